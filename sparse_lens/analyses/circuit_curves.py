"""Circuit size against training: every snapshot of a run pruned at the target task loss.

Do a weight-sparse model's circuits shrink as it trains? The paper's readable circuits come from
models trained on billions of tokens; the ones trained here see millions. This analysis prunes
the tasks on every snapshot of each run given (`sparse-lens train --snapshot-every N`), so the
question is measured, not guessed: e.g. whether a longer run may bring the quote circuit down to
the size the paper reports.

    sparse-lens analyze circuit-curves --runs runs/wide-20k --tasks single_double_quote bracket_brace --out results

Each snapshot is pruned with `common.prune_tasks` (the default `PruneConfig` at `--target-loss`);
its circuits are saved beside it, in `<snapshot>/circuits/target0.15/<task>/`, and read back by a
later run with the same settings, so a run still training can be re-analysed as its snapshots
appear and only the new ones cost time. A snapshot must be at a step where the run evaluated its
validation loss. `--previous results/circuit_curves/circuit_curves.csv` keeps the earlier table's
rows of runs not given (a run given again replaces its rows). Writes:

- `circuit_curves.csv`: one row per (run, step, task): tokens trained, the weight L0 the anneal
  had reached (edges fall with it: fewer nonzero weights join the same nodes), validation loss,
  the full-model and circuit task loss, solved, nodes and edges (empty where the full model
  misses the target: nothing to prune);
- `circuit_curves.png`: nodes and edges against tokens, one line per (run, task), solved
  snapshots only;
- `summary.md`: per (run, task), the circuit's size at each solved snapshot.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from sparse_lens.analyses.common import (
    AnalysisResult, existing_model, option, previous_option, prune_tasks, runs_option, settings_dict,
    target_loss_option, tasks_option, with_previous_rows, write_outputs,
)

NAME = "circuit_curves"
QUICK_TASKS = ("single_double_quote",)


def add_arguments(parser) -> None:
    runs_option(parser)
    tasks_option(parser)
    target_loss_option(parser)
    option(parser, "--every", type=int, help="circuit-curves: only the snapshots at multiples of "
           "this many steps (default: every snapshot)")
    previous_option(parser)


def run(out_dir: str | Path, models_dir: str | Path, quick: bool = False,
        runs: Sequence[str | Path] | None = None, tasks: Sequence[str] | None = None,
        target_loss: float = 0.15, every: int | None = None, previous: str | Path | None = None,
        progress: bool = False) -> AnalysisResult:
    """Prune `tasks` (default: the demo's) on every snapshot of `runs` at `target_loss` (`every`:
    only those at multiples of so many steps); `quick` trains the learning curves' tiny run with
    two snapshots into `models_dir` first. `previous`: an earlier `circuit_curves.csv`, whose rows
    of other runs are kept (e.g. of a run whose snapshots are gone)."""
    from sparse_lens.analyses.learning_curves import quick_run
    from sparse_lens.demo import DEMO_TASKS

    if quick:
        runs = [quick_run(Path(models_dir), progress)]
    if not runs:
        raise ValueError("circuit-curves needs --runs: run directories trained with --snapshot-every")
    tasks = list(tasks or (QUICK_TASKS if quick else DEMO_TASKS))
    if every is not None and every < 1:
        raise ValueError(f"every must be >= 1 step; got {every}")
    table = pd.concat([run_circuits(r, tasks, target_loss, every, quick, progress) for r in runs],
                      ignore_index=True)
    table = with_previous_rows(table, previous)
    lines = []
    for (run_name, task), rows in table.groupby(["run", "task"], sort=False):
        solved = rows[rows.solved.astype(bool)]
        sizes = ", ".join(f"{int(r.nodes)} at step {r.step:,}" for r in solved.itertuples()) or "none"
        lines.append(f"- `{run_name}` {task}: solved at {len(solved)} of {len(rows)} snapshots; nodes: {sizes}")
    summary = (f"Circuit size at task loss <= {target_loss:g} on every training snapshot (a "
               f"snapshot whose full model misses the target has no circuit):\n\n" + "\n".join(lines))
    return write_outputs(out_dir, NAME, table, _plot(table), summary, [],
                         settings_dict(quick=quick, runs=[str(r) for r in runs], tasks=tasks,
                                       target_loss=target_loss, every=every,
                                       previous=str(previous) if previous is not None else None))


def run_circuits(run_dir: str | Path, tasks: Sequence[str], target_loss: float, every: int | None = None,
                 quick: bool = False, progress: bool = False) -> pd.DataFrame:
    """The circuits of `tasks` on every snapshot of the run in `run_dir` (`every`: at multiples of
    so many steps); one row per (step, task)."""
    from sparse_lens.analyses.learning_curves import snapshots, tokens_and_l0
    from sparse_lens.training import saved_configs

    model_cfg, tc = saved_configs(run_dir)
    chosen = [(step, path) for step, path in snapshots(run_dir) if every is None or step % every == 0]
    if not chosen:
        raise ValueError(f"{run_dir} has no snapshot at a multiple of {every} steps")
    tables = []
    for step, path in chosen:
        snapshot = existing_model(path, Path(run_dir))
        table = prune_tasks(snapshot, tasks, target_loss, quick, progress).drop(columns="model")
        tokens, l0 = tokens_and_l0(step, model_cfg, tc)
        table.insert(0, "run", Path(run_dir).name)
        table.insert(1, "step", step)
        table.insert(2, "tokens", tokens)
        table.insert(3, "l0", l0)
        tables.append(table)
    return pd.concat(tables, ignore_index=True)


def _plot(table: pd.DataFrame):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 4))
    nodes_ax, edges_ax = fig.subplots(1, 2)
    solved = table[table.solved.astype(bool)]
    for (run_name, task), rows in solved.groupby(["run", "task"]):
        rows = rows.sort_values("tokens")
        nodes_ax.plot(rows.tokens, rows.nodes.astype(float), marker="o", label=f"{run_name} {task}")
        edges_ax.plot(rows.tokens, rows.edges.astype(float), marker="o", label=f"{run_name} {task}")
    scale = "log" if (solved.edges.astype(float) > 0).all() else "linear"  # an empty circuit: linear
    nodes_ax.set(xlabel="tokens trained", ylabel="circuit nodes", yscale=scale, title="nodes")
    edges_ax.set(xlabel="tokens trained", ylabel="circuit edges", yscale=scale, title="edges")
    if len(solved):
        nodes_ax.legend(fontsize=7)
    return fig
