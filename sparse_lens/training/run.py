"""`train`: a plain run (weight-sparse, or the dense baseline with sparsity off), from a fresh model
or resumed from its run directory, driven by the shared loop (`training.loop`)."""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from sparse_lens import checkpoint, data, distributed
from sparse_lens.config import SparseHookedTransformerConfig
from sparse_lens.model import SparseHookedTransformer
from sparse_lens.training.config import TrainConfig, TrainResult
from sparse_lens.training.graphed import StaticStep
from sparse_lens.training.loop import Loop, run_loop
from sparse_lens.training.rundir import load_run, plan_run, save_run
from sparse_lens.training.step import corpus_for, deterministic_algorithms, evaluate, make_optimizer, train_step


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
    the package docstring). The global torch RNG is left as it was: the fresh model is
    initialised under `torch.random.fork_rng`.

    `ranks`: this process's place in a data-parallel run (default `distributed.current()`: the
    process group torchrun started, else a single process); see `sparse_lens.distributed`.
    `tc.batch_size` is then the per-rank batch, and only rank 0 writes to `out_dir`."""
    out_dir = Path(out_dir)
    ranks = ranks or distributed.current()
    _check_one_process_for_graphs(tc, ranks)  # before --overwrite clears anything
    model_cfg, tc, resuming = plan_run(model_cfg, tc, out_dir, resume, overwrite, ranks.is_main)
    _check_one_process_for_graphs(tc, ranks)  # a resumed run's saved settings
    ranks.barrier()  # rank 0 has cleared what --overwrite replaces before anyone reads out_dir
    with deterministic_algorithms(torch.device(tc.device).type == "cpu"):
        return _train(model_cfg, tc, out_dir, resuming, corpus, progress, ranks)


def _check_one_process_for_graphs(tc: TrainConfig | None, ranks: distributed.RankContext) -> None:
    if tc is not None and tc.cuda_graph and ranks.world_size > 1:
        raise ValueError("TrainConfig.cuda_graph runs in one process; drop it under torchrun")


def seeded_model(model_cfg: SparseHookedTransformerConfig, seed: int, tokenizer) -> SparseHookedTransformer:
    """A fresh model initialised from `seed`, leaving the global torch RNG as it was."""
    with torch.random.fork_rng():  # CPU and any CUDA device in use
        torch.manual_seed(seed)
        return SparseHookedTransformer(model_cfg, tokenizer=tokenizer)


@dataclass
class PlainJob:
    """A plain run's part of the loop: `train_step` on the (possibly DDP-wrapped) model."""

    model: SparseHookedTransformer
    optimizer: torch.optim.Optimizer
    tc: TrainConfig
    out_dir: Path
    val_batches: list[torch.Tensor]
    unigram: float
    ranks: distributed.RankContext
    static_step: StaticStep | None = None  # `TrainConfig.cuda_graph`: the graph-ready step

    def __post_init__(self) -> None:
        self.target_l0 = self.model.cfg.weight_l0
        self.trained = self.ranks.wrap(self.model)  # DDP when distributed: gradients all-reduced

    def step(self, step: int, tokens: torch.Tensor, l0: float, lr: float) -> tuple[float, dict[str, float]]:
        if self.static_step is not None:
            return self.static_step(tokens, lr, l0), {}
        return train_step(self.trained, self.optimizer, tokens, lr, l0, self.tc), {}

    def evaluate(self) -> dict[str, float]:
        return dict(val_loss=evaluate(self.model, self.val_batches))

    def save(self, step: int, history: list) -> None:
        save_run(self.out_dir, self.model, self.optimizer, step, self.tc, history, self.unigram,
                 self.ranks.world_size)

    def snapshot(self, path: Path) -> None:
        checkpoint.save_model(self.model, path)


def _train(model_cfg: SparseHookedTransformerConfig, tc: TrainConfig, out_dir: Path, resuming: bool,
           corpus: data.TokenCorpus | None, progress: bool, ranks: distributed.RankContext) -> TrainResult:
    from sparse_lens.tokenizer import load_tokenizer

    start = time.perf_counter()
    device = ranks.device_for(_resolve_device(tc.device))
    model_cfg = dataclasses.replace(model_cfg, device=device)
    seq_len = tc.seq_len or model_cfg.n_ctx
    if seq_len > model_cfg.n_ctx:
        raise ValueError(f"TrainConfig.seq_len={seq_len} exceeds the model's n_ctx={model_cfg.n_ctx}")
    if resuming:
        model, optimizer, first_step, history = load_run(out_dir, model_cfg, tc, device, ranks.world_size)
    else:
        model = seeded_model(model_cfg, tc.seed, load_tokenizer())
        optimizer, first_step, history = make_optimizer(model, tc), 0, []
    if corpus is None:
        corpus = corpus_for(tc, model.tokenizer)
    check_vocabulary(corpus, model_cfg.d_vocab)
    val_batches = data.validation_batches(corpus.val, tc.batch_size, seq_len, tc.eval_batches)
    unigram = data.unigram_cross_entropy(corpus.train, corpus.val, model_cfg.d_vocab)
    static_step = StaticStep(model, optimizer, tc, (tc.batch_size, seq_len)) if tc.cuda_graph else None
    job = PlainJob(model, optimizer, tc, out_dir, val_batches, unigram, ranks, static_step)
    loop = Loop(tc, out_dir, corpus.train, seq_len, device, first_step, history, ranks)
    model.train()
    run_loop(job, loop, progress, "sparse train" if model_cfg.is_weight_sparse else "dense train")
    steps_done = max(loop.last_step, history[-1]["step"] if history else 0)
    val_loss = loop.val_loss
    if not history or history[-1]["step"] != steps_done:
        val_loss = evaluate(model, val_batches)
    return TrainResult(model=model, out_dir=out_dir, steps=steps_done, val_loss=val_loss,
                       unigram_val_loss=unigram, history=history,
                       seconds=time.perf_counter() - start)


def check_vocabulary(corpus: data.TokenCorpus, d_vocab: int) -> None:
    if int(corpus.train.max()) >= d_vocab:
        raise ValueError(f"the corpus has token ids >= d_vocab={d_vocab}")


def _resolve_device(device: str) -> str:
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} was asked for but torch.cuda.is_available() is False")
    return device
