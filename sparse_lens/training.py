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
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Int
from tqdm.auto import tqdm

from sparse_lens import checkpoint, data, sparsity
from sparse_lens.config import SparseHookedTransformerConfig
from sparse_lens.model import SparseHookedTransformer

TRAINING_DIR = "training"
log = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN or infinite loss or gradient; the last good checkpoint is kept."""


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
    # stop (and save) at the first evaluation whose validation loss is <= this: a model trained
    # to a given loss (the analyses' dense baseline at the sparse model's loss); None = never
    stop_at_val_loss: float | None = None
    seed: int = 0
    device: str = "cpu"
    # the corpus: None = the running interpreter's standard library
    sources: list[str] | None = None
    val_fraction: float = 0.02
    max_files: int | None = None

    def __post_init__(self) -> None:
        self.betas = tuple(self.betas)  # type: ignore[assignment]
        for name in ("steps", "batch_size", "eval_every", "eval_batches", "checkpoint_every"):
            if not (isinstance(getattr(self, name), int) and getattr(self, name) >= 1):
                raise ValueError(f"TrainConfig.{name} must be an integer >= 1; got {getattr(self, name)!r}")
        if self.seq_len is not None and self.seq_len < 2:
            raise ValueError(f"TrainConfig.seq_len must be >= 2 or None; got {self.seq_len!r}")
        if not (self.lr > 0 and self.eps > 0 and self.grad_rms > 0 and self.weight_decay >= 0):
            raise ValueError("TrainConfig.lr, eps and grad_rms must be > 0, weight_decay >= 0")
        if self.grad_rms_mode not in ("rescale", "clip"):
            raise ValueError(f"TrainConfig.grad_rms_mode must be 'rescale' or 'clip'; got {self.grad_rms_mode!r}")
        # the schedules validate their own fractions
        sparsity.l0_at_step(0, self.steps, 0.5, self.dense_frac, self.anneal_end_frac, self.anneal_kind)
        sparsity.lr_at_step(0, self.steps, self.lr, 1.0, self.warmup_frac)

    def to_json_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    # fields that change nothing in the weights a run produces
    NON_RESULT_FIELDS = ("eval_every", "eval_batches", "checkpoint_every", "device")


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


@torch.no_grad()
def corpus_for(tc: TrainConfig, tokenizer) -> data.TokenCorpus:
    """The corpus `tc` trains on (its sources, split and file cap), tokenized with `tokenizer`
    and cached in `data.default_cache_dir()`."""
    return data.load_corpus(tc.sources, tokenizer, val_fraction=tc.val_fraction,
                            max_files=tc.max_files, cache_dir=data.default_cache_dir())


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
    model_cfg: SparseHookedTransformerConfig,
    tc: TrainConfig,
    out_dir: str | Path,
    resume: bool = False,
    corpus: data.TokenCorpus | None = None,
    progress: bool = True,
) -> TrainResult:
    """Train a model of `model_cfg` on the corpus of `tc`, checkpointing into `out_dir` (a model
    directory `SparseHookedTransformer.from_pretrained` opens at any time). With `resume=True`
    and a checkpoint in `out_dir`, continue it (the configs must match the checkpoint's).

    On CPU the run is bitwise reproducible for the same torch build, CPU and thread count (see
    the module docstring)."""
    with deterministic_algorithms(torch.device(tc.device).type == "cpu"):
        return _train(model_cfg, tc, out_dir, resume, corpus, progress)


def _train(
    model_cfg: SparseHookedTransformerConfig,
    tc: TrainConfig,
    out_dir: str | Path,
    resume: bool,
    corpus: data.TokenCorpus | None,
    progress: bool,
) -> TrainResult:
    from sparse_lens.tokenizer import load_tokenizer

    start = time.perf_counter()
    out_dir = Path(out_dir)
    device = _resolve_device(tc.device)
    model_cfg = dataclasses.replace(model_cfg, device=device)
    seq_len = tc.seq_len or model_cfg.n_ctx
    if seq_len > model_cfg.n_ctx:
        raise ValueError(f"TrainConfig.seq_len={seq_len} exceeds the model's n_ctx={model_cfg.n_ctx}")

    resuming = resume and (out_dir / TRAINING_DIR).is_dir()
    if resuming:
        model, optimizer, first_step, history = _load_run(out_dir, model_cfg, tc, device)
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

    model.train()
    val_loss = history[-1]["val_loss"] if history else float("nan")
    last_step = first_step
    if _reached(tc, val_loss):  # a resumed run that had already stopped at its target loss
        first_step = tc.steps
    bar = tqdm(range(first_step, tc.steps), initial=first_step, total=tc.steps,
               disable=not progress, desc="sparse train" if model_cfg.is_weight_sparse else "dense train")
    for step in bar:
        l0 = sparsity.l0_at_step(step, tc.steps, model_cfg.weight_l0, tc.dense_frac,
                                 tc.anneal_end_frac, tc.anneal_kind)
        lr = sparsity.lr_at_step(step, tc.steps, tc.lr, l0, tc.warmup_frac)
        tokens = data.sample_batch(corpus.train, tc.batch_size, seq_len, step, tc.seed).to(device)
        try:
            loss = train_step(model, optimizer, tokens, lr, l0, tc)
        except NonFiniteLossError as err:
            raise NonFiniteLossError(
                f"{err} at step {step}; stopping. The last good checkpoint is kept in "
                f"{out_dir} (step {_saved_step(out_dir)}); lower TrainConfig.lr or check the data"
            ) from err
        done = last_step = step + 1
        record = dict(step=done, loss=loss, l0=l0, lr=lr)
        if done % tc.eval_every == 0 or done == tc.steps:
            val_loss = evaluate(model, val_batches)
            record["val_loss"] = val_loss
            history.append(record)
            log.info("step %d/%d  loss %.4f  val %.4f  L0 %.4f  lr %.3g",
                     done, tc.steps, loss, val_loss, l0, lr)
        bar.set_postfix(loss=f"{loss:.3f}", val=f"{val_loss:.3f}", l0=f"{l0:.4f}")
        stop = _reached(tc, val_loss) and "val_loss" in record
        if done % tc.checkpoint_every == 0 or done == tc.steps or stop:
            _save_run(out_dir, model, optimizer, done, model_cfg, tc, history, unigram)
        if stop:
            log.info("validation loss %.4f <= stop_at_val_loss %.4f: stopping at step %d",
                     val_loss, tc.stop_at_val_loss, done)
            break
    bar.close()
    steps_done = max(last_step, history[-1]["step"] if history else 0)
    if not history or history[-1]["step"] != steps_done:
        val_loss = evaluate(model, val_batches)
    return TrainResult(model=model, out_dir=out_dir, steps=steps_done, val_loss=val_loss,
                       unigram_val_loss=unigram, history=history,
                       seconds=time.perf_counter() - start)


# ------------------------------------------------------------------- checkpoints
def _save_run(out_dir: Path, model: SparseHookedTransformer, optimizer: torch.optim.AdamW,
              step: int, model_cfg: SparseHookedTransformerConfig, tc: TrainConfig,
              history: list[dict[str, float]], unigram: float) -> None:
    names = {id(p): n for n, p in model.named_parameters()}

    def write_training_state(tmp: Path) -> None:
        (tmp / TRAINING_DIR).mkdir()
        tensors, param_steps = {}, {}
        for group in optimizer.param_groups:
            for p in group["params"]:
                state = optimizer.state.get(p)
                if state:
                    name = names[id(p)]
                    tensors[f"{name}.exp_avg"] = state["exp_avg"]
                    tensors[f"{name}.exp_avg_sq"] = state["exp_avg_sq"]
                    param_steps[name] = float(state["step"])
        checkpoint.save_tensors(tensors, tmp / TRAINING_DIR / "optimizer.safetensors")
        # torch build and thread count: what bitwise reproducibility depends on (module docstring)
        state = dict(step=step, train_config=tc.to_json_dict(), param_steps=param_steps,
                     history=history, unigram_val_loss=unigram, torch_version=torch.__version__,
                     torch_threads=torch.get_num_threads())
        (tmp / TRAINING_DIR / "state.json").write_text(json.dumps(state, indent=1))

    checkpoint.save_model(model, out_dir, write_extra=write_training_state)


def _load_run(out_dir: Path, model_cfg: SparseHookedTransformerConfig, tc: TrainConfig, device: str):
    model = SparseHookedTransformer.from_pretrained(out_dir, device=device)
    saved_model_cfg = model.cfg.to_json_dict()
    wanted_model_cfg = model_cfg.to_json_dict()
    state = checkpoint.read_json(out_dir / TRAINING_DIR / "state.json")
    saved_tc = state["train_config"]
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
    for name, p in model.named_parameters():
        if name in state["param_steps"]:
            optimizer.state[p] = dict(
                step=torch.tensor(state["param_steps"][name]),
                exp_avg=tensors[f"{name}.exp_avg"].to(p.device),
                exp_avg_sq=tensors[f"{name}.exp_avg_sq"].to(p.device),
            )
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
