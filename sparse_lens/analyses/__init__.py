"""The paper's results as re-runnable analyses. Each writes `<name>.csv`, `<name>.png`,
`summary.md` and `meta.json` (command, seeds, model configs, versions) into `<out>/<name>/`:

    sparse-lens analyze circuit-size --out results          # sparse vs dense circuit edges
    sparse-lens analyze kurtosis --out results              # residual kurtosis vs L0 and width
    sparse-lens analyze frontier --out results              # loss vs circuit size, the frontier
    sparse-lens analyze dilution --out results              # bracket_counting context dilution
    sparse-lens analyze learning-curves --runs RUN ...      # task loss of each training snapshot
    sparse-lens analyze circuit-curves --runs RUN ...       # circuit size of each training snapshot
    sparse-lens analyze all --quick --out /tmp/r            # minutes, tiny models (the tests)

or `sparse_lens.analyses.run("kurtosis", out_dir, models_dir, quick=True)`, which returns an
`AnalysisResult` (the table, the summary text, the folder and the files written). Trained models
are kept in `models_dir` (default `runs/analyses`) and reused by every analysis that needs them.

Each analysis module has `run(out_dir, models_dir, quick=False, progress=False, **options)` and
`add_arguments(parser)`, which declares its options as flags (default `argparse.SUPPRESS`: a flag
not given leaves `run`'s default); `add_arguments(parser, name)` here adds the options every
analysis shares and that analysis's own (all of them for "all").
"""

from __future__ import annotations

import argparse
import importlib
from pathlib import Path

#: analysis name -> module
ANALYSES: dict[str, str] = {
    "circuit-size": "sparse_lens.analyses.circuit_size",
    "kurtosis": "sparse_lens.analyses.kurtosis",
    "frontier": "sparse_lens.analyses.frontier",
    "dilution": "sparse_lens.analyses.dilution",
    "learning-curves": "sparse_lens.analyses.learning_curves",
    "circuit-curves": "sparse_lens.analyses.circuit_curves",
}
#: analysis name -> what it shows (its line in `sparse-lens analyze --help`)
ABOUT: dict[str, str] = {
    "circuit-size": "sparse vs dense circuit edges at matched pretraining loss",
    "kurtosis": "residual-stream kurtosis against weight L0 and width",
    "frontier": "pretraining loss against circuit size, and the Pareto frontier",
    "dilution": "bracket_counting's context dilution, and the flip length the circuit predicts",
    "learning-curves": "task loss of each training snapshot of --runs",
    "circuit-curves": "circuit size at the target loss of each training snapshot of --runs",
    "all": "every analysis (learning-curves and circuit-curves with --runs or --quick)",
}
#: the analyses of training runs' snapshots: `analyze all` runs them only with --runs or --quick
RUN_ANALYSES = ("learning-curves", "circuit-curves")
#: the options every analysis takes (the others are its own)
COMMON_OPTIONS = ("out", "models_dir", "quick", "no_progress")


def module(name: str):
    """The module of analysis `name`."""
    if name not in ANALYSES:
        raise ValueError(f"unknown analysis {name!r}; known: {sorted(ANALYSES)}")
    return importlib.import_module(ANALYSES[name])


def run(name: str, out_dir: str | Path, models_dir: str | Path = "runs/analyses", quick: bool = False,
        **options):
    """Run the analysis `name` (see `ANALYSES`); returns its `AnalysisResult`."""
    return module(name).run(out_dir, models_dir, quick=quick, **options)


def add_arguments(parser: argparse.ArgumentParser, name: str) -> None:
    """The flags of `sparse-lens analyze NAME`: the shared ones, then the analysis's own (for
    "all", every analysis's, in a parser made with `conflict_handler="resolve"`: analyses that
    share an option declare it alike; each analysis gets the ones it declares)."""
    parser.add_argument("--out", type=Path, default=Path("results"), help="output folder (default results)")
    parser.add_argument("--models-dir", type=Path, default=Path("runs/analyses"),
                        help="where the analyses' models are trained and reused (default runs/analyses)")
    parser.add_argument("--quick", action="store_true", help="tiny models, minutes (what the tests run)")
    parser.add_argument("--no-progress", action="store_true")
    for each in ANALYSES if name == "all" else [name]:
        module(each).add_arguments(parser)


def option_names(name: str) -> set[str]:
    """The options analysis `name` declares (their `run` keywords)."""
    parser = argparse.ArgumentParser(add_help=False)
    module(name).add_arguments(parser)
    return {a.dest for a in parser._actions}


__all__ = ["ABOUT", "ANALYSES", "COMMON_OPTIONS", "RUN_ANALYSES", "add_arguments", "module", "option_names", "run"]
