"""The training loop, shared by plain (`training.train`) and bridged (`bridges.train_bridged`) runs.

Every run has the same steps around its own update: the L0 anneal and the "sharkfin" LR
(`TrainConfig.schedule`), a batch that is a pure function of (seed, step) (`distributed.rank_batch`,
this rank's rows of the global batch), the stop on a non-finite loss, evaluation every
`eval_every` steps, a checkpoint every `checkpoint_every` steps, at the end, when the validation
loss reaches `stop_at_val_loss`, and on Ctrl-C, snapshots, and a check that data-parallel ranks
still hold the same weights. What differs is a `Job`: its step (forward, loss, backward, gradient
rescale, AdamW, projection), what it evaluates, and what it saves.
"""

from __future__ import annotations

import contextlib
import logging
import math
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from tqdm.auto import tqdm

from sparse_lens import distributed
from sparse_lens.training.config import NonFiniteLossError, TrainConfig, TrainingInterrupted
from sparse_lens.training.rundir import SNAPSHOTS_DIR

log = logging.getLogger("sparse_lens.training")


class Job(Protocol):
    """What a run brings to `run_loop`."""

    model: torch.nn.Module  # whose weights the ranks of a data-parallel run must agree on
    target_l0: float  # the L0 the anneal ends at

    def step(self, step: int, tokens: torch.Tensor, l0: float, lr: float) -> tuple[float, dict[str, float]]:
        """Optimizer step `step` on `tokens`: the loss before it and any other figures to record; raises
        `NonFiniteLossError` on a non-finite loss or gradient."""

    def evaluate(self) -> dict[str, float]:
        """Validation figures (`val_loss`, when given, is what `stop_at_val_loss` compares)."""

    def save(self, step: int, history: list[dict[str, Any]]) -> None:
        """A checkpoint a resume continues from (called on the main rank only)."""

    def snapshot(self, path: Path) -> None:
        """A model directory at `path`, for learning curves (`TrainConfig.snapshot_every`)."""


@dataclass
class Loop:
    """Where a run's loop stands and what it needs besides the job."""

    tc: TrainConfig
    out_dir: Path
    train_tokens: torch.Tensor
    seq_len: int
    device: str
    first_step: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    ranks: distributed.RankContext = field(default_factory=distributed.RankContext)
    keep_every_step: bool = False  # history: a record per step (else one per evaluation)
    resume_command: str | None = None  # what TrainingInterrupted tells the user to run
    last_step: int = 0

    def __post_init__(self) -> None:
        self.last_step = self.first_step

    @property
    def val_loss(self) -> float:
        """The last evaluated validation loss (NaN before any)."""
        return next((r["val_loss"] for r in reversed(self.history) if "val_loss" in r), math.nan)


def run_loop(job: Job, loop: Loop, progress: bool = True, desc: str = "train") -> Loop:
    """Train `job` from `loop.first_step` to `tc.steps` (or the stop at `stop_at_val_loss`);
    returns `loop` with its history and `last_step`. Ctrl-C finishes the step, saves and raises
    `TrainingInterrupted`."""
    tc, ranks = loop.tc, loop.ranks
    first = tc.steps if _reached(tc, loop.val_loss) else loop.first_step  # stopped there already
    saved: int | str = loop.first_step or "none written yet"
    bar = tqdm(range(first, tc.steps), initial=first, total=tc.steps,
               disable=not (progress and ranks.is_main), desc=desc)
    pace = _Pace(first)
    with _sigint_flag() as interrupted:
        for step in bar:
            l0, lr = tc.schedule(step, job.target_l0)
            tokens = distributed.rank_batch(loop.train_tokens, tc.batch_size, loop.seq_len, step,
                                            tc.seed, ranks.rank, ranks.world_size).to(loop.device)
            try:
                loss, figures = job.step(step, tokens, l0, lr)
            except NonFiniteLossError as err:
                raise NonFiniteLossError(
                    f"{err} at step {step}; stopping. The last good checkpoint is kept in "
                    f"{loop.out_dir} (step {saved}); lower TrainConfig.lr or check the data"
                ) from err
            done = loop.last_step = step + 1
            loss, stopping = ranks.reduce_step(loss, interrupted(), loop.device)  # as one, across ranks
            if done % distributed.CHECKSUM_EVERY == 0 or done == tc.steps:
                ranks.check_weights(job.model, done)
            record = dict(step=done, loss=loss, l0=l0, lr=lr, **figures)
            evaluated = done % tc.eval_every == 0 or done == tc.steps
            if evaluated:
                _evaluate_into(record, job, tc, pace.since_last(done))
            if evaluated or loop.keep_every_step:
                loop.history.append(record)
            bar.set_postfix(loss=f"{loss:.3f}", val=f"{loop.val_loss:.3f}", l0=f"{l0:.4f}")
            stop = evaluated and _reached(tc, loop.val_loss)
            if done % tc.checkpoint_every == 0 or done == tc.steps or stop or stopping:
                if ranks.is_main:
                    job.save(done, loop.history)
                saved = done
            if tc.snapshot_every and done % tc.snapshot_every == 0 and ranks.is_main:
                job.snapshot(loop.out_dir / SNAPSHOTS_DIR / f"step-{done:06d}")
            if stopping:
                bar.close()
                raise TrainingInterrupted(loop.out_dir, done, loop.resume_command)
            if stop:
                log.info("validation loss %.4f <= stop_at_val_loss %.4f: stopping at step %d",
                         loop.val_loss, tc.stop_at_val_loss, done)
                break
    bar.close()
    ranks.barrier()  # rank 0's last checkpoint is written before any rank returns
    return loop


class _Pace:
    """Wall-clock seconds per step between evaluations, for the log (never in the history, which
    a resumed run must reproduce exactly)."""

    def __init__(self, step: int):
        self.step, self.time = step, time.perf_counter()

    def since_last(self, step: int) -> float:
        now = time.perf_counter()
        seconds = (now - self.time) / max(step - self.step, 1)
        self.step, self.time = step, now
        return seconds


def _evaluate_into(record: dict[str, Any], job: Job, tc: TrainConfig, seconds_per_step: float) -> None:
    figures = job.evaluate()
    record.update(figures)
    log.info("step %d/%d  loss %.4f  %s  L0 %.4f  lr %.3g  %.3f s/step", record["step"], tc.steps,
             record["loss"], "  ".join(f"{k} {v:.4f}" for k, v in figures.items()), record["l0"],
             record["lr"], seconds_per_step)


def _reached(tc: TrainConfig, val_loss: float) -> bool:
    """Whether `val_loss` meets the run's `stop_at_val_loss` (never when it has none)."""
    return tc.stop_at_val_loss is not None and val_loss <= tc.stop_at_val_loss


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
