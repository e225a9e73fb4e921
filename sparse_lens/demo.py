"""The one-command demo: train (or reuse) a model, prune a handful of tasks, write the report.

    sparse-lens demo                       # runs/small: train if needed, prune, verify, report

Each step reuses what is already in the run directory: a finished training run is loaded (an
interrupted one resumes), the node means are cached next to the model, and the report is
written to `<run>/report.html`. A task the model does not solve is reported as such.
"""

from __future__ import annotations

import time
from pathlib import Path

import pandas as pd

#: The tasks the demo prunes: the paper's two showcase circuits and two more.
DEMO_TASKS: tuple[str, ...] = ("single_double_quote", "bracket_counting", "lambda_func", "for_while")


def run_demo(
    out_dir: str | Path = "runs/small",
    preset: str = "small",
    tasks: tuple[str, ...] = DEMO_TASKS,
    steps: int | None = None,
    progress: bool = True,
) -> tuple[pd.DataFrame, Path]:
    """Train or reuse `out_dir`, prune `tasks`, verify the solved ones, write the report.
    Returns the summary table and the report's path. Prints progress as it goes."""
    from sparse_lens.config import SparseHookedTransformerConfig
    from sparse_lens.hooks import node_means_for
    from sparse_lens.pruning import PruneConfig, prune
    from sparse_lens.training import TrainConfig, train
    from sparse_lens.viz import write_report

    out_dir = Path(out_dir)
    start = time.perf_counter()
    tc = TrainConfig(**({} if steps is None else {"steps": steps}))
    model_cfg = SparseHookedTransformerConfig.preset(preset)
    print(f"[1/4] model: {out_dir} ({preset}, {tc.steps} steps; trained only where not done yet)")
    result = train(model_cfg, tc, out_dir, resume=True, progress=progress)
    model = result.model
    model.eval()
    print(f"      model saved in {out_dir}; validation loss {result.val_loss:.4f} nats/token "
          f"(unigram baseline {result.unigram_val_loss:.4f})")

    print("[2/4] node means over the standard library (cached next to the model)")
    config = PruneConfig(progress=progress)
    means = node_means_for(model, out_dir, n_tokens=config.mean_tokens)

    print(f"[3/4] pruning {len(tasks)} tasks to target loss {config.target_loss}")
    circuits, rows = [], []
    for task in tasks:
        circuit = prune(model, task, config, means=means)
        circuit.save(out_dir / "circuits" / task)
        if not circuit.full_model_misses_target:
            circuit.verify(n=128)
        print(f"      {circuit!r}".replace("\n", "\n      "))
        circuits.append(circuit)
        rows.append(circuit.summary())
    summary = pd.DataFrame(rows)

    print("[4/4] writing the report")
    report = write_report(model, circuits, out_dir / "report.html",
                          title=f"Circuits of {out_dir.resolve().name}")
    print(summary.to_string(index=False))
    print(f"report: {report.resolve()}  ({time.perf_counter() - start:.0f} s in all)")
    return summary, report
