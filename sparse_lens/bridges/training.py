"""Training a weight-sparse model together with its bridges, against a frozen dense model.

    dense = SparseHookedTransformer.from_pretrained("runs/small-dense")   # any HookedTransformer
    result = train_bridged(dense, SparseHookedTransformerConfig.preset("small"),
                           BridgeTrainConfig(train=TrainConfig(steps=300)), "runs/small-bridged")
    sparse, bridges = load_bridged("runs/small-bridged")

The loop is the project's own (`sparse_lens.training`): batches from `data.sample_batch` (a pure
function of seed and step), the L0 anneal and the "sharkfin" LR of `sparsity`, AdamW with the
paper's settings (`training.make_optimizer`), the global gradient RMS rescale, and the weight
projection after every step. What differs: the loss is `losses.bridge_losses` (six terms); the
bridges' own parameters join the optimizer in groups of their own whose LR omits the
1/sqrt(L0) factor (they are dense; the factor compensates for sparse weights), and their
gradient is rescaled to RMS 1 apart from the sparse model's: in one global RMS the bridges'
small share of the gradient would sit far below Adam's deliberately large eps (0.1) and
they would barely move. The dense model's parameters are frozen for the run (and restored
after). Runs do not resume.

A bridged model directory is a sparse model directory (`SparseHookedTransformer.from_pretrained`
opens it) with a `bridges/` folder: `bridges.json`, `bridges.safetensors`, and `training.json`
(configs and history). It is written atomically, at checkpoints and at the end.
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
from tqdm.auto import tqdm

from sparse_lens import checkpoint, data, sparsity
from sparse_lens.bridges.hybrid import hybrid_kl_table, mean_kl
from sparse_lens.bridges.losses import LOSS_TERMS, bridge_losses, total_loss
from sparse_lens.bridges.modules import Bridges, check_models
from sparse_lens.fingerprint import model_fingerprint
from sparse_lens.config import SparseHookedTransformerConfig
from sparse_lens.model import SparseHookedTransformer
from sparse_lens.training import (
    NonFiniteLossError, TrainConfig, corpus_for, deterministic_algorithms, make_optimizer,
    rescale_grad_rms_,
)

BRIDGES_DIR = "bridges"
TRAINING_FILE = "training.json"
log = logging.getLogger(__name__)


@dataclass(kw_only=True)
class BridgeTrainConfig:
    """How to train a bridged sparse model. `train` holds everything the plain training has
    (steps, batches, LR, schedules, AdamW, corpus, seed); the rest is the bridges' own."""

    train: TrainConfig = field(default_factory=TrainConfig)
    encoder_topk_frac: float | None = 0.25  # AbsTopK after each encoder (None: no top-k)
    # sites whose hybrid passes run each step, drawn afresh per step (None: all 2L+1, the
    # paper's). Fewer is cheaper: each site costs a partial forward and backward of both models.
    hybrid_sites: int | None = None
    loss_weights: dict[str, float] = field(default_factory=lambda: dict.fromkeys(LOSS_TERMS, 1.0))
    eval_hybrid_batches: int = 2  # validation batches for the per-site hybrid KL at each eval

    def __post_init__(self) -> None:
        if isinstance(self.train, dict):
            self.train = TrainConfig(**self.train)
        unknown = sorted(set(self.loss_weights) - set(LOSS_TERMS))
        if unknown:
            raise ValueError(f"BridgeTrainConfig.loss_weights has unknown terms {unknown}; "
                             f"terms are {list(LOSS_TERMS)}")
        if any(not (w >= 0 and math.isfinite(w)) for w in self.loss_weights.values()):
            raise ValueError("BridgeTrainConfig.loss_weights must be finite and >= 0; "
                             f"got {self.loss_weights}")
        sites = self.hybrid_sites
        if sites is not None and not (isinstance(sites, int) and sites >= 1):
            raise ValueError(f"BridgeTrainConfig.hybrid_sites must be None or an integer >= 1; "
                             f"got {self.hybrid_sites!r}")
        if self.encoder_topk_frac is not None and not 0.0 < self.encoder_topk_frac <= 1.0:
            raise ValueError(f"BridgeTrainConfig.encoder_topk_frac must be None or in (0, 1]; "
                             f"got {self.encoder_topk_frac!r}")
        if not (isinstance(self.eval_hybrid_batches, int) and self.eval_hybrid_batches >= 1):
            raise ValueError("BridgeTrainConfig.eval_hybrid_batches must be an integer >= 1")

    def to_json_dict(self) -> dict[str, Any]:
        return dict(train=self.train.to_json_dict(), encoder_topk_frac=self.encoder_topk_frac,
                    hybrid_sites=self.hybrid_sites, loss_weights=dict(self.loss_weights),
                    eval_hybrid_batches=self.eval_hybrid_batches)


@dataclass
class BridgeTrainResult:
    sparse: SparseHookedTransformer
    bridges: Bridges
    out_dir: Path
    history: list[dict[str, Any]]  # one record per step: losses, l0, lr (val_* at evaluations)
    seconds: float = 0.0


# -------------------------------------------------------------------------- the run
def train_bridged(
    dense,
    sparse: SparseHookedTransformerConfig | SparseHookedTransformer,
    config: BridgeTrainConfig | None = None,
    out_dir: str | Path = "runs/bridged",
    corpus: data.TokenCorpus | None = None,
    progress: bool = True,
    dense_ref: str | None = None,
) -> BridgeTrainResult:
    """Train a sparse model and its bridges against the frozen `dense` model; save them in
    `out_dir` (see the module docstring). `sparse`: a config (a fresh model, seeded by
    `config.train.seed`) or a model to continue training (e.g. a finished sparse run; then set
    `dense_frac=anneal_end_frac=0` so L0 starts at its target). `dense_ref`: a note saved with
    the bridges saying where the dense model lives (e.g. its directory)."""
    config = config or BridgeTrainConfig()
    with deterministic_algorithms(torch.device(config.train.device).type == "cpu"), _frozen(dense):
        return _train(dense, sparse, config, Path(out_dir), corpus, progress, dense_ref)


def _train(dense, sparse, config: BridgeTrainConfig, out_dir: Path, corpus, progress, dense_ref):
    from sparse_lens.tokenizer import load_tokenizer

    start = time.perf_counter()
    tc = config.train
    if isinstance(sparse, SparseHookedTransformerConfig):
        torch.manual_seed(tc.seed)
        tokenizer = dense.tokenizer if dense.tokenizer is not None else load_tokenizer()
        sparse = SparseHookedTransformer(dataclasses.replace(sparse, device=tc.device), tokenizer=tokenizer)
    check_models(dense, sparse)
    bridges = Bridges.for_pair(dense, sparse, config.encoder_topk_frac, seed=tc.seed)
    bridges.dense_fingerprint = model_fingerprint(dense)
    bridges.meta = dict(dense_model=dense_ref, dense_model_name=dense.cfg.model_name)
    seq_len = tc.seq_len or min(dense.cfg.n_ctx, sparse.cfg.n_ctx)
    if seq_len > min(dense.cfg.n_ctx, sparse.cfg.n_ctx):
        raise ValueError(f"TrainConfig.seq_len={seq_len} exceeds a model's n_ctx")
    if corpus is None:
        corpus = corpus_for(tc, sparse.tokenizer)
    if int(corpus.train.max()) >= sparse.cfg.d_vocab:
        raise ValueError(f"the corpus has token ids >= d_vocab={sparse.cfg.d_vocab}")
    val_batches = data.validation_batches(corpus.val, tc.batch_size, seq_len, tc.eval_batches)

    optimizer = make_optimizer(sparse, tc)
    n_sparse_groups = len(optimizer.param_groups)
    for params, decay in (([p for p in bridges.parameters() if p.ndim >= 2], tc.weight_decay),
                          ([p for p in bridges.parameters() if p.ndim < 2], 0.0)):
        optimizer.add_param_group(dict(params=params, weight_decay=decay))
    sparse_params, bridge_params = list(sparse.parameters()), list(bridges.parameters())
    target_l0 = sparse.cfg.weight_l0
    history: list[dict[str, Any]] = []
    sparse.train()
    bar = tqdm(range(tc.steps), disable=not progress, desc="bridged train")
    for step in bar:
        l0 = sparsity.l0_at_step(step, tc.steps, target_l0, tc.dense_frac, tc.anneal_end_frac, tc.anneal_kind)
        lr = sparsity.lr_at_step(step, tc.steps, tc.lr, l0, tc.warmup_frac)
        bridge_lr = sparsity.lr_at_step(step, tc.steps, tc.lr, 1.0, tc.warmup_frac)
        for i, group in enumerate(optimizer.param_groups):
            group["lr"] = lr if i < n_sparse_groups else bridge_lr
        tokens = data.sample_batch(corpus.train, tc.batch_size, seq_len, step, tc.seed).to(tc.device)
        terms = bridge_losses(dense, sparse, bridges, tokens, _hybrid_sites(config, len(bridges.sites), step))
        loss = total_loss(terms, config.loss_weights)
        if not math.isfinite(loss.item()):
            raise NonFiniteLossError(f"non-finite bridged loss at step {step}: "
                                     f"{ {k: v.item() for k, v in terms.items()} }")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        rescale_grad_rms_(sparse_params, tc.grad_rms, tc.grad_rms_mode)
        rescale_grad_rms_(bridge_params, tc.grad_rms, tc.grad_rms_mode)
        optimizer.step()
        sparse.project_weights_(l0)
        done = step + 1
        record = dict(step=done, loss=loss.item(), l0=l0, lr=lr, **{k: v.item() for k, v in terms.items()})
        if done % tc.eval_every == 0 or done == tc.steps:
            record.update(evaluate_bridged(dense, sparse, bridges, val_batches,
                                           n_hybrid_batches=config.eval_hybrid_batches))
            log.info("step %d/%d  loss %.4f  val ce %.4f  val kl %.4f  hybrid d2s %.4f s2d %.4f",
                     done, tc.steps, record["loss"], record["val_ce"], record["val_kl"],
                     record["val_hybrid_d2s"], record["val_hybrid_s2d"])
        history.append(record)
        bar.set_postfix(loss=f"{record['loss']:.3f}", ce=f"{record['ce']:.3f}", l0=f"{l0:.4f}")
        if done % tc.checkpoint_every == 0 or done == tc.steps:
            save_bridged(sparse, bridges, out_dir, dict(config=config.to_json_dict(),
                                                        model_config=sparse.cfg.to_json_dict(),
                                                        step=done, history=history))
    bar.close()
    sparse.eval()
    return BridgeTrainResult(sparse, bridges, out_dir, history, time.perf_counter() - start)


def _hybrid_sites(config: BridgeTrainConfig, n_sites: int, step: int) -> list[int] | None:
    """The sites whose hybrid passes run at `step`: all, or a sorted random subset drawn from a
    generator seeded by (seed, step), like the batches."""
    if config.hybrid_sites is None or config.hybrid_sites >= n_sites:
        return None
    gen = torch.Generator().manual_seed((config.train.seed * 1_000_003 + step + 7) % 2**63)
    return sorted(torch.randperm(n_sites, generator=gen)[:config.hybrid_sites].tolist())


@torch.no_grad()
def evaluate_bridged(dense, sparse, bridges: Bridges, batches: list[torch.Tensor],
                     n_hybrid_batches: int = 2) -> dict[str, float]:
    """Validation figures: the sparse model's CE and KL(dense || sparse) over `batches`; the
    hybrid KLs (to the dense output, mean over sites) and bridge NMSEs over the first
    `n_hybrid_batches` of them."""
    was_training = sparse.training
    sparse.eval()
    try:
        device = sparse.cfg.device
        ce = kl = 0.0
        for tokens in batches:
            tokens = tokens.to(device)
            dense_logits, sparse_logits = dense(tokens), sparse(tokens)
            ce += sparse.loss_fn(sparse_logits, tokens).item()
            kl += mean_kl(dense_logits, sparse_logits).item()
        table = hybrid_kl_table(dense, sparse, bridges, [b.to(device) for b in batches[:n_hybrid_batches]])
    finally:
        sparse.train(was_training)
    return dict(val_ce=ce / len(batches), val_kl=kl / len(batches),
                val_hybrid_d2s=float(table.dense_to_sparse_kl_to_dense.mean()),
                val_hybrid_s2d=float(table.sparse_to_dense_kl_to_dense.mean()),
                val_enc_nmse=float(table.enc_nmse.mean()), val_dec_nmse=float(table.dec_nmse.mean()))


@contextlib.contextmanager
def _frozen(model):
    """Parameters of `model` without gradients for the body; restored afterwards."""
    before = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, r in zip(model.parameters(), before):
            p.requires_grad_(r)


# -------------------------------------------------------------------------- save / load
def save_bridged(sparse: SparseHookedTransformer, bridges: Bridges, path: str | Path,
                 training_state: dict | None = None) -> Path:
    """Write the sparse model directory at `path` with its bridges in `bridges/` (atomically)."""

    def write_bridges(tmp: Path) -> None:
        bridges.save(tmp / BRIDGES_DIR)
        if training_state is not None:
            (tmp / BRIDGES_DIR / TRAINING_FILE).write_text(json.dumps(training_state, indent=1))

    return checkpoint.save_model(sparse, path, write_extra=write_bridges)


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
