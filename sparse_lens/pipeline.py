"""Prune these tasks: the one way a set of tasks goes from a model to saved, verified circuits
and a summary table. `sparse-lens prune`, the demo and the analyses all call `prune_tasks`.

    table = prune_tasks(model_dir, ["for_while", "lambda_func"], PruneConfig(), out="circuits")

For each task, in order: `prune`, save the circuit in `out/<task>/`, verify it (unless `verify`
is False, or the full model misses the target so there is no circuit), and make its row:
`Circuit.summary()` plus, when verified, `held_out_loss` (the circuit on the held-out test
examples), `ablated_loss` (the model with the circuit's nodes ablated) and `random_loss` (random
node sets of the circuit's size). The rows are returned as a
DataFrame in task order and, with `out`, written to `out/summary.csv`.

With `jobs=N` the tasks are pruned in N processes (or on N GPUs). The node means are computed
(or loaded) once, in the calling process, and saved in the model directory, where every worker
reads them. Each worker (a fresh `spawn`ed process) loads the model once and prunes every N-th
task; circuits are saved by the worker that made them. Pruning is deterministic, so the
circuits are those of the serial run; with the same thread count per process (1 in the test)
they are bitwise equal, with other counts float reductions may differ in the last bits.
Workers get `torch.get_num_threads() // N` threads each (at least 1) and, on CUDA, GPU
`j % torch.cuda.device_count()`.

With `reuse=True` a task whose circuit is already saved in `out/<task>/`, pruned from these very
weights (the fingerprint `Circuit.load` checks) with an equal `PruneConfig` (`progress` aside),
is read back instead of pruned again: how the analyses share their pruning (circuit-size and
frontier prune the same models). A change to the search that leaves `PruneConfig` as it was is
not detected; delete the circuits folder (or leave `reuse` off, the default) to prune afresh.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import multiprocessing
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import torch

SUMMARY_FILE = "summary.csv"


@dataclasses.dataclass(frozen=True)
class TaskOutcome:
    """One pruned task: its summary row, the report printed for it (the circuit, then its
    verification table) and the circuit itself (None when it was pruned in another process;
    `Circuit.load(out / task, model)` reads it back)."""

    task: str
    row: dict
    report: str
    circuit: Any = None  # sparse_lens.circuit.Circuit


def prune_task(model, task: str, config, means, out: Path | None = None, verify: bool = True,
               verify_n: int | None = None, reuse: bool = False) -> TaskOutcome:
    """Prune `task`, save the circuit in `out/task` (if `out`), verify it (unless `verify` is
    False or the full model misses the target: its summary row has no nodes); return its row.
    `reuse`: read back the circuit saved there instead, when `saved_circuit` finds it valid."""
    from sparse_lens.pruning import prune

    circuit = saved_circuit(model, task, config, out) if reuse and out is not None else None
    if circuit is None:
        circuit = prune(model, task, config, means=means)
        if out is not None:
            circuit.save(Path(out) / task)
    row = circuit.summary()
    lines = [repr(circuit)]
    if verify and row["nodes"] is not None:
        table = circuit.verify(**({} if verify_n is None else {"n": verify_n})).set_index("condition")
        lines.append(table.round(4).to_string())
        row.update(held_out_loss=table.loc["circuit", "task_loss"],
                   ablated_loss=table.loc["circuit ablated", "task_loss"],
                   random_loss=table.iloc[-1]["task_loss"])
    return TaskOutcome(task, row, "\n".join(lines), circuit)


def saved_circuit(model, task: str, config, out: str | Path):
    """The circuit saved in `out/task` if it was pruned from `model`'s exact weights with a
    `PruneConfig` equal to `config` (`progress` aside); None when there is none, or it differs."""
    from sparse_lens.circuit import CIRCUIT_FILE, Circuit

    path = Path(out) / task
    if not (path / CIRCUIT_FILE).is_file():
        return None
    try:
        circuit = Circuit.load(path, model)
    except ValueError:  # other weights, another format version, an unreadable file
        return None

    def settings(c) -> dict:
        return {**dataclasses.asdict(c), "progress": None}

    same = circuit.config is not None and settings(circuit.config) == settings(config)
    return circuit if same and circuit.task == task else None


def prune_tasks(model, tasks: Sequence[str], config=None, *, model_dir: str | Path | None = None,
                out: str | Path | None = None, verify: bool = True, verify_n: int | None = None,
                means=None, device: str | None = None, jobs: int = 1, reuse: bool = False,
                on_done: Callable[[TaskOutcome], None] | None = None) -> pd.DataFrame:
    """Prune `tasks` of `model` (a `SparseHookedTransformer`, or a model directory, loaded on
    `device`) with `config` (a `PruneConfig`; None: the defaults); one summary row per task, in
    task order (see the module docstring). Circuits go to `out/<task>/` and the table to
    `out/summary.csv` when `out` is given. `means`: the node means (default: those cached in
    `model_dir`, the directory the model came from, computed and saved there if missing).
    `verify_n`: held-out examples per verification (default `Circuit.verify`'s). `on_done(outcome)`
    is called as each task's outcome is known (serially: at once; with `jobs` > 1: in task order,
    as the workers finish; those outcomes carry no circuit). `reuse`: see the module docstring."""
    from sparse_lens.hooks import node_means_for
    from sparse_lens.model import SparseHookedTransformer
    from sparse_lens.pruning import PruneConfig

    if not (isinstance(jobs, int) and jobs >= 1):
        raise ValueError(f"jobs must be an integer >= 1; got {jobs!r}")
    config = config if config is not None else PruneConfig()
    tasks, out = list(tasks), None if out is None else Path(out)
    if isinstance(model, (str, Path)):
        model_dir = Path(model) if model_dir is None else Path(model_dir)
        model = SparseHookedTransformer.from_pretrained(model, device=device)
    if means is None:  # saved in model_dir: the workers read them from there
        means = node_means_for(model, model_dir, n_tokens=config.mean_tokens,
                               sparse_kernels=config.sparse_kernels)
    jobs = min(jobs, len(tasks))
    if jobs <= 1:
        outcomes = []
        for task in tasks:
            outcomes.append(prune_task(model, task, config, means, out, verify, verify_n, reuse))
            if on_done:
                on_done(outcomes[-1])
    else:
        if model_dir is None or out is None:
            raise ValueError("prune_tasks with jobs > 1 needs the model directory and `out` "
                             "(each worker loads the model and saves its circuits)")
        del model
        outcomes = _in_processes(Path(model_dir), tasks, config, out, verify, verify_n, device, jobs, reuse)
        for outcome in outcomes if on_done else ():
            on_done(outcome)
    table = pd.DataFrame([o.row for o in outcomes])
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        table.to_csv(out / SUMMARY_FILE, index=False)
    return table


def _in_processes(model_dir: Path, tasks: list[str], config, out: Path, verify: bool,
                  verify_n: int | None, device: str | None, jobs: int, reuse: bool) -> list[TaskOutcome]:
    """`tasks` shared round-robin among `jobs` spawned processes; outcomes in task order."""
    quiet = dataclasses.replace(config, progress=False)  # N progress bars would interleave
    threads = max(1, torch.get_num_threads() // jobs)
    shares = [tasks[j::jobs] for j in range(jobs)]
    context = multiprocessing.get_context("spawn")  # no forked torch thread pools
    with concurrent.futures.ProcessPoolExecutor(max_workers=jobs, mp_context=context) as pool:
        futures = [pool.submit(_worker, model_dir, share, quiet, out, verify, verify_n,
                               _device_for_job(device, j), threads, reuse) for j, share in enumerate(shares)]
        by_task = {o.task: o for f in futures for o in f.result()}
    return [by_task[task] for task in tasks]


def _worker(model_dir: Path, tasks: list[str], config, out: Path, verify: bool, verify_n: int | None,
            device: str | None, threads: int, reuse: bool = False) -> list[TaskOutcome]:
    """One process's share: load the model and its saved means once, prune `tasks` in order."""
    from sparse_lens.hooks import node_means_for
    from sparse_lens.model import SparseHookedTransformer

    torch.set_num_threads(threads)
    model = SparseHookedTransformer.from_pretrained(model_dir, device=device)
    means = node_means_for(model, model_dir, n_tokens=config.mean_tokens,
                           sparse_kernels=config.sparse_kernels)
    outcomes = [prune_task(model, task, config, means, out, verify, verify_n, reuse) for task in tasks]
    return [dataclasses.replace(o, circuit=None) for o in outcomes]  # the model stays here


def _device_for_job(device: str | None, job: int) -> str | None:
    """Job `job`'s device: `cuda` spreads the jobs over the visible GPUs."""
    if device == "cuda" and torch.cuda.is_available():
        return f"cuda:{job % torch.cuda.device_count()}"
    return device
