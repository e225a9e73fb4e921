"""Causal attention with optional sinks by the native kernel (`kernels.c`), on CPU in float32.

Every preset's heads are 16 wide, where PyTorch's CPU flash-attention kernel spends most of its
time on overheads. The C kernel is written for exactly that width (`attention_head_dim()`; other
widths fall back): one (batch, head) pair per task, copied into contiguous scratch; each query
row's scores in 16-wide chunks kept in registers, the softmax with the sink, the weighted sum
of values; each row's log-sum-exp kept for the backward, which recomputes the row's
probabilities and accumulates dq, dk, dv and the sink's gradient. Its exp is Cephes' polynomial
(relative error < 2e-7): results equal the other paths to float tolerance and do not depend on
the thread count (`tests/test_native.py`).
"""

from __future__ import annotations

import torch
from jaxtyping import Float

from sparse_lens import native


def causal_attention(
    q: Float[torch.Tensor, "batch pos head_index d_head"],
    k: Float[torch.Tensor, "batch pos head_index d_head"],
    v: Float[torch.Tensor, "batch pos head_index d_head"],
    scale: float,
    sinks: Float[torch.Tensor, " head_index"] | None = None,
) -> Float[torch.Tensor, "batch pos head_index d_head"] | None:
    """z of causal attention (`softmax(scale * q.k)` over the keys at or before each query, each
    head's sink logit in the denominator if given, applied to v); None where the kernel does not
    apply (not CPU float32 throughout, another head width, or no native library)."""
    lib = native.library_for(q, k, v, *(() if sinks is None else (sinks,)))
    if lib is None or q.shape[-1] != lib.attention_head_dim():
        return None
    return _NativeAttention.apply(q, k, v, sinks, scale)


class _NativeAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, sinks, scale):
        q, k, v = (t.detach().contiguous() for t in (q, k, v))
        batch, pos, heads, _ = q.shape
        z = torch.empty_like(q)
        lse = torch.empty(batch, heads, pos)
        sinks_c = torch.empty(0) if sinks is None else sinks.detach().contiguous()
        _check(native.library().attention_forward(
            q.data_ptr(), k.data_ptr(), v.data_ptr(), sinks_c.data_ptr() if sinks is not None else None,
            z.data_ptr(), lse.data_ptr(), batch, pos, heads, scale, torch.get_num_threads()))
        ctx.scale, ctx.has_sinks = scale, sinks is not None
        ctx.save_for_backward(q, k, v, sinks_c, z, lse)
        return z

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dz):
        q, k, v, sinks, z, lse = ctx.saved_tensors
        dz = dz.contiguous()
        batch, pos, heads, _ = q.shape
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        d_sinks = torch.empty(batch, heads)
        _check(native.library().attention_backward(
            q.data_ptr(), k.data_ptr(), v.data_ptr(), sinks.data_ptr() if ctx.has_sinks else None,
            z.data_ptr(), lse.data_ptr(), dz.data_ptr(), dq.data_ptr(), dk.data_ptr(), dv.data_ptr(),
            d_sinks.data_ptr(), batch, pos, heads, ctx.scale, torch.get_num_threads()))
        return dq, dk, dv, (d_sinks.sum(dim=0) if ctx.has_sinks else None), None


def _check(status: int) -> None:
    if status != 0:
        raise MemoryError("native attention: could not allocate its scratch memory")
