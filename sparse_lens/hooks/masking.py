"""Hooks that replace pruned nodes by their mean, as a context manager that always cleans up.

At every node site the hook computes `mean + (x - mean) * mask`: a node with mask 1 passes, a node
with mask 0 takes its mean over the pretraining distribution (`means.py`), at every position.
Masks may be fractional and may carry gradients (pruning learns them through this hook).
The hooks are registered through TransformerLens's own `model.hooks(fwd_hooks=...)` context (so
they show in `hook_point.fwd_hooks`), after AbsTopK, and are removed when the context exits,
exception or not; hooks the user added stay.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from jaxtyping import Float

from sparse_lens.hooks.nodes import NodeRegistry


class NodeMasker:
    """The live state of `masked_nodes`: set `.mask` (shape [n_nodes]) between forward passes."""

    def __init__(self, registry: NodeRegistry, mask: torch.Tensor, means: torch.Tensor):
        self.registry = registry
        self.means = means
        self._mean_parts = registry.split(means)
        self.mask = mask

    @property
    def mask(self) -> Float[torch.Tensor, " n_nodes"]:
        return self._mask

    @mask.setter
    def mask(self, value: Float[torch.Tensor, " n_nodes"]) -> None:
        if value.shape != (self.registry.n_nodes,):
            raise ValueError(f"mask must have shape ({self.registry.n_nodes},) (one entry per "
                             f"node of {self.registry}); got {tuple(value.shape)}")
        self._mask = value
        self._mask_parts = self.registry.split(value.to(self.means.dtype))

    def set_row_masks(self, masks: Float[torch.Tensor, "batch n_nodes"]) -> None:
        """Give each row of the next batches its own mask (row b uses `masks[b]`; the batch must
        have exactly `masks.shape[0]` rows), e.g. to evaluate many candidate circuits in one
        pass. Setting `.mask` goes back to one mask for every row."""
        if masks.ndim != 2 or masks.shape[1] != self.registry.n_nodes:
            raise ValueError(f"row masks must have shape (batch, {self.registry.n_nodes}); "
                             f"got {tuple(masks.shape)}")
        masks = masks.to(self.means.dtype)
        self._mask = masks
        self._mask_parts = {s.hook_name: masks[:, s.offset:s.offset + s.size].reshape(len(masks), 1, *s.shape)
                            for s in self.registry.sites}

    @contextmanager
    def using(self, mask: Float[torch.Tensor, " n_nodes"] | None) -> Iterator[NodeMasker]:
        """Apply `mask` (None: the current one) for the passes inside the block, then put the
        previous mask (or row masks) back, exception or not."""
        if mask is None:
            yield self
            return
        saved = self._mask, self._mask_parts
        self.mask = mask
        try:
            yield self
        finally:
            self._mask, self._mask_parts = saved

    def hook_for(self, hook_name: str):
        mean = self._mean_parts[hook_name]

        def apply_mask(activation: torch.Tensor, hook) -> torch.Tensor:
            mask = self._mask_parts[hook_name]
            return mean + (activation - mean) * mask

        apply_mask.__name__ = f"sparse_lens_mask[{hook_name}]"
        return apply_mask

    def logits(self, model, data) -> Float[torch.Tensor, "batch pos d_vocab"]:
        """The model's logits on a `TaskData` batch under the current mask. Subclasses that need
        the batch itself (resampling takes other prompts' activations) override this."""
        return model(data.tokens)


@contextmanager
def masked_nodes(
    model,
    registry: NodeRegistry,
    mask: Float[torch.Tensor, " n_nodes"],
    means: Float[torch.Tensor, " n_nodes"],
) -> Iterator[NodeMasker]:
    """Run `model` with node `mask` applied (1 keeps a node, 0 replaces it by its mean).

        with masked_nodes(model, registry, mask, means) as masker:
            logits = model(tokens)
            masker.mask = other_mask      # change it between passes

    Only the hooks added here are removed on exit; the user's own hooks stay."""
    means = means.to(model.cfg.device)
    with attached(model, NodeMasker(registry, mask.to(model.cfg.device), means)) as masker:
        yield masker


@contextmanager
def attached(model, masker: NodeMasker) -> Iterator[NodeMasker]:
    """Register `masker`'s hook at every node site of `model` through `model.hooks(...)`, which
    removes exactly those hooks on exit, exception or not (the user's own hooks stay, and so do
    their hook contexts: `clear_contexts=False`)."""
    hooks = [(site.hook_name, masker.hook_for(site.hook_name)) for site in masker.registry.sites]
    with model.hooks(fwd_hooks=hooks, clear_contexts=False):
        yield masker


def keep_mask_from_ids(registry: NodeRegistry, ids, device=None) -> Float[torch.Tensor, " n_nodes"]:
    """A 0/1 mask over nodes keeping exactly `ids`."""
    mask = torch.zeros(registry.n_nodes, device=device)
    ids = torch.as_tensor(list(ids) if not isinstance(ids, torch.Tensor) else ids, dtype=torch.long)
    if ids.numel() and (ids.min() < 0 or ids.max() >= registry.n_nodes):
        raise ValueError(f"node ids must be in [0, {registry.n_nodes}); got {ids.min()}..{ids.max()}")
    mask[ids.to(mask.device)] = 1.0
    return mask
