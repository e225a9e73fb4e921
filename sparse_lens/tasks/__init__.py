"""The paper's 20 binary next-token Python tasks (Gao et al. 2025, arXiv 2511.13653).

    from sparse_lens.tasks import get_task, list_tasks, task_loss, task_accuracy

    data = get_task("single_double_quote", n=256, seed=0, split="train")
    logits = model(data.tokens)                 # [batch, pos, d_vocab]
    task_loss(logits, data), task_accuracy(logits, data)

Each task prompt ends right before a token that has exactly two plausible values (for example
the closing quote `'` vs `"`); `data.correct` is the right one and `data.contrast` the other.
Examples are balanced (the two classes swap the roles of the answers), the train and test splits
are disjoint, and every example is checked: each candidate is one token in context, and the
prompt completed with the correct token (plus a task-specific suffix) compiles as Python.
`TaskData.from_prompts` builds hand-made task data with the same checks.

Levels: `level="core"` (the default) is the behaviour the paper names, without adversarial
distractors; `level="hard"` adds them (`get_spec(name, "hard").hard_adds` says what).
`source="corpus"` takes real instances from a corpus's files instead (`tasks.corpus`; the quote
and bracket tasks). `last_token_accuracy` measures how far a last-token-only predictor gets
(a core task above `TOO_EASY_ACCURACY` is too easy), and `evaluate_levels` tabulates a model's
task loss and accuracy at every level.
"""

from __future__ import annotations

# Importing the generator modules registers their tasks.
from sparse_lens.tasks import control_flow, definitions, delimiters, variables  # noqa: F401
from sparse_lens.tasks.base import LEVELS, TASK_NAMES, Example, TaskSpec, check_level, get_spec, list_tasks
from sparse_lens.tasks.corpus import (
    CORPUS_TASKS, corpus_class_counts, corpus_examples, default_corpus_files,
)
from sparse_lens.tasks.dataset import TaskData
from sparse_lens.tasks.generation import (
    SPLITS, check_example_syntax, compiles, generate_examples, split_of, validate_request,
)
from sparse_lens.tasks.guard import TOO_EASY_ACCURACY, last_token_accuracy
from sparse_lens.tasks.loading import SOURCES, get_task
from sparse_lens.tasks.metrics import final_logits, task_accuracy, task_logit_diff, task_loss

__all__ = [
    "TASK_NAMES", "SPLITS", "Example", "TaskSpec", "TaskData", "list_tasks", "get_task", "get_spec",
    "generate_examples", "check_example_syntax", "compiles", "split_of", "final_logits",
    "task_logit_diff", "task_loss", "task_accuracy", "LEVELS", "SOURCES", "CORPUS_TASKS",
    "corpus_examples", "corpus_class_counts", "default_corpus_files", "TOO_EASY_ACCURACY", "last_token_accuracy",
    "bigram_guard", "evaluate_levels",
]

def __getattr__(name: str):
    # evaluation imports pandas: only when asked for
    if name in ("evaluate_levels", "bigram_guard"):
        from sparse_lens.tasks import evaluation

        return getattr(evaluation, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
