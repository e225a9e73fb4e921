"""Shared building blocks for the task generators: realistic identifiers, literals, filler
statements and indentation, all drawn from a seeded `random.Random`.

Indentation and the tokenizer: whitespace is pre-tokenised GPT-2 style, so in
`"\\n        total"` the last space belongs to the next token (` total`). A prompt that stops
just before an indented token with a leading space therefore ends with `4 * level - 1` spaces
(`target_indent`), and the prompt's tokens plus the target's token then equal the tokens of the
whole line.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

#: Common variable names (any tokenization; used in prompts, never as targets).
NAMES: tuple[str, ...] = (
    "items", "values", "result", "data", "names", "count", "total", "index", "path", "line",
    "lines", "text", "key", "value", "node", "nodes", "parts", "words", "buf", "size", "config",
    "options", "entry", "record", "rows", "queue", "stack", "state", "status", "message",
    "prefix", "width", "offset", "limit", "level", "depth", "matches", "seen", "tokens",
    "fields", "headers", "args", "output", "source", "target", "name", "chunk", "row", "col",
    "pending", "errors", "labels", "scores", "parent", "children", "counts", "keys", "paths",
)

#: Names that are one token *with* a leading space (` name`): usable as next-token targets.
TOKEN_NAMES: tuple[str, ...] = (
    "x", "y", "z", "a", "b", "c", "i", "j", "k", "n", "m", "s", "t", "v", "w", "d", "p", "q",
    "name", "value", "data", "result", "path", "key", "item", "index", "node", "text", "line",
    "lines", "size", "msg", "message", "obj", "values", "out", "output", "res", "temp", "col",
    "stack", "start", "end", "first", "last", "cur", "current", "other", "source", "filename",
    "stream", "config", "state", "mode", "flags", "err", "error", "errors", "char", "token",
    "names", "handle", "number", "default", "timeout", "root", "child", "module", "func",
    "handler", "method", "attr", "match", "prefix", "header", "url", "user",
)

FUNC_NAMES: tuple[str, ...] = (
    "process", "load", "parse", "update", "handle", "build", "compute", "render", "check",
    "convert", "collect", "format_row", "read_config", "get_value", "make_key", "normalize",
    "split_line", "merge", "validate", "encode", "decode", "resolve", "transform", "lookup",
)

CLASS_NAMES: tuple[str, ...] = (
    "Parser", "Config", "Worker", "Handler", "Buffer", "Reader", "Writer", "Cache", "Node",
    "Client", "Server", "Session", "Record", "Counter", "Registry", "Loader", "Formatter",
    "Request", "Response", "Token", "Channel", "Builder", "Visitor", "Table",
)

#: Plain words for string contents (no quotes, braces or backslashes).
WORDS: tuple[str, ...] = (
    "hello", "world", "error", "file", "not", "found", "value", "is", "too", "large", "done",
    "loading", "data", "from", "the", "server", "invalid", "name", "user", "missing", "key",
    "config", "failed", "to", "open", "path", "expected", "a", "number", "got", "unknown",
    "option", "reading", "line", "skipping", "empty", "input", "total", "count", "ready",
    "cannot", "parse", "header", "request", "timed", "out", "retrying", "warning", "saved",
)


def pick(rng: random.Random, pool: Sequence[str], exclude: Sequence[str] = ()) -> str:
    """One element of `pool` that is not in `exclude`."""
    return rng.choice([x for x in pool if x not in exclude])


def pick_distinct(rng: random.Random, pool: Sequence[str], k: int,
                  exclude: Sequence[str] = ()) -> list[str]:
    """`k` distinct elements of `pool`, none in `exclude`, in random order."""
    return rng.sample([x for x in pool if x not in exclude], k)


def phrase(rng: random.Random, low: int = 1, high: int = 4) -> str:
    """A few space-separated words, e.g. `failed to open`."""
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(low, high)))


def int_literal(rng: random.Random) -> str:
    return str(rng.choice([0, 1, 2, 3, 5, 8, 10, 16, 42, 100, 255, 1024, rng.randint(0, 999)]))


def str_literal(rng: random.Random, quote: str | None = None) -> str:
    """A short string literal quoted with `quote` (default: `'` or `"` at random)."""
    quote = quote or rng.choice("'\"")
    return f"{quote}{phrase(rng, 1, 2)}{quote}"


def scalar_literal(rng: random.Random) -> str:
    """An int, string, float, boolean or None literal."""
    kind = rng.random()
    if kind < 0.45:
        return int_literal(rng)
    if kind < 0.8:
        return str_literal(rng)
    if kind < 0.9:
        return f"{rng.randint(0, 9)}.{rng.randint(0, 99)}"
    return rng.choice(["True", "False", "None"])


def filler_statement(rng: random.Random, avoid: Sequence[str] = ()) -> str:
    """One simple, self-contained statement (no indentation, no newline) that assigns or
    uses names other than those in `avoid`, e.g. `total = len(items)`."""
    a, b = pick_distinct(rng, NAMES, 2, exclude=avoid)
    form = rng.randrange(7)
    if form == 0:
        return f"{a} = {scalar_literal(rng)}"
    if form == 1:
        return f"{a} = {rng.choice(FUNC_NAMES)}({b})"
    if form == 2:
        return f"{a} = len({b})"
    if form == 3:
        return f"{a}.append({b})"
    if form == 4:
        return f"{a} = [{scalar_literal(rng)}, {scalar_literal(rng)}]"
    if form == 5:
        return f"print({a}, {b})"
    return f"{a} = {b} + {int_literal(rng)}"


def filler_lines(rng: random.Random, level: int, low: int, high: int,
                 avoid: Sequence[str] = (), without: str = "") -> list[str]:
    """Between `low` and `high` filler statements, indented to `level`. A statement containing
    any character of `without` is drawn again (core levels keep e.g. quotes out of the filler)."""
    lines = []
    for _ in range(rng.randint(low, high)):
        statement = filler_statement(rng, avoid)
        while any(c in statement for c in without):
            statement = filler_statement(rng, avoid)
        lines.append(indent(level) + statement)
    return lines


def indent(level: int) -> str:
    """The indentation of a line at block depth `level` (4 spaces per level)."""
    return "    " * level


def target_indent(level: int) -> str:
    """What a prompt ends with right before a leading-space token at depth `level >= 1`: one
    space fewer than the indentation (see the module docstring)."""
    if level < 1:
        raise ValueError("target_indent needs level >= 1")
    return " " * (4 * level - 1)


def join_lines(lines: Sequence[str]) -> str:
    """The lines joined with newlines, plus a final newline."""
    return "".join(line + "\n" for line in lines)


def def_header(rng: random.Random, params: Sequence[str], name: str | None = None) -> str:
    """`def name(p1, p2):` with a random function name unless `name` is given."""
    return f"def {name or rng.choice(FUNC_NAMES)}({', '.join(params)}):"
