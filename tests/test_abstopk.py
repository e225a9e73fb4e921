"""AbsTopK: the fast threshold path against the topk + scatter reference, ties, gradients."""

import pytest
import torch

from sparse_lens import abstopk
from sparse_lens.abstopk import abs_topk, abs_topk_mask, abs_topk_mask_on_device, abs_topk_reference
from sparse_lens.kernels import fast_kernels_enabled, reference_kernels


def tie_free(*shape, seed=0):
    """Distinct magnitudes (a permutation of 1..n plus a little noise), random signs."""
    gen = torch.Generator().manual_seed(seed)
    n = torch.Size(shape).numel()
    mags = torch.randperm(n, generator=gen).float() + 1 + 0.5 * torch.rand(n, generator=gen)
    signs = torch.randint(0, 2, (n,), generator=gen) * 2 - 1
    return (mags * signs).reshape(shape)


# (shape, k): the small preset's widths, a row wider than NumPy's fast width that is not a
# multiple of it (padded chunks), one too wide to narrow (k >= the chunk), and tiny rows
@pytest.mark.parametrize("shape,k", [((8, 16, 256), 64), ((4, 9, 1024), 256), ((3, 1300), 100),
                                     ((5, 2048), 600), ((7, 2), 1), ((2, 3, 5), 4)])
def test_fast_equals_reference_values_and_gradients_without_ties(shape, k):
    x = tie_free(*shape)
    grad = torch.randn(shape)
    fast_x, ref_x = x.clone().requires_grad_(), x.clone().requires_grad_()
    fast, ref = abs_topk(fast_x, k), abs_topk_reference(ref_x, k)
    assert torch.equal(fast, ref)
    assert torch.all((fast != 0).sum(-1) == k)
    fast.backward(grad)
    ref.backward(grad)
    assert torch.equal(fast_x.grad, ref_x.grad)
    assert torch.equal(fast_x.grad != 0, fast != 0)  # gradient only where kept


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_other_float_dtypes(dtype):
    # each row a permutation of -1..-100 / 1..100: integers exact in every dtype, no ties
    gen = torch.Generator().manual_seed(0)
    x = torch.stack([torch.randperm(100, generator=gen) + 1.0 for _ in range(6)])
    x = (x * (torch.randint(0, 2, x.shape, generator=gen) * 2 - 1)).to(dtype)
    fast = abs_topk(x, 40)
    assert fast.dtype == dtype and torch.equal(fast, abs_topk_reference(x, 40))


def test_ties_keep_exactly_k_at_the_lowest_positions():
    x = torch.tensor([[2.0, -1.0, 1.0, -1.0, 1.0, 0.5],   # 2 kept above the tie, 1 of 4 tied
                      [0.0, 0.0, 0.0, 0.0, 0.0, 0.0],     # all tied at zero
                      [1.0, 1.0, 1.0, 3.0, -3.0, 3.0]])   # 3 above: the tie takes none
    keep = abs_topk_mask(x, 3)
    assert keep.tolist() == [[True, True, True, False, False, False],
                             [True, True, True, False, False, False],
                             [False, False, False, True, True, True]]
    # the same in wide rows, through the chunked selection: every entry tied
    wide = torch.ones(4, 1500)
    keep = abs_topk_mask(wide, 100)
    assert torch.all(keep.sum(-1) == 100) and torch.all(keep[:, :100])


def test_rounded_values_with_many_ties_keep_exactly_k_and_the_largest():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(64, 1100, generator=gen).mul(3).round()  # most rows tie at the k-th value
    keep = abs_topk_mask(x, 200)
    assert torch.all(keep.sum(-1) == 200)
    kept_min = x.abs().masked_fill(~keep, float("inf")).amin(-1)
    dropped_max = x.abs().masked_fill(keep, -1.0).amax(-1)
    assert torch.all(kept_min >= dropped_max)


def test_chunked_selection_finds_the_kth_and_next_largest():
    import numpy as np

    rng = np.random.default_rng(0)
    keys = rng.integers(0, 50, size=(30, 1500), dtype=np.int32)  # heavy ties
    for k in (1, 7, 100, 511):
        kth, runner_up = abstopk._kth_and_next_largest(keys, k)
        ordered = -np.sort(-keys, axis=1)
        assert np.array_equal(kth, ordered[:, k - 1]) and np.array_equal(runner_up, ordered[:, k])


def test_k_at_least_the_width_is_the_identity_and_k_below_one_is_an_error():
    x = torch.randn(3, 8)
    assert abs_topk(x, 8) is x and abs_topk(x, 20) is x
    with pytest.raises(ValueError, match="k >= 1"):
        abs_topk(x, 0)
    with pytest.raises(ValueError, match="1 <= k < dim"):
        abs_topk_mask(x, 8)


def test_reference_kernels_switches_abstopk_and_restores_the_default_on_error():
    x = torch.ones(2, 10)  # all tied: the two paths may keep different entries, both exactly k
    assert fast_kernels_enabled()
    with pytest.raises(RuntimeError):
        with reference_kernels():
            assert not fast_kernels_enabled()
            assert abs_topk(x.requires_grad_(), 3).grad_fn.name() == "ScatterBackward0"
            raise RuntimeError("inside")
    assert fast_kernels_enabled()
    assert "AbsTopK" in abs_topk(x, 3).grad_fn.name()
    with reference_kernels(enabled=False):
        assert fast_kernels_enabled()


def test_noncontiguous_input_and_no_grad():
    x = tie_free(40, 256).t()  # [256, 40], rows strided
    with torch.no_grad():
        assert torch.equal(abs_topk(x, 10), abs_topk_reference(x, 10))


def test_nan_counts_as_the_largest_magnitude_like_torch_topk():
    x = torch.tensor([[1.0, -float("nan"), 3.0, 0.5, -2.0]])
    out = abs_topk(x, 2)
    assert torch.isnan(out[0, 1]) and out[0, 2] == 3.0 and (out[0, [0, 3, 4]] == 0).all()


def test_the_device_path_keeps_the_same_entries_ties_included():
    """The path GPUs take (torch ops, no read-back) against the CPU's selection, on the tie cases
    above and on Gaussian rows."""
    gen = torch.Generator().manual_seed(2)
    tied = torch.tensor([[2.0, -1.0, 1.0, -1.0, 1.0, 0.5], [0.0] * 6, [1.0, 1.0, 1.0, 3.0, -3.0, 3.0]])
    cases = [(tied, 3),
             (torch.randn(64, 1100, generator=gen).mul(3).round(), 200),
             (torch.randn(32, 384, generator=gen), 96)]
    for x, k in cases:
        assert torch.equal(abs_topk_mask_on_device(x.abs(), k), abs_topk_mask(x, k))
