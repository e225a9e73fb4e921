"""The capability vs interpretability frontier: pretraining loss against mean circuit size, one
point per model of the width x weight-L0 sweep (`common.sweep_specs`), with the Pareto frontier
(the models no other model beats on both: lower loss *and* smaller circuits).

Circuit size of a model = the mean number of edges of its circuits over the tasks it solves at
the target loss; the number of tasks solved is reported beside it (a model that solves none has
no point on the plot).
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from sparse_lens.analyses.common import (
    AnalysisResult, prune_tasks, settings_dict, sweep_options, sweep_or_existing,
    target_loss_option, tasks_option, write_outputs,
)

NAME = "frontier"
DEFAULT_TASKS = ("single_double_quote", "bracket_counting", "lambda_func", "for_while")
QUICK_TASKS = ("single_double_quote",)


def pareto_front(loss: pd.Series, size: pd.Series) -> pd.Series:
    """True for each point that no other point beats on both (<= on both, < on one)."""
    points = list(zip(loss, size))
    keep = []
    for i, (l, s) in enumerate(points):
        if l != l or s != s:  # NaN: not a point
            keep.append(False)
            continue
        dominated = any((l2 <= l and s2 <= s) and (l2 < l or s2 < s)
                        for j, (l2, s2) in enumerate(points) if j != i and l2 == l2 and s2 == s2)
        keep.append(not dominated)
    return pd.Series(keep, index=loss.index)


def add_arguments(parser) -> None:
    target_loss_option(parser)
    tasks_option(parser)
    sweep_options(parser)


def run(out_dir: str | Path, models_dir: str | Path, quick: bool = False, target_loss: float = 0.15,
        tasks: list[str] | None = None, widths=None, l0s=None, steps: int | None = None,
        models=None, progress: bool = False) -> AnalysisResult:
    tasks = list(tasks or (QUICK_TASKS if quick else DEFAULT_TASKS))
    trained = sweep_or_existing(models, quick, widths, l0s, steps, Path(models_dir), progress)
    per_task = pd.concat([prune_tasks(t, tasks, target_loss, quick, progress) for t in trained],
                         ignore_index=True)
    rows = []
    for t in trained:
        mine = per_task[per_task.model == t.spec.name]
        solved = mine[mine.solved.astype(bool)]
        rows.append(dict(model=t.spec.name, d_model=t.model.cfg.d_model,
                         weight_l0=t.model.cfg.weight_l0, val_loss=t.val_loss,
                         tasks_solved=len(solved), tasks=len(mine),
                         mean_edges=solved.edges.astype(float).mean() if len(solved) else float("nan"),
                         mean_nodes=solved.nodes.astype(float).mean() if len(solved) else float("nan")))
    table = pd.DataFrame(rows)
    table["on_frontier"] = pareto_front(table.val_loss, table.mean_edges)
    front = table[table.on_frontier].sort_values("val_loss")
    summary = (
        f"{len(table)} models ({'given' if models else 'widths x weight L0'}), {len(tasks)} task(s) "
        f"({', '.join(tasks)}) pruned at target loss {target_loss}. "
        f"{int(table.tasks_solved.gt(0).sum())} model(s) solve at least one task. Frontier: "
        + (", ".join(f"{r.model} (loss {r.val_loss:.3f}, {r.mean_edges:.0f} edges)" for r in front.itertuples())
           or "empty (no model solves a task at this target)") + "."
    )
    return write_outputs(out_dir, NAME, table, _plot(table, target_loss), summary, trained,
                         settings_dict(quick=quick, models=models, target_loss=target_loss, tasks=tasks),
                         more_tables={f"{NAME}_per_task.csv": per_task})


def _plot(table: pd.DataFrame, target_loss: float):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4.5))
    ax = fig.subplots()
    points = table.dropna(subset=["mean_edges"])
    for l0, g in points.groupby("weight_l0"):
        ax.scatter(g.val_loss, g.mean_edges, s=20 + g.d_model / 4, label=f"weight L0 {l0:.4g}")
        for r in g.itertuples():
            ax.annotate(f"w{r.d_model}", (r.val_loss, r.mean_edges), fontsize=7)
    front = points[points.on_frontier].sort_values("val_loss")
    if len(front):
        ax.step(front.val_loss, front.mean_edges, where="post", color="k", lw=0.8, label="frontier")
        if (points.mean_edges > 0).all():
            ax.set_yscale("log")
    else:
        ax.text(0.5, 0.5, "no model solves a task\nat this target", ha="center", va="center",
                transform=ax.transAxes)
    ax.set_xlabel("pretraining validation loss (nats/token)")
    ax.set_ylabel("mean circuit edges (tasks solved)")
    ax.set_title(f"capability vs interpretability (target task loss {target_loss})", fontsize=9)
    ax.legend(fontsize=7)
    return fig
