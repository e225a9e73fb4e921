"""Bridges: read a dense model through a weight-sparse one (Gao et al. 2025, "Bridges").

Linear maps join the residual streams of a dense `HookedTransformer` (any TransformerLens model
with attention and MLP blocks, e.g. the project's dense baseline) and a `SparseHookedTransformer`
with the same number of layers and the same vocabulary, at every residual site: after the
embedding and after each attention and MLP block (2 n_layers + 1 sites, named by their hooks
`blocks.0.hook_resid_pre`, `blocks.{l}.hook_resid_mid`, `blocks.{l}.hook_resid_post`). At each
an encoder (dense -> sparse: linear + AbsTopK) and a decoder (sparse -> dense: linear).

    from sparse_lens.bridges import (BridgeTrainConfig, train_bridged, load_bridged,
                                     hybrid_kl_table, dense_to_sparse, carry_edit)
    result = train_bridged(dense, SparseHookedTransformerConfig.preset("small"), BridgeTrainConfig(),
                           "runs/small-bridged")                       # sparse model + bridges
    sparse, bridges = load_bridged("runs/small-bridged")
    dense_to_sparse(dense, sparse, bridges, tokens, "blocks.1.hook_resid_mid").kl_to_dense
    hybrid_kl_table(dense, sparse, bridges, batches)                   # one row per site
    carry_edit(dense, sparse, bridges, tokens, [(hook_name, edit_fn)]) # sparse edit -> dense

Modules: `modules` (sites, encoder, decoder, `Bridges`, shape checks, save/load), `hybrid`
(hybrid forward passes, the per-site KL table), `losses` (the bridged objective), `training`
(the joint training loop, bridged model directories), `edit` (carrying an edit across), `cli`
(`sparse-lens bridges ...`). Names are imported lazily, like `sparse_lens` itself.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "BridgeSite": "modules", "Bridges": "modules", "BridgeEncoder": "modules",
    "BridgeDecoder": "modules", "BridgeMismatchError": "modules", "bridge_sites": "modules",
    "check_models": "modules",
    "HybridOutput": "hybrid", "dense_to_sparse": "hybrid", "sparse_to_dense": "hybrid",
    "hybrid_kl_table": "hybrid", "run_from_site": "hybrid", "run_capturing": "hybrid",
    "mean_kl": "hybrid",
    "LOSS_TERMS": "losses", "bridge_losses": "losses", "nmse": "losses", "total_loss": "losses",
    "BridgeTrainConfig": "training", "BridgeTrainResult": "training", "train_bridged": "training",
    "save_bridged": "training", "load_bridged": "training", "evaluate_bridged": "training",
    "training_state": "training",
    "CarriedEdit": "edit", "carry_edit": "edit", "NodeShift": "edit", "node_shift": "edit",
    "node_id": "edit", "class_separation": "edit", "class_flip_shift": "edit",
    "task_edit_effect": "edit", "summarise_edit": "edit", "site_after": "edit",
    "rank_by_sparse_effect": "edit",
}

__all__ = list(_EXPORTS)

if TYPE_CHECKING:
    from sparse_lens.bridges.edit import (
        CarriedEdit, NodeShift, carry_edit, class_flip_shift, class_separation, node_id, node_shift,
        rank_by_sparse_effect, site_after, summarise_edit, task_edit_effect,
    )
    from sparse_lens.bridges.hybrid import (
        HybridOutput, dense_to_sparse, hybrid_kl_table, mean_kl, run_capturing, run_from_site,
        sparse_to_dense,
    )
    from sparse_lens.bridges.losses import LOSS_TERMS, bridge_losses, nmse, total_loss
    from sparse_lens.bridges.modules import (
        BridgeDecoder, BridgeEncoder, BridgeMismatchError, Bridges, BridgeSite, bridge_sites,
        check_models,
    )
    from sparse_lens.bridges.training import (
        BridgeTrainConfig, BridgeTrainResult, evaluate_bridged, load_bridged, save_bridged,
        train_bridged, training_state,
    )


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"sparse_lens.bridges.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'sparse_lens.bridges' has no attribute {name!r}")
