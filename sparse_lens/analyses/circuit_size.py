"""Circuit size, weight-sparse vs dense at matched pretraining loss (the paper's headline: sparse
circuits are about 16x smaller).

1. Train the weight-sparse model (`small` preset, its default weight L0), or take one trained
   before (`--sparse-model`: a packed model directory or a shipped checkpoint's name, e.g. `small`,
   whose provenance gives its loss and settings), and the dense baseline (same shape, weight
   L0 = 1) with the same training settings on the same corpus.
2. Match the losses: a dense model of the same shape gets to the sparse model's final
   validation loss much earlier, so the dense run (same settings) stops at its first evaluation
   at or below that loss (`TrainConfig.stop_at_val_loss`, evaluated every 25 steps). Both
   losses are reported; the match is as close as the evaluation interval allows. Or take a dense
   model trained before (`--dense-model`, e.g. the first snapshot of a dense run at or below the
   sparse model's loss): the paper matches pretraining loss, not shape, and its reported loss
   and shape say how close the match is.
3. Prune every task on the sparse model and on the matched dense model at the same target loss;
   per task the edges of each (`Circuit.n_edges`), and the geometric mean of dense/sparse edges
   over the tasks both solve.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from sparse_lens.analyses.common import (
    AnalysisResult, ModelSpec, existing_model, geometric_mean, option, prune_tasks, result_settings,
    settings_dict, target_loss_option, tasks_option, train_model, write_outputs,
)

NAME = "circuit_size"
QUICK_TASKS = ("single_double_quote", "bracket_counting")


def add_arguments(parser) -> None:
    target_loss_option(parser)
    tasks_option(parser)
    option(parser, "--preset", help="model preset of the sparse and dense models (default small)")
    option(parser, "--sparse-model", help="use this sparse model instead of training one: a packed "
           "model directory with a provenance.json, or a shipped checkpoint's name (small)")
    option(parser, "--dense-model", help="use this dense model instead of training one to the sparse "
           "model's loss: a packed model directory, a training run or a run's snapshot "
           "(<run>/snapshots/step-N)")


def run(out_dir: str | Path, models_dir: str | Path, quick: bool = False, target_loss: float = 0.15,
        tasks: list[str] | None = None, preset: str = "small", sparse_model: str | Path | None = None,
        dense_model: str | Path | None = None, progress: bool = False) -> AnalysisResult:
    from sparse_lens.tasks import list_tasks

    models_dir = Path(models_dir)
    tasks = list(tasks or (QUICK_TASKS if quick else list_tasks()))
    sparse = (existing_model(sparse_model, models_dir) if sparse_model is not None
              else train_model(ModelSpec(preset, preset), models_dir, quick, progress))
    target_val = float(f"{sparse.val_loss:.4f}")
    if dense_model is not None:
        dense = existing_model(dense_model, models_dir)
        dense_steps = dense.history[-1]["step"] if dense.history else 0
        cfg = dense.model.cfg
        how = (f"taken from `{dense_model}`: {dense_steps} steps, d_model {cfg.d_model}, d_mlp "
               f"{cfg.d_mlp}, {cfg.n_layers} layers, weight L0 {cfg.weight_l0:.4g}")
    else:
        dense = train_model(dense_spec(sparse), models_dir, quick, progress)
        dense_steps = dense.history[-1]["step"] if dense.history else 0
        planned = dense.spec.configs(quick)[1].steps
        how = (f"trained with the same settings until its validation loss first reached the sparse "
               f"model's (evaluated every {dense.spec.configs(quick)[1].eval_every} steps): stopped at "
               f"step {dense_steps} of {planned}" if dense.val_loss <= target_val else
               f"trained for all {planned} steps without reaching the sparse model's loss")

    rows = []
    for trained, kind in ((sparse, "sparse"), (dense, "dense")):
        table = prune_tasks(trained, tasks, target_loss, quick, progress)
        table.insert(0, "kind", kind)
        rows.append(table)
    wide, both, ratio = compare_sizes(pd.concat(rows, ignore_index=True), tasks)
    summary = (
        f"Sparse model `{sparse.spec.name}` (weight L0 {sparse.model.cfg.weight_l0:.4g}): validation "
        f"loss {sparse.val_loss:.4f} nats/token. Dense model `{dense.spec.name}`: {dense.val_loss:.4f} "
        f"({how}). Target task loss {target_loss}. Tasks solved by both: {int(both.sum())} of "
        f"{len(tasks)}. Geometric mean of dense/sparse circuit edges over them: "
        + (f"**{ratio:.2f}x**." if ratio == ratio else "undefined (no task solved by both).")
    )
    fig = _plot(wide, both, ratio, target_loss)
    return write_outputs(out_dir, NAME, wide, fig, summary, [sparse, dense],
                         settings_dict(quick=quick, target_loss=target_loss, tasks=tasks,
                                       preset=sparse.spec.preset, sparse_model=str(sparse.path),
                                       dense_model=str(dense.path), dense_steps=dense_steps,
                                       sparse_val_loss=sparse.val_loss, dense_val_loss=dense.val_loss,
                                       geometric_mean_ratio=ratio))


def dense_spec(sparse) -> ModelSpec:
    """The dense baseline matched to the `TrainedModel` `sparse`: same preset and training
    settings, weight L0 1, stopped at the first evaluation (every 25 steps) at or below the
    sparse model's validation loss (to 4 decimals)."""
    target_val = float(f"{sparse.val_loss:.4f}")
    return ModelSpec(f"{sparse.spec.preset}-dense-to-{target_val:.4f}", sparse.spec.preset,
                     dict(weight_l0=1.0), dict(result_settings(sparse), stop_at_val_loss=target_val,
                                               eval_every=25))


def compare_sizes(long: pd.DataFrame, tasks: list[str]) -> tuple[pd.DataFrame, pd.Series, float]:
    """From one row per (kind, task) (`kind` sparse or dense; edges, nodes, solved,
    full_model_loss): one row per task with both kinds' columns and the dense/sparse edge ratio
    (NaN unless both solve it); the tasks both solve; the geometric mean of their ratios."""
    wide = long.pivot(index="task", columns="kind", values=["edges", "nodes", "solved", "full_model_loss"])
    wide.columns = [f"{a}_{b}" for a, b in wide.columns]
    wide = wide.reindex(tasks).reset_index()
    both = wide.solved_sparse.astype(bool) & wide.solved_dense.astype(bool)
    wide["edge_ratio_dense_over_sparse"] = [
        (d / s if ok and s else float("nan"))
        for d, s, ok in zip(wide.edges_dense, wide.edges_sparse, both)]
    return wide, both, geometric_mean(wide.edge_ratio_dense_over_sparse[both & (wide.edges_sparse > 0)])


def _plot(wide: pd.DataFrame, both, ratio: float, target_loss: float):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 5))
    ax = fig.subplots()
    solved = wide[both]
    if len(solved):
        ax.scatter(solved.edges_sparse.clip(lower=1), solved.edges_dense.clip(lower=1), color="C0")
        for r in solved.itertuples():
            ax.annotate(r.task, (max(r.edges_sparse, 1), max(r.edges_dense, 1)), fontsize=7)
        lo = max(1, min(solved.edges_sparse.min(), solved.edges_dense.min()) / 2)
        hi = max(solved.edges_sparse.max(), solved.edges_dense.max()) * 2
        ax.plot([lo, hi], [lo, hi], "k--", lw=0.8, label="equal size")
        ax.plot([lo, hi / 16], [lo * 16, hi], ":", color="C3", lw=0.8, label="dense 16x larger")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, "no task solved by both models\nat this target", ha="center", va="center",
                transform=ax.transAxes)
    title = f"circuit edges at target {target_loss}"
    if ratio == ratio:
        title += f": dense/sparse geometric mean {ratio:.2f}x"
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("sparse circuit edges")
    ax.set_ylabel("dense circuit edges")
    return fig
