"""Tasks about with-statements, functions and classes.

with_as, with_open, lambda_func, class_init.
"""

from __future__ import annotations

import random

from sparse_lens.tasks.base import Example, register
from sparse_lens.tasks.snippets import (
    CLASS_NAMES, NAMES, def_header, filler_lines, indent, int_literal, join_lines, pick,
    pick_distinct, scalar_literal, str_literal, target_indent,
)

_EXCEPTIONS = ("ValueError", "KeyError", "OSError", "TypeError", "FileNotFoundError")

#: Context managers whose value is used, so they are bound with `as` ({p}: a name).
_BOUND_MANAGERS = (
    "open({p})", "open({p}, 'w')", "tempfile.TemporaryDirectory()", "zipfile.ZipFile({p})",
    "tarfile.open({p})", "socket.create_connection({p})", "urllib.request.urlopen({p})",
    "os.scandir({p})", "subprocess.Popen({p})", "io.StringIO()", "tempfile.NamedTemporaryFile()",
)
#: Context managers used only for their effect, entered without `as` ({e}: an exception).
_EFFECT_MANAGERS = (
    "self._lock", "self.lock", "contextlib.suppress({e})", "suppress({e})",
    "warnings.catch_warnings()", "redirect_stdout({p})", "self.assertRaises({e})",
    "self.subTest({p}={p})",
)

#: Names for an open file or stream (single tokens with a leading space: they are targets).
_HANDLE_NAMES = ("f", "file", "stream", "handle", "out", "output", "source")
_PATH_NAMES = ("path", "filename", "fname", "dest", "src", "config_path", "log_file")


@register("with_as",
          "after `with manager`: ' as' when the manager's value is used (open(...), "
          "TemporaryDirectory(), ...) vs ':' for effect-only managers (locks, suppress, assertRaises)",
          hard_adds="nothing: the two levels draw from the same generator (no distractors to remove)")
def with_as(rng: random.Random, label: int, hard: bool = True) -> Example:
    param = rng.choice(NAMES)
    pool = _BOUND_MANAGERS if label == 0 else _EFFECT_MANAGERS
    manager = rng.choice(pool).format(p=param, e=rng.choice(_EXCEPTIONS))
    lines = [def_header(rng, ["self", param])] + filler_lines(rng, 1, 0, 2, avoid=[param])
    lines.append(indent(1) + f"with {manager}")
    body = f"\n{indent(2)}pass\n"
    if label == 0:
        return Example(join_lines(lines)[:-1], " as", ":", f" {rng.choice(_HANDLE_NAMES)}:{body}", label)
    return Example(join_lines(lines)[:-1], ":", " as", body, label)


def _path_line(rng: random.Random, path: str) -> str:
    return rng.choice([
        f"{path} = os.path.join({rng.choice(NAMES)}, {str_literal(rng)})",
        f"{path} = {str_literal(rng)}",
        f"{path} = self.{path}",
    ])


@register("with_open",
          "after `with`: ' open' when only a path was prepared, vs the name of the file object "
          "when the previous line already opened it (`f = open(path)`)",
          hard_adds="nothing: the two levels draw from the same generator (no distractors to remove)")
def with_open(rng: random.Random, label: int, hard: bool = True) -> Example:
    path, handle = rng.choice(_PATH_NAMES), rng.choice(_HANDLE_NAMES)
    lines = [def_header(rng, ["self"])] + filler_lines(rng, 1, 0, 1, avoid=[path, handle])
    lines.append(indent(1) + _path_line(rng, path))
    body = f":\n{indent(2)}pass\n"
    if label == 0:
        lines.append(indent(1) + "with")
        return Example(join_lines(lines)[:-1], " open", " " + handle, f"({path}) as {handle}{body}", label)
    mode = rng.choice(["", ", 'rb'", ", 'w'", ", encoding='utf-8'"])
    lines += [indent(1) + f"{handle} = open({path}{mode})", indent(1) + "with"]
    return Example(join_lines(lines)[:-1], " " + handle, " open", body, label)


_DECORATORS = ("@property", "@staticmethod", "@classmethod", "@functools.cache", "@abstractmethod")


def _class_start(rng: random.Random) -> list[str]:
    """`class Name:` with a class attribute or a complete method (or both)."""
    lines = [f"class {rng.choice(CLASS_NAMES)}:"]
    if rng.random() < 0.6:
        lines.append(indent(1) + f"{rng.choice(NAMES)} = {scalar_literal(rng)}")
    if len(lines) == 1 or rng.random() < 0.5:
        attr = rng.choice(NAMES)
        blank = [""] if len(lines) > 1 else []
        lines += blank + [indent(1) + f"def {attr}(self):", indent(2) + f"return self._{attr}", ""]
    return lines


@register("lambda_func",
          "' def' to start a method in a class body (often after a decorator) vs ' lambda' "
          "after `name =` or a dict key, where a def cannot go",
          hard_adds="nothing: the two levels draw from the same generator",
          too_easy="the prompt's last token differs by class (indentation or a decorator before "
          "' def', '=' or ':' before ' lambda'), so a last-token table solves it")
def lambda_func(rng: random.Random, label: int, hard: bool = True) -> Example:
    lines = _class_start(rng)
    if label == 0:
        decorated = rng.random() < 0.6
        if decorated:
            lines.append(indent(1) + rng.choice(_DECORATORS))
        suffix = f" {rng.choice(NAMES)}(self):\n{indent(2)}return {scalar_literal(rng)}\n"
        return Example(join_lines(lines) + target_indent(1), " def", " lambda", suffix, label,
                       contrast_invalid=decorated)
    arg, name = pick_distinct(rng, NAMES, 2)
    body = f" {arg}: {rng.choice([arg, f'len({arg})', f'{arg} * 2', f'{arg}.name'])}"
    if rng.random() < 0.5:
        line, suffix = f"{name} =", body + "\n"
    else:
        line, suffix = f"{name} = {{{str_literal(rng)}:", body + "}\n"
    return Example(join_lines(lines) + indent(1) + line, " lambda", " def", suffix, label,
                   contrast_invalid=True)


#: Methods a subclass commonly overrides; `.name` is one token for each.
_OVERRIDDEN = ("close", "run", "write", "read", "load", "parse", "get", "set", "open", "add",
               "append", "join")


def _init_method(rng: random.Random, params: list[str], complete: bool) -> list[str]:
    """`def __init__(self, ...)`: complete (super call and attributes) or stopping at `super()`."""
    lines = [indent(1) + f"def __init__(self, {', '.join(params)}):"]
    if not complete:
        return lines + [indent(2) + "super()"]
    lines.append(indent(2) + "super().__init__()")
    return lines + [indent(2) + f"self.{p} = {p}" for p in params]


@register("class_init",
          "after `super()` inside a method: '.__init__' when the enclosing method is __init__, "
          "else '.name' of the enclosing method",
          max_prompt_tokens=72,
          hard_adds="a complete __init__ (with its super().__init__() call) before the other method")
def class_init(rng: random.Random, label: int, hard: bool = True) -> Example:
    base = pick(rng, CLASS_NAMES + ("Thread", "dict", "Exception"))
    lines = [f"class {pick(rng, CLASS_NAMES, exclude=[base])}({base}):"]
    if rng.random() < 0.4:
        lines += [indent(1) + f"{rng.choice(NAMES)} = {int_literal(rng)}", ""]
    params = pick_distinct(rng, NAMES, rng.randint(1, 2))
    method = rng.choice(_OVERRIDDEN)
    if label == 0:
        lines += _init_method(rng, params, complete=False)
        correct, contrast = ".__init__", "." + method
    else:
        if hard and rng.random() < 0.6:
            lines += _init_method(rng, params, complete=True) + [""]
        arg = rng.choice(["", ", " + rng.choice(NAMES)])
        lines += [indent(1) + f"def {method}(self{arg}):", indent(2) + "super()"]
        correct, contrast = "." + method, ".__init__"
    return Example(join_lines(lines)[:-1], correct, contrast, "()\n", label)
