"""Model directories on disk: safetensors weights, a JSON config, the tokenizer's own files.

A model directory holds
    config.json          {"format": ..., "format_version": 1, "config": {...}}
    model.safetensors    every parameter, by its TransformerLens name
    tokenizer/           the tokenizer, as `save_pretrained` writes it (optional)
    training/            optimizer and trainer state, when written by `sparse-lens train`
Nothing is unpickled on load. A model directory is also a working folder: pruning writes
`circuits/` and `node_means.safetensors` into it, the demo `report.html`. Saving a model therefore
replaces only the entries the model owns (the files above, plus what `write_extra` adds): they are
written into a staging folder inside the directory and moved into place one by one with renames
(`write_entries_atomically`), so a crash mid-write leaves each entry either old or new, never
half-written, and everything else in the directory untouched.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

# the model class is the caller's (`SparseHookedTransformer.from_pretrained` passes itself): this
# module sits below the model and knows only that it is a torch Module with `cfg` and `tokenizer`
M = TypeVar("M", bound=torch.nn.Module)

FORMAT = "sparse_lens.SparseHookedTransformer"
FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
TOKENIZER_DIR = "tokenizer"
# how the weights were made, with their SHA-256 (written by `sparse_lens.pretrained`, checked on load)
PROVENANCE_FILE = "provenance.json"


class CheckpointError(ValueError):
    """A model directory that is missing, corrupt, or does not match the model."""


def save_model(
    model: torch.nn.Module,
    path: str | Path,
    write_extra: Callable[[Path], None] | None = None,
) -> Path:
    """Write `model` as a model directory at `path`; `write_extra(staging_dir)` may add entries
    (training state) beside the model's. Only those entries are replaced, each atomically (see
    `write_entries_atomically`); other files in `path` are left as they are."""
    from sparse_lens.tokenizer import save_tokenizer

    path = Path(path)

    def write(tmp: Path) -> None:
        header = {"format": FORMAT, "format_version": FORMAT_VERSION,
                  "config": model.cfg.to_json_dict()}
        (tmp / CONFIG_FILE).write_text(json.dumps(header, indent=2))
        save_tensors(dict(model.named_parameters()), tmp / WEIGHTS_FILE)
        if model.tokenizer is not None:
            save_tokenizer(model.tokenizer, tmp / TOKENIZER_DIR)
        if write_extra is not None:
            write_extra(tmp)

    write_entries_atomically(path, write)
    return path


def load_model(
    cls: type[M], path: str | Path, device: str | torch.device | None = None
) -> M:
    """Build `cls` from the model directory at `path` (see the module docstring)."""
    from sparse_lens.config import SparseHookedTransformerConfig
    from sparse_lens.tokenizer import load_tokenizer

    path = latest_dir(Path(path))
    header = read_json(path / CONFIG_FILE)
    if header.get("format") != FORMAT or "config" not in header:
        raise CheckpointError(f"{path / CONFIG_FILE} is not a sparse_lens model config "
                              f"(format {header.get('format')!r}, expected {FORMAT!r})")
    if header.get("format_version", 0) > FORMAT_VERSION:
        raise CheckpointError(f"{path} was written by a newer sparse_lens "
                              f"(format_version {header['format_version']} > {FORMAT_VERSION})")
    try:
        cfg = SparseHookedTransformerConfig.from_json_dict(
            header["config"], **({"device": str(device)} if device is not None else {}))
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"invalid config in {path / CONFIG_FILE}: {err}") from err
    tokenizer = load_tokenizer(path / TOKENIZER_DIR) if (path / TOKENIZER_DIR).is_dir() else None
    if tokenizer is None:
        warnings.warn(f"{path} has no tokenizer files ({TOKENIZER_DIR}/): the model takes token ids "
                      "only (string inputs fail); give it one with model.set_tokenizer("
                      "sparse_lens.load_tokenizer())", UserWarning, stacklevel=3)
    model = cls(cfg, tokenizer=tokenizer)
    tensors = load_tensors(path / WEIGHTS_FILE)
    check_recorded_digest(path, tensors)
    load_parameters(model, tensors, source=path / WEIGHTS_FILE)
    model.loaded_from = path  # where its training corpus is recorded (hooks.node_means_for)
    return model


def check_recorded_digest(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """If the model directory `path` has a `provenance.json` recording `weights_sha256`, the
    weights must hash to it (`fingerprint.weights_digest`); CheckpointError otherwise."""
    from sparse_lens.fingerprint import weights_digest

    record_file = path / PROVENANCE_FILE
    if not record_file.is_file():
        return
    expected = read_json(record_file).get("weights_sha256")
    if expected is not None and weights_digest(tensors) != expected:
        raise CheckpointError(f"{path / WEIGHTS_FILE} is not the model its {record_file} records "
                              f"(weights sha256 {expected[:12]}...): the weights changed after the "
                              "record was written")


@torch.no_grad()
def load_parameters(model: torch.nn.Module, tensors: dict[str, torch.Tensor], source: Path) -> None:
    """Copy `tensors` into the model's parameters; every name and shape must match exactly."""
    params = dict(model.named_parameters())
    missing = sorted(set(params) - set(tensors))
    unexpected = sorted(set(tensors) - set(params))
    if missing or unexpected:
        raise CheckpointError(f"{source} does not match the model: missing {missing[:8]}"
                              f"{' ...' if len(missing) > 8 else ''}, unexpected {unexpected[:8]}"
                              f"{' ...' if len(unexpected) > 8 else ''}")
    for name, param in params.items():
        if tensors[name].shape != param.shape:
            raise CheckpointError(f"{source}: {name} has shape {tuple(tensors[name].shape)}, "
                                  f"the model expects {tuple(param.shape)}")
    for name, param in params.items():
        param.copy_(tensors[name].to(param.device, param.dtype))


def save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(path))


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise CheckpointError(f"missing weights file {path}")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"corrupt weights file {path}: {err}") from err


def read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise CheckpointError(f"missing {path}: not a sparse_lens model directory")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"corrupt JSON in {path}: {err}") from err
    if not isinstance(data, dict):
        raise CheckpointError(f"corrupt JSON in {path}: expected an object")
    return data


STAGING_DIR = ".staging"


def write_entries_atomically(path: Path, write: Callable[[Path], None]) -> None:
    """Run `write(stage)` on a fresh staging folder inside `path`, then move each top-level entry
    it wrote into `path`, replacing the entry of that name and nothing else. Directories first
    (each swapped by two renames; the previous version sits at `.<name>.old` in between), then
    files (one `os.replace` each), in name order. If `write` raises, `path` is untouched."""
    path.mkdir(parents=True, exist_ok=True)
    stage = path / STAGING_DIR
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir()
    try:
        write(stage)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    for entry in sorted(stage.iterdir(), key=lambda e: (not e.is_dir(), e.name)):
        target = path / entry.name
        if entry.is_dir():
            old = path / f".{entry.name}.old"
            shutil.rmtree(old, ignore_errors=True)
            if target.exists():
                os.replace(target, old)
            os.replace(entry, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(entry, target)
    stage.rmdir()


def link_or_copy(source: Path, dest: Path) -> None:
    """`dest` as a hard link to `source` (no second copy on disk), or a copy where links fail."""
    try:
        os.link(source, dest)
    except OSError:
        shutil.copyfile(source, dest)


def latest_dir(path: Path) -> Path:
    """`path`, or the previous version left at `<path>.old` by a crash between two renames."""
    if not path.exists() and _sibling(path, "old").is_dir():
        return _sibling(path, "old")
    if not path.is_dir():
        raise CheckpointError(f"no model directory at {path}")
    return path


def _sibling(path: Path, tag: str) -> Path:
    return path.with_name(f"{path.name}.{tag}")
