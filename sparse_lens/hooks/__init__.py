"""The hook engine: the node registry, node means, and mean-ablation masks.

    registry = NodeRegistry.for_model(model)
    means = node_means_for(model, model_dir)            # [n_nodes], cached next to the model
    with masked_nodes(model, registry, mask, means):    # mask: [n_nodes], 1 keep / 0 ablate
        logits = model(tokens)
"""

from sparse_lens.hooks.masking import NodeMasker, keep_mask_from_ids, masked_nodes
from sparse_lens.hooks.means import (
    MEANS_FILE,
    compute_node_means,
    load_node_means,
    node_means_for,
    save_node_means,
)
from sparse_lens.hooks.nodes import NODE_HOOKS, NODE_KINDS, NodeKind, NodeRegistry, NodeSite, node_label

__all__ = [
    "NODE_HOOKS", "NODE_KINDS", "NodeKind", "node_label", "NodeRegistry", "NodeSite", "NodeMasker", "masked_nodes",
    "keep_mask_from_ids", "MEANS_FILE", "compute_node_means", "load_node_means",
    "save_node_means", "node_means_for",
]
