"""Circuit size, weight-sparse vs dense at matched pretraining loss (the paper's headline: sparse
circuits are about 16x smaller).

1. Train the weight-sparse model (`small` preset, its default weight L0) and the dense baseline
   (same shape, weight L0 = 1) for the same steps on the same corpus.
2. Match the losses: a dense model of the same shape reaches the sparse model's final validation
   loss much earlier, so read the step where the dense run's validation curve first gets there,
   and train a dense model for that many steps (its own schedule, LR decayed to 0 at the end).
   Both losses are reported; the match is as close as the evaluation interval allows.
3. Prune every task on the sparse model and on the matched dense model at the same target loss;
   per task the edges of each (`Circuit.n_edges`), and the geometric mean of dense/sparse edges
   over the tasks both solve.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from sparse_lens.analyses.common import (
    ModelSpec, geometric_mean, prune_tasks, settings_dict, train_model, write_outputs,
)

NAME = "circuit_size"
QUICK_TASKS = ("single_double_quote", "bracket_counting")


def matched_dense_steps(dense_history: list[dict], target_val_loss: float) -> int | None:
    """The first evaluated step of a dense run whose validation loss is <= `target_val_loss`
    (None if it never gets there)."""
    for record in dense_history:
        if "val_loss" in record and record["val_loss"] <= target_val_loss:
            return int(record["step"])
    return None


def run(out_dir: str | Path, models_dir: str | Path, quick: bool = False, target_loss: float = 0.15,
        tasks: list[str] | None = None, preset: str = "small", progress: bool = False) -> Path:
    from sparse_lens.tasks import list_tasks

    models_dir = Path(models_dir)
    tasks = list(tasks or (QUICK_TASKS if quick else list_tasks()))
    sparse = train_model(ModelSpec(preset, preset), models_dir, quick, progress)
    dense_full = train_model(ModelSpec(f"{preset}-dense", preset, dict(weight_l0=1.0)), models_dir,
                             quick, progress)
    steps = matched_dense_steps(dense_full.history, sparse.val_loss)
    if steps is None or steps >= dense_full.spec.configs(quick)[1].steps:
        dense, how = dense_full, "the dense run reached the sparse loss only at its end, or never: used it whole"
    else:
        dense = train_model(ModelSpec(f"{preset}-dense-{steps}steps", preset, dict(weight_l0=1.0),
                                      dict(steps=steps)), models_dir, quick, progress)
        how = (f"the dense run first reached the sparse model's loss at step {steps} of "
               f"{dense_full.spec.configs(quick)[1].steps}; a dense model trained for {steps} steps")

    rows = []
    for trained, kind in ((sparse, "sparse"), (dense, "dense")):
        table = prune_tasks(trained, tasks, target_loss, quick, progress)
        table.insert(0, "kind", kind)
        rows.append(table)
    long = pd.concat(rows, ignore_index=True)
    wide = long.pivot(index="task", columns="kind", values=["edges", "nodes", "solved", "full_model_loss"])
    wide.columns = [f"{a}_{b}" for a, b in wide.columns]
    wide = wide.reindex(tasks).reset_index()
    both = wide.solved_sparse.astype(bool) & wide.solved_dense.astype(bool)
    wide["edge_ratio_dense_over_sparse"] = [
        (d / s if ok and s else float("nan"))
        for d, s, ok in zip(wide.edges_dense, wide.edges_sparse, both)]
    ratio = geometric_mean(wide.edge_ratio_dense_over_sparse[both & (wide.edges_sparse > 0)])
    summary = (
        f"Sparse model `{sparse.spec.name}` (weight L0 {sparse.model.cfg.weight_l0:.4g}): validation "
        f"loss {sparse.val_loss:.4f} nats/token. Dense model `{dense.spec.name}`: {dense.val_loss:.4f} "
        f"({how}). Target task loss {target_loss}. Tasks solved by both: {int(both.sum())} of "
        f"{len(tasks)}. Geometric mean of dense/sparse circuit edges over them: "
        + (f"**{ratio:.2f}x**." if ratio == ratio else "undefined (no task solved by both).")
    )
    fig = _plot(wide, both, ratio, target_loss)
    return write_outputs(out_dir, NAME, wide, fig, summary, [sparse, dense_full, dense],
                         settings_dict(quick=quick, target_loss=target_loss, tasks=tasks,
                                       preset=preset, matched_dense_steps=steps,
                                       geometric_mean_ratio=ratio))


def _plot(wide: pd.DataFrame, both, ratio: float, target_loss: float):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 5))
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
