"""Training a weight-sparse model together with its bridges, against a frozen dense model.

    dense = SparseHookedTransformer.from_pretrained("runs/small-dense")   # any HookedTransformer
    result = train_bridged(dense, SparseHookedTransformerConfig.preset("small"),
                           BridgeTrainConfig(train=TrainConfig(steps=300)), "runs/small-bridged")
    sparse, bridges = load_bridged("runs/small-bridged")

The loop is the project's own, shared with plain runs (`training.loop`): batches a pure function
of seed and step, the L0 anneal and the "sharkfin" LR, AdamW with the paper's settings
(`training.make_optimizer`), the weight projection after every step, evaluation, checkpoints,
Ctrl-C and resume. What differs (`BridgedJob`): the loss is `losses.bridge_losses` (six terms);
the bridges' own parameters join the optimizer in groups of their own whose LR omits the
1/sqrt(L0) factor (they are dense; the factor compensates for sparse weights), and their
gradient is rescaled to RMS 1 apart from the sparse model's: in one global RMS the bridges'
small share of the gradient would sit far below Adam's deliberately large eps (0.1) and
they would barely move. The dense model's parameters are frozen for the run (and restored
after). Runs resume like plain ones, bitwise (`resume=True` or "auto").

A bridged model directory is a sparse model directory with a `bridges/` folder (`bridges.saving`):
`bridges.json`, `bridges.safetensors`, and `training.json` (configs, step, history) beside the
optimizer state. It is written atomically, at checkpoints and at the end.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from sparse_lens import checkpoint, data, sparsity
from sparse_lens.bridges import saving
from sparse_lens.bridges.hybrid import hybrid_kl_table, mean_kl
from sparse_lens.bridges.losses import LOSS_TERMS, bridge_losses, total_loss
from sparse_lens.bridges.modules import Bridges, check_models
from sparse_lens.bridges.saving import (  # noqa: F401  (public here too: `sparse_lens.bridges`)
    BRIDGES_DIR, TRAINING_FILE, load_bridged, save_bridged, training_state,
)
from sparse_lens.config import SparseHookedTransformerConfig
from sparse_lens.fingerprint import model_fingerprint
from sparse_lens.model import SparseHookedTransformer
from sparse_lens.training import (
    Loop, NonFiniteLossError, TrainConfig, corpus_for, deterministic_algorithms, make_optimizer,
    rescale_grad_rms_, run_loop, seeded_model,
)
from sparse_lens.training.run import check_vocabulary
from sparse_lens.training.rundir import config_diffs, saved_fused_adamw


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

    @classmethod
    def from_json_dict(cls, d: dict[str, Any]) -> BridgeTrainConfig:
        """The config `to_json_dict` wrote (as `training.json` holds it)."""
        return cls(**{**d, "train": TrainConfig(**d["train"])})

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
    sparse: SparseHookedTransformerConfig | SparseHookedTransformer | None,
    config: BridgeTrainConfig | None = None,
    out_dir: str | Path = "runs/bridged",
    corpus: data.TokenCorpus | None = None,
    progress: bool = True,
    dense_ref: str | None = None,
    resume: bool | str = False,
    overwrite: bool = False,
) -> BridgeTrainResult:
    """Train a sparse model and its bridges against the frozen `dense` model; save them in
    `out_dir` (see the module docstring). `sparse`: a config (a fresh model, seeded by
    `config.train.seed`) or a model to continue training (e.g. a finished sparse run; then set
    `dense_frac=anneal_end_frac=0` so L0 starts at its target). `dense_ref`: a note saved with
    the bridges saying where the dense model lives (e.g. its directory).

    `resume`: as for `training.train`: True continues the run checkpointed in `out_dir` (with
    bitwise the weights an uninterrupted run ends with; `sparse` and `config` may then be None,
    given ones must match the checkpoint's, and `dense` must be the model the bridges were
    trained against); "auto" continues one if there is one, else starts one. Ctrl-C writes a
    checkpoint and raises `TrainingInterrupted`. The global torch RNG is left as it was. A new run
    refuses a directory that already holds a model unless `overwrite=True` (as `train` does)."""
    out_dir = Path(out_dir)
    if resume not in (False, True, "auto"):
        raise ValueError(f"resume must be False, True or 'auto'; got {resume!r}")
    resuming = resume is True or (resume == "auto" and saving.has_checkpoint(out_dir))
    if not resuming and not overwrite and ((out_dir / checkpoint.CONFIG_FILE).exists()
                                           or (out_dir / saving.BRIDGES_DIR).exists()):
        raise ValueError(f"{out_dir} already holds a model: pass overwrite=True (--overwrite) to "
                         "replace it, or resume=True (--resume) to continue its run")
    if resuming and config is None and saving.has_checkpoint(out_dir):
        config = BridgeTrainConfig.from_json_dict(saving.training_state(out_dir)["config"])
    config = config or BridgeTrainConfig()
    with deterministic_algorithms(torch.device(config.train.device).type == "cpu"), _frozen(dense):
        return _train(dense, sparse, config, out_dir, corpus, progress, dense_ref, resuming)


def _train(dense, sparse, config: BridgeTrainConfig, out_dir: Path, corpus, progress, dense_ref,
           resuming: bool) -> BridgeTrainResult:
    start = time.perf_counter()
    tc = config.train
    if resuming:
        job, first_step, history = _resumed_job(dense, sparse, config, out_dir)
    else:
        job, first_step, history = _fresh_job(dense, sparse, config, out_dir, dense_ref), 0, []
    sparse = job.sparse
    seq_len = tc.seq_len or min(dense.cfg.n_ctx, sparse.cfg.n_ctx)
    if seq_len > min(dense.cfg.n_ctx, sparse.cfg.n_ctx):
        raise ValueError(f"TrainConfig.seq_len={seq_len} exceeds a model's n_ctx")
    if corpus is None:
        corpus = corpus_for(tc, sparse.tokenizer)
    check_vocabulary(corpus, sparse.cfg.d_vocab)
    job.val_batches = data.validation_batches(corpus.val, tc.batch_size, seq_len, tc.eval_batches)
    loop = Loop(tc, out_dir, corpus.train, seq_len, tc.device, first_step, history,
                keep_every_step=True, resume_command=f"train_bridged(..., out_dir={str(out_dir)!r}, resume=True)")
    sparse.train()
    run_loop(job, loop, progress, "bridged train")
    sparse.eval()
    return BridgeTrainResult(sparse, job.bridges, out_dir, history, time.perf_counter() - start)


def _fresh_job(dense, sparse, config: BridgeTrainConfig, out_dir: Path, dense_ref) -> BridgedJob:
    tc = config.train
    if isinstance(sparse, SparseHookedTransformerConfig):
        from sparse_lens.tokenizer import load_tokenizer

        tokenizer = dense.tokenizer if dense.tokenizer is not None else load_tokenizer()
        sparse = seeded_model(dataclasses.replace(sparse, device=tc.device), tc.seed, tokenizer)
    check_models(dense, sparse)
    bridges = Bridges.for_pair(dense, sparse, config.encoder_topk_frac, seed=tc.seed)
    bridges.dense_fingerprint = model_fingerprint(dense)
    bridges.meta = dict(dense_model=dense_ref, dense_model_name=dense.cfg.model_name)
    return BridgedJob(dense, sparse, bridges, config, out_dir)


def _resumed_job(dense, sparse, config: BridgeTrainConfig, out_dir: Path):
    """The job, step and history of the bridged run checkpointed in `out_dir`, checked against
    the configs and dense model given."""
    tc = config.train
    saved_sparse, bridges, state = saving.load_checkpoint(out_dir, tc.device)
    bridges.check_pair(dense, saved_sparse)  # the dense weights the bridges were trained against
    saved_config = BridgeTrainConfig.from_json_dict(state["config"])
    diffs = config_diffs("train", saved_config.train.to_json_dict(), tc.to_json_dict(),
                         TrainConfig.NON_RESULT_FIELDS)
    diffs += config_diffs("bridges", saved_config.to_json_dict(), config.to_json_dict(), ("train",))
    if sparse is not None:
        given = sparse if isinstance(sparse, SparseHookedTransformerConfig) else sparse.cfg
        diffs += config_diffs("model", saved_sparse.cfg.to_json_dict(),
                              dataclasses.replace(given, device=saved_sparse.cfg.device).to_json_dict())
    if diffs:
        raise ValueError(f"cannot resume {out_dir}: the configs differ from the checkpoint's: "
                         + "; ".join(diffs))
    job = BridgedJob(dense, saved_sparse, bridges, config, out_dir,
                     fused=saved_fused_adamw(state))
    saving.load_optimizer(saved_sparse, bridges, out_dir, job.optimizer, state)
    return job, int(state["step"]), list(state["history"])


class BridgedJob:
    """A bridged run's part of the shared loop (`training.loop`): the six-term loss, the bridges'
    own LR and gradient rescale, the bridged evaluation and checkpoints."""

    def __init__(self, dense, sparse: SparseHookedTransformer, bridges: Bridges,
                 config: BridgeTrainConfig, out_dir: Path, fused: bool | None = None):
        self.dense, self.sparse, self.bridges, self.config, self.out_dir = dense, sparse, bridges, config, out_dir
        self.model, self.target_l0 = sparse, sparse.cfg.weight_l0
        self.val_batches: list[torch.Tensor] = []
        tc = config.train
        if tc.cuda_graph:
            raise ValueError("TrainConfig.cuda_graph is for plain runs (`sparse-lens train`); "
                             "bridged training runs the default step")
        self.optimizer = make_optimizer(sparse, tc, fused)
        self.n_sparse_groups = len(self.optimizer.param_groups)
        for params, decay in (([p for p in bridges.parameters() if p.ndim >= 2], tc.weight_decay),
                              ([p for p in bridges.parameters() if p.ndim < 2], 0.0)):
            self.optimizer.add_param_group(dict(params=params, weight_decay=decay))
        self.sparse_params, self.bridge_params = list(sparse.parameters()), list(bridges.parameters())

    def step(self, step: int, tokens: torch.Tensor, l0: float, lr: float) -> tuple[float, dict[str, float]]:
        tc, optimizer = self.config.train, self.optimizer
        # the bridges are dense: their LR omits the 1/sqrt(L0) factor
        bridge_lr = sparsity.lr_at_step(step, tc.steps, tc.lr, 1.0, tc.warmup_frac)
        for i, group in enumerate(optimizer.param_groups):
            group["lr"] = lr if i < self.n_sparse_groups else bridge_lr
        sites = _hybrid_sites(self.config, len(self.bridges.sites), step)
        terms = bridge_losses(self.dense, self.sparse, self.bridges, tokens, sites)
        loss = total_loss(terms, self.config.loss_weights)
        if not math.isfinite(loss.item()):
            raise NonFiniteLossError(f"non-finite bridged loss {loss.item()} "
                                     f"({ {k: v.item() for k, v in terms.items()} })")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        rescale_grad_rms_(self.sparse_params, tc.grad_rms, tc.grad_rms_mode)
        rescale_grad_rms_(self.bridge_params, tc.grad_rms, tc.grad_rms_mode)
        optimizer.step()
        self.sparse.project_weights_(l0)
        return loss.item(), {k: v.item() for k, v in terms.items()}

    def evaluate(self) -> dict[str, float]:
        return evaluate_bridged(self.dense, self.sparse, self.bridges, self.val_batches,
                                n_hybrid_batches=self.config.eval_hybrid_batches)

    def save(self, step: int, history: list) -> None:
        state = dict(config=self.config.to_json_dict(), model_config=self.sparse.cfg.to_json_dict(),
                     step=step, history=history)
        saving.save_checkpoint(self.sparse, self.bridges, self.out_dir, self.optimizer, state)

    def snapshot(self, path: Path) -> None:
        saving.save_bridged(self.sparse, self.bridges, path)


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


