"""Prune several tasks of one model: one after another, or in N processes (or on N GPUs).

`prune_tasks(model_dir, tasks, config, out, jobs=N)` is what `sparse-lens prune --task all --jobs N`
runs. The node means are computed (or loaded) once, in the calling process, and saved in the
model directory, where every worker reads them. Each worker (a fresh `spawn`ed process) loads the
model once and prunes every N-th task; circuits are saved by the worker that made them, and the
summary rows and printed reports come back in task order. Pruning is deterministic, so the
circuits are those of the serial run; with the same thread count per process (1 in the test)
they are bitwise equal, with other counts float reductions may differ in the last bits.
Workers get `torch.get_num_threads() // N` threads each (at least 1) and, on CUDA, GPU
`j % torch.cuda.device_count()`.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import multiprocessing
from pathlib import Path

import torch


@dataclasses.dataclass(frozen=True)
class TaskOutcome:
    """One pruned task: its summary row (for summary.csv) and the report printed for it."""

    task: str
    row: dict
    report: str


def prune_and_save(model, task: str, config, means, out: Path, verify: bool) -> TaskOutcome:
    """Prune `task`, save the circuit in `out/task`, verify it (unless `verify` is False or the
    full model misses the target); return its summary row and printable report."""
    from sparse_lens.pruning import prune

    circuit = prune(model, task, config, means=means)
    circuit.save(out / task)
    lines = [str(circuit)]
    row = circuit.summary()
    if verify and not circuit.full_model_misses_target:
        table = circuit.verify().set_index("condition")
        lines.append(table.round(4).to_string())
        row.update(ablated_loss=table.loc["circuit ablated", "task_loss"],
                   random_loss=table.iloc[-1]["task_loss"])
    return TaskOutcome(task, row, "\n".join(lines))


def _worker(model_dir: Path, tasks: list[str], config, out: Path, verify: bool, device: str | None,
            threads: int) -> list[TaskOutcome]:
    """One process's share: load the model and its saved means once, prune `tasks` in order."""
    from sparse_lens.hooks import node_means_for
    from sparse_lens.model import SparseHookedTransformer

    torch.set_num_threads(threads)
    model = SparseHookedTransformer.from_pretrained(model_dir, device=device)
    means = node_means_for(model, model_dir, n_tokens=config.mean_tokens,
                           sparse_kernels=config.sparse_kernels)
    return [prune_and_save(model, task, config, means, out, verify) for task in tasks]


def prune_tasks(model_dir: str | Path, tasks: list[str], config, out: str | Path, *,
                verify: bool = True, device: str | None = None, jobs: int = 1,
                on_done=None) -> list[TaskOutcome]:
    """Prune `tasks` of the model in `model_dir` into `out/<task>/`, in `jobs` processes; returns
    the outcomes in task order. `on_done(outcome)` is called as each task's outcome is known
    (serially: at once; in parallel: in task order, as the workers finish)."""
    from sparse_lens.hooks import node_means_for
    from sparse_lens.model import SparseHookedTransformer

    if not (isinstance(jobs, int) and jobs >= 1):
        raise ValueError(f"jobs must be an integer >= 1; got {jobs!r}")
    model_dir, out = Path(model_dir), Path(out)
    model = SparseHookedTransformer.from_pretrained(model_dir, device=device)
    means = node_means_for(model, model_dir, n_tokens=config.mean_tokens,
                           sparse_kernels=config.sparse_kernels)  # saved there for the workers
    jobs = min(jobs, len(tasks))
    if jobs <= 1:
        outcomes = []
        for task in tasks:
            outcomes.append(prune_and_save(model, task, config, means, out, verify))
            if on_done:
                on_done(outcomes[-1])
        return outcomes
    del model
    quiet = dataclasses.replace(config, progress=False)  # N progress bars would interleave
    threads = max(1, torch.get_num_threads() // jobs)
    shares = [tasks[j::jobs] for j in range(jobs)]
    context = multiprocessing.get_context("spawn")  # no forked torch thread pools
    with concurrent.futures.ProcessPoolExecutor(max_workers=jobs, mp_context=context) as pool:
        futures = [pool.submit(_worker, model_dir, share, quiet, out, verify,
                               _device_for_job(device, j), threads) for j, share in enumerate(shares)]
        by_task = {o.task: o for f in futures for o in f.result()}
    outcomes = [by_task[task] for task in tasks]
    for outcome in outcomes if on_done else ():
        on_done(outcome)
    return outcomes


def _device_for_job(device: str | None, job: int) -> str | None:
    """Job `job`'s device: `cuda` spreads the jobs over the visible GPUs."""
    if device == "cuda" and torch.cuda.is_available():
        return f"cuda:{job % torch.cuda.device_count()}"
    return device
