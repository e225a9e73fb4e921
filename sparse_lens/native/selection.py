"""Tensor-facing wrappers of the native kernels (`kernels.c`): AbsTopK and the weight projection.

Each returns None (or False) where the kernels do not apply (not CPU float32, or the library did
not load) and the caller then runs its PyTorch/NumPy twin, which gives the same bits
(`tests/test_native.py`).
"""

from __future__ import annotations

import ctypes
import math
from collections.abc import Callable, Sequence

import numpy as np
import torch
from jaxtyping import Float, UInt8

from sparse_lens import native


def abs_topk(
    x: Float[torch.Tensor, "... dim"], k: int, kth_largest: Callable[[np.ndarray, int], np.ndarray]
) -> tuple[Float[torch.Tensor, "... dim"], UInt8[torch.Tensor, "... dim"]] | None:
    """(x * keep, keep as 0/1 bytes), keep marking exactly `k` (`1 <= k < dim`) entries of each
    row along the last axis: those of largest |x|, ties at the lowest positions. None where the
    kernels do not apply. Each row's threshold comes from the kernel's own selection where it is
    vectorised (AVX-512), else from `kth_largest(keys [rows, dim] int32, k) -> [rows]` (NumPy's
    selection, faster than the plain-C one on short rows)."""
    lib = native.library_for(x)
    if lib is None:
        return None
    x = x.detach().contiguous()
    dim = x.shape[-1]
    rows = x.numel() // dim
    out = torch.empty_like(x)
    keep = torch.empty(x.shape, dtype=torch.uint8)
    threads = torch.get_num_threads()
    if lib.select_is_vectorised():
        kth = torch.empty(rows, dtype=torch.int32)
        lib.abstopk_rows(x.data_ptr(), kth.data_ptr(), out.data_ptr(), keep.data_ptr(), rows, dim, k,
                         threads)
    else:
        keys = x.abs().view(torch.int32).reshape(rows, dim).numpy()
        kth_np = np.ascontiguousarray(kth_largest(keys, k), dtype=np.int32)
        lib.abstopk_apply(x.data_ptr(), kth_np.ctypes.data, out.data_ptr(), keep.data_ptr(), rows,
                          dim, k, threads)
    return out, keep


def mul_keep(grad: Float[torch.Tensor, "..."], keep: UInt8[torch.Tensor, "..."]) -> torch.Tensor | None:
    """grad * keep (AbsTopK's backward; `keep` contiguous, of grad's shape), or None where the
    kernels do not apply."""
    lib = native.library_for(grad)
    if lib is None:
        return None
    grad = grad.contiguous()
    out = torch.empty_like(grad)
    lib.mul_keep(grad.data_ptr(), keep.data_ptr(), out.data_ptr(), grad.numel(), torch.get_num_threads())
    return out


def project_(weight: Float[torch.Tensor, "*shape"], k: int, min_per_unit: int,
             unit_dims: Sequence[int]) -> bool:
    """`sparsity.project_` by the native kernel, if it applies: a contiguous float32 CPU weight,
    unit axes that are leading and/or trailing axes (`unit_blocks`: every TransformerLens
    layout), `0 < k < numel`, and a plain top-k that already gives every unit at least
    `min_per_unit` entries (`sparsity.keep_mask`'s fast path). Ties with the k-th largest |w|
    keep the lowest positions; dropped entries become +0.0, kept ones keep their bits. Returns
    whether it projected `weight` (in place, its version counter bumped as an in-place op's)."""
    if not weight.is_contiguous() or not 0 < k < weight.numel():
        return False
    lib = native.library_for(weight)
    blocks = unit_blocks(weight.shape, unit_dims)
    if lib is None or blocks is None or blocks[0] * blocks[2] * min_per_unit > k:
        return False
    a, b, c = blocks
    data = weight.detach()
    threshold, room = ctypes.c_uint32(), ctypes.c_int64()
    per_unit = torch.zeros(a * c, dtype=torch.int64)
    lib.weight_topk(data.data_ptr(), data.numel(), k, a, b, c, ctypes.byref(threshold),
                    ctypes.byref(room), per_unit.data_ptr())
    if int(per_unit.min()) < min_per_unit:
        return False
    lib.weight_apply(data.data_ptr(), data.numel(), threshold.value, room.value)
    torch.autograd.graph.increment_version(weight)  # as masked_fill_ would record
    return True


def unit_blocks(shape: Sequence[int], unit_dims: Sequence[int]) -> tuple[int, int, int] | None:
    """`(a, b, c)` such that a weight of `shape`, viewed as [a, b, c], has units (i_a, i_c) and
    fan-in b: the unit axes (any order, non-negative or negative) must be the leading and/or
    the trailing axes; else None."""
    ndim = len(shape)
    dims = sorted(d % ndim for d in unit_dims)
    lead = 0
    while lead < ndim and lead in dims:
        lead += 1
    trail = [d for d in dims if d >= lead]
    if trail != list(range(ndim - len(trail), ndim)):
        return None
    a = math.prod(shape[:lead])
    c = math.prod(shape[ndim - len(trail):])
    return a, math.prod(shape) // (a * c), c
