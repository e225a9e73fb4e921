"""Causal attention without the [batch, head, query_pos, key_pos] scores: the fast path of
`components.SparseAttention`.

TransformerLens's attention materialises the scores and the pattern (for `hook_attn_scores` and
`hook_pattern`) and then runs a dozen element-wise passes over them (causal mask, sink column,
max, softmax, NaN check) forward and backward. When nothing reads those two hooks, the same z
comes from a fused kernel that never stores them:

- on CPU in float32 with 16-wide heads (every preset's), with or without sinks: the native
  kernel (`native.attention`, C compiled on first use), in TransformerLens's layout;
- no sinks: `torch.nn.functional.scaled_dot_product_attention(..., is_causal=True)`;
- sinks (one learned logit `b` per head, an always-visible key with zero value, so it only adds
  `exp(b)` to each row's softmax denominator): PyTorch's CPU flash-attention kernel, which also
  returns each row's log-sum-exp `lse` of the real keys. With the sink the denominator's log is
  `lse' = logaddexp(lse, b)`, so `z = z_flash * exp(lse - lse')`. The backward is the kernel's
  own, given `z` and `lse'`: it rebuilds the pattern as `exp(score - lse')`, which is exactly the
  sink-normalised pattern, and its row term `sum(dz * z)` is the one the sink softmax needs; the
  sink logit's gradient is `-sum over rows of exp(b - lse') * sum(dz * z)`.

The CPU kernel is `torch.ops.aten._scaled_dot_product_flash_attention_for_cpu` (the op behind
`scaled_dot_product_attention` on CPU; not public API, so `supports` checks it exists and
callers fall back to TransformerLens's attention otherwise, as they do on other devices when
the model has sinks). Under `torch.use_deterministic_algorithms(True)` it raises no warning, and
its outputs and gradients were bitwise equal across repeated runs and across 1 and 2 threads
(torch 2.13, `tests/test_attention.py` checks repeats).

Results equal TransformerLens's attention to float tolerance (the kernel sums in another order):
`tests/test_attention.py`. The CPU kernel silently computes garbage from inputs whose last
(d_head) axis is not contiguous (torch 2.13: a q laid out [d_head, ...]-major gave logits off by
~1), so such inputs are copied first: CSR products (`sparse_kernels`) return that layout, and a
hook on `hook_q`/`hook_k`/`hook_v` may.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from jaxtyping import Float

from sparse_lens.native import attention as native_attention

_FLASH_CPU = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
_FLASH_CPU_BACKWARD = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)
_FLASH_CPU_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def supports(device: torch.device, dtype: torch.dtype, sinks: bool) -> bool:
    """Whether `causal_attention` runs for tensors of this device and dtype, with or without
    sinks."""
    if not sinks:
        return True
    return (device.type == "cpu" and dtype in _FLASH_CPU_DTYPES
            and _FLASH_CPU is not None and _FLASH_CPU_BACKWARD is not None)


def causal_attention(
    q: Float[torch.Tensor, "batch pos head_index d_head"],
    k: Float[torch.Tensor, "batch pos head_index d_head"],
    v: Float[torch.Tensor, "batch pos head_index d_head"],
    scale: float,
    sinks: Float[torch.Tensor, " head_index"] | None = None,
) -> Float[torch.Tensor, "batch pos head_index d_head"]:
    """z of causal attention: `softmax(scale * q.k)` over the keys at or before each query (plus
    each head's sink logit in the denominator, if given) applied to v. Inputs in
    TransformerLens's layout; check `supports` first."""
    z = native_attention.causal_attention(q, k, v, scale, sinks)  # CPU float32 d_head 16, if loaded
    if z is not None:
        return z
    # [batch, head, pos, d_head], each d_head vector contiguous (what the CPU kernel assumes)
    q_, k_, v_ = (t.transpose(1, 2) if t.stride(-1) == 1 else t.transpose(1, 2).contiguous()
                  for t in (q, k, v))
    if sinks is None:
        z = F.scaled_dot_product_attention(q_, k_, v_, is_causal=True, scale=scale)
    else:
        z = _SinkFlashAttention.apply(q_, k_, v_, sinks, scale)
    return z.transpose(1, 2)


class _SinkFlashAttention(torch.autograd.Function):
    """Causal flash attention with one sink logit per head (see the module docstring).
    q, k, v: [batch, head, pos, d_head]; sinks: [head]."""

    @staticmethod
    def forward(ctx, q, k, v, sinks, scale):
        z_flash, lse = _FLASH_CPU(q, k, v, 0.0, True, scale=scale)  # lse: [batch, head, pos]
        lse_sink = torch.logaddexp(lse, sinks.detach().to(lse.dtype)[None, :, None])
        z = z_flash * torch.exp(lse - lse_sink).unsqueeze(-1).to(z_flash.dtype)
        ctx.scale = scale
        ctx.save_for_backward(q, k, v, sinks, z, lse_sink)
        return z

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dz):
        q, k, v, sinks, z, lse_sink = ctx.saved_tensors
        dq, dk, dv = _FLASH_CPU_BACKWARD(dz.contiguous(), q, k, v, z, lse_sink, 0.0, True,
                                         scale=ctx.scale)
        row_term = (dz.to(lse_sink.dtype) * z.to(lse_sink.dtype)).sum(-1)  # [batch, head, pos]
        p_sink = torch.exp(sinks.detach().to(lse_sink.dtype)[None, :, None] - lse_sink)
        d_sinks = -(p_sink * row_term).sum(dim=(0, 2)).to(sinks.dtype)
        return dq, dk, dv, d_sinks, None
