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
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

# Importing the generator modules registers their tasks.
from sparse_lens.tasks import control_flow, definitions, delimiters, variables  # noqa: F401
from sparse_lens.tasks.base import TASK_NAMES, Example, TaskSpec, get_spec, list_tasks
from sparse_lens.tasks.dataset import TaskData
from sparse_lens.tasks.generation import (
    SPLITS, check_example_syntax, compiles, generate_examples, split_of, validate_request,
)
from sparse_lens.tasks.metrics import final_logits, task_accuracy, task_logit_diff, task_loss

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = [
    "TASK_NAMES", "SPLITS", "Example", "TaskSpec", "TaskData", "list_tasks", "get_task", "get_spec",
    "generate_examples", "check_example_syntax", "compiles", "split_of", "final_logits",
    "task_logit_diff", "task_loss", "task_accuracy",
]


@functools.lru_cache(maxsize=1)
def _default_tokenizer() -> PreTrainedTokenizerBase:
    from sparse_lens.tokenizer import load_tokenizer

    return load_tokenizer()


def get_task(name: str, tokenizer: PreTrainedTokenizerBase | None = None, n: int = 256,
             seed: int = 0, split: str = "train", n_ctx: int | None = None) -> TaskData:
    """`n` examples of the task `name` (see `list_tasks()`) from `split` ("train" or "test"),
    tokenized with `tokenizer` (default: the shipped tokenizer, `load_tokenizer()`).

    Deterministic in (name, seed, split), and a smaller `n` gives a prefix of a larger one's
    examples. Classes alternate 0, 1, 0, ... (so even-sized slices are balanced). Train and
    test prompts never overlap. Raises ValueError for an unknown name (listing the known
    ones), a non-positive `n` or an unknown split, and (with a model's context `n_ctx`) when a
    prompt is longer than `n_ctx` tokens."""
    spec = get_spec(name)
    validate_request(n, split)
    if tokenizer is None:
        tokenizer = _default_tokenizer()
    examples = generate_examples(name, n=n, seed=seed, split=split, tokenizer=tokenizer)
    data = TaskData.from_examples(spec, examples, tokenizer)
    return data if n_ctx is None else data.check_fits(n_ctx)
