"""Bridged model directories: a sparse model directory (`SparseHookedTransformer.from_pretrained`
opens it) with a `bridges/` folder holding `bridges.json`, `bridges.safetensors` and, when written
by training, `training.json` (configs, step, history), the optimizer state
(`training.write_trainer_state`) and a hard-linked copy of the sparse weights, so that a crash
between swapping in `bridges/` and the model's files still leaves a consistent run to resume.
Everything is written atomically (`checkpoint.save_model`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from sparse_lens import checkpoint
from sparse_lens.bridges.modules import Bridges
from sparse_lens.model import SparseHookedTransformer
from sparse_lens.training.rundir import (
    DERIVED_FILES, OPTIMIZER_FILE, read_trainer_state, write_trainer_state,
)

BRIDGES_DIR = "bridges"
TRAINING_FILE = "training.json"
SPARSE_WEIGHTS_FILE = "sparse.safetensors"  # the sparse weights of the same checkpoint


def save_bridged(sparse: SparseHookedTransformer, bridges: Bridges, path: str | Path,
                 training_state: dict | None = None) -> Path:
    """Write the sparse model directory at `path` with its bridges in `bridges/` (atomically)."""

    def write_bridges(tmp: Path) -> None:
        bridges.save(tmp / BRIDGES_DIR)
        if training_state is not None:
            (tmp / BRIDGES_DIR / TRAINING_FILE).write_text(json.dumps(training_state, indent=1))

    return checkpoint.save_model(sparse, path, write_extra=write_bridges)


def trained_pair(sparse: SparseHookedTransformer, bridges: Bridges) -> torch.nn.Module:
    """One module naming every trained parameter (`sparse.*`, `bridges.*`): the names the
    optimizer state is saved under."""
    return torch.nn.ModuleDict(dict(sparse=sparse, bridges=bridges))


def save_checkpoint(sparse: SparseHookedTransformer, bridges: Bridges, path: Path,
                    optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """A resumable checkpoint of a bridged run: `save_bridged` plus the optimizer state and a
    linked copy of the sparse weights in `bridges/`. Files derived from the previous weights
    (`training.DERIVED_FILES`) are removed, as a plain run's checkpoint does."""

    def write_bridges(tmp: Path) -> None:
        folder = tmp / BRIDGES_DIR
        bridges.save(folder)
        checkpoint.link_or_copy(tmp / checkpoint.WEIGHTS_FILE, folder / SPARSE_WEIGHTS_FILE)
        write_trainer_state(folder, trained_pair(sparse, bridges), optimizer, state, TRAINING_FILE)

    checkpoint.save_model(sparse, path, write_extra=write_bridges)
    for name in DERIVED_FILES:
        (path / name).unlink(missing_ok=True)


def has_checkpoint(path: Path) -> bool:
    """Whether `path` holds a resumable bridged run (one written with its optimizer state)."""
    return (path / BRIDGES_DIR / TRAINING_FILE).is_file() and (path / BRIDGES_DIR / OPTIMIZER_FILE).is_file()


def load_checkpoint(path: Path, device: str) -> tuple[SparseHookedTransformer, Bridges, dict[str, Any]]:
    """The sparse model, bridges and `training.json` of the resumable run in `path`."""
    if not has_checkpoint(path):
        raise ValueError(f"nothing to resume in {path}: no {BRIDGES_DIR}/{TRAINING_FILE} with an "
                         f"optimizer state there (start a new run without resume)")
    sparse, bridges = load_bridged(path, device=device)
    weights = path / BRIDGES_DIR / SPARSE_WEIGHTS_FILE
    checkpoint.load_parameters(sparse, checkpoint.load_tensors(weights), source=weights)
    return sparse, bridges, training_state(path)


def load_optimizer(sparse: SparseHookedTransformer, bridges: Bridges, path: Path,
                   optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Put the optimizer state saved by `save_checkpoint` into `optimizer`."""
    read_trainer_state(path / BRIDGES_DIR, trained_pair(sparse, bridges), optimizer, state)


def load_bridged(path: str | Path, device: str | torch.device | None = None
                 ) -> tuple[SparseHookedTransformer, Bridges]:
    """The sparse model and its bridges from a directory written by `save_bridged` (or
    `sparse-lens bridges train`). Raises `checkpoint.CheckpointError` when a file is missing or
    corrupt, or when the bridges do not fit the model beside them."""
    path = checkpoint.latest_dir(Path(path))
    sparse = SparseHookedTransformer.from_pretrained(path, device=device)
    if not (path / BRIDGES_DIR).is_dir():
        raise checkpoint.CheckpointError(f"{path} holds a model but no {BRIDGES_DIR}/ folder: "
                                         "not a bridged model (train one with `sparse-lens bridges train`)")
    bridges = Bridges.load(path / BRIDGES_DIR, device=sparse.cfg.device)
    c = sparse.cfg
    if (bridges.d_sparse, bridges.n_layers, bridges.d_vocab) != (c.d_model, c.n_layers, c.d_vocab):
        raise checkpoint.CheckpointError(
            f"the bridges in {path / BRIDGES_DIR} are for a sparse model with d_model {bridges.d_sparse}, "
            f"{bridges.n_layers} layers, vocabulary {bridges.d_vocab}; the model there has "
            f"{c.d_model}, {c.n_layers}, {c.d_vocab}")
    return sparse, bridges


def training_state(path: str | Path) -> dict:
    """The `training.json` of a bridged model directory (configs, history)."""
    return checkpoint.read_json(Path(path) / BRIDGES_DIR / TRAINING_FILE)
