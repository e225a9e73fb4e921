"""Task instances from real code: every place in a corpus's files where a task's answer occurs.

    get_task("single_double_quote", source="corpus")          # the stdlib validation files
    get_task("bracket_brace", source="corpus", corpus=["my_project/"])

Real code is the ground truth beside the generated levels. Extraction reads each file with
Python's own `tokenize` (so strings, comments and brackets are told apart exactly) and keeps
only files that compile, so the real continuation is valid Python by construction:

- `single_double_quote`: the closing quote of every one-line string (any prefix: r, b, f, ...;
  triple-quoted strings are skipped); the contrast is the other quote.
- `bracket_counting`: a `]` followed directly by another `]` (answer `]]`, contrast `]`), or a
  `]` whose enclosing bracket is not `[` (answer `]`; `]]` would not parse). Real code's `]]` is
  mostly nested indexing (`a[b[i]]`), not nested list literals.
- `bracket_brace`: every closing `]` or `}` (the other is the contrast; it would not parse).

A prompt is the text before the answer, from the start of a line: up to `_CONTEXT_LINES` lines
and at most the task's `max_prompt_tokens` tokens. Instances whose answer is not a single
token in context (`TaskData`'s check) are dropped, prompts are deduplicated, the split is
`split_of(prompt)` (disjoint, as for generated tasks), and classes alternate 0, 1, 0, ... from
a seeded shuffle of each class, so a smaller `n` gives a prefix of a larger one.
"""

from __future__ import annotations

import io
import random
import tokenize
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from sparse_lens.tasks.generation import compiles, split_of, validate_request

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

#: The tasks with a corpus source, in `TASK_NAMES` order.
CORPUS_TASKS: tuple[str, ...] = ("single_double_quote", "bracket_counting", "bracket_brace")

_CONTEXT_LINES = 4  # lines of context before the answer, at most (fewer if over the token budget)
_CLOSERS = {"]": "[", ")": "(", "}": "{"}


@dataclass(frozen=True)
class CorpusInstance:
    """One real occurrence of a task's answer: the text before it, the two candidates, the class."""

    prompt: str
    correct: str
    contrast: str
    label: int


def default_corpus_files() -> list[Path]:
    """The standard library's validation files: the default corpus's held-out split, exactly
    as `sparse-lens train` splits it (`data.split_train_val`, 2% of files by a path hash)."""
    from sparse_lens import data

    return data.split_train_val(data.stdlib_source_files())[1]


def corpus_examples(name: str, tokenizer: PreTrainedTokenizerBase, n: int = 256, seed: int = 0,
                    split: str = "train", files: Sequence[str | Path] | None = None,
                    max_prompt_tokens: int = 64) -> list[CorpusInstance]:
    """`n` real instances of task `name` from `files` (default `default_corpus_files()`; any
    entry `data.resolve_source_files` accepts), classes alternating 0, 1, 0, ...; see the module
    docstring. ValueError for a task without a corpus source or a corpus with too few instances."""
    validate_request(n, split)
    by_class = _by_class(name, tokenizer, split, files, max_prompt_tokens)
    rng = random.Random(f"sparse_lens.tasks/{name}/corpus/{split}/{seed}")
    for group in by_class:
        rng.shuffle(group)
    wanted = (n + 1) // 2, n // 2
    if len(by_class[0]) < wanted[0] or len(by_class[1]) < wanted[1]:
        raise ValueError(f"task {name!r}: the corpus has only {len(by_class[0])} + "
                         f"{len(by_class[1])} {split} instances of the two classes; {wanted[0]} + "
                         f"{wanted[1]} requested (see corpus_class_counts)")
    return [by_class[i % 2][i // 2] for i in range(n)]


def corpus_class_counts(name: str, tokenizer: PreTrainedTokenizerBase, split: str = "train",
                        files: Sequence[str | Path] | None = None,
                        max_prompt_tokens: int = 64) -> tuple[int, int]:
    """How many distinct `split` instances of each class the corpus holds (so the largest
    balanced `n` is twice the smaller count)."""
    validate_request(1, split)
    by_class = _by_class(name, tokenizer, split, files, max_prompt_tokens)
    return len(by_class[0]), len(by_class[1])


def _by_class(name: str, tokenizer: PreTrainedTokenizerBase, split: str,
              files: Sequence[str | Path] | None, max_prompt_tokens: int) -> list[list[CorpusInstance]]:
    """The distinct checked instances of `split`, by class, in file order."""
    from sparse_lens import data

    if name not in CORPUS_TASKS:
        raise ValueError(f"task {name!r} has no corpus source; tasks with one: {', '.join(CORPUS_TASKS)}")
    paths = default_corpus_files() if files is None else data.resolve_source_files(files)
    by_class: list[list[CorpusInstance]] = [[], []]
    seen: set[str] = set()
    for instance in _checked(list(_instances(name, paths)), tokenizer, max_prompt_tokens):
        if instance.prompt not in seen and split_of(instance.prompt) == split:
            seen.add(instance.prompt)
            by_class[instance.label].append(instance)
    return by_class


# ---------------------------------------------------------------------- finding answers in a file
def _instances(name: str, paths: Sequence[Path]) -> Iterator[CorpusInstance]:
    """Every candidate instance of `name` in the files that compile, in file order."""
    find = {"single_double_quote": _quote_answers, "bracket_counting": _bracket_depth_answers,
            "bracket_brace": _closer_answers}[name]
    for path in paths:
        text = Path(path).read_text(encoding="utf-8", errors="replace")
        if not compiles(text):
            continue
        try:
            tokens = list(tokenize.generate_tokens(io.StringIO(text).readline))
        except (tokenize.TokenError, SyntaxError):
            continue
        line_starts = _line_starts(text)
        for (row, col), correct, contrast, label in find(tokens):
            prompt = _context(text, line_starts, row, col)
            if prompt is not None:
                yield CorpusInstance(prompt, correct, contrast, label)


def _line_starts(text: str) -> list[int]:
    """Offset of the first character of each line (index 0 is line 1)."""
    starts = [0]
    for line in io.StringIO(text):
        starts.append(starts[-1] + len(line))
    return starts


def _context(text: str, line_starts: list[int], row: int, col: int) -> str | None:
    """The up to `_CONTEXT_LINES` lines before (row, col), from a line start; None if the
    answer's own line starts with nothing before it (no prompt)."""
    first = max(1, row - _CONTEXT_LINES + 1)
    prompt = text[line_starts[first - 1]:line_starts[row - 1] + col]
    return prompt if prompt.strip() else None


def _quote_answers(tokens: list[tokenize.TokenInfo]):
    """(position, correct, contrast, label) of the closing quote of every one-line string."""
    for tok in tokens:
        if tok.type != tokenize.STRING or tok.start[0] != tok.end[0]:
            continue
        body = tok.string.lstrip("rRbBuUfF")
        quote = body[0]
        if body.startswith(quote * 3) or quote not in "'\"":
            continue
        other = '"' if quote == "'" else "'"
        yield (tok.end[0], tok.end[1] - 1), quote, other, 0 if quote == "'" else 1


def _closing_brackets(tokens: list[tokenize.TokenInfo]):
    """(index, token, the bracket enclosing it after it closes or None) for every closer."""
    stack: list[str] = []
    for i, tok in enumerate(tokens):
        if tok.type != tokenize.OP:
            continue
        if tok.string in "([{":
            stack.append(tok.string)
        elif tok.string in _CLOSERS and stack:
            stack.pop()
            yield i, tok, stack[-1] if stack else None


def _bracket_depth_answers(tokens: list[tokenize.TokenInfo]):
    """`]]` where two `]` follow each other directly; `]` where `]]` could not parse."""
    for i, tok, enclosing in _closing_brackets(tokens):
        if tok.string != "]":
            continue
        after = tokens[i + 1] if i + 1 < len(tokens) else None
        if after is not None and after.string == "]" and after.start == tok.end:
            yield tok.start, "]]", "]", 1
        elif enclosing != "[":
            yield tok.start, "]", "]]", 0


def _closer_answers(tokens: list[tokenize.TokenInfo]):
    """Every closing `]` (label 0) or `}` (label 1)."""
    for _, tok, _ in _closing_brackets(tokens):
        if tok.string == "]":
            yield tok.start, "]", "}", 0
        elif tok.string == "}":
            yield tok.start, "}", "]", 1


# ---------------------------------------------------------------------- the TaskData checks
def _encode(tokenizer: PreTrainedTokenizerBase, texts: list[str]) -> list[list[int]]:
    return tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []


def _checked(instances: list[CorpusInstance], tokenizer: PreTrainedTokenizerBase,
             max_prompt_tokens: int) -> Iterator[CorpusInstance]:
    """The instances whose prompt fits `max_prompt_tokens` (dropping leading lines if needed)
    and whose two candidates are single tokens in context (tokenized in batches)."""
    candidates = sorted({c for i in instances for c in (i.correct, i.contrast)})
    single = {c: ids[0] for c, ids in zip(candidates, _encode(tokenizer, candidates)) if len(ids) == 1}
    instances = [i for i in instances if i.correct in single and i.contrast in single]
    prompts = [i.prompt for i in instances]
    for k, ids in enumerate(_encode(tokenizer, prompts)):
        if len(ids) > max_prompt_tokens:
            prompts[k] = _fit(prompts[k], tokenizer, max_prompt_tokens)
    kept = [(p, i) for p, i in zip(prompts, instances) if p is not None]
    texts = [p + c for p, i in kept for c in ("", i.correct, i.contrast)]
    ids = _encode(tokenizer, texts)
    for k, (prompt, instance) in enumerate(kept):
        base, with_correct, with_contrast = ids[3 * k:3 * k + 3]
        if with_correct == base + [single[instance.correct]] and \
                with_contrast == base + [single[instance.contrast]]:
            yield CorpusInstance(prompt, instance.correct, instance.contrast, instance.label)


def _fit(prompt: str, tokenizer: PreTrainedTokenizerBase, max_tokens: int) -> str | None:
    """`prompt` without as few leading lines as it takes to fit `max_tokens`; None if even its
    last line is too long (all the shorter versions are tokenized in one batch)."""
    starts = [k + 1 for k, char in enumerate(prompt) if char == "\n"]
    shorter = [prompt[k:] for k in starts if prompt[k:].strip()]
    for text, ids in zip(shorter, _encode(tokenizer, shorter)):
        if len(ids) <= max_tokens:
            return text
    return None
