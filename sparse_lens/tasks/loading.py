"""`get_task`: a task's examples, generated at a level or taken from real code, as `TaskData`."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

# Importing the generator modules registers their tasks.
from sparse_lens.tasks import control_flow, definitions, delimiters, variables  # noqa: F401
from sparse_lens.tasks.base import get_spec
from sparse_lens.tasks.corpus import corpus_examples
from sparse_lens.tasks.dataset import TaskData
from sparse_lens.tasks.generation import generate_examples, validate_request

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

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
