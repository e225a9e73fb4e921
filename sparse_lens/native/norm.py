"""TransformerLens's RMSNorm forward and backward in one pass each, by the native kernel.

`(x / s) * w` with `s = sqrt(mean(x^2) + eps)` per row; the backward is the closed form
`dx = (g - xh * mean(g * xh)) / s`, `g = dy * w`, `xh = x / s`, `dw = sum over rows of dy * xh`,
where autograd through TransformerLens's `pow`, `mean`, `sqrt`, `/` and `*` runs about ten
passes. Results equal TransformerLens's to float tolerance (the mean sums in another order) and
do not depend on the thread count (`tests/test_native.py`).
"""

from __future__ import annotations

import torch
from jaxtyping import Float

from sparse_lens import native


def rms_norm(x: Float[torch.Tensor, "... length"], w: Float[torch.Tensor, " length"],
             eps: float) -> Float[torch.Tensor, "... length"] | None:
    """RMSNorm of `x` over its last axis times `w`; None where the kernel does not apply (not
    CPU float32, or no native library)."""
    if native.library_for(x, w) is None:
        return None
    return _RMSNorm.apply(x, w, eps)


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, eps):
        x, w = x.detach().contiguous(), w.detach().contiguous()
        rows = x.numel() // x.shape[-1]
        y = torch.empty_like(x)
        scale = torch.empty(rows)
        native.library().rms_norm_forward(x.data_ptr(), w.data_ptr(), y.data_ptr(), scale.data_ptr(),
                                          rows, x.shape[-1], eps, torch.get_num_threads())
        ctx.save_for_backward(x, w, scale)
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):
        x, w, scale = ctx.saved_tensors
        dy = dy.contiguous()
        rows, dim = scale.numel(), x.shape[-1]
        dx, dw = torch.empty_like(x), torch.empty_like(w)
        partial = torch.empty(-(-rows // 64), dim)  # NORM_BLOCK_ROWS rows a block
        native.library().rms_norm_backward(x.data_ptr(), w.data_ptr(), scale.data_ptr(), dy.data_ptr(),
                                           dx.data_ptr(), dw.data_ptr(), partial.data_ptr(), rows, dim,
                                           torch.get_num_threads())
        return dx, dw, None
