"""Tasks about closing what was opened: string quotes and brackets.

single_double_quote, bracket_counting, fstring_brace, bracket_brace.
"""

from __future__ import annotations

import random

from sparse_lens.tasks.base import Example, register
from sparse_lens.tasks.snippets import (
    FUNC_NAMES, NAMES, WORDS, filler_lines, int_literal, join_lines, phrase, str_literal,
)

#: Where a string or a bracketed literal can start, and what closes that construct afterwards.
_EXPRESSION_SLOTS: tuple[tuple[str, str], ...] = (
    ("{v} = ", ""), ("print(", ")"), ("raise ValueError(", ")"), ("logger.warning(", ")"),
    ("{v}.append(", ")"), ("{f}(", ")"), ("assert {v} == ", ""),
)

_APOSTROPHE_WORDS = ("can't", "don't", "user's", "isn't", "won't")


def _slot(rng: random.Random) -> tuple[str, str]:
    """A random (opener, closer) pair from `_EXPRESSION_SLOTS` with its names filled in."""
    opener, closer = rng.choice(_EXPRESSION_SLOTS)
    return opener.format(v=rng.choice(NAMES), f=rng.choice(FUNC_NAMES)), closer


def _string_body(rng: random.Random, quote: str) -> str:
    """String contents that never contain `quote` but sometimes the other quote character
    (`don't` inside "...", `"name"` inside '...'), and never end with a quote or a space."""
    words = [rng.choice(WORDS) for _ in range(rng.randint(1, 4))]
    if rng.random() < 0.35:
        inner = rng.choice(_APOSTROPHE_WORDS) if quote == '"' else f'"{rng.choice(WORDS)}"'
        words.insert(rng.randrange(len(words)), inner)  # never last: a plain word follows
    return " ".join(words)


@register("single_double_quote",
          "close a string with the quote it was opened with: ' vs \" (no other quote anywhere)",
          hard_adds="the other quote inside the string (don't in \"...\", \"name\" in '...'), a "
          "complete string of the other quote on an earlier line, strings in the filler")
def single_double_quote(rng: random.Random, label: int, hard: bool = True) -> Example:
    quote, other = ("'", '"') if label == 0 else ('"', "'")
    opener, closer = _slot(rng)
    lines = filler_lines(rng, 0, 0, 2 if hard else 3, without="" if hard else "'\"")
    if hard and rng.random() < 0.5:  # an earlier, complete string with the other quote
        lines.insert(rng.randint(0, len(lines)), f"{rng.choice(NAMES)} = {str_literal(rng, other)}")
    body = _string_body(rng, quote) if hard else phrase(rng, 1, 5)
    prompt = join_lines(lines) + opener + quote + body
    return Example(prompt, quote, other, suffix=closer + "\n", label=label, contrast_invalid=True)


def _scalars(rng: random.Random, kind: str, low: int, high: int) -> list[str]:
    """`low..high` scalar list elements of one kind: ints, strings or names."""
    n = rng.randint(low, high)
    if kind == "int":
        return [int_literal(rng) for _ in range(n)]
    if kind == "str":
        quote = rng.choice("'\"")
        return [f"{quote}{rng.choice(WORDS)}{quote}" for _ in range(n)]
    return [rng.choice(NAMES) for _ in range(n)]


@register("bracket_counting",
          "close a list literal with ] (depth 1) or ]] (still inside an inner list opened after "
          "0-2 scalars)",
          hard_adds="complete inner lists before the open one (so the depth must be counted, not "
          "just seen), lists in the filler")
def bracket_counting(rng: random.Random, label: int, hard: bool = True) -> Example:
    kind = rng.choice(["int", "str", "name"])
    if hard:
        items = [f"[{', '.join(_scalars(rng, kind, 1, 3))}]" if rng.random() < 0.6
                 else _scalars(rng, kind, 1, 1)[0] for _ in range(rng.randint(0, 2))]
    else:
        items = _scalars(rng, kind, 0, 2)
    if label == 1:  # end inside an unfinished inner list
        items.append("[" + ", ".join(_scalars(rng, kind, 1, 3)))
    else:
        items.extend(_scalars(rng, kind, 1, 3))
    opener, closer = _slot(rng)
    correct, contrast = ("]]", "]") if label == 1 else ("]", "]]")
    filler = filler_lines(rng, 0, 0, 2, without="" if hard else "[]")
    prompt = join_lines(filler) + opener + "[" + ", ".join(items)
    return Example(prompt, correct, contrast, suffix=closer + "\n", label=label, contrast_invalid=True)


_CALLS = ("print(", "logger.info(", "log(", "self.emit(", "warnings.warn(", "out.write(")
_ATTRIBUTES = ("name", "value", "path", "size", "count", "status", "id", "text")


def _field_expression(rng: random.Random) -> str:
    """An expression that ends with an identifier: `total`, `self.name`, `user.path`."""
    form = rng.randrange(3)
    if form == 0:
        return rng.choice(NAMES)
    base = "self" if form == 1 else rng.choice(NAMES)
    return f"{base}.{rng.choice(_ATTRIBUTES)}"


@register("fstring_brace",
          "after an expression, close an f-string replacement field with } or a call's argument "
          "list with ); both kinds of prompt sit inside a call",
          hard_adds="a complete replacement field earlier in the f-string, and a complete f-string "
          "(with its {...}) as an earlier argument of the call")
def fstring_brace(rng: random.Random, label: int, hard: bool = True) -> Example:
    call, quote, text = rng.choice(_CALLS), rng.choice("'\""), phrase(rng, 1, 3)
    if label == 0:  # inside {...} of an f-string
        done = f"{{{_field_expression(rng)}}} " if hard and rng.random() < 0.4 else ""
        line = f"{call}f{quote}{done}{text}: {{{_field_expression(rng)}"
        correct, contrast, suffix = "}", ")", quote + ")\n"
    else:  # a plain argument list, possibly after a complete f-string argument
        head = f"f{quote}{text} {{{_field_expression(rng)}}}{quote}" if hard and rng.random() < 0.4 \
            else f"{quote}{text}:{quote}"
        line = f"{call}{head}, {_field_expression(rng)}"
        correct, contrast, suffix = ")", "}", "\n"
    prompt = join_lines(filler_lines(rng, 0, 0, 2)) + line
    return Example(prompt, correct, contrast, suffix, label=label, contrast_invalid=True)


def _dict_literal(rng: random.Random, complete: bool) -> str:
    """`{"key": 1, ...`, closed with } when `complete`; an open one's earlier values may be
    complete small lists."""
    quote = rng.choice("'\"")
    keys = rng.sample(WORDS, rng.randint(1, 3))
    values = [int_literal(rng) for _ in keys]
    for i in range(len(keys) - 1):  # the open literal's last value stays a scalar
        if not complete and rng.random() < 0.4:
            values[i] = f"[{int_literal(rng)}, {int_literal(rng)}]"
    body = ", ".join(f"{quote}{k}{quote}: {v}" for k, v in zip(keys, values))
    return "{" + body + ("}" if complete else "")


def _flat_collection(rng: random.Random, label: int) -> tuple[str, str, str]:
    """Core bracket_brace: an open list (label 0) or dict / set (label 1) of scalars of one kind,
    and its (correct, contrast) closers."""
    kind = rng.choice(["int", "str", "name"])
    if label == 0:
        return "[" + ", ".join(_scalars(rng, kind, 1, 4)), "]", "}"
    if rng.random() < 0.6:
        quote = rng.choice("'\"")
        keys, values = rng.sample(WORDS, rng.randint(1, 3)), _scalars(rng, kind, 3, 3)
        return "{" + ", ".join(f"{quote}{k}{quote}: {v}" for k, v in zip(keys, values)), "}", "]"
    return "{" + ", ".join(_scalars(rng, kind, 1, 4)), "}", "]"


@register("bracket_brace",
          "close a collection literal of scalars with ] (a list) or } (a dict or set)",
          hard_adds="complete literals of the other kind nested inside (dicts in the list, lists "
          "as dict values); lists only of scalars, dicts with int values, sets of ints")
def bracket_brace(rng: random.Random, label: int, hard: bool = True) -> Example:
    if not hard:
        literal, correct, contrast = _flat_collection(rng, label)
        opener, closer = _slot(rng)
        prompt = join_lines(filler_lines(rng, 0, 0, 2, without="[]{}")) + opener + literal
        return Example(prompt, correct, contrast, suffix=closer + "\n", label=label,
                       contrast_invalid=True)
    if label == 0:  # a list, possibly holding complete dicts
        items = [_dict_literal(rng, True) for _ in range(rng.randint(0, 1))]
        items += _scalars(rng, rng.choice(["int", "str", "name"]), 1, 3)
        literal, correct, contrast = "[" + ", ".join(items), "]", "}"
    elif rng.random() < 0.7:  # a dict, its earlier values possibly complete lists
        literal, correct, contrast = _dict_literal(rng, False), "}", "]"
    else:  # a set
        literal, correct, contrast = "{" + ", ".join(_scalars(rng, "int", 1, 4)), "}", "]"
    opener, closer = _slot(rng)
    prompt = join_lines(filler_lines(rng, 0, 0, 2)) + opener + literal
    return Example(prompt, correct, contrast, suffix=closer + "\n", label=label, contrast_invalid=True)
