"""The paper's results as re-runnable analyses. Each writes `<name>.csv`, `<name>.png`,
`summary.md` and `meta.json` (command, seeds, model configs, versions) into `<out>/<name>/`:

    sparse-lens analyze circuit-size --out results          # sparse vs dense circuit edges
    sparse-lens analyze kurtosis --out results              # residual kurtosis vs L0 and width
    sparse-lens analyze frontier --out results              # loss vs circuit size, the frontier
    sparse-lens analyze dilution --out results              # bracket_counting context dilution
    sparse-lens analyze learning-curves --runs RUN ...      # task loss of each training snapshot
    sparse-lens analyze all --quick --out /tmp/r            # minutes, tiny models (the tests)

or `sparse_lens.analyses.run("kurtosis", out_dir, models_dir, quick=True)`. Trained models are
kept in `models_dir` (default `runs/analyses`) and reused by every analysis that needs them.
"""

from __future__ import annotations

import importlib
from pathlib import Path

#: analysis name -> module
ANALYSES: dict[str, str] = {
    "circuit-size": "sparse_lens.analyses.circuit_size",
    "kurtosis": "sparse_lens.analyses.kurtosis",
    "frontier": "sparse_lens.analyses.frontier",
    "dilution": "sparse_lens.analyses.dilution",
    "learning-curves": "sparse_lens.analyses.learning_curves",
}


def run(name: str, out_dir: str | Path, models_dir: str | Path = "runs/analyses", quick: bool = False,
        **options) -> Path:
    """Run the analysis `name` (see `ANALYSES`); returns its output folder."""
    if name not in ANALYSES:
        raise ValueError(f"unknown analysis {name!r}; known: {sorted(ANALYSES)}")
    module = importlib.import_module(ANALYSES[name])
    return module.run(out_dir, models_dir, quick=quick, **options)


__all__ = ["ANALYSES", "run"]
