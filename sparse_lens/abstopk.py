"""AbsTopK: keep the k entries of largest |x| along the last axis, zero the rest.

Two implementations with the same result (`kernels.reference_kernels()` selects the second):

- `abs_topk` (fast, the default): finds each row's k-th largest |x| as a threshold and keeps
  `|x| >= threshold`; the gradient is `grad * keep`. On CPU float32 the native kernels
  (`native.selection`, C compiled on first use) do it: each row's threshold by bisection on the
  integer bit patterns of |x| (for non-negative floats they sort like the floats) with AVX-512,
  then the output and the byte mask in one pass, rows split over torch's threads. Without
  AVX-512, or without the native library, the threshold comes from NumPy's `partition` on the
  same bit patterns (SIMD sorting networks on rows of up to 512 entries; wider rows are first
  narrowed to the top `k` of each 512-wide chunk, exact since every entry of the row's top k is
  in its chunk's top k), and the rest from the C pass or PyTorch. Elsewhere (GPUs) `torch.topk`
  gives each row's k-th largest and the tie rule runs on every row, so nothing is read back on
  the host (`abs_topk_mask_on_device`).
- `abs_topk_reference`: `torch.topk` on |x|, then a scatter of the kept values into zeros.

Measured (`benchmarks/bench_training.py`, small preset, 8 x 128 tokens, 2 threads, idle
machine): the 32 AbsTopK calls of one training step, forward and backward, isolated, 16.5 ms
against 95.7 ms for the reference (NumPy's selection, the path before the native kernels, took
46 ms in an earlier run of the same benchmark).

Ties. Exactly `k` entries are kept in every row. Where several entries tie with the k-th largest
|x|, the fast path keeps the tied entries at the lowest positions (first along the last axis);
the reference keeps whichever `torch.topk` returns. Without ties both keep the same entries.
Dropped entries are zeros (`-0.0` where x was negative: the output is x times a 0/1 mask); a
NaN counts as larger than every number, as in `torch.topk`.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from jaxtyping import Bool, Float

from sparse_lens.kernels import fast_kernels_enabled
from sparse_lens.native import selection

#: NumPy selects within rows of up to this many entries with sorting networks (x86-simd-sort;
#: measured: 512-wide rows 0.5 ms per 1024 rows, 513-wide 1.9 ms); wider rows are narrowed first.
_NUMPY_FAST_WIDTH = 512

# the signed integer type whose bit patterns order the non-negative floats of each width
_BITS_AS_INT = {torch.float64: torch.int64, torch.float32: torch.int32,
                torch.float16: torch.int16, torch.bfloat16: torch.int16}


def abs_topk(x: Float[torch.Tensor, "... dim"], k: int) -> Float[torch.Tensor, "... dim"]:
    """Keep the `k` entries of largest |x| along the last axis, zero the rest (ties: the lowest
    positions, see the module docstring). The gradient flows to the kept entries only.
    `k >= dim` returns `x` unchanged; `k` must be >= 1."""
    if k < 1:
        raise ValueError(f"AbsTopK needs k >= 1; got {k}")
    if k >= x.shape[-1]:
        return x
    if not fast_kernels_enabled():
        return abs_topk_reference(x, k)
    return _AbsTopK.apply(x, k)


def abs_topk_reference(x: Float[torch.Tensor, "... dim"], k: int) -> Float[torch.Tensor, "... dim"]:
    """The reference AbsTopK: `torch.topk` of |x|, kept values scattered into zeros."""
    if k >= x.shape[-1]:
        return x
    idx = x.abs().topk(k, dim=-1, sorted=False).indices
    return torch.zeros_like(x).scatter(-1, idx, x.gather(-1, idx))


class _AbsTopK(torch.autograd.Function):
    """x * keep, with keep = `abs_topk_mask(x, k)` saved (one byte per entry) for the backward.
    On CPU float32 the output, the mask and the backward's product come from the native kernels
    (`native.selection`) when they load, else from PyTorch (multiplying by the mask as uint8 is
    several times faster on CPU than as bool or `where`). Both give the same bits."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, k: int) -> torch.Tensor:
        out_keep = selection.abs_topk(x, k, _kth_largest)
        if out_keep is None:
            keep = abs_topk_mask(x, k).view(torch.uint8)
            out = x * keep
        else:
            out, keep = out_keep
        ctx.save_for_backward(keep)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        (keep,) = ctx.saved_tensors
        out = selection.mul_keep(grad, keep)
        return (grad * keep if out is None else out), None


def _kth_largest(keys: np.ndarray, k: int) -> np.ndarray:
    """The k-th largest of each row of the 2-D integer array `keys`."""
    return _kth_and_next_largest(keys, k, runner_up=False)[0]


@torch.no_grad()
def abs_topk_mask(x: Float[torch.Tensor, "... dim"], k: int) -> Bool[torch.Tensor, "... dim"]:
    """Which entries AbsTopK keeps: exactly `k` per row (`1 <= k < dim`), those of largest |x|;
    among entries tied with the k-th largest, the lowest positions."""
    dim = x.shape[-1]
    if not 1 <= k < dim:
        raise ValueError(f"abs_topk_mask needs 1 <= k < dim={dim}; got k={k}")
    mags = x.detach().abs().reshape(-1, dim)
    if mags.device.type != "cpu" or mags.dtype not in _BITS_AS_INT:
        return abs_topk_mask_on_device(mags, k).view(x.shape)
    keys = mags.view(_BITS_AS_INT[mags.dtype]).numpy()
    kth, runner_up = _kth_and_next_largest(keys, k)
    keep = torch.from_numpy(keys >= kth[:, None])
    tied = torch.from_numpy(kth == runner_up)
    kth_t = torch.from_numpy(kth).view(mags.dtype).unsqueeze(1)
    if bool(tied.any()):
        rows = tied.nonzero().squeeze(1)
        keep[rows] = _lowest_positions_first(mags[rows], kth_t[rows], k)
    return keep.view(x.shape)


def abs_topk_mask_on_device(mags: Float[torch.Tensor, "rows dim"], k: int) -> Bool[torch.Tensor, "rows dim"]:
    """`abs_topk_mask` of the magnitudes `mags` with torch ops alone and no value read back on
    the host (on a GPU, no synchronisation): each row's k-th largest from `topk`, then the tie
    rule applied to every row (a row without ties keeps its k-th largest and what is above)."""
    kth = mags.topk(k, dim=-1, sorted=False).values.amin(dim=-1, keepdim=True)
    return _lowest_positions_first(mags, kth, k)


def _kth_and_next_largest(keys: np.ndarray, k: int,
                          runner_up: bool = True) -> tuple[np.ndarray, np.ndarray | None]:
    """The k-th and (k+1)-th largest of each row of the 2-D integer array `keys` (`k < width`).

    Rows wider than `_NUMPY_FAST_WIDTH` are cut into chunks of that width (the last padded with
    -1, below every key); each chunk's top k are the candidates for the row's top k. A row's
    (k+1)-th largest is either among the candidates or the (k+1)-th of its own chunk, so it is
    the larger of the candidates' (k+1)-th and the chunks' (k+1)-ths."""
    rows, width = keys.shape
    chunk = _NUMPY_FAST_WIDTH
    n_chunks = math.ceil(width / chunk)
    if width <= chunk or n_chunks * k >= width:
        part = np.partition(keys, width - k, axis=1)
        return part[:, width - k], part[:, : width - k].max(axis=1) if runner_up else None
    if width % chunk:
        padded = np.full((rows, n_chunks * chunk), -1, dtype=keys.dtype)
        padded[:, :width] = keys
        keys = padded
    part = np.partition(keys.reshape(rows * n_chunks, chunk), chunk - k, axis=1)
    candidates = np.ascontiguousarray(part[:, chunk - k:]).reshape(rows, n_chunks * k)
    kth, candidates_next = _kth_and_next_largest(candidates, k, runner_up)
    if not runner_up:
        return kth, None
    chunk_next = part[:, : chunk - k].max(axis=1).reshape(rows, n_chunks).max(axis=1)
    return kth, np.maximum(candidates_next, chunk_next)


def _lowest_positions_first(
    mags: Float[torch.Tensor, "rows dim"], kth: Float[torch.Tensor, "rows 1"], k: int
) -> Bool[torch.Tensor, "rows dim"]:
    """Keep every entry above `kth`, then the first of those equal to it until `k` are kept."""
    above = mags > kth
    tied = mags == kth
    room = k - above.sum(dim=1, keepdim=True)
    return above | (tied & (tied.cumsum(dim=1) <= room))
