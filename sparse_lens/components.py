"""The TransformerLens components a weight-sparse transformer swaps in: AbsTopK at named locations.

Each AbsTopK runs *before* the standard hook of its location fires (see `config.TOPK_LOCATIONS`),
so `run_with_cache`, `ActivationCache.get_neuron_results`, head results from `hook_z` and every
other TransformerLens helper see the sparse values the model really uses. With no location
configured these components compute what TransformerLens's own `Attention`, `MLP` and
`TransformerBlock` compute (attention to float tolerance when its fused path runs, see
`SparseAttention`). AbsTopK is `abstopk.abs_topk`; `kernels.reference_kernels()` switches both
AbsTopK and attention to their reference implementations.
"""

from __future__ import annotations

import einops
import torch
import torch.nn as nn
import torch.nn.functional as F
from jaxtyping import Float, Int
from transformer_lens.components import Attention, LayerNorm, RMSNorm, TransformerBlock
from transformer_lens.components.mlps.mlp import MLP
from transformer_lens.hook_points import HookPoint
from transformer_lens.utilities.addmm import batch_addmm
from transformer_lens.utilities.attention import simple_attn_linear

from sparse_lens import attention
from sparse_lens.abstopk import abs_topk
from sparse_lens.config import SparseHookedTransformerConfig
from sparse_lens.kernels import fast_kernels_enabled
from sparse_lens.native import norm as native_norm

__all__ = ["abs_topk", "maybe_topk", "make_norm", "SparseRMSNorm", "SparseAttention", "SparseMLP",
           "SparseTransformerBlock"]


def maybe_topk(
    cfg: SparseHookedTransformerConfig, location: str, x: Float[torch.Tensor, "... dim"]
) -> Float[torch.Tensor, "... dim"]:
    """AbsTopK over the last axis if `location` is configured, else `x`."""
    return abs_topk(x, cfg.topk_k(x.shape[-1])) if cfg.topk_at(location) else x


def make_norm(cfg: SparseHookedTransformerConfig, length: int) -> nn.Module:
    """The config's pre-norm (`SparseRMSNorm` or TransformerLens's LayerNorm) over `length`
    channels."""
    return SparseRMSNorm(cfg, length) if cfg.normalization_type == "RMS" else LayerNorm(cfg, length)


class SparseRMSNorm(RMSNorm):
    """TransformerLens's `RMSNorm`; when nothing hooks `hook_scale` or `hook_normalized` (and the
    fast kernels are on), its forward and backward run fused (`native.norm`, CPU float32) with
    the same values to float tolerance."""

    def forward(self, x):
        if (fast_kernels_enabled() and not _observed(self.hook_scale)
                and not _observed(self.hook_normalized)):
            y = native_norm.rms_norm(x, self.w, self.eps)
            if y is not None:
                return y
        return super().forward(x)


class SparseAttention(Attention):
    """TransformerLens `Attention` with optional AbsTopK on q, k and v (over all heads' channels
    of a token together) before `hook_q`/`hook_k`/`hook_v`. W_Q, W_K and W_V read `cfg.d_read`
    channels (d_model, plus the concatenated positions when `d_pos_emb` is set).

    When nothing can observe the scores or the pattern (no hook on `hook_attn_scores` or
    `hook_pattern`, no KV cache, padding mask or extra bias: see `pattern_is_unobserved`), z comes
    from `attention.causal_attention`, which never materialises them; otherwise, and under
    `kernels.reference_kernels()`, from TransformerLens's own forward. Every other hook fires
    on both paths."""

    cfg: SparseHookedTransformerConfig

    def __init__(self, cfg: SparseHookedTransformerConfig, attn_type: str = "global",
                 layer_id: int | None = None):
        super().__init__(cfg, attn_type, layer_id)
        if cfg.d_read != cfg.d_model:
            shape = (cfg.n_heads, cfg.d_read, cfg.d_head)
            self.W_Q = nn.Parameter(torch.empty(shape, dtype=cfg.dtype))
            self.W_K = nn.Parameter(torch.empty(shape, dtype=cfg.dtype))
            self.W_V = nn.Parameter(torch.empty(shape, dtype=cfg.dtype))

    def forward(self, query_input, key_input, value_input, past_kv_cache_entry=None,  # type: ignore[override]
                additive_attention_mask=None, attention_mask=None, position_bias=None):
        """TransformerLens's attention forward, or its fused equivalent (see the class docstring)."""
        extras = (past_kv_cache_entry, additive_attention_mask, attention_mask, position_bias)
        if any(e is not None for e in extras) or not self.pattern_is_unobserved(query_input):
            return super().forward(query_input, key_input, value_input, past_kv_cache_entry,
                                   additive_attention_mask, attention_mask, position_bias)
        q, k, v = self.calculate_qkv_matrices(query_input, key_input, value_input)
        sinks = self.sinks if self.cfg.use_attention_sinks else None
        z = self.hook_z(attention.causal_attention(q, k, v, 1.0 / self.attn_scale, sinks))
        # the output projection exactly as TransformerLens writes it
        w = einops.rearrange(self.W_O, "head_index d_head d_model -> d_model (head_index d_head)")
        return F.linear(z.reshape(z.shape[0], z.shape[1], -1), w.contiguous(), self.b_O)

    def pattern_is_unobserved(self, x: torch.Tensor) -> bool:
        """Whether the fused path may run: fast kernels on, no hook (of any kind, nor a global
        module hook) on `hook_attn_scores` or `hook_pattern`, a plain causal softmax attention
        (no soft cap, ALiBi, rotary, local window, per-head results or cache-only options), and
        a kernel for `x`'s device and dtype."""
        cfg = self.cfg
        plain = (cfg.positional_embedding_type == "standard" and self.attn_type == "global"
                 and (self._attention_dir_override or cfg.attention_dir) == "causal"
                 and not cfg.use_attn_result and not cfg.load_in_4bit and cfg.clip_qkv is None
                 and not (cfg.attn_scores_soft_cap is not None and cfg.attn_scores_soft_cap > 0)
                 and not (cfg.use_logn_attn and not self.training))
        return (plain and fast_kernels_enabled()
                and not _observed(self.hook_attn_scores) and not _observed(self.hook_pattern)
                and attention.supports(x.device, x.dtype, cfg.use_attention_sinks))

    def calculate_qkv_matrices(self, query_input, key_input, value_input):  # type: ignore[override]
        q = self._project("attn_q", query_input, self.W_Q, self.b_Q, self.hook_q)
        k = self._project("attn_k", key_input, self.W_K, self.b_K, self.hook_k)
        v = self._project("attn_v", value_input, self.W_V, self.b_V, self.hook_v)
        return q, k, v

    def _project(
        self,
        location: str,
        x: Float[torch.Tensor, "batch pos d_model"],
        W: Float[torch.Tensor, "head_index d_model d_head"],
        b: Float[torch.Tensor, "head_index d_head"],
        hook: HookPoint,
    ) -> Float[torch.Tensor, "batch pos head_index d_head"]:
        out = simple_attn_linear(x, W, b)
        if self.cfg.topk_at(location):
            flat = einops.rearrange(out, "batch pos head d_head -> batch pos (head d_head)")
            flat = abs_topk(flat, self.cfg.topk_k(flat.shape[-1]))
            out = einops.rearrange(flat, "batch pos (head d_head) -> batch pos head d_head",
                                   head=out.shape[2])
        return hook(out)


def _observed(module: nn.Module) -> bool:
    """Whether any forward or backward hook (the module's own or a global one) would see
    `module` run."""
    from torch.nn.modules import module as torch_module

    own = (module._forward_hooks, module._forward_pre_hooks, module._backward_hooks,
           module._backward_pre_hooks)
    global_ = (torch_module._global_forward_hooks, torch_module._global_forward_pre_hooks,
               torch_module._global_backward_hooks, torch_module._global_backward_pre_hooks)
    return any(len(hooks) > 0 for hooks in own + global_)


class SparseMLP(MLP):
    """TransformerLens `MLP` with optional AbsTopK on the neurons before `hook_post`; W_in reads
    `cfg.d_read` channels."""

    cfg: SparseHookedTransformerConfig

    def __init__(self, cfg: SparseHookedTransformerConfig):
        super().__init__(cfg)
        if cfg.d_read != cfg.d_model:
            self.W_in = nn.Parameter(torch.empty(cfg.d_read, self.d_mlp, dtype=cfg.dtype))

    def forward(self, x: Float[torch.Tensor, "batch pos d_model"]) -> Float[torch.Tensor, "batch pos d_model"]:
        pre_act = self.hook_pre(batch_addmm(self.b_in, self.W_in, x))  # [batch, pos, d_mlp]
        post_act = self.hook_post(maybe_topk(self.cfg, "mlp_neuron", self.act_fn(pre_act)))
        return batch_addmm(self.b_out, self.W_out, post_act)


class SparseTransformerBlock(TransformerBlock):
    """A pre-norm block whose attention and MLP read through their own hooks:

    resid_pre -> ln1 -> [AbsTopK attn_in] -> hook_attn_read -> attn -> [attn_out] -> hook_attn_out
    resid_mid = [resid_post_attn](act(resid_pre + attn_out)) -> hook_resid_mid
    resid_mid -> ln2 -> [mlp_in] -> hook_mlp_read -> mlp -> [mlp_out] -> hook_mlp_out
    resid_post = [resid_post_mlp](act(resid_mid + mlp_out)) -> hook_resid_post

    `act` is the identity, or a ReLU when `cfg.residual_activation == "relu"`. With `d_pos_emb`
    set, the reads are `cat(ln1(resid_pre), ln_p1(pos))` (and `ln2`/`ln_p2`), where `pos` is the
    position embedding TransformerLens passes to blocks as `shortformer_pos_embed`.

    `hook_attn_read` and `hook_mlp_read` ([batch, pos, d_read]) are the channels where the block
    reads; `hook_attn_out` and `hook_mlp_out` ([batch, pos, d_model]) where it writes. The norm
    runs once per block (TransformerLens's block runs ln1 three times, once for each of q, k, v).
    """

    cfg: SparseHookedTransformerConfig

    def __init__(self, cfg: SparseHookedTransformerConfig, block_index: int):
        super().__init__(cfg, block_index)
        self.attn = SparseAttention(cfg, "global", block_index)
        self.mlp = SparseMLP(cfg)
        if cfg.normalization_type == "RMS":
            self.ln1, self.ln2 = make_norm(cfg, cfg.d_model), make_norm(cfg, cfg.d_model)
        self.hook_attn_read = HookPoint()  # [batch, pos, d_model]
        self.hook_mlp_read = HookPoint()  # [batch, pos, d_model]
        if cfg.d_pos_emb is not None:
            self.ln_p1 = make_norm(cfg, cfg.d_pos_emb)
            self.ln_p2 = make_norm(cfg, cfg.d_pos_emb)

    def forward(
        self,
        resid_pre: Float[torch.Tensor, "batch pos d_model"],
        shortformer_pos_embed: Float[torch.Tensor, "batch pos d_pos_emb"] | None = None,
        past_kv_cache_entry=None,
        attention_mask: Int[torch.Tensor, "batch offset_pos"] | None = None,
    ) -> Float[torch.Tensor, "batch pos d_model"]:
        if self.cfg.use_split_qkv_input or self.cfg.use_attn_in or self.cfg.use_hook_mlp_in:
            raise NotImplementedError(
                "SparseHookedTransformer does not support use_split_qkv_input, use_attn_in or "
                "use_hook_mlp_in; hook blocks.{L}.hook_attn_read / hook_mlp_read instead"
            )
        cfg = self.cfg
        if cfg.d_pos_emb is not None and shortformer_pos_embed is None:
            raise ValueError("this model concatenates position embeddings (d_pos_emb is set): "
                             "its blocks need them, pass shortformer_pos_embed= with start_at_layer")
        resid_pre = self.hook_resid_pre(resid_pre)
        attn_read = self.hook_attn_read(maybe_topk(
            cfg, "attn_in", self._read(self.ln1, resid_pre, "ln_p1", shortformer_pos_embed)))
        attn_out = self.attn(
            query_input=attn_read,
            key_input=attn_read,
            value_input=attn_read,
            past_kv_cache_entry=past_kv_cache_entry,
            attention_mask=attention_mask,
        )
        attn_out = self.hook_attn_out(maybe_topk(cfg, "attn_out", attn_out))
        resid_mid = self.hook_resid_mid(
            maybe_topk(cfg, "resid_post_attn", self._residual_act(resid_pre + attn_out)))
        mlp_read = self.hook_mlp_read(maybe_topk(
            cfg, "mlp_in", self._read(self.ln2, resid_mid, "ln_p2", shortformer_pos_embed)))
        mlp_out = self.hook_mlp_out(maybe_topk(cfg, "mlp_out", self.mlp(mlp_read)))
        return self.hook_resid_post(
            maybe_topk(cfg, "resid_post_mlp", self._residual_act(resid_mid + mlp_out)))

    def _read(
        self,
        norm: nn.Module,
        resid: Float[torch.Tensor, "batch pos d_model"],
        pos_norm_name: str,
        pos_embed: Float[torch.Tensor, "batch pos d_pos_emb"] | None,
    ) -> Float[torch.Tensor, "batch pos d_read"]:
        """What a sublayer reads: norm(resid), with the normed positions concatenated if any."""
        read = norm(resid)
        if self.cfg.d_pos_emb is None:
            return read
        # generate() with a KV cache feeds the last token's residual with every position's
        # embedding: the residual's positions are the last ones
        pos = getattr(self, pos_norm_name)(pos_embed[:, -read.shape[1]:].to(read.device))
        return torch.cat([read, pos.expand(read.shape[0], -1, -1)], dim=-1)

    def _residual_act(self, resid: Float[torch.Tensor, "batch pos d_model"]) -> Float[torch.Tensor, "batch pos d_model"]:
        return torch.relu(resid) if self.cfg.residual_activation == "relu" else resid
