"""Running and checking a circuit, as functions of what it is made of (the `Circuit` record's
`run`, `verify` and task data call these).

    data = task_examples(model, "with_as", config, split="test", n=256)
    logits = run_masked(model, registry, tokens, keep_mask, values, calibration)
    table = verify_nodes(model, registry, data, node_ids, ablation, calibration)
"""

from __future__ import annotations

import pandas as pd
import torch
from jaxtyping import Float, Int

from sparse_lens.ablation import Ablation, ablated_nodes
from sparse_lens.hooks import NodeRegistry, keep_mask_from_ids, masked_nodes
from sparse_lens.sparse_kernels import sparse_matmuls
from sparse_lens.task_loss import Calibration, final_logit_pairs, pair_accuracy, pair_loss


def task_examples(model, task: str, config=None, data=None, split: str = "test", n: int = 256,
                  seed: int = 0):
    """Examples of `task` for `model`, at the level and from the source of `config` (a
    `PruneConfig`, or None: core, generated); real code holds few of some classes: then as
    many as it has, balanced. `data`: a hand-made TaskData, returned instead (on the model's
    device)."""
    from sparse_lens.tasks import corpus_class_counts, get_task

    if data is not None:
        return data.check_fits(model.cfg.n_ctx).to(model.cfg.device)
    level = config.level if config is not None else "core"
    source = config.source if config is not None else "generated"
    if source == "corpus":
        n = min(n, 2 * min(corpus_class_counts(task, model.tokenizer, split)))
    return get_task(task, model.tokenizer, n=n, seed=seed, split=split, level=level,
                    source=source, n_ctx=model.cfg.n_ctx).to(model.cfg.device)


def run_masked(model, registry: NodeRegistry, tokens: Int[torch.Tensor, "batch pos"],
               keep_mask: Float[torch.Tensor, " n_nodes"], values: Float[torch.Tensor, " n_nodes"],
               calibration: Calibration | None = None, **forward_kwargs):
    """`model(tokens)` with every node outside `keep_mask` replaced by its entry of `values`,
    and `calibration` (if any) applied to the logits."""
    with sparse_matmuls(model, "auto"), masked_nodes(model, registry, keep_mask, values):
        out = model(tokens, **forward_kwargs)
    if calibration is not None and isinstance(out, torch.Tensor) and out.ndim == 3:
        out = calibration.apply_logits(out)
    return out


def verify_nodes(model, registry: NodeRegistry, data, node_ids: list[int], ablation: Ablation,
                 calibration: Calibration | None = None, n_random: int = 5,
                 seed: int = 0) -> pd.DataFrame:
    """Task loss and accuracy on `data` for: the full model; the circuit `node_ids` alone
    (everything else ablated by `ablation`, `calibration` applied); the model with those nodes
    ablated; random node sets of the same size (mean and std over `n_random` seeds)."""
    n_all, n_kept = registry.n_nodes, len(node_ids)
    circuit_mask = keep_mask_from_ids(registry, node_ids)
    rows = []
    was_training = model.training
    model.eval()
    try:
        with sparse_matmuls(model, "auto"), \
                ablated_nodes(model, registry, torch.ones(n_all), ablation) as masker:
            def evaluate(mask, calibrate=False):
                pairs = final_logit_pairs(model, data, masker, mask.to(model.cfg.device))
                if calibrate and calibration is not None:
                    pairs = calibration.apply_pairs(pairs, data)
                return pair_loss(pairs), pair_accuracy(pairs)

            for condition, mask, size, cal in (
                ("full model", torch.ones(n_all), n_all, False),
                ("circuit", circuit_mask, n_kept, True),
                ("circuit ablated", 1 - circuit_mask, n_all - n_kept, False),
            ):
                loss, acc = evaluate(mask, cal)
                rows.append(dict(condition=condition, n_nodes=size, task_loss=loss,
                                 task_loss_std=0.0, accuracy=acc, accuracy_std=0.0))
            gen = torch.Generator().manual_seed(seed)
            random_results = torch.tensor([
                evaluate(keep_mask_from_ids(registry, torch.randperm(n_all, generator=gen)[:n_kept]))
                for _ in range(n_random)])
    finally:
        model.train(was_training)
    spread = (lambda col: random_results[:, col].std().item() if n_random > 1 else 0.0)  # noqa: E731
    rows.append(dict(condition=f"random nodes (x{n_random})", n_nodes=n_kept,
                     task_loss=random_results[:, 0].mean().item(), task_loss_std=spread(0),
                     accuracy=random_results[:, 1].mean().item(), accuracy_std=spread(1)))
    return pd.DataFrame(rows)
