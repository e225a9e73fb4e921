"""Exact attributions in TransformerLens's grammar: the cache `run_with_cache` returns.

`SparseHookedTransformer.run_with_cache` returns a `SparseActivationCache`, an `ActivationCache`
that differs from TransformerLens's own in two places, both so that attributions add up to what
the model really computes:

1. **The final norm's weight.** TransformerLens's `apply_ln_to_stack` divides by the cached scale
   of `ln_final` and nothing else: it assumes `ln_final.w` has been folded into `W_U`
   (`fold_ln`), which `from_pretrained` does for official models. Our models are never folded
   (folding would change the trained parameters and the saved circuits' fingerprints), so here
   a stack taken to the unembed (`layer` None, -1 or n_layers) is also multiplied by `ln_final.w`.
   Then `cache.logit_attrs(cache.decompose_resid(apply_ln=True), ...)` sums to the logit
   difference less `b_U` (and less the bigram table's logits, when the model has one; for
   `normalization_type="LN"` also less `ln_final.b @ W_U`, which TransformerLens counts with
   `b_U`). We chose this over folding `ln_final.w` into `W_U`: folding is exact too, but it
   changes the trained parameters (a loaded model would no longer equal its checkpoint, resume
   its optimizer state, or match its circuits' fingerprints). Stacks taken to a block's own
   norm (`layer` < n_layers) are left as TransformerLens makes them (the norm weight belongs to
   what reads them, as with folded weights).

2. **Per-head and per-neuron results.** AbsTopK at `attn_out` / `mlp_out` keeps a set of
   channels of the *summed* output, so TransformerLens's `stack_head_results`,
   `get_neuron_results`, `stack_neuron_results` and `get_full_resid_decomposition` (products of
   `hook_z` with `W_O`, and of `hook_post` with `W_out`, before that selection) do not sum to
   `hook_attn_out` / `hook_mlp_out` (relative error 0.15-0.27 on the `small` model).
   `head_contributions` and `neuron_contributions` apply the channel selection the model made
   to each term, so the terms plus the bias term sum exactly (to float rounding) to the block's
   output. Without AbsTopK at those locations they equal TransformerLens's results.

With `d_pos_emb` set the positions are concatenated to what blocks read and never enter the
residual stream, so `decompose_resid`/`accumulated_resid` leave `pos_embed` out.
"""

from __future__ import annotations

import torch
from jaxtyping import Float
from transformer_lens import ActivationCache


class SparseActivationCache(ActivationCache):
    """An `ActivationCache` of a `SparseHookedTransformer` (see the module docstring)."""

    def __init__(self, cache_dict, model, has_batch_dim: bool = True):
        super().__init__(cache_dict, model, has_batch_dim=has_batch_dim)
        if getattr(model.cfg, "d_pos_emb", None) is not None:
            self.has_pos_embed = False  # positions are concatenated to reads, not in the residual

    def apply_ln_to_stack(self, residual_stack, layer=None, mlp_input=False, pos_slice=None,
                          batch_slice=None, has_batch_dim=True, recompute_ln=False):
        """TransformerLens's `apply_ln_to_stack`; at the unembed the stack is also multiplied by
        `ln_final.w` [d_model], so it is what the unembedding really reads (see module)."""
        out = super().apply_ln_to_stack(residual_stack, layer, mlp_input, pos_slice, batch_slice,
                                        has_batch_dim, recompute_ln)
        final = layer is None or layer == -1 or layer == self.model.cfg.n_layers
        w = getattr(getattr(self.model, "ln_final", None), "w", None)
        if not final or recompute_ln or w is None:  # recompute_ln runs ln_final itself
            return out
        return out * w.to(out.device, out.dtype)

    def head_contributions(self, layer: int) -> tuple[
            Float[torch.Tensor, "batch pos head_index d_model"], Float[torch.Tensor, "batch pos d_model"]]:
        """What each head of block `layer` adds to `blocks.{layer}.hook_attn_out`, and the bias
        term, as the model uses them: `z_h @ W_O[h]` (and `b_O`) restricted to the channels the
        `attn_out` AbsTopK kept. `heads.sum(-2) + bias` equals `hook_attn_out`."""
        attn = self.model.blocks[layer].attn
        z = self[f"blocks.{layer}.attn.hook_z"]  # [batch, pos, head, d_head]
        heads = torch.einsum("bphd,hdm->bphm", z, attn.W_O)
        return self._kept(layer, "attn_out", heads, attn.b_O)

    def neuron_contributions(self, layer: int, neurons: slice | list[int] | None = None) -> tuple[
            Float[torch.Tensor, "batch pos neuron d_model"], Float[torch.Tensor, "batch pos d_model"]]:
        """What each MLP neuron of block `layer` adds to `blocks.{layer}.hook_mlp_out`, and the
        bias term, as the model uses them: `post_n * W_out[n]` (and `b_out`) restricted to the
        channels the `mlp_out` AbsTopK kept. Over all neurons, `.sum(-2) + bias` equals
        `hook_mlp_out`. `neurons` selects some (memory: batch x pos x neurons x d_model)."""
        mlp = self.model.blocks[layer].mlp
        index = slice(None) if neurons is None else neurons
        post = self[f"blocks.{layer}.mlp.hook_post"][..., index]  # [batch, pos, neuron]
        per_neuron = post[..., None] * mlp.W_out[index]  # [batch, pos, neuron, d_model]
        return self._kept(layer, "mlp_out", per_neuron, mlp.b_out)

    def _kept(self, layer: int, location: str, terms: Float[torch.Tensor, "batch pos n d_model"],
              bias: Float[torch.Tensor, " d_model"]):
        """`terms` and `bias` on the channels the model kept at `location` of block `layer`.
        The kept channels are those where the hook's cached output is nonzero (a kept channel
        that is exactly 0 has terms summing to 0 either way)."""
        if not self.has_batch_dim:
            raise ValueError("head/neuron contributions need a cache with its batch dimension "
                             "(run_with_cache without remove_batch_dim=True)")
        bias = bias.expand(*terms.shape[:2], -1)
        if not self.model.cfg.topk_at(location):
            return terms, bias
        out = self[f"blocks.{layer}.hook_{location}"]  # [batch, pos, d_model]
        keep = (out != 0).to(terms.dtype)
        return terms * keep[:, :, None, :], bias * keep
