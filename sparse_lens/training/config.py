"""What a training run is told (`TrainConfig`), what it returns (`TrainResult`), and how it stops
early (`NonFiniteLossError`, `TrainingInterrupted`)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from sparse_lens import sparsity
from sparse_lens.model import SparseHookedTransformer

# TrainConfig.dtype -> the autocast dtype of the forward pass (None: no autocast)
AUTOCAST_DTYPES: dict[str, torch.dtype | None] = {"float32": None, "bf16": torch.bfloat16}


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN or infinite loss or gradient; the last good checkpoint is kept."""


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C (SIGINT) during `train`: a checkpoint of the last finished step was written; the
    message says how to resume. A KeyboardInterrupt, so code that handles Ctrl-C still does."""

    def __init__(self, out_dir: Path, step: int, command: str | None = None):
        command = command or f"sparse-lens train --out {out_dir} --resume"
        super().__init__(f"interrupted: checkpoint at step {step} saved in {out_dir}; resume with "
                         f"`{command}`")
        self.out_dir, self.step = out_dir, step


@dataclass(kw_only=True)
class TrainConfig:
    """How to train. Defaults are for the `small` preset on a 2-core CPU."""

    steps: int = 1400  # the small preset: 407 s on 2 idle CPU cores (up to ~12 min when busy)
    batch_size: int = 8
    seq_len: int | None = None  # None: the model's n_ctx
    lr: float = 2e-3  # base LR, before the 1/sqrt(L0) factor
    warmup_frac: float = 0.01
    dense_frac: float = 0.01  # fraction of steps trained dense before the L0 anneal starts
    anneal_end_frac: float = 0.5  # fraction of steps at which L0 reaches its target
    anneal_kind: str = "linear"  # or "exponential"
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 0.1
    grad_rms: float = 1.0
    grad_rms_mode: str = "rescale"  # or "clip"
    eval_every: int = 100
    eval_batches: int = 8
    checkpoint_every: int = 250
    # keep a model directory (weights and config, no optimizer) every this many steps under
    # `<out_dir>/snapshots/step-NNNNNN/`, for learning curves; None = none
    snapshot_every: int | None = None
    # stop (and save) at the first evaluation whose validation loss is <= this: a model trained
    # to a given loss (the analyses' dense baseline at the sparse model's loss); None = never
    stop_at_val_loss: float | None = None
    seed: int = 0
    device: str = "cpu"
    # "float32", or "bf16": the forward pass under torch.autocast(bfloat16) (weights, gradients
    # and optimizer state stay float32); meant for CUDA (CPU autocast works but is slower)
    dtype: str = "float32"
    # the step as one CUDA graph, captured once and replayed (`training.graphed`; one process,
    # plain runs). Off CUDA the same graph-ready step runs eagerly (slower than the default step;
    # for checking it). Part of the run's settings: its numbers differ from the default step's
    cuda_graph: bool = False
    # the corpus: None = the running interpreter's standard library
    sources: list[str] | None = None
    val_fraction: float = 0.02
    max_files: int | None = None

    def __post_init__(self) -> None:
        self.betas = tuple(self.betas)  # type: ignore[assignment]
        for name in ("steps", "batch_size", "eval_every", "eval_batches", "checkpoint_every"):
            if not (isinstance(getattr(self, name), int) and getattr(self, name) >= 1):
                raise ValueError(f"TrainConfig.{name} must be an integer >= 1; got {getattr(self, name)!r}")
        if self.snapshot_every is not None and not (isinstance(self.snapshot_every, int)
                                                     and self.snapshot_every >= 1):
            raise ValueError(f"TrainConfig.snapshot_every must be an integer >= 1 or None; "
                             f"got {self.snapshot_every!r}")
        if self.seq_len is not None and self.seq_len < 2:
            raise ValueError(f"TrainConfig.seq_len must be >= 2 or None; got {self.seq_len!r}")
        if not (self.lr > 0 and self.eps > 0 and self.grad_rms > 0 and self.weight_decay >= 0):
            raise ValueError("TrainConfig.lr, eps and grad_rms must be > 0, weight_decay >= 0")
        if self.dtype not in AUTOCAST_DTYPES:
            raise ValueError(f"TrainConfig.dtype must be one of {sorted(AUTOCAST_DTYPES)}; got {self.dtype!r}")
        if not isinstance(self.cuda_graph, bool):
            raise ValueError(f"TrainConfig.cuda_graph must be True or False; got {self.cuda_graph!r}")
        if self.grad_rms_mode not in ("rescale", "clip"):
            raise ValueError(f"TrainConfig.grad_rms_mode must be 'rescale' or 'clip'; got {self.grad_rms_mode!r}")
        # the schedules validate their own fractions
        sparsity.l0_at_step(0, self.steps, 0.5, self.dense_frac, self.anneal_end_frac, self.anneal_kind)
        sparsity.lr_at_step(0, self.steps, self.lr, 1.0, self.warmup_frac)

    def to_json_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    # fields that change nothing in the weights a run produces
    NON_RESULT_FIELDS = ("eval_every", "eval_batches", "checkpoint_every", "snapshot_every", "device")

    def schedule(self, step: int, target_l0: float) -> tuple[float, float]:
        """(L0, LR) at optimizer step `step`: the L0 anneal towards `target_l0` and the
        "sharkfin" LR, base x warmup-then-decay x 1/sqrt(L0) (`sparsity`)."""
        l0 = sparsity.l0_at_step(step, self.steps, target_l0, self.dense_frac,
                                 self.anneal_end_frac, self.anneal_kind)
        return l0, sparsity.lr_at_step(step, self.steps, self.lr, l0, self.warmup_frac)


@dataclass
class TrainResult:
    model: SparseHookedTransformer
    out_dir: Path
    steps: int
    val_loss: float
    unigram_val_loss: float
    history: list[dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0
