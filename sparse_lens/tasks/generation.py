"""Drawing a task's examples: balanced classes, disjoint train/test splits, no duplicates, and a
syntax check of every example.

Splits: a prompt belongs to the test split when a CRC-32 of its text falls in one bucket out of
`SPLIT_BUCKETS`, otherwise to train. The split is thus a property of the prompt itself, so train
and test are disjoint for every seed and every `n` (the two splits also use separate random
streams). Within a split, prompts are unique; classes alternate 0, 1, 0, 1, ... so any even-sized
contiguous slice is balanced. Given a tokenizer, prompts longer than the task's
`max_prompt_tokens` are skipped like duplicates (the generators keep that rare).
"""

from __future__ import annotations

import random
import warnings
import zlib
from typing import TYPE_CHECKING

from sparse_lens.tasks.base import Example, TaskSpec, get_spec

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

SPLITS = ("train", "test")
SPLIT_BUCKETS = 4  # one bucket in 4 is test: about a quarter of all prompts
_ATTEMPTS_PER_EXAMPLE = 200


def split_of(prompt: str) -> str:
    """The split ("train" or "test") a prompt belongs to, from a hash of its text."""
    return "test" if zlib.crc32(prompt.encode("utf-8")) % SPLIT_BUCKETS == 0 else "train"


def compiles(source: str) -> bool:
    """Whether `source` compiles as a Python module (stricter than ast.parse: it also rejects
    e.g. `return` outside a function)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            compile(source, "<task>", "exec", dont_inherit=True)
    except SyntaxError:
        return False
    return True


def check_example_syntax(example: Example, task: str = "?") -> None:
    """Raise ValueError unless `prompt + correct + suffix` compiles and, when the example says
    `contrast_invalid`, `prompt + contrast + suffix` does not."""
    if not compiles(example.correct_program):
        raise ValueError(f"task {task!r}: the correct continuation does not give valid Python:\n"
                         f"{example.correct_program}")
    if example.contrast_invalid and compiles(example.contrast_program):
        raise ValueError(f"task {task!r}: the contrast continuation unexpectedly gives valid Python:\n"
                         f"{example.contrast_program}")


def validate_request(n: int, split: str) -> None:
    """ValueError for an `n` that is not a positive int or a `split` not in SPLITS."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive integer, got {n!r}")
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")


def _draw(spec: TaskSpec, rng: random.Random, label: int) -> Example:
    example = spec.generate(rng, label)
    if example.label != label:
        raise RuntimeError(f"task {spec.name!r}: asked for class {label}, got {example.label}")
    return example


def _too_long(spec: TaskSpec, prompt: str, tokenizer: PreTrainedTokenizerBase | None) -> bool:
    if tokenizer is None:
        return False
    return len(tokenizer(prompt, add_special_tokens=False)["input_ids"]) > spec.max_prompt_tokens


def generate_examples(name: str, n: int = 256, seed: int = 0, split: str = "train",
                      tokenizer: PreTrainedTokenizerBase | None = None,
                      level: str = "core") -> list[Example]:
    """`n` distinct examples of task `name` at `level` ("core" or "hard") from `split`, classes
    alternating 0, 1, 0, ...; deterministic in (name, level, seed, split, tokenizer), and a
    smaller `n` gives a prefix of a larger one's examples. With a `tokenizer`, prompts longer
    than the task's `max_prompt_tokens` are skipped. Every example passes
    `check_example_syntax`. The hard level draws exactly the examples it drew before levels
    existed (same random stream)."""
    validate_request(n, split)
    spec = get_spec(name, level)
    stream = f"{name}/{split}/{seed}" if level == "hard" else f"{name}/{level}/{split}/{seed}"
    rng = random.Random(f"sparse_lens.tasks/{stream}")
    examples: list[Example] = []
    seen: set[str] = set()
    for _ in range(_ATTEMPTS_PER_EXAMPLE * n):
        example = _draw(spec, rng, label=len(examples) % 2)
        if (split_of(example.prompt) != split or example.prompt in seen
                or _too_long(spec, example.prompt, tokenizer)):
            continue
        check_example_syntax(example, name)
        seen.add(example.prompt)
        examples.append(example)
        if len(examples) == n:
            return examples
    raise RuntimeError(f"task {name!r}: found only {len(examples)} distinct {split} prompts "
                       f"of the {n} requested")
