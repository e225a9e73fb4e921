"""Learning curves: full-model task loss (core, hard and real-code levels) against tokens trained.

A training run with `TrainConfig.snapshot_every` keeps a model directory every so many steps in
`<run>/snapshots/step-NNNNNN/` (`sparse-lens train --snapshot-every N`). This analysis evaluates
every snapshot of every run it is given with `sparse_lens.tasks.evaluate_levels` and writes:

- `learning_curves.csv`: one row per (run, step, task, level): tokens trained, the run's
  validation loss at that step (when it was evaluated there), task loss and accuracy;
- `learning_curves.png`: per run, the number of tasks at task loss <= 0.15 and the median task loss
  at each level, against tokens;
- `summary.md`: the last snapshot of each run, level by level.

    sparse-lens analyze learning-curves --runs runs/small-8k runs/wide --out results

Each snapshot's evaluation is kept beside it (`task_levels.csv`, with the settings it was made
with in `task_levels.json`) and read back by a later run with the same tasks, levels and n, so a
run still training can be evaluated as its snapshots appear and only new ones cost time (delete
the file to evaluate afresh, e.g. after changing a task generator). `--previous TABLE` carries the
rows of runs that are not given (their directories gone) from an earlier `learning_curves.csv`.

Tokens are `step x batch_size x seq_len` of the run's saved `TrainConfig`. Snapshots of one run
share its schedules (L0 anneal, LR decay), so an early snapshot is a model mid-schedule, not one
trained to completion on fewer tokens; the `l0` column says where the anneal stood.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from sparse_lens.analyses.common import (
    AnalysisResult, option, previous_option, runs_option, settings_dict, tasks_option, with_previous_rows,
    write_outputs,
)

NAME = "learning_curves"
SOLVED_LOSS = 0.15
QUICK_RUN = dict(steps=20, batch_size=4, seq_len=32, max_files=20, eval_every=10,
                 eval_batches=2, checkpoint_every=10, snapshot_every=10)
QUICK_TASKS = ("single_double_quote", "bracket_counting")


def snapshots(run_dir: str | Path) -> list[tuple[int, Path]]:
    """(step, model directory) of each snapshot of the run in `run_dir`, by step."""
    from sparse_lens.training import SNAPSHOTS_DIR

    folder = Path(run_dir) / SNAPSHOTS_DIR
    found = [(int(p.name.split("-")[1]), p) for p in folder.glob("step-*") if p.is_dir()]
    if not found:
        raise ValueError(f"{run_dir} has no snapshots (train it with --snapshot-every N)")
    return sorted(found)


def run_curve(run_dir: str | Path, tasks: Sequence[str] | None = None,
              levels: Sequence[str] = ("core", "hard", "corpus"), n: int = 128) -> pd.DataFrame:
    """Evaluate every snapshot of the run in `run_dir`; one row per (step, task, level)."""
    from sparse_lens.model import SparseHookedTransformer
    from sparse_lens.tasks import evaluate_levels
    from sparse_lens.training import saved_configs

    model_cfg, tc = saved_configs(run_dir)
    val_at = _validation_losses(Path(run_dir))
    tables = []
    for step, path in snapshots(run_dir):
        table = _cached_evaluation(path, tasks, levels, n)
        if table is None:
            model = SparseHookedTransformer.from_pretrained(path)
            table = evaluate_levels(model, tasks, levels=levels, n=n, bigram=False)
            _save_evaluation(path, table, tasks, levels, n)
        tokens, l0 = tokens_and_l0(step, model_cfg, tc)
        table.insert(0, "run", Path(run_dir).name)
        table.insert(1, "step", step)
        table.insert(2, "tokens", tokens)
        table.insert(3, "l0", l0)
        table.insert(4, "val_loss", val_at.get(step, float("nan")))
        tables.append(table)
    return pd.concat(tables, ignore_index=True)


def tokens_and_l0(step: int, model_cfg, tc) -> tuple[int, float]:
    """Tokens a run (`model_cfg`, its `TrainConfig` `tc`) had trained on after `step` steps, and
    the weight L0 its anneal had reached there."""
    from sparse_lens import sparsity

    tokens = step * tc.batch_size * (tc.seq_len or model_cfg.n_ctx)
    return tokens, sparsity.l0_at_step(step - 1, tc.steps, model_cfg.weight_l0, tc.dense_frac,
                                       tc.anneal_end_frac, tc.anneal_kind)


CACHE_TABLE, CACHE_SETTINGS = "task_levels.csv", "task_levels.json"


def _cache_key(tasks, levels, n: int) -> dict:
    return dict(tasks=list(tasks) if tasks else "all", levels=list(levels), n=n, bigram=False)


def _cached_evaluation(snapshot: Path, tasks, levels, n: int) -> pd.DataFrame | None:
    """The evaluation saved beside `snapshot` with these settings, else None."""
    try:
        same = json.loads((snapshot / CACHE_SETTINGS).read_text()) == _cache_key(tasks, levels, n)
        return pd.read_csv(snapshot / CACHE_TABLE) if same else None
    except (OSError, ValueError):
        return None


def _save_evaluation(snapshot: Path, table: pd.DataFrame, tasks, levels, n: int) -> None:
    table.to_csv(snapshot / CACHE_TABLE, index=False)
    (snapshot / CACHE_SETTINGS).write_text(json.dumps(_cache_key(tasks, levels, n)))


def _validation_losses(run_dir: Path) -> dict[int, float]:
    """step -> validation loss, from the run's saved history."""
    from sparse_lens import checkpoint
    from sparse_lens.training import TRAINING_DIR

    state = checkpoint.read_json(run_dir / TRAINING_DIR / "state.json")
    return {int(r["step"]): float(r["val_loss"]) for r in state["history"] if "val_loss" in r}


def per_snapshot(table: pd.DataFrame) -> pd.DataFrame:
    """Tasks solved (loss <= 0.15), evaluated and the median task loss per (run, step, level)."""
    return (table.groupby(["run", "step", "tokens", "val_loss", "level"], dropna=False)
            .agg(tasks=("task", "size"), solved=("loss", lambda x: int((x <= SOLVED_LOSS).sum())),
                 median_loss=("loss", "median"))
            .reset_index())


def add_arguments(parser) -> None:
    runs_option(parser)
    tasks_option(parser)
    option(parser, "--n", type=int, help="learning-curves: examples per task and level (default 128)")
    previous_option(parser)


def run(out_dir: str | Path, models_dir: str | Path, quick: bool = False,
        runs: Sequence[str | Path] | None = None, tasks: Sequence[str] | None = None,
        n: int | None = None, previous: str | Path | None = None, progress: bool = False) -> AnalysisResult:
    """Evaluate the snapshots of `runs` (model run directories); `quick` trains a tiny run with
    snapshots into `models_dir` first and evaluates two tasks on a few examples. `previous`: an
    earlier `learning_curves.csv`, whose rows of other runs are kept."""
    if quick:
        runs = [quick_run(Path(models_dir), progress)]
        tasks, n = tasks or QUICK_TASKS, n or 16
    if not runs:
        raise ValueError("learning-curves needs --runs: run directories trained with --snapshot-every")
    table = pd.concat([run_curve(r, tasks, n=n or 128) for r in runs], ignore_index=True)
    table = with_previous_rows(table, previous)
    summary_table = per_snapshot(table)
    last = summary_table.sort_values("step").groupby(["run", "level"]).tail(1)
    lines = [f"- `{r.run}` at step {r.step} ({r.tokens:,} tokens, validation loss {r.val_loss:.4f}): "
             f"{r.level}: {r.solved} of {r.tasks} tasks at task loss <= {SOLVED_LOSS}, median "
             f"{r.median_loss:.3f}" for r in last.itertuples()]
    summary = ("Full-model task loss of every training snapshot, at each task level (core: the "
               "named behaviour; hard: with distractors; corpus: real code from the validation "
               "files). Last snapshot of each run:\n\n" + "\n".join(lines))
    return write_outputs(out_dir, NAME, table, _plot(summary_table), summary, [],
                         settings_dict(quick=quick, runs=[str(r) for r in runs],
                                       previous=str(previous) if previous is not None else None,
                                       tasks=list(tasks) if tasks else "all", n=n or 128),
                         more_tables={"per_snapshot.csv": summary_table})


def quick_run(models_dir: Path, progress: bool) -> Path:
    """A tiny run with snapshots at steps 10 and 20 (what `--quick` analyses of runs use)."""
    from sparse_lens.config import SparseHookedTransformerConfig
    from sparse_lens.training import TrainConfig, train

    path = models_dir / "tiny-snapshots"
    train(SparseHookedTransformerConfig.preset("tiny"), TrainConfig(**QUICK_RUN), path,
          resume="auto", progress=progress)
    return path


def _plot(summary: pd.DataFrame):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4))
    solved_ax, loss_ax = fig.subplots(1, 2)
    runs = sorted(summary.run.unique())
    colour = {run: f"C{i % 10}" for i, run in enumerate(runs)}  # one colour per run, a line style per level
    style = {"core": "-", "hard": "--", "corpus": ":"}
    for (run_name, level), rows in summary.groupby(["run", "level"]):
        rows = rows.sort_values("tokens")
        look = dict(color=colour[run_name], ls=style.get(level, "-."), marker="o", ms=3,
                    label=f"{run_name} {level}")
        solved_ax.plot(rows.tokens, rows.solved, **look)
        loss_ax.plot(rows.tokens, rows.median_loss, **look)
    solved_ax.set(xlabel="tokens trained", ylabel=f"tasks at loss <= {SOLVED_LOSS}",
                  title="tasks solved")
    loss_ax.axhline(SOLVED_LOSS, color="k", lw=0.8, ls=":")
    loss_ax.set(xlabel="tokens trained", ylabel="median task loss (nats)", yscale="log",
                title="median task loss")
    loss_ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5))
    return fig
