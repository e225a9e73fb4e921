"""What a task is: `Example` (one prompt and its two candidate next tokens), `TaskSpec` (a named
generator of examples) and the registry that `get_task` / `list_tasks` read.

Every task is a binary next-token choice. A generator is a function
`(rng, label, hard) -> Example` that draws one example of class `label` (0 or 1) from a seeded
`random.Random`; the two classes swap the roles of the two answers, so balanced data cannot be
solved by always predicting one token. The generators live in the themed modules of this package
and register themselves with `@register(...)`; `TASK_NAMES` fixes the canonical order.

Levels (`LEVELS`): every task has a *core* level, the behaviour the paper names, varied (names,
literals, lengths, surrounding lines) but without adversarial distractors, and a *hard* level
(`hard=True`: the original generators, unchanged) that adds distractors; `TaskSpec.hard_adds`
says which. `get_spec(name, level)` returns the level's spec. A core task that a last-token-only
predictor solves (`tasks.guard`) carries the reason in `TaskSpec.too_easy`.
"""

from __future__ import annotations

import functools
import random
from collections.abc import Callable
from dataclasses import dataclass

#: The paper's 20 tasks, in the order `list_tasks()` returns them.
TASK_NAMES: tuple[str, ...] = (
    "single_double_quote", "bracket_counting", "set_or_string", "set_or_string_fixedvarname",
    "with_as", "with_open", "for_while", "else_elif", "if_ternary", "if_equals", "fstring_brace",
    "bracket_brace", "var_swap", "var_if", "indent_for", "while_return_true", "lambda_func",
    "enumerate_range", "final_kwarg", "class_init",
)

#: No task prompt may be longer than this many tokens (the models have n_ctx 64-256).
MAX_PROMPT_TOKENS_LIMIT = 120


@dataclass(frozen=True)
class Example:
    """One task example.

    `prompt + correct + suffix` is complete, compilable Python (checked at generation time).
    When `contrast_invalid`, `prompt + contrast + suffix` must *not* compile: the contrast token
    is then provably wrong in this context, not merely unconventional. `label` (0/1) is the
    example's class; the classes swap the roles of the two answers."""

    prompt: str
    correct: str
    contrast: str
    suffix: str
    label: int
    contrast_invalid: bool = False

    @property
    def correct_program(self) -> str:
        return self.prompt + self.correct + self.suffix

    @property
    def contrast_program(self) -> str:
        return self.prompt + self.contrast + self.suffix


#: The generated levels of every task, the default first.
LEVELS: tuple[str, ...] = ("core", "hard")

Generator = Callable[[random.Random, int], Example]
LevelledGenerator = Callable[[random.Random, int, bool], Example]


@dataclass(frozen=True)
class TaskSpec:
    """A named task at one level: its generator `(rng, label) -> Example`, a one-line
    description, its prompt-length budget, what the hard level adds to the core one, and (core
    only) why the task is too easy for a last-token-only predictor, if it is."""

    name: str
    description: str
    generate: Generator
    max_prompt_tokens: int = 64
    level: str = "hard"
    hard_adds: str = ""
    too_easy: str = ""

    def __post_init__(self):
        if not 1 <= self.max_prompt_tokens <= MAX_PROMPT_TOKENS_LIMIT:
            raise ValueError(f"task {self.name!r}: max_prompt_tokens={self.max_prompt_tokens} "
                             f"must be in [1, {MAX_PROMPT_TOKENS_LIMIT}]")
        check_level(self.level)


_REGISTRY: dict[tuple[str, str], TaskSpec] = {}


def check_level(level: str) -> None:
    """ValueError unless `level` is one of `LEVELS`."""
    if level not in LEVELS:
        raise ValueError(f"level must be one of {LEVELS}, got {level!r}")


def register(name: str, description: str, max_prompt_tokens: int = 64, *, hard_adds: str,
             too_easy: str = "") -> Callable[[LevelledGenerator], LevelledGenerator]:
    """Decorator: register `generate(rng, label, hard) -> Example` as the task `name`, at the
    core level (`hard=False`, described by `description`) and the hard level (`hard=True`,
    which adds `hard_adds`)."""
    if name not in TASK_NAMES:
        raise ValueError(f"{name!r} is not one of the task names {TASK_NAMES}")

    def decorate(generate: LevelledGenerator) -> LevelledGenerator:
        if (name, "core") in _REGISTRY:
            raise ValueError(f"task {name!r} is registered twice")
        for level in LEVELS:
            hard = level == "hard"
            text = f"{description}; hard level: {hard_adds}" if hard else description
            _REGISTRY[name, level] = TaskSpec(
                name, text, functools.partial(generate, hard=hard), max_prompt_tokens, level,
                hard_adds, "" if hard else too_easy)
        return generate

    return decorate


def get_spec(name: str, level: str = "core") -> TaskSpec:
    """The registered `TaskSpec` called `name` at `level`; ValueError listing the known names
    (or levels) otherwise."""
    check_level(level)
    if (name, level) not in _REGISTRY:
        raise ValueError(f"unknown task {name!r}; known tasks: {', '.join(list_tasks())}")
    return _REGISTRY[name, level]


def list_tasks() -> list[str]:
    """The names of the registered tasks, in the paper's order (`TASK_NAMES`)."""
    return [name for name in TASK_NAMES if (name, "core") in _REGISTRY]
