"""What every analysis shares: the models it trains (or reuses), pruning a set of tasks, and the
output folder (CSV, PNG, summary.md, meta.json with the command, seeds, configs and versions).

Models live in a models directory (default `runs/analyses`, `--models-dir`), one training run
each, named by what they are (`small`, `small-dense`, `sweep-w128-l0_0.0625`); `train(...,
resume="auto")` reuses a finished run and continues an interrupted one, so analyses that need the
same model train it once. `small` and `small-dense` are the runs `sparse-lens train [--dense]`
makes, so `--models-dir runs` reuses the demo's model and the dense baseline.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import platform
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

#: Training settings of `--quick` runs: tiny models on a slice of the standard library.
QUICK_TRAIN = dict(steps=20, batch_size=4, seq_len=32, max_files=20, eval_every=5,
                   eval_batches=2, checkpoint_every=1000)
#: Pruning settings of `--quick` runs.
QUICK_PRUNE = dict(steps=5, n_train=16, n_eval=8, batch_size=8, mean_tokens=1024)


@dataclass(frozen=True)
class ModelSpec:
    """One model an analysis trains: a preset, config overrides and training overrides."""

    name: str
    preset: str = "small"
    model: dict[str, Any] = field(default_factory=dict)
    train: dict[str, Any] = field(default_factory=dict)

    def configs(self, quick: bool):
        from sparse_lens.config import SparseHookedTransformerConfig
        from sparse_lens.training import TrainConfig

        model_cfg = SparseHookedTransformerConfig.preset("tiny" if quick else self.preset, **self.model)
        train_cfg = TrainConfig(**{**self.train, **(QUICK_TRAIN if quick else {})})
        return model_cfg, train_cfg


@dataclass
class TrainedModel:
    spec: ModelSpec
    model: Any  # SparseHookedTransformer
    path: Path
    val_loss: float
    history: list[dict]
    seconds: float


def train_model(spec: ModelSpec, models_dir: Path, quick: bool, progress: bool = False) -> TrainedModel:
    """Train `spec` into `models_dir/spec.name` (or reuse the finished run there)."""
    from sparse_lens.training import train

    model_cfg, train_cfg = spec.configs(quick)
    path = Path(models_dir) / spec.name
    start = time.perf_counter()
    result = train(model_cfg, train_cfg, path, resume="auto", progress=progress)
    result.model.eval()
    return TrainedModel(spec, result.model, path, result.val_loss, result.history,
                        time.perf_counter() - start)


def existing_model(where: str | Path, models_dir: Path) -> TrainedModel:
    """A model trained elsewhere, as a `TrainedModel`: a model directory with the
    `provenance.json` of a packed checkpoint (its validation loss, training settings and
    history), a training run's directory (`sparse-lens train --out DIR`: the same from its
    `training/state.json`; the loss is its last evaluation's), a snapshot of such a run
    (`<run>/snapshots/step-NNNNNN`, from `--snapshot-every`: the run's record, the loss evaluated
    at that step), or the name of a checkpoint shipped in the package (`sparse_lens.pretrained`),
    written as a model directory `models_dir/<name>-shipped` first."""
    from sparse_lens import checkpoint, pretrained
    from sparse_lens.checkpoint import PROVENANCE_FILE
    from sparse_lens.model import SparseHookedTransformer
    from sparse_lens.training.rundir import TRAINING_DIR, snapshot_of_run

    path = Path(where)
    if not path.is_dir() and str(where) in pretrained.available():
        path = Path(models_dir) / f"{where}-shipped"
        if not (path / PROVENANCE_FILE).is_file():
            pretrained.materialise(str(where), path)
    record_file, state_file = path / PROVENANCE_FILE, path / TRAINING_DIR / "state.json"
    run_dir, snapshot_step = snapshot_of_run(path) or (None, None)
    if run_dir is not None and not record_file.is_file():
        record = checkpoint.read_json(run_dir / TRAINING_DIR / "state.json")
        at_step = [h["val_loss"] for h in record.get("history", [])
                   if h.get("step") == snapshot_step and h.get("val_loss") is not None]
        if not at_step:
            raise ValueError(f"{where}: the run evaluated no validation loss at step {snapshot_step} "
                             f"(snapshots at evaluation steps only can be used)")
        val_loss = float(at_step[-1])
        record = {**record, "history": [h for h in record.get("history", []) if h["step"] <= snapshot_step]}
    elif record_file.is_file():
        record = checkpoint.read_json(record_file)
        val_loss = float(record["val_loss"])
    elif state_file.is_file():
        record = checkpoint.read_json(state_file)
        evaluated = [h["val_loss"] for h in record.get("history", []) if h.get("val_loss") is not None]
        if not evaluated:
            raise ValueError(f"{where}: the training run has no evaluation yet (no validation loss)")
        val_loss = float(evaluated[-1])
    else:
        raise FileNotFoundError(f"{where}: neither a model directory with a {PROVENANCE_FILE} (a packed "
                                f"checkpoint), nor a training run's directory (with {TRAINING_DIR}/"
                                f"state.json), nor a shipped checkpoint ({pretrained.available()})")
    train = {k: tuple(v) if isinstance(v, list) else v for k, v in record["train_config"].items()}
    model = SparseHookedTransformer.from_pretrained(path)
    model.eval()
    name = path.name if run_dir is None else f"{run_dir.name}-{path.name}"
    spec = ModelSpec(name, record.get("preset", "small"), train=train)
    return TrainedModel(spec, model, path, val_loss, list(record.get("history", [])), float("nan"))


def sweep_or_existing(models, quick: bool, widths, l0s, steps, models_dir: Path,
                      progress: bool) -> list[TrainedModel]:
    """The models of the width x L0 sweep (trained, or reused from `models_dir`), or, when
    `models` names some (`existing_model`: directories or shipped names), those instead."""
    if models:
        return [existing_model(m, Path(models_dir)) for m in models]
    return [train_model(s, Path(models_dir), quick, progress) for s in sweep_specs(quick, widths, l0s, steps)]


def result_settings(trained: TrainedModel) -> dict[str, Any]:
    """The fields of `trained`'s training config that set its weights and differ from the
    defaults (e.g. `steps`): what a matched run must share with it."""
    from sparse_lens.training import TrainConfig

    own, default = trained.spec.configs(False)[1].to_json_dict(), TrainConfig().to_json_dict()
    return {k: trained.spec.train[k] for k, v in own.items()
            if k not in TrainConfig.NON_RESULT_FIELDS + ("stop_at_val_loss",) and v != default[k]}


def prune_tasks(trained: TrainedModel, task_names, target_loss: float, quick: bool,
                progress: bool = False, **prune_overrides) -> pd.DataFrame:
    """Prune every task on one model at `target_loss` (`pipeline.prune_tasks`, unverified); one
    row per task (`Circuit.summary()` after the model's name and validation loss). Circuits are
    saved in `circuits_dir(trained, target_loss)`, and one saved there before for the same weights
    and settings is reused (`pipeline.prune_tasks(reuse=True)`: analyses share their pruning)."""
    from sparse_lens.pipeline import prune_tasks as prune_all
    from sparse_lens.pruning import PruneConfig

    overrides = {**(QUICK_PRUNE if quick else {}), **prune_overrides}
    config = PruneConfig(target_loss=target_loss, progress=progress, **overrides)
    table = prune_all(trained.model, task_names, config, model_dir=trained.path,
                      out=circuits_dir(trained, target_loss), verify=False, reuse=True)
    table.insert(0, "model", trained.spec.name)
    table.insert(1, "val_loss", trained.val_loss)
    return table


def circuits_dir(trained: TrainedModel, target_loss: float) -> Path:
    """Where the circuits of `trained` at `target_loss` are saved, one folder a task."""
    return trained.path / "circuits" / f"target{target_loss:g}"


def geometric_mean(values) -> float:
    values = [float(v) for v in values]
    if not values or any(v <= 0 for v in values):
        return float("nan")
    return math.exp(sum(math.log(v) for v in values) / len(values))


# --------------------------------------------------------------------------------- outputs
def versions() -> dict[str, str]:
    import torch
    import transformer_lens

    import sparse_lens

    from importlib import metadata

    def installed(dist: str, module) -> str:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return getattr(module, "__version__", "?")

    out = dict(python=platform.python_version(), torch=torch.__version__,
               transformer_lens=installed("transformer-lens", transformer_lens),
               sparse_lens=installed("sparse-lens", sparse_lens))
    try:
        import subprocess

        out["git_commit"] = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10,
            cwd=Path(__file__).parent).stdout.strip() or "?"
    except (OSError, subprocess.SubprocessError):
        out["git_commit"] = "?"
    return out


@dataclass(frozen=True, eq=False)  # eq=False: a DataFrame has no single truth value
class AnalysisResult:
    """What an analysis found and wrote: its table, its summary text (as in summary.md), its
    output folder and the files written there."""

    name: str
    table: pd.DataFrame
    summary: str
    folder: Path
    paths: tuple[Path, ...]


def write_outputs(out_dir: str | Path, name: str, table: pd.DataFrame, figure, summary: str,
                  models: list[TrainedModel], settings: dict[str, Any],
                  more_tables: dict[str, pd.DataFrame] | None = None) -> AnalysisResult:
    """Write `<name>.csv`, `<name>.png` (from `figure`, a matplotlib `Figure`), `summary.md`,
    `meta.json` and `more_tables` ({file name: table}) into `out_dir/name`."""
    folder = Path(out_dir) / name
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"{name}.csv", folder / f"{name}.png", folder / "meta.json", folder / "summary.md"]
    table.to_csv(paths[0], index=False)
    figure.savefig(paths[1], dpi=120, bbox_inches="tight")
    command = " ".join(shlex.quote(a) for a in ["sparse-lens", *sys.argv[1:]]) \
        if Path(sys.argv[0]).name in ("sparse-lens", "cli.py") else " ".join(map(shlex.quote, sys.argv))
    meta = dict(
        analysis=name, command=command, settings=settings, versions=versions(),
        models=[dict(name=m.spec.name, path=str(m.path), val_loss=m.val_loss,
                     train_seconds=round(m.seconds, 1),
                     model_config=m.model.cfg.to_json_dict(),
                     train_config=m.spec.configs(settings.get("quick", False))[1].to_json_dict())
                for m in models],
    )
    paths[2].write_text(json.dumps(meta, indent=1, default=str))
    paths[3].write_text(
        f"# {name}\n\n{summary.strip()}\n\nCommand: `{command}` (settings, seeds, model configs "
        f"and versions in `meta.json`).\n\n![{name}]({name}.png)\n\n{table_markdown(table)}\n")
    for file_name, extra in (more_tables or {}).items():
        extra.to_csv(folder / file_name, index=False)
        paths.append(folder / file_name)
    return AnalysisResult(name, table, summary.strip(), folder, tuple(paths))


def option(parser: argparse.ArgumentParser, flag: str, **kwargs) -> None:
    """Declare an analysis option: not given, it stays out of the namespace (`run`'s default)."""
    parser.add_argument(flag, default=argparse.SUPPRESS, **kwargs)


def target_loss_option(parser: argparse.ArgumentParser) -> None:
    option(parser, "--target-loss", type=float,
           help="task loss a circuit must reach (default 0.15, the paper's)")


def tasks_option(parser: argparse.ArgumentParser) -> None:
    option(parser, "--tasks", nargs="+", help="tasks to prune or evaluate (default: the analysis's)")


def runs_option(parser: argparse.ArgumentParser) -> None:
    option(parser, "--runs", nargs="+", type=Path,
           help="learning-curves, circuit-curves: run directories trained with --snapshot-every")


def previous_option(parser: argparse.ArgumentParser) -> None:
    """`--previous`: an earlier output table of a runs analysis (learning-curves, circuit-curves)."""
    option(parser, "--previous", type=Path, help="learning-curves, circuit-curves: the analysis's "
           "earlier csv table, whose rows of runs not given are kept (runs whose directories are gone)")


def with_previous_rows(table: pd.DataFrame, previous: str | Path | None) -> pd.DataFrame:
    """`table` (one `run` column) after the rows of the earlier table in the csv `previous` whose
    run is not in `table`: a run given again replaces its old rows. `previous` None: `table`."""
    if previous is None:
        return table
    earlier = pd.read_csv(previous)
    missing = set(table.columns) - set(earlier.columns)
    if missing:
        raise ValueError(f"{previous} is not this analysis's table: it has no {sorted(missing)} columns")
    earlier = earlier[~earlier.run.isin(set(table.run))]
    return pd.concat([earlier[table.columns], table], ignore_index=True)


def sweep_options(parser: argparse.ArgumentParser) -> None:
    """The width x weight-L0 sweep's options (kurtosis, frontier)."""
    option(parser, "--widths", nargs="+", type=int, help=f"d_model of the sweep (default {SWEEP_WIDTHS})")
    option(parser, "--l0s", nargs="+", type=float, help="weight L0s of the sweep (default 1, 1/4, 1/16)")
    option(parser, "--steps", type=int, help=f"training steps of each sweep model (default {SWEEP_STEPS})")
    option(parser, "--models", nargs="+", help="models trained elsewhere instead of the sweep: model "
           "directories (packed, or a training run's --out) or shipped checkpoint names (small)")


def table_markdown(table: pd.DataFrame, floatfmt: str = ".4g") -> str:
    """A GitHub markdown table (no `tabulate` needed)."""
    def cell(v):
        if isinstance(v, float):
            if math.isnan(v):
                return ""
            # counts that a NaN elsewhere in their column turned into floats print as integers
            return f"{int(v):,}" if v.is_integer() and abs(v) >= 1e4 else format(v, floatfmt)
        return "" if v is None else str(v)

    head = "| " + " | ".join(map(str, table.columns)) + " |"
    rule = "|" + "|".join("---" for _ in table.columns) + "|"
    rows = ["| " + " | ".join(cell(v) for v in row) + " |" for row in table.itertuples(index=False)]
    return "\n".join([head, rule, *rows])


def settings_dict(**kwargs) -> dict[str, Any]:
    return {k: (dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v) for k, v in kwargs.items()}


# ---------------------------------------------------------------------- the width x L0 sweep
#: The sweep the kurtosis and frontier analyses share: 2-layer models of three widths, each
#: dense and at two weight L0s (CPU size; `--widths`/`--l0s` for larger sweeps on a GPU).
SWEEP_WIDTHS = (64, 128, 256)
SWEEP_L0S = (1.0, 1 / 4, 1 / 16)
SWEEP_STEPS = 400
QUICK_WIDTHS = (32, 64)
QUICK_L0S = (1.0, 1 / 4)


def sweep_specs(quick: bool, widths=None, l0s=None, steps: int | None = None) -> list[ModelSpec]:
    """One `ModelSpec` per (width, weight L0): n_layers 2, d_head 16, d_mlp 4 x width."""
    widths = widths or (QUICK_WIDTHS if quick else SWEEP_WIDTHS)
    l0s = l0s or (QUICK_L0S if quick else SWEEP_L0S)
    specs = []
    for width in widths:
        for l0 in l0s:
            specs.append(ModelSpec(
                f"sweep-w{width}-l0_{l0:.4g}", "small",
                dict(n_layers=2, d_model=width, d_head=16, d_mlp=4 * width, weight_l0=float(l0),
                     model_name=f"sweep-w{width}-l0_{l0:.4g}"),
                dict(steps=steps or SWEEP_STEPS)))
    return specs
