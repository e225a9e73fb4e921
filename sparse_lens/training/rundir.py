"""The run directory: what a checkpoint writes, what a resume reads, and what a new run may replace.

A run directory is also a model directory (`from_pretrained` opens it at any time) and a working
folder (pruning writes `circuits/` and `node_means.safetensors` there, the demo a report). A
checkpoint replaces only the trainer's own entries, each atomically (`checkpoint.save_model`): the
model's files and `training/`, which holds everything a resume needs (the weights, hard-linked,
the optimizer state and `state.json`), swapped in as one directory before the model's files, so a
crash between the two leaves a resumable run; files computed from the previous weights (cached
node means, a provenance record) are removed. The optimizer state is generic
(`optimizer_tensors`, `trainer_state`): bridged runs save theirs the same way in `bridges/`.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path
from typing import Any

import torch

from sparse_lens import checkpoint
from sparse_lens.config import SparseHookedTransformerConfig
from sparse_lens.model import SparseHookedTransformer
from sparse_lens.training.config import TrainConfig
from sparse_lens.training.step import is_fused, make_optimizer

TRAINING_DIR = "training"
SNAPSHOTS_DIR = "snapshots"
OPTIMIZER_FILE = "optimizer.safetensors"
# files in a model directory computed from the weights it held: stale once a new run replaces them
DERIVED_FILES = ("node_means.safetensors", "provenance.json")
log = logging.getLogger("sparse_lens.training")


def plan_run(model_cfg, tc, out_dir: Path, resume: bool | str, overwrite: bool, writer: bool = True):
    """The configs to train with and whether to resume; checks `out_dir` against `resume`."""
    if resume not in (False, True, "auto"):
        raise ValueError(f"resume must be False, True or 'auto'; got {resume!r}")
    has_run = (out_dir / TRAINING_DIR / "state.json").is_file()
    if has_run and resume or resume is True:  # saved_configs: an error if there is no run
        saved_model_cfg, saved_tc = saved_configs(out_dir)
        return model_cfg or saved_model_cfg, tc or saved_tc, True
    if model_cfg is None or tc is None:
        raise ValueError("a new run needs a model config and a TrainConfig")
    if (out_dir / checkpoint.CONFIG_FILE).exists():
        if not overwrite:
            raise ValueError(f"{out_dir} already holds a model: pass overwrite=True (--overwrite) "
                             "to replace it, or resume=True (--resume) to continue its run")
        for name in (TRAINING_DIR, SNAPSHOTS_DIR, *DERIVED_FILES) if writer else ():
            target = out_dir / name
            shutil.rmtree(target) if target.is_dir() else target.unlink(missing_ok=True)
    return model_cfg, tc, False


def saved_configs(out_dir: str | Path) -> tuple[SparseHookedTransformerConfig, TrainConfig]:
    """The model and training configs of the run in `out_dir` (what `resume=True` continues)."""
    out_dir = Path(out_dir)
    if not (out_dir / TRAINING_DIR / "state.json").is_file():
        raise ValueError(f"nothing to resume in {out_dir}: no {TRAINING_DIR}/state.json there "
                         "(start a new run without --resume)")
    state = checkpoint.read_json(out_dir / TRAINING_DIR / "state.json")
    saved = checkpoint.read_json(out_dir / checkpoint.CONFIG_FILE)["config"]
    return SparseHookedTransformerConfig.from_json_dict(saved), TrainConfig(**state["train_config"])


# ------------------------------------------------------------------ generic trainer state
def optimizer_tensors(model: torch.nn.Module, optimizer: torch.optim.Optimizer
                      ) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, float]]]:
    """The optimizer's per-parameter state, whatever its keys: tensors with more than one element
    as `{param_name}.{key}` (for safetensors), 0-d ones (such as Adam's step) as JSON numbers."""
    names = {id(p): n for n, p in model.named_parameters()}
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, float]] = {}
    for p, state in optimizer.state.items():
        for key, value in state.items():
            if torch.is_tensor(value) and value.ndim > 0:
                tensors[f"{names[id(p)]}.{key}"] = value
            else:
                scalars.setdefault(names[id(p)], {})[key] = float(value)
    return tensors, scalars


def load_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                         tensors: dict[str, torch.Tensor], scalars: dict[str, dict[str, float]]) -> None:
    """Put back what `optimizer_tensors` saved (scalars as 0-d float32 tensors, as torch keeps them:
    on the parameter's device for a fused optimizer, on the CPU otherwise)."""
    fused = is_fused(optimizer)
    for name, p in model.named_parameters():
        state = {key: torch.tensor(value, dtype=torch.float32, device=p.device if fused else "cpu")
                 for key, value in scalars.get(name, {}).items()}
        state.update({key[len(name) + 1:]: t.to(p.device) for key, t in tensors.items()
                      if key.rsplit(".", 1)[0] == name})
        if state:
            optimizer.state[p] = state


def write_trainer_state(folder: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                        state: dict[str, Any], state_file: str = "state.json") -> None:
    """Write the optimizer state (`OPTIMIZER_FILE`) and `state` into `folder`, with the optimizer's
    scalars and what bitwise reproducibility depends on (torch build, thread count)."""
    tensors, param_state = optimizer_tensors(model, optimizer)
    checkpoint.save_tensors(tensors, folder / OPTIMIZER_FILE)
    state = dict(state, param_state=param_state, torch_version=torch.__version__,
                 torch_threads=torch.get_num_threads(), fused_adamw=is_fused(optimizer))
    (folder / state_file).write_text(json.dumps(state, indent=1))


def snapshot_of_run(path: str | Path) -> tuple[Path, int] | None:
    """(the run's directory, N) when `path` is `<run>/snapshots/step-N` of a training run with its
    record (`<run>/training/state.json`), else None."""
    path = Path(path)
    match = re.fullmatch(r"step-(\d+)", path.name)
    run_dir = path.parent.parent
    if match and path.parent.name == SNAPSHOTS_DIR and (run_dir / TRAINING_DIR / "state.json").is_file():
        return run_dir, int(match.group(1))
    return None


def saved_fused_adamw(state: dict[str, Any]) -> bool:
    """Whether the run whose state JSON is `state` used the fused AdamW (`write_trainer_state`
    records it; runs from before the record used the per-parameter loop)."""
    return bool(state.get("fused_adamw", False))


def read_trainer_state(folder: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                       state: dict[str, Any]) -> None:
    """Load into `optimizer` what `write_trainer_state` wrote in `folder` (`state`: its JSON)."""
    tensors = checkpoint.load_tensors(folder / OPTIMIZER_FILE)
    scalars = state.get("param_state") or {  # runs written before param_state: Adam's steps
        name: {"step": step} for name, step in state.get("param_steps", {}).items()}
    load_optimizer_state(model, optimizer, tensors, scalars)
    if state.get("torch_threads", torch.get_num_threads()) != torch.get_num_threads():
        log.warning("resuming with %d torch threads where the run used %d: the weights will not be "
                    "bitwise those of an uninterrupted run (set OMP_NUM_THREADS=%d to match)",
                    torch.get_num_threads(), state["torch_threads"], state["torch_threads"])


def config_diffs(prefix: str, saved: dict[str, Any], given: dict[str, Any], ignore=()) -> list[str]:
    """The fields where `given` differs from `saved`, as `prefix.field: saved ..., given ...`."""
    return [f"{prefix}.{k}: saved {saved.get(k)!r}, given {v!r}"
            for k, v in given.items() if k not in ignore and saved.get(k) != v]


# -------------------------------------------------------------------- plain runs
def save_run(out_dir: Path, model: SparseHookedTransformer, optimizer: torch.optim.Optimizer,
             step: int, tc: TrainConfig, history: list[dict[str, float]], unigram: float,
             world_size: int = 1) -> None:
    """Checkpoint: the model's files plus `training/` (weights linked, optimizer state, state.json).
    Files derived from the previous weights (`DERIVED_FILES`: cached node means, a provenance
    record with their digest) are removed; everything else in `out_dir` stays."""

    def write_training_state(stage: Path) -> None:
        (stage / TRAINING_DIR).mkdir()
        checkpoint.link_or_copy(stage / checkpoint.WEIGHTS_FILE, stage / TRAINING_DIR / checkpoint.WEIGHTS_FILE)
        write_trainer_state(stage / TRAINING_DIR, model, optimizer, dict(
            step=step, train_config=tc.to_json_dict(), history=history, unigram_val_loss=unigram,
            world_size=world_size))

    checkpoint.save_model(model, out_dir, write_extra=write_training_state)
    for name in DERIVED_FILES:  # computed from the weights just replaced
        (out_dir / name).unlink(missing_ok=True)


def load_run(out_dir: Path, model_cfg: SparseHookedTransformerConfig, tc: TrainConfig, device: str,
             world_size: int = 1):
    """The model, optimizer, step and history of the run in `out_dir`, checked against the
    configs given (those fields that change the weights must match)."""
    model = SparseHookedTransformer.from_pretrained(out_dir, device=device)
    weights = out_dir / TRAINING_DIR / checkpoint.WEIGHTS_FILE
    if weights.is_file():  # runs written before training/ held its own copy use the model's
        checkpoint.load_parameters(model, checkpoint.load_tensors(weights), source=weights)
    state = checkpoint.read_json(out_dir / TRAINING_DIR / "state.json")
    missing = [k for k in ("step", "train_config", "history") if k not in state]
    if missing:
        raise checkpoint.CheckpointError(f"{out_dir / TRAINING_DIR / 'state.json'} lacks {missing}: "
                                         "not a complete training state")
    saved_tc = TrainConfig(**state["train_config"]).to_json_dict()  # fields added since: defaults
    saved_world = int(state.get("world_size", 1))
    if saved_world != world_size:  # the global batch is batch_size x world size
        raise ValueError(f"cannot resume {out_dir} with {world_size} process(es): the run was trained "
                         f"with {saved_world} (each draws its share of a global batch of batch_size x "
                         f"world size); resume it with torchrun --nproc_per_node={saved_world} in total")
    diffs = config_diffs("model", model.cfg.to_json_dict(), model_cfg.to_json_dict())
    diffs += config_diffs("train", saved_tc, tc.to_json_dict(), TrainConfig.NON_RESULT_FIELDS)
    if diffs:
        raise ValueError(f"cannot resume {out_dir}: the configs differ from the checkpoint's: "
                         + "; ".join(diffs))
    optimizer = make_optimizer(model, tc, fused=saved_fused_adamw(state))
    read_trainer_state(out_dir / TRAINING_DIR, model, optimizer, state)
    return model, optimizer, int(state["step"]), list(state["history"])
