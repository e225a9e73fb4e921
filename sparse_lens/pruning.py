"""Pruning: the smallest set of nodes that still solves a task, everything else mean-ablated.

`prune(model, task)` gets the task's examples and the node means, runs the search of
`sparse_lens.search` (the paper's method, Gao et al. 2025, section 2.2: learned node masks, then
the smallest prefix of the tau order under the target loss, optionally a calibration) and returns
what it found as a `Circuit`.

The task loss is the per-example mean of binary cross-entropy over the two candidate logits at
the final position (`tasks.task_loss`); the 0.15 target applies to that mean.

Pruned nodes take their mean over the pretraining corpus by default; `ablation=` picks another
mode (`zero`, `task_mean`, `resample`: see `sparse_lens.ablation`), used by the optimisation and
the bisection alike, and recorded in the circuit's config.
"""

from __future__ import annotations

import dataclasses
import time

from sparse_lens.circuit import Circuit
from sparse_lens.edges import edge_tokens
from sparse_lens.hooks import node_means_for
from sparse_lens.search import (  # noqa: F401  (re-exported: the search's public names)
    ExampleLosses, PruneConfig, SearchResult, _bisect, _prefix_losses, _search, heaviside_ste,
    prune_task_data, search_nodes, smallest_passing_prefix,
)
from sparse_lens.task_loss import (  # noqa: F401  (re-exported: the evaluation primitives)
    Calibration, final_logit_pairs, fit_calibration, pair_accuracy, pair_loss,
)


def prune(model, task, config: PruneConfig | None = None, model_dir=None, means=None,
          **overrides) -> Circuit:
    """Prune `model` to the smallest circuit that solves `task`: a task name (`tasks.list_tasks()`,
    at `config.level` from `config.source`; optimised on its train split, the circuit size
    searched on other train examples) or a hand-made `TaskData` (used for both).

    `means`: per-node means over the pretraining corpus (default: loaded from / cached in
    `model_dir`, else computed on the standard library). Keyword overrides update `config`, e.g.
    `prune(model, "with_as", steps=50, ablation="zero")`. Returns a `Circuit` (see
    `Circuit.verify`). If the full model misses the target on the evaluation examples, nothing is
    optimised: the circuit keeps every node and `solved` is False. With `force_search` (the
    faithfulness controls) the search runs anyway, and the bisection looks for the smallest
    circuit within the optimised mask's own nodes (more nodes than that do worse)."""
    config = dataclasses.replace(config or PruneConfig(), **overrides)
    start = time.perf_counter()
    name, train_data, eval_data, custom = prune_task_data(model, task, config)
    if means is None:  # after the task data, whose errors come first
        means = node_means_for(model, model_dir, n_tokens=config.mean_tokens,
                               sparse_kernels=config.sparse_kernels)
    found = search_nodes(model, train_data, eval_data, means, config)
    seconds = time.perf_counter() - start
    return Circuit(
        model=model, task=name, node_ids=found.node_ids, tau=found.tau,
        means=means.detach().cpu(), config=config, losses=found.losses,
        calibration=found.calibration, solved=found.solved, bisection=found.curve,
        seconds=seconds, data=custom,
        ablation_values=None if config.ablation == "mean" else found.ablation.values.detach().cpu(),
        edge_tokens=edge_tokens(model, name, config, custom),
    )
