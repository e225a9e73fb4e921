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

import functools
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

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
from sparse_lens.tasks.metrics import final_logits, task_accuracy, task_logit_diff, task_loss

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = [
    "TASK_NAMES", "SPLITS", "Example", "TaskSpec", "TaskData", "list_tasks", "get_task", "get_spec",
    "generate_examples", "check_example_syntax", "compiles", "split_of", "final_logits",
    "task_logit_diff", "task_loss", "task_accuracy", "LEVELS", "SOURCES", "CORPUS_TASKS",
    "corpus_examples", "corpus_class_counts", "default_corpus_files", "TOO_EASY_ACCURACY", "last_token_accuracy",
    "bigram_guard", "evaluate_levels",
]

#: Where task examples come from: the generators, or real code.
SOURCES = ("generated", "corpus")


@functools.lru_cache(maxsize=1)
def _default_tokenizer() -> PreTrainedTokenizerBase:
    from sparse_lens.tokenizer import load_tokenizer

    return load_tokenizer()


def get_task(name: str, tokenizer: PreTrainedTokenizerBase | None = None, n: int = 256,
             seed: int = 0, split: str = "train", level: str = "core", source: str = "generated",
             corpus: Sequence[str | Path] | None = None, n_ctx: int | None = None) -> TaskData:
    """`n` examples of the task `name` (see `list_tasks()`) from `split` ("train" or "test"),
    tokenized with `tokenizer` (default: the shipped tokenizer, `load_tokenizer()`).

    `level`: "core" (default) or "hard" (the core behaviour plus distractors). `source`:
    "generated" (default) or "corpus", real instances from the files `corpus` (default: the
    standard library's validation split; only for `CORPUS_TASKS`, and then `level` must stay
    "core": real code has no levels). Deterministic in (name, level, source, seed, split), and a
    smaller `n` gives a prefix of a larger one's examples. Classes alternate 0, 1, 0, ... (so
    even-sized slices are balanced). Train and test prompts never overlap. Raises ValueError
    for an unknown name (listing the known ones), level or source, a non-positive `n` or an
    unknown split, and (with a model's context `n_ctx`) when a prompt is longer than `n_ctx` tokens."""
    spec = get_spec(name, level)
    validate_request(n, split)
    if source not in SOURCES:
        raise ValueError(f"source must be one of {SOURCES}, got {source!r}")
    if tokenizer is None:
        tokenizer = _default_tokenizer()
    if source == "corpus":
        if level != "core":
            raise ValueError(f"level={level!r} is for generated tasks; corpus instances have no levels")
        found = corpus_examples(name, tokenizer, n=n, seed=seed, split=split, files=corpus,
                                max_prompt_tokens=spec.max_prompt_tokens)
        data = TaskData.from_prompts(
            name, [e.prompt for e in found], [e.correct for e in found], [e.contrast for e in found],
            tokenizer, description=f"{spec.description} (real code)", labels=[e.label for e in found],
            max_prompt_tokens=spec.max_prompt_tokens)
        return data if n_ctx is None else data.check_fits(n_ctx)
    if corpus is not None:
        raise ValueError("corpus= is only read with source='corpus'")
    examples = generate_examples(name, n=n, seed=seed, split=split, tokenizer=tokenizer, level=level)
    data = TaskData.from_examples(spec, examples, tokenizer)
    return data if n_ctx is None else data.check_fits(n_ctx)


def __getattr__(name: str):
    # evaluation imports pandas: only when asked for
    if name in ("evaluate_levels", "bigram_guard"):
        from sparse_lens.tasks import evaluation

        return getattr(evaluation, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
