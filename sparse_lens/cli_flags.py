"""Command-line flags made from a config dataclass, and the config read back from them.

    add_config_flags(parser, TrainConfig, help={"lr": "base learning rate"})
    args = parser.parse_args(["--lr", "0.01", "--betas", "0.9", "0.99"])
    TrainConfig(**given_fields(args, TrainConfig))      # only the flags given: the rest default

One flag per field, `--field-name` for `field_name`, typed from the field's annotation: `int`,
`float`, `str` (and `X | None` of them) take one value; `list[X]` one or more; `tuple[X, X]` as
many as the tuple has (`tuple[X, ...]`: one or more); `bool` is a `--name` / `--no-name` pair.
A flag not given is None in the namespace, so `given_fields` returns only what the command line
set, and a saved config can be updated with it (`dataclasses.replace`). The help is, first found:
the caller's `help`, the field's `metadata["help"]`, the comment beside or above the field in the
class's source; the default is appended.

`LazyParser` is a subcommand parser that adds its flags only when it is used, so `prog --help`
never imports the modules (torch) that define the configs.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import io
import textwrap
import tokenize
import types
import typing
from collections.abc import Callable, Iterable


class LazyParser(argparse.ArgumentParser):
    """An `ArgumentParser` that calls `populate(self)` once, the first time it parses or prints
    its help (pass `populate=` to `subparsers.add_parser`)."""

    def __init__(self, *args, populate: Callable[[argparse.ArgumentParser], None] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self._populate = populate

    def _ensure_populated(self) -> None:
        populate, self._populate = self._populate, None
        if populate is not None:
            populate(self)

    def parse_known_args(self, args=None, namespace=None):
        self._ensure_populated()
        return super().parse_known_args(args, namespace)

    def format_help(self) -> str:
        self._ensure_populated()
        return super().format_help()


def flag_name(field_name: str) -> str:
    return "--" + field_name.replace("_", "-")


def add_config_flags(parser: argparse.ArgumentParser, cls: type, fields: Iterable[str] | None = None, *,
                     exclude: Iterable[str] = (), help: dict[str, str] | None = None,
                     choices: dict[str, Iterable] | None = None, show_defaults: bool = True) -> list[str]:
    """Add a flag for each field of dataclass `cls` (those named in `fields`, in that order;
    default every field but `exclude`); returns the field names. `help` and `choices` by field
    name; `show_defaults=False` leaves the dataclass's defaults out of the help (where something
    else, such as a preset, decides). A field whose type has no flag form raises TypeError (name
    it in `exclude`)."""
    by_name = {f.name: f for f in dataclasses.fields(cls)}
    names = list(fields) if fields is not None else [n for n in by_name if n not in set(exclude)]
    hints, comments = typing.get_type_hints(cls), field_comments(cls)
    help, choices = help or {}, choices or {}
    for name in names:
        field = by_name[name]
        text = help.get(name) or field.metadata.get("help") or comments.get(name, "")
        default = field.default if field.default is not dataclasses.MISSING else (
            field.default_factory() if field.default_factory is not dataclasses.MISSING else None)
        shown = "none" if default is None else " ".join(map(str, default)) \
            if isinstance(default, (tuple, list)) else default
        if show_defaults:
            text = f"{text} (default: {shown})" if text else f"default: {shown}"
        kwargs = _argument_kwargs(cls, name, hints[name])
        if name in choices:
            kwargs["choices"] = list(choices[name])
        parser.add_argument(flag_name(name), dest=name, default=None, help=text.replace("%", "%%"),
                            **kwargs)
    return names


def given_fields(args: argparse.Namespace, cls: type, fields: Iterable[str] | None = None) -> dict:
    """The fields of `cls` (or those named) that the command line set: {name: value}, a list
    turned into a tuple for a tuple field."""
    names = list(fields) if fields is not None else [f.name for f in dataclasses.fields(cls)]
    hints = typing.get_type_hints(cls)
    out = {}
    for name in names:
        value = getattr(args, name, None)
        if value is not None:
            out[name] = tuple(value) if _base(hints[name])[0] is tuple else value
    return out


def _base(annotation) -> tuple[object, tuple]:
    """(origin, args) of `annotation` with a `| None` removed."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        rest = [a for a in args if a is not type(None)]
        if len(rest) != 1:
            return origin, tuple(rest)
        annotation = rest[0]
        origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    return (annotation, ()) if origin is None else (origin, args)


def _argument_kwargs(cls: type, name: str, annotation) -> dict:
    origin, args = _base(annotation)
    if origin is bool:
        return dict(action=argparse.BooleanOptionalAction)
    if origin in (int, float, str):
        return dict(type=origin)
    if origin is list and len(args) == 1 and args[0] in (int, float, str):
        return dict(type=args[0], nargs="+")
    if origin is tuple and args and all(a in (int, float, str) for a in args if a is not Ellipsis):
        return dict(type=args[0], nargs="+" if Ellipsis in args else len(args))
    raise TypeError(f"{cls.__name__}.{name}: no command-line form for {annotation!r}; exclude it")


def field_comments(cls: type) -> dict[str, str]:
    """{field name: the comment on its line, else the comment lines just above it} from the
    class's source ({} when the source is not available)."""
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):
        return {}
    comments = {tok.start[0]: tok.string.lstrip("#").strip()
                for tok in tokenize.generate_tokens(io.StringIO(source).readline)
                if tok.type == tokenize.COMMENT}
    lines = source.splitlines()
    out = {}
    for node in ast.parse(source).body[0].body:
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            line = node.lineno
            if line in comments and not lines[line - 1].lstrip().startswith("#"):
                out[node.target.id] = comments[line]
                continue
            above = []
            while line - 1 in comments and lines[line - 2].lstrip().startswith("#"):
                line -= 1
                above.insert(0, comments[line])
            if above:
                out[node.target.id] = " ".join(above)
    return out
