"""The corpus's files: where Python source is found (the standard library by default, or the
directories, files and glob patterns given) and how files split into train and validation (by a
hash of each file's path relative to its corpus root, so the split depends neither on the order
files are listed in nor on the machine). Below both `data` (token streams) and `tokenizer`.
"""

from __future__ import annotations

import glob
import hashlib
import math
import os
import sysconfig
from collections.abc import Sequence
from pathlib import Path

_EXCLUDED_DIRS = frozenset({"site-packages", "dist-packages"})


def stdlib_dir() -> Path:
    """The running interpreter's standard-library directory."""
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_source_files() -> list[Path]:
    """Every `.py` file of the running interpreter's standard library, recursively, without
    `site-packages`/`dist-packages`, sorted."""
    root = stdlib_dir()
    return sorted(
        p for p in root.rglob("*.py")
        if not _EXCLUDED_DIRS.intersection(p.relative_to(root).parts) and p.is_file()
    )


def resolve_source_files(sources: Sequence[str | Path] | None) -> list[Path]:
    """The `.py` files named by `sources`: each entry is a directory (all `*.py` under it,
    recursively), a file, or a glob pattern (`**` allowed). None means the standard library.
    Sorted and deduplicated; raises ValueError naming the entries that matched nothing."""
    if sources is None:
        return stdlib_source_files()
    if isinstance(sources, (str, Path)):
        sources = [sources]
    found: dict[str, Path] = {}
    unmatched: list[str] = []
    for entry in sources:
        path = Path(entry).expanduser()
        if path.is_dir():
            matches = [p for p in path.rglob("*.py") if p.is_file()]
        elif path.is_file():
            matches = [path]
        else:
            matches = [Path(m) for m in glob.glob(str(path), recursive=True) if Path(m).is_file()]
        if not matches:
            unmatched.append(str(entry))
        for m in matches:
            found.setdefault(os.path.normpath(m.absolute()), m)
    if unmatched:
        raise ValueError(f"these sources matched no files: {', '.join(map(repr, unmatched))}")
    return sorted(Path(k) for k in found)


def _corpus_root(files: Sequence[Path]) -> Path:
    """The directory that split keys are relative to: the stdlib dir when every file is in it
    (so the split is the same on every machine with the same Python), else the common parent."""
    absolute = [Path(os.path.normpath(Path(f).absolute())) for f in files]
    std = Path(os.path.normpath(stdlib_dir().absolute()))
    if all(p.is_relative_to(std) for p in absolute):
        return std
    common = Path(os.path.commonpath([str(p) for p in absolute]))
    return common.parent if len(absolute) == 1 else common


def _unit_hash(key: str, salt: str) -> float:
    """A machine-independent hash of `key` into [0, 1)."""
    digest = hashlib.sha256(f"{salt}\0{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def _relative_keys(files: Sequence[Path], root: Path | None) -> dict[Path, str]:
    root = _corpus_root(files) if root is None else Path(os.path.normpath(Path(root).absolute()))
    keys = {}
    for f in files:
        p = Path(os.path.normpath(Path(f).absolute()))
        keys[Path(f)] = (p.relative_to(root) if p.is_relative_to(root) else p).as_posix()
    return keys


def split_train_val(
    files: Sequence[str | Path], val_fraction: float = 0.02, root: str | Path | None = None,
) -> tuple[list[Path], list[Path]]:
    """Split `files` into (train, val), deterministically and by file: a file goes to validation
    when a SHA-256 hash of its path relative to the corpus root (`root`, default the stdlib dir
    for stdlib files, else the files' common parent) falls below `val_fraction`. Independent of
    input order. With >= 2 files both parts are nonempty. Both lists are sorted."""
    if not (isinstance(val_fraction, (int, float)) and 0.0 < val_fraction < 1.0):
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction!r}")
    paths = sorted(set(Path(f) for f in files))
    if not paths:
        return [], []
    keys = _relative_keys(paths, root)
    score = {p: _unit_hash(keys[p], "sparse_lens.split") for p in paths}
    val = {p for p in paths if score[p] < val_fraction}
    if len(paths) >= 2:
        by_score = sorted(paths, key=lambda p: (score[p], keys[p]))
        if not val:
            val.add(by_score[0])
        if len(val) == len(paths):
            val.discard(by_score[-1])
    return [p for p in paths if p not in val], [p for p in paths if p in val]


def select_subset(files: Sequence[str | Path], max_files: int, root: str | Path | None = None) -> list[Path]:
    """A deterministic, order-independent subset of `max_files` files (chosen by a hash of each
    relative path, so it spreads over the whole corpus rather than taking the first names)."""
    if max_files < 1:
        raise ValueError(f"max_files must be >= 1, got {max_files}")
    paths = sorted(set(Path(f) for f in files))
    keys = _relative_keys(paths, root) if paths else {}
    chosen = sorted(paths, key=lambda p: (_unit_hash(keys[p], "sparse_lens.subset"), keys[p]))[:max_files]
    return sorted(chosen)


# ------------------------------------------------------------------------------ tokenizing
