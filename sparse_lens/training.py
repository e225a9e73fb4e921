"""Weight-sparse training (and the dense baseline, with sparsity off).

One step (`train_step`): forward, loss, backward, global gradient RMS rescale, AdamW step, then the
projection of every matrix onto its top-k (`SparseHookedTransformer.project_weights_`). The step
is the unit a torch DDP wrapper drives: it takes the (possibly wrapped) model, and the projection
is deterministic, so it runs identically on every rank after the all-reduced step.

Choices (the paper's, unless said):
- L0 annealed from 1 (dense) to the target: dense for the first `dense_frac` of steps, linear to
  the target by `anneal_end_frac` (see `sparsity.l0_at_step`).
- LR "sharkfin": base x linear warmup-then-decay x 1/sqrt(L0(step)) (`sparsity.lr_at_step`).
- AdamW, betas (0.9, 0.95), eps 0.1, weight decay 0.1 on matrices only.
- Gradient RMS: the paper says "clip at 1", the reference code always rescales to RMS 1. We
  rescale by default (`grad_rms_mode="rescale"`): with eps = 0.1 an unnormalised gradient of
  small RMS would make Adam's update vanish, so the large eps only makes sense with it. "clip"
  only scales down.
- Batches are a pure function of (seed, step) and the optimizer state is checkpointed, so
  `resume=True` ends with bitwise the weights an uninterrupted run has (CPU, same seed).

The run directory. It is also a model directory (`from_pretrained` opens it at any time) and a
working folder (pruning writes `circuits/` and `node_means.safetensors` there, the demo a report).
A checkpoint replaces only the trainer's own entries, each atomically (`checkpoint.save_model`):
the model's files and `training/`, which holds everything a resume needs (the weights, hard-linked,
the optimizer state and `state.json`), swapped in as one directory before the model's files, so a
crash between the two leaves a resumable run; files computed from the previous weights (cached
node means, a provenance record) are removed. A new run refuses a directory that already holds a
model unless `overwrite=True`; `resume=True` refuses one with nothing to resume. Ctrl-C (SIGINT)
finishes the current step, writes a checkpoint and raises `TrainingInterrupted`, which says how to
resume; `snapshot_every` keeps a model directory every so many steps under `snapshots/`.

Reproducibility. On CPU, `train` runs its steps under `deterministic_algorithms()`: without it,
the backward of the token embedding (TransformerLens's `W_E[tokens]`, an `index_put_` with
accumulate) adds its rows with parallel atomic float adds whenever more than one thread runs and
the batch has >= 32768 embedding entries, so two runs of the same command (even in one process)
ended with different weights, and after 1400 steps the `small` model's validation loss differed by
0.04 nats. With it, a run is bitwise reproducible across processes and hash seeds *for the same
torch build, CPU and thread count* (`torch.get_num_threads()`, recorded in the checkpoint): other
threads split float reductions (matmuls, sums) differently, so 1, 2 or 4 threads give weights that
differ in the last bits, and training amplifies that. On CUDA nothing is forced (cuBLAS needs
`CUBLAS_WORKSPACE_CONFIG` set before it starts); GPU runs are not promised to be bitwise reproducible.

Data-parallel. Under `torchrun` (see `sparse_lens.distributed`) `train` wraps the model in
DistributedDataParallel, each rank trains on its rows of a global batch of `batch_size x world
size`, rank 0 alone writes the run directory, and the ranks' weights are checked to stay bitwise
equal. With one process nothing of that runs. `TrainConfig.dtype="bf16"` runs the forward pass
under bfloat16 autocast (for GPUs).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import shutil
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Int
from tqdm.auto import tqdm

from sparse_lens import checkpoint, data, distributed, sparsity
from sparse_lens.config import SparseHookedTransformerConfig
from sparse_lens.model import SparseHookedTransformer

TRAINING_DIR = "training"
SNAPSHOTS_DIR = "snapshots"
# files in a model directory computed from the weights it held: stale once a new run replaces them
DERIVED_FILES = ("node_means.safetensors", "provenance.json")
log = logging.getLogger(__name__)
# TrainConfig.dtype -> the autocast dtype of the forward pass (None: no autocast)
AUTOCAST_DTYPES: dict[str, torch.dtype | None] = {"float32": None, "bf16": torch.bfloat16}


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN or infinite loss or gradient; the last good checkpoint is kept."""


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C (SIGINT) during `train`: a checkpoint of the last finished step was written; the
    message says how to resume. A KeyboardInterrupt, so code that handles Ctrl-C still does."""

    def __init__(self, out_dir: Path, step: int):
        super().__init__(f"interrupted: checkpoint at step {step} saved in {out_dir}; resume with "
                         f"`sparse-lens train --out {out_dir} --resume`")
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
        if self.grad_rms_mode not in ("rescale", "clip"):
            raise ValueError(f"TrainConfig.grad_rms_mode must be 'rescale' or 'clip'; got {self.grad_rms_mode!r}")
        # the schedules validate their own fractions
        sparsity.l0_at_step(0, self.steps, 0.5, self.dense_frac, self.anneal_end_frac, self.anneal_kind)
        sparsity.lr_at_step(0, self.steps, self.lr, 1.0, self.warmup_frac)

    def to_json_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    # fields that change nothing in the weights a run produces
    NON_RESULT_FIELDS = ("eval_every", "eval_batches", "checkpoint_every", "snapshot_every", "device")


@dataclass
class TrainResult:
    model: SparseHookedTransformer
    out_dir: Path
    steps: int
    val_loss: float
    unigram_val_loss: float
    history: list[dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0


# ----------------------------------------------------------------------------- the step
def make_optimizer(model: SparseHookedTransformer, tc: TrainConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices (ndim >= 2) only."""
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    groups = [dict(params=decay, weight_decay=tc.weight_decay),
              dict(params=no_decay, weight_decay=0.0)]
    return torch.optim.AdamW(groups, lr=tc.lr, betas=tc.betas, eps=tc.eps)


@torch.no_grad()
def rescale_grad_rms_(params: list[torch.Tensor], target: float, mode: str) -> float:
    """Scale all gradients together so their global RMS is `target` ("rescale") or at most
    `target` ("clip"). Returns the RMS before scaling; raises on a non-finite gradient."""
    grads = [p.grad for p in params if p.grad is not None]
    total_sq = torch.stack([g.pow(2).sum() for g in grads]).sum()
    rms = (total_sq / sum(g.numel() for g in grads)).sqrt().item()
    if not math.isfinite(rms):
        raise NonFiniteLossError(f"non-finite gradient (RMS {rms})")
    if rms > 0 and (mode == "rescale" or rms > target):
        torch._foreach_mul_(grads, target / rms)
    return rms


def train_step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    tokens: Int[torch.Tensor, "batch pos"],
    lr: float,
    l0: float,
    tc: TrainConfig,
) -> float:
    """One optimisation step on `tokens`; returns the loss (nats/token) before the step.

    `model` may be a `SparseHookedTransformer` or a DDP wrapper of one (`.module`)."""
    core: SparseHookedTransformer = getattr(model, "module", model)
    for group in optimizer.param_groups:
        group["lr"] = lr
    with autocast(tc.dtype, tokens.device.type):
        loss = model(tokens, return_type="loss")
    loss_value = loss.item()
    if not math.isfinite(loss_value):
        raise NonFiniteLossError(f"non-finite loss {loss_value}")
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    rescale_grad_rms_(list(core.parameters()), tc.grad_rms, tc.grad_rms_mode)
    optimizer.step()
    core.project_weights_(l0)
    return loss_value


def autocast(dtype: str, device_type: str):
    """The forward pass's autocast context for `TrainConfig.dtype` (a no-op for float32)."""
    target = AUTOCAST_DTYPES[dtype]
    if target is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device_type, dtype=target)


def corpus_for(tc: TrainConfig, tokenizer) -> data.TokenCorpus:
    """The corpus `tc` trains on (its sources, split and file cap), tokenized with `tokenizer`
    and cached in `data.default_cache_dir()`."""
    return data.load_corpus(tc.sources, tokenizer, val_fraction=tc.val_fraction,
                            max_files=tc.max_files, cache_dir=data.default_cache_dir())


@torch.no_grad()
def evaluate(model: SparseHookedTransformer, batches: list[torch.Tensor]) -> float:
    """Mean loss (nats/token) over fixed batches."""
    was_training = model.training
    model.eval()
    device = model.cfg.device
    losses = [model(b.to(device), return_type="loss").item() for b in batches]
    model.train(was_training)
    return sum(losses) / len(losses)


@contextlib.contextmanager
def deterministic_algorithms(enabled: bool = True):
    """Run the body with `torch.use_deterministic_algorithms(True, warn_only=True)` (ops with no
    deterministic version warn rather than raise) and without filling new tensors with NaN
    (`torch.utils.deterministic.fill_uninitialized_memory`, a cost with no use here); restore the
    caller's settings afterwards. `train` uses it on CPU; a custom loop around `train_step`
    (e.g. under DDP) should too, for reproducible weights."""
    if not enabled:
        yield
        return
    import torch.utils.deterministic as det

    before = (torch.are_deterministic_algorithms_enabled(),
              torch.is_deterministic_algorithms_warn_only_enabled(), det.fill_uninitialized_memory)
    torch.use_deterministic_algorithms(True, warn_only=True)
    det.fill_uninitialized_memory = False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])
        det.fill_uninitialized_memory = before[2]


# ------------------------------------------------------------------------------ the run
def train(
    model_cfg: SparseHookedTransformerConfig | None,
    tc: TrainConfig | None,
    out_dir: str | Path,
    resume: bool | str = False,
    corpus: data.TokenCorpus | None = None,
    progress: bool = True,
    overwrite: bool = False,
    ranks: distributed.RankContext | None = None,
) -> TrainResult:
    """Train a model of `model_cfg` on the corpus of `tc`, checkpointing into `out_dir` (a model
    directory `SparseHookedTransformer.from_pretrained` opens at any time).

    `resume`: False starts a new run, and refuses a directory that already holds a model unless
    `overwrite=True` (which replaces the model's files and those derived from its weights,
    `DERIVED_FILES`; other files stay). True continues the run in `out_dir` and refuses a
    directory with nothing to resume; `model_cfg` and `tc` may then be None (the saved ones are
    used), and given ones must match the checkpoint's. "auto" continues a run if there is one,
    else starts one. Ctrl-C writes a checkpoint and raises `TrainingInterrupted`.

    On CPU the run is bitwise reproducible for the same torch build, CPU and thread count (see
    the module docstring).

    `ranks`: this process's place in a data-parallel run (default `distributed.current()`: the
    process group torchrun started, else a single process); see `sparse_lens.distributed`.
    `tc.batch_size` is then the per-rank batch, and only rank 0 writes to `out_dir`."""
    out_dir = Path(out_dir)
    ranks = ranks or distributed.current()
    model_cfg, tc, resuming = _plan_run(model_cfg, tc, out_dir, resume, overwrite, ranks.is_main)
    ranks.barrier()  # rank 0 has cleared what --overwrite replaces before anyone reads out_dir
    with deterministic_algorithms(torch.device(tc.device).type == "cpu"):
        return _train(model_cfg, tc, out_dir, resuming, corpus, progress, ranks)


def _plan_run(model_cfg, tc, out_dir: Path, resume: bool | str, overwrite: bool, writer: bool = True):
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


def _train(
    model_cfg: SparseHookedTransformerConfig,
    tc: TrainConfig,
    out_dir: Path,
    resuming: bool,
    corpus: data.TokenCorpus | None,
    progress: bool,
    ranks: distributed.RankContext,
) -> TrainResult:
    from sparse_lens.tokenizer import load_tokenizer

    start = time.perf_counter()
    device = ranks.device_for(_resolve_device(tc.device))
    model_cfg = dataclasses.replace(model_cfg, device=device)
    seq_len = tc.seq_len or model_cfg.n_ctx
    if seq_len > model_cfg.n_ctx:
        raise ValueError(f"TrainConfig.seq_len={seq_len} exceeds the model's n_ctx={model_cfg.n_ctx}")

    if resuming:
        model, optimizer, first_step, history = _load_run(out_dir, model_cfg, tc, device, ranks.world_size)
    else:
        torch.manual_seed(tc.seed)
        model = SparseHookedTransformer(model_cfg, tokenizer=load_tokenizer())
        optimizer = make_optimizer(model, tc)
        first_step, history = 0, []
    if corpus is None:
        corpus = corpus_for(tc, model.tokenizer)
    if int(corpus.train.max()) >= model_cfg.d_vocab:
        raise ValueError(f"the corpus has token ids >= d_vocab={model_cfg.d_vocab}")
    val_batches = data.validation_batches(corpus.val, tc.batch_size, seq_len, tc.eval_batches)
    unigram = data.unigram_cross_entropy(corpus.train, corpus.val, model_cfg.d_vocab)

    def save(step: int) -> None:
        if ranks.is_main:
            _save_run(out_dir, model, optimizer, step, model_cfg, tc, history, unigram, ranks.world_size)

    trained = ranks.wrap(model)  # DDP when distributed: gradients all-reduced in backward()

    model.train()
    val_loss = history[-1]["val_loss"] if history else float("nan")
    last_step = first_step
    if _reached(tc, val_loss):  # a resumed run that had already stopped at its target loss
        first_step = tc.steps
    bar = tqdm(range(first_step, tc.steps), initial=first_step, total=tc.steps,
               disable=not (progress and ranks.is_main), desc="sparse train" if model_cfg.is_weight_sparse else "dense train")
    with _sigint_flag() as interrupted:
        for step in bar:
            l0 = sparsity.l0_at_step(step, tc.steps, model_cfg.weight_l0, tc.dense_frac,
                                     tc.anneal_end_frac, tc.anneal_kind)
            lr = sparsity.lr_at_step(step, tc.steps, tc.lr, l0, tc.warmup_frac)
            tokens = distributed.rank_batch(corpus.train, tc.batch_size, seq_len, step, tc.seed,
                                            ranks.rank, ranks.world_size).to(device)
            try:
                loss = train_step(trained, optimizer, tokens, lr, l0, tc)
            except NonFiniteLossError as err:
                raise NonFiniteLossError(
                    f"{err} at step {step}; stopping. The last good checkpoint is kept in "
                    f"{out_dir} (step {_saved_step(out_dir)}); lower TrainConfig.lr or check the data"
                ) from err
            done = last_step = step + 1
            loss, stopping = ranks.reduce_step(loss, interrupted(), device)  # as one, across ranks
            if done % distributed.CHECKSUM_EVERY == 0 or done == tc.steps:
                ranks.check_weights(model, done)
            record = dict(step=done, loss=loss, l0=l0, lr=lr)
            if done % tc.eval_every == 0 or done == tc.steps:
                val_loss = evaluate(model, val_batches)
                record["val_loss"] = val_loss
                history.append(record)
                log.info("step %d/%d  loss %.4f  val %.4f  L0 %.4f  lr %.3g",
                         done, tc.steps, loss, val_loss, l0, lr)
            bar.set_postfix(loss=f"{loss:.3f}", val=f"{val_loss:.3f}", l0=f"{l0:.4f}")
            stop = _reached(tc, val_loss) and "val_loss" in record
            if done % tc.checkpoint_every == 0 or done == tc.steps or stop or stopping:
                save(done)
            if tc.snapshot_every and done % tc.snapshot_every == 0 and ranks.is_main:
                checkpoint.save_model(model, out_dir / SNAPSHOTS_DIR / f"step-{done:06d}")
            if stopping:
                bar.close()
                raise TrainingInterrupted(out_dir, done)
            if stop:
                log.info("validation loss %.4f <= stop_at_val_loss %.4f: stopping at step %d",
                         val_loss, tc.stop_at_val_loss, done)
                break
    bar.close()
    ranks.barrier()  # rank 0's last checkpoint is written before any rank returns
    steps_done = max(last_step, history[-1]["step"] if history else 0)
    if not history or history[-1]["step"] != steps_done:
        val_loss = evaluate(model, val_batches)
    return TrainResult(model=model, out_dir=out_dir, steps=steps_done, val_loss=val_loss,
                       unigram_val_loss=unigram, history=history,
                       seconds=time.perf_counter() - start)


@contextlib.contextmanager
def _sigint_flag():
    """Within the body, the first Ctrl-C (SIGINT) only sets a flag (the body polls it with the
    yielded callable) and restores the previous handler, so a second Ctrl-C interrupts at once.
    Outside the main thread, where signal handlers cannot be set, the flag is never set."""
    hit = []
    if threading.current_thread() is not threading.main_thread():
        yield lambda: False
        return
    previous = signal.getsignal(signal.SIGINT)

    def on_sigint(signum, frame):
        hit.append(signum)
        signal.signal(signal.SIGINT, previous)
        log.warning("Ctrl-C: finishing this step, then writing a checkpoint (Ctrl-C again to abort)")

    signal.signal(signal.SIGINT, on_sigint)
    try:
        yield lambda: bool(hit)
    finally:
        signal.signal(signal.SIGINT, previous)


# ------------------------------------------------------------------- checkpoints
def _save_run(out_dir: Path, model: SparseHookedTransformer, optimizer: torch.optim.Optimizer,
              step: int, model_cfg: SparseHookedTransformerConfig, tc: TrainConfig,
              history: list[dict[str, float]], unigram: float, world_size: int = 1) -> None:
    """Checkpoint: the model's files plus `training/` (weights linked, optimizer state, state.json).
    Files derived from the previous weights (`DERIVED_FILES`: cached node means, a provenance
    record with their digest) are removed; everything else in `out_dir` stays."""

    def write_training_state(stage: Path) -> None:
        (stage / TRAINING_DIR).mkdir()
        checkpoint.link_or_copy(stage / checkpoint.WEIGHTS_FILE, stage / TRAINING_DIR / checkpoint.WEIGHTS_FILE)
        tensors, param_state = optimizer_tensors(model, optimizer)
        checkpoint.save_tensors(tensors, stage / TRAINING_DIR / "optimizer.safetensors")
        # torch build and thread count: what bitwise reproducibility depends on (module docstring)
        state = dict(step=step, train_config=tc.to_json_dict(), param_state=param_state,
                     history=history, unigram_val_loss=unigram, torch_version=torch.__version__,
                     torch_threads=torch.get_num_threads(), world_size=world_size)
        (stage / TRAINING_DIR / "state.json").write_text(json.dumps(state, indent=1))

    checkpoint.save_model(model, out_dir, write_extra=write_training_state)
    for name in DERIVED_FILES:  # computed from the weights just replaced
        (out_dir / name).unlink(missing_ok=True)


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
    """Put back what `optimizer_tensors` saved (scalars as 0-d float32 tensors, as torch keeps them)."""
    for name, p in model.named_parameters():
        state = {key: torch.tensor(value, dtype=torch.float32)
                 for key, value in scalars.get(name, {}).items()}
        state.update({key[len(name) + 1:]: t.to(p.device) for key, t in tensors.items()
                      if key.rsplit(".", 1)[0] == name})
        if state:
            optimizer.state[p] = state


def _load_run(out_dir: Path, model_cfg: SparseHookedTransformerConfig, tc: TrainConfig, device: str,
              world_size: int = 1):
    model = SparseHookedTransformer.from_pretrained(out_dir, device=device)
    weights = out_dir / TRAINING_DIR / checkpoint.WEIGHTS_FILE
    if weights.is_file():  # runs written before training/ held its own copy use the model's
        checkpoint.load_parameters(model, checkpoint.load_tensors(weights), source=weights)
    saved_model_cfg = model.cfg.to_json_dict()
    wanted_model_cfg = model_cfg.to_json_dict()
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
    diffs = [f"model.{k}: saved {saved_model_cfg.get(k)!r}, given {v!r}"
             for k, v in wanted_model_cfg.items() if saved_model_cfg.get(k) != v]
    diffs += [f"train.{k}: saved {saved_tc.get(k)!r}, given {v!r}"
              for k, v in tc.to_json_dict().items()
              if k not in TrainConfig.NON_RESULT_FIELDS and saved_tc.get(k) != v]
    if diffs:
        raise ValueError(f"cannot resume {out_dir}: the configs differ from the checkpoint's: "
                         + "; ".join(diffs))
    optimizer = make_optimizer(model, tc)
    tensors = checkpoint.load_tensors(out_dir / TRAINING_DIR / "optimizer.safetensors")
    scalars = state.get("param_state") or {  # runs written before param_state: Adam's steps
        name: {"step": step} for name, step in state.get("param_steps", {}).items()}
    load_optimizer_state(model, optimizer, tensors, scalars)
    if state.get("torch_threads", torch.get_num_threads()) != torch.get_num_threads():
        log.warning("resuming with %d torch threads where the run used %d: the weights will not be "
                    "bitwise those of an uninterrupted run (set OMP_NUM_THREADS=%d to match)",
                    torch.get_num_threads(), state["torch_threads"], state["torch_threads"])
    return model, optimizer, int(state["step"]), list(state["history"])


def _saved_step(out_dir: Path) -> int | str:
    try:
        return checkpoint.read_json(out_dir / TRAINING_DIR / "state.json")["step"]
    except checkpoint.CheckpointError:
        return "none written yet"


def _reached(tc: TrainConfig, val_loss: float) -> bool:
    """Whether `val_loss` meets the run's `stop_at_val_loss` (never when it has none)."""
    return tc.stop_at_val_loss is not None and val_loss <= tc.stop_at_val_loss


def _resolve_device(device: str) -> str:
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} was asked for but torch.cuda.is_available() is False")
    return device
