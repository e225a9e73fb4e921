"""Cost and convergence of pruning: time per task, and whether the default budget has converged.

    .venv/bin/python benchmarks/bench_pruning.py --model runs/small   # the demo's model and tasks

For each task (and its target task loss, `task:target`), prunes the model twice, with the default
mask-optimisation budget (`PruneConfig.steps`) and with `--factor` (10) times as many steps, and
prints side by side: wall and CPU seconds of each phase (mask optimisation, circuit-size
search), the circuit's nodes, edges and loss, and the size ratio default / longer. The issue's
bars: under 60 s per task on the `small` preset on 2 cores, and a ratio of at most 1.2 (a 10x
longer optimisation finds a circuit at most 1.2x smaller). CPU seconds beside wall seconds and
the load average show how contended the machine was. Also the memory of the mean cache and of
the mask state next to the model's parameters.
"""

from __future__ import annotations

import argparse
import os
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from sparse_lens.demo import DEMO_TARGET_LOSS, DEMO_TASKS

TIME_BAR_S = 60.0
RATIO_BAR = 1.2


@contextmanager
def timed(phases: dict, name: str, module, attr: str):
    """Time every call of `module.attr` into `phases[name]` as [wall s, cpu s, calls]."""
    original = getattr(module, attr)

    def wrapper(*args, **kwargs):
        wall, cpu = time.perf_counter(), time.process_time()
        try:
            return original(*args, **kwargs)
        finally:
            spent = phases.setdefault(name, [0.0, 0.0, 0])
            spent[0] += time.perf_counter() - wall
            spent[1] += time.process_time() - cpu
            spent[2] += 1

    setattr(module, attr, wrapper)
    try:
        yield
    finally:
        setattr(module, attr, original)


def prune_once(model, task: str, target: float, steps: int, means, k_coef: float,
               restart_steps_scale: int = 1) -> dict:
    """One pruning run: its circuit and the seconds of each phase."""
    from sparse_lens import pruning, search

    phases: dict[str, list] = {}
    config = pruning.PruneConfig(progress=False, steps=steps, target_loss=target, k_coef=k_coef,
                                 restart_steps_scale=restart_steps_scale)
    wall, cpu = time.perf_counter(), time.process_time()
    with timed(phases, "optimise", search, "_optimise_taus"), timed(phases, "search", search, "_search"):
        circuit = pruning.prune(model, task, config, means=means)
    phases["total"] = [time.perf_counter() - wall, time.process_time() - cpu, 1]
    return dict(circuit=circuit, phases=phases, steps=steps)


def print_run(run: dict) -> None:
    """One pruning run's circuit and the seconds of each phase."""
    c, p = run["circuit"], run["phases"]
    if c.full_model_misses_target:
        print(f"  {run['steps']:>5} steps: the full model misses the target (loss "
              f"{c.losses['full_model']:.3f}); nothing pruned", flush=True)
        return
    times = "  ".join(f"{k} {w:6.1f} s wall / {u:6.1f} s cpu" + (f" ({n} runs)" if n > 1 else "")
                      for k, (w, u, n) in p.items())
    print(f"  {run['steps']:>5} steps: {c.n_nodes:5d} nodes {c.n_edges:6d} edges, circuit loss "
          f"{c.losses['circuit']:.3f} (full {c.losses['full_model']:.3f});  {times}", flush=True)


def print_ratio(runs: list[dict]) -> None:
    """The default budget's circuit size over the longer budget's, against the bars."""
    short, long = runs[0]["circuit"], runs[-1]["circuit"]
    if short.full_model_misses_target or len(runs) < 2:
        return
    ratio = short.n_nodes / max(long.n_nodes, 1)
    total = runs[0]["phases"]["total"][0]
    print(f"  size ratio {runs[0]['steps']} / {runs[-1]['steps']} steps = {ratio:.3f} "
          f"(bar <= {RATIO_BAR}: {'met' if ratio <= RATIO_BAR else 'MISSED'});  default budget "
          f"{total:.1f} s wall (bar < {TIME_BAR_S:.0f} s: {'met' if total < TIME_BAR_S else 'MISSED'})")


def main(argv: list[str] | None = None) -> None:
    from sparse_lens.allocator import add_retain_flag, apply_retain_flag

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=Path("runs/small"))
    parser.add_argument("--tasks", nargs="+", default=[f"{t}:{DEMO_TARGET_LOSS}" for t in DEMO_TASKS],
                        help="task:target pairs (a target the full model meets; default: the demo's)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--factor", type=int, default=10, help="the longer run's step multiple")
    parser.add_argument("--k-coef", type=float, default=None,
                        help="node penalty of the mask optimisation (default: PruneConfig's, not the demo's 3e-3)")
    parser.add_argument("--restart-steps-scale", type=int, default=None,
                        help="steps multiple of each restart after a collapsed mask (default: PruneConfig's)")
    parser.add_argument("--no-long", action="store_true", help="time the default budget only")
    parser.add_argument("--long-only", action="store_true", help="run the longer budget only")
    add_retain_flag(parser)
    args = parser.parse_args(argv)
    apply_retain_flag(args)

    from sparse_lens.hooks import NodeRegistry, node_means_for
    from sparse_lens.model import SparseHookedTransformer
    from sparse_lens.pruning import PruneConfig

    torch.set_num_threads(args.threads)
    model = SparseHookedTransformer.from_pretrained(args.model)
    registry = NodeRegistry.for_model(model)
    means = node_means_for(model, args.model, n_tokens=PruneConfig().mean_tokens)
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    print(f"model {args.model}: {registry.n_nodes:,} nodes, {param_bytes / 2**20:.1f} MiB of "
          f"parameters; {torch.get_num_threads()} threads, {os.cpu_count()} CPUs; load average "
          f"{os.getloadavg()[0]:.1f} at the start")
    print(f"  mean cache / parameters = {means.numel() * means.element_size() / param_bytes:.4f}; "
          f"mask state (tau, grad, 2 AdamW moments) / parameters = "
          f"{16 * registry.n_nodes / param_bytes:.4f}")
    steps = PruneConfig().steps
    k_coef = PruneConfig().k_coef if args.k_coef is None else args.k_coef
    scale = PruneConfig().restart_steps_scale if args.restart_steps_scale is None else args.restart_steps_scale
    print(f"k_coef {k_coef}; default budget {steps} mask-optimisation steps; restarts x{scale} steps")
    for spec in args.tasks:
        task, _, target = spec.partition(":")
        target = float(target or PruneConfig().target_loss)
        budgets = [steps] if args.no_long else [steps, steps * args.factor]
        budgets = [steps * args.factor] if args.long_only else budgets
        print(f"{task} at target {target}:", flush=True)
        runs = []
        for budget in budgets:
            runs.append(prune_once(model, task, target, budget, means, k_coef, scale))
            print_run(runs[-1])
        print_ratio(runs)
        print(f"  load average now {os.getloadavg()[0]:.1f}", flush=True)


if __name__ == "__main__":
    main()
