"""Cost of pruning one task: wall time, and the memory of the mean cache and mask state.

    .venv/bin/python benchmarks/bench_pruning.py --model runs/small --task single_double_quote --target-loss 0.8

Prints seconds per phase (node means, if not cached; mask optimisation + bisection), the
issue's target (under 60 s per task on 2 CPU threads), and the bytes of the node means and of
the mask state (tau, its gradient and AdamW's two moments) next to the model's parameter bytes.
Also the process's peak RSS before and after pruning (Linux ru_maxrss).
"""

from __future__ import annotations

import argparse
import resource
import time
from pathlib import Path

import torch


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=Path("runs/small"))
    parser.add_argument("--task", default="single_double_quote")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--target-loss", type=float, default=None,
                        help="a target the full model meets (at 0.15 a task the model cannot solve "
                        "is skipped, which times nothing)")
    args = parser.parse_args(argv)

    from sparse_lens.hooks import NodeRegistry, node_means_for
    from sparse_lens.model import SparseHookedTransformer
    from sparse_lens.pruning import PruneConfig, prune

    torch.set_num_threads(args.threads)
    model = SparseHookedTransformer.from_pretrained(args.model)
    registry = NodeRegistry.for_model(model)
    overrides = {k: v for k, v in (("steps", args.steps), ("target_loss", args.target_loss)) if v}
    config = PruneConfig(progress=False, **overrides)

    t0 = time.perf_counter()
    means = node_means_for(model, args.model, n_tokens=config.mean_tokens)
    t_means = time.perf_counter() - t0
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    circuit = prune(model, args.task, config, means=means)
    t_prune = time.perf_counter() - t0
    rss_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    means_bytes = means.numel() * means.element_size()
    mask_state_bytes = 4 * registry.n_nodes * 4  # tau, grad, exp_avg, exp_avg_sq in float32
    print(f"model {args.model} ({model.cfg.model_name}): {registry.n_nodes:,} nodes, "
          f"{param_bytes / 2**20:.1f} MiB of parameters; {torch.get_num_threads()} threads")
    print(f"  node means ({'loaded' if t_means < 1 else 'computed'}): {t_means:6.1f} s")
    print(f"  prune {args.task}: {t_prune:6.1f} s ({config.steps} mask steps of {config.batch_size} "
          f"examples + bisection)  target < 60 s: {'met' if t_prune < 60 else 'MISSED'}")
    if circuit.full_model_misses_target:
        print(f"  the full model misses target {config.target_loss}: nothing was pruned (pass --target-loss)")
    else:
        print(f"  circuit: {circuit.n_nodes} nodes, {circuit.n_edges} edges, losses {circuit.losses}")
    print(f"  mean cache / parameters = {means_bytes / param_bytes:.4f} ({means_bytes / 1024:.0f} KiB)")
    print(f"  mask state / parameters = {mask_state_bytes / param_bytes:.4f} "
          f"({mask_state_bytes / 1024:.0f} KiB)")
    print(f"  peak RSS {rss_before / 1024:.0f} MiB before pruning, {rss_after / 1024:.0f} MiB after")


if __name__ == "__main__":
    main()
