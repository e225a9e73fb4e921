"""sparsity.py: the top-k projection with a per-unit floor, and the L0 / LR schedules.

The projection tests draw random 2-D and 3-D shapes, random unit axes (any subset, any order),
random l0 and min_per_unit, and weights whose magnitudes are a random permutation of 1..numel
with random signs: no zeros and no ties, so the projection's answer is unique and can be
compared with a slow reference.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sparse_lens import sparsity

SETTINGS = settings(max_examples=150, deadline=None)


# ------------------------------------------------------------------------------------ helpers
def distinct_weight(shape: tuple[int, ...], seed: int, dtype=torch.float32) -> torch.Tensor:
    """Magnitudes a random permutation of 1..numel, random signs: no zeros, no ties."""
    gen = torch.Generator().manual_seed(seed)
    numel = math.prod(shape)
    magnitudes = (torch.randperm(numel, generator=gen) + 1).to(torch.float64)
    signs = torch.randint(0, 2, (numel,), generator=gen).to(torch.float64) * 2 - 1
    # a little noise on top keeps values non-integer without creating ties (gaps are >= 1)
    noise = torch.rand(numel, generator=gen, dtype=torch.float64) * 0.5
    return ((magnitudes + noise) * signs).reshape(shape).to(dtype)


def as_units(t: torch.Tensor, unit_dims: tuple[int, ...]) -> torch.Tensor:
    """Reference [units, fan_in] reshaping, independent of sparsity.units_view."""
    rest = [d for d in range(t.dim()) if d not in unit_dims]
    perm = list(unit_dims) + rest
    n_units = math.prod(t.shape[d] for d in unit_dims)
    return t.permute(perm).reshape(n_units, -1)


def reference_mask(weight: torch.Tensor, k: int, j: int, unit_dims: tuple[int, ...]) -> torch.Tensor:
    """Slow, obviously-correct reference: protect each unit's j largest |w| (Python sort), then
    add the largest |w| among the rest until max(k, units*j) are kept. Assumes no ties."""
    mags = as_units(weight.abs(), unit_dims).tolist()
    chosen = set()
    for u, row in enumerate(mags):
        for f in sorted(range(len(row)), key=lambda f: -row[f])[:j]:
            chosen.add((u, f))
    others = sorted(
        ((u, f) for u, row in enumerate(mags) for f in range(len(row)) if (u, f) not in chosen),
        key=lambda uf: -mags[uf[0]][uf[1]],
    )
    chosen.update(others[: max(k - len(chosen), 0)])
    units = torch.zeros(len(mags), len(mags[0]), dtype=torch.bool)
    for u, f in chosen:
        units[u, f] = True
    # undo the [units, fan_in] reshaping
    rest = [d for d in range(weight.dim()) if d not in unit_dims]
    perm = list(unit_dims) + rest
    inverse = sorted(range(len(perm)), key=perm.__getitem__)
    return units.reshape([weight.shape[d] for d in perm]).permute(inverse)


@st.composite
def cases(draw, max_side: int = 12):
    """(weight, unit_dims, l0, j, k) with a 2-D or 3-D weight and any valid unit axes."""
    ndim = draw(st.sampled_from([2, 3]))
    side = max_side if ndim == 2 else 6
    shape = tuple(draw(st.lists(st.integers(1, side), min_size=ndim, max_size=ndim)))
    order = draw(st.permutations(range(ndim)))
    n_unit_axes = draw(st.integers(0, ndim))
    unit_dims = tuple(order[:n_unit_axes])
    weight = distinct_weight(shape, draw(st.integers(0, 2**31 - 1)))
    fan_in = math.prod(shape[d] for d in range(ndim) if d not in unit_dims)
    j = draw(st.integers(0, fan_in))
    l0 = draw(st.floats(1e-3, 1.0, exclude_min=False))
    k = sparsity.nonzero_budget(weight.numel(), l0)
    return weight, unit_dims, l0, j, k


# ------------------------------------------------------------------------------- keep_mask
@SETTINGS
@given(cases())
def test_keep_mask_count_floor_optimality_and_reference(case):
    weight, unit_dims, _, j, k = case
    mask = sparsity.keep_mask(weight, k, j, unit_dims)
    assert mask.dtype == torch.bool and mask.shape == weight.shape

    units_mask = as_units(mask, unit_dims)
    units_abs = as_units(weight.abs(), unit_dims)
    n_units = units_mask.shape[0]

    # exact count
    assert int(mask.sum()) == max(k, n_units * j)
    # floor
    assert int(units_mask.sum(dim=1).min()) >= j
    # optimality: every kept entry outside each unit's protected top-j is >= every dropped entry
    protected = torch.zeros_like(units_mask)
    if j:
        protected.scatter_(1, units_abs.topk(j, dim=1).indices, True)
    assert bool((units_mask | ~protected).all()), "a unit's j largest must be kept"
    extra = units_mask & ~protected
    dropped = ~units_mask
    if extra.any() and dropped.any():
        assert float(units_abs[extra].min()) >= float(units_abs[dropped].max())
    # and it is exactly the (unique, no ties) answer
    assert torch.equal(mask, reference_mask(weight, k, j, unit_dims))
    # units_view agrees with the reference reshaping
    assert torch.equal(sparsity.units_view(weight, unit_dims), as_units(weight, unit_dims))


@SETTINGS
@given(cases())
def test_keep_mask_is_plain_top_k_without_a_binding_floor(case):
    weight, unit_dims, _, j, k = case
    flat_abs = weight.abs().reshape(-1)
    plain = torch.zeros(weight.numel(), dtype=torch.bool)
    plain[flat_abs.topk(k).indices] = True
    plain = plain.reshape(weight.shape)
    assert torch.equal(sparsity.keep_mask(weight, k, 0, unit_dims), plain)
    # a floor the plain top-k already satisfies changes nothing
    min_kept = int(as_units(plain, unit_dims).sum(dim=1).min())
    assert torch.equal(sparsity.keep_mask(weight, k, min(j, min_kept), unit_dims), plain)


@pytest.mark.parametrize(
    "shape, unit_dims",
    [
        ((768, 1024), (1,)),  # W_in-like; floor on a strided [units, fan_in] view
        ((4, 256, 64 * 4), (0, 2)),  # W_Q-like 3-D: floor on a copy, mapped back
        ((1024, 600), (0,)),  # W_E-like; contiguous rows
    ],
)
@pytest.mark.parametrize("l0", [1 / 64, 1 / 4])
def test_keep_mask_large_uses_the_sampled_prefilter_and_stays_exact(shape, unit_dims, l0, monkeypatch):
    weight = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    assert weight.numel() >= sparsity._SAMPLE_MIN_NUMEL
    k = sparsity.nonzero_budget(weight.numel(), l0)
    j = 2
    fast = sparsity.keep_mask(weight, k, j, unit_dims)
    # the same computation with the prefilter off (plain topk over all entries)
    monkeypatch.setattr(sparsity, "_SAMPLE_MIN_NUMEL", 1 << 62)
    slow = sparsity.keep_mask(weight, k, j, unit_dims)
    assert torch.equal(fast, slow)
    n_units = math.prod(shape[d] for d in unit_dims)
    assert int(fast.sum()) == max(k, n_units * j)


def test_keep_mask_prefilter_fallback_when_too_few_candidates(monkeypatch):
    weight = torch.randn(600, 500, generator=torch.Generator().manual_seed(2))
    k = sparsity.nonzero_budget(weight.numel(), 1 / 16)
    expected = sparsity.keep_mask(weight, k, 1, (1,))
    # a negative margin puts the estimated threshold above the true one: the prefilter lets
    # through fewer than r entries and the code must fall back to a full topk
    monkeypatch.setattr(sparsity, "_SAMPLE_MARGIN_SIGMAS", -40.0)
    assert torch.equal(sparsity.keep_mask(weight, k, 1, (1,)), expected)


def test_keep_mask_ties_exact_count_and_deterministic():
    weight = torch.ones(300, 1000)  # every entry tied, both small and prefiltered sizes
    for w in (weight, weight[:20, :30].clone()):
        for j in (0, 3):
            k = sparsity.nonzero_budget(w.numel(), 1 / 8)
            a = sparsity.keep_mask(w, k, j, (1,))
            assert int(a.sum()) == max(k, w.shape[1] * j)
            assert int(a.sum(dim=0).min()) >= j
            assert torch.equal(a, sparsity.keep_mask(w, k, j, (1,)))


def test_keep_mask_floor_denser_than_budget():
    weight = distinct_weight((8, 10), 0)  # W_U-like, 10 units of fan-in 8
    mask = sparsity.keep_mask(weight, 5, 2, (1,))
    assert int(mask.sum()) == 20 and bool((mask.sum(dim=0) == 2).all())


def test_keep_mask_does_not_modify_weight_and_k_zero():
    weight = distinct_weight((5, 7), 3)
    before = weight.clone()
    assert int(sparsity.keep_mask(weight, 0, 0, (1,)).sum()) == 0
    sparsity.keep_mask(weight, 9, 2, (0,))
    assert torch.equal(weight, before)


def test_keep_mask_errors():
    w = distinct_weight((4, 6), 0)
    with pytest.raises(ValueError, match=r"min_per_unit=5 .*fan-in 4"):
        sparsity.keep_mask(w, 3, 5, (1,))  # units along axis 1 have fan-in 4
    with pytest.raises(ValueError, match="min_per_unit"):
        sparsity.keep_mask(w, 3, -1, (1,))
    with pytest.raises(ValueError, match="k must be"):
        sparsity.keep_mask(w, 25, 0, (1,))
    with pytest.raises(ValueError, match="k must be"):
        sparsity.keep_mask(w, -1, 0, (1,))
    with pytest.raises(ValueError, match="out of range"):
        sparsity.keep_mask(w, 3, 0, (2,))
    with pytest.raises(ValueError, match="repeats"):
        sparsity.keep_mask(w, 3, 0, (1, -1))
    with pytest.raises(ValueError, match=r"min_per_unit=7 .*fan-in 6"):
        sparsity.project_(w, 1.0, 7, (0,))  # checked even on the dense fast path


def test_negative_unit_dims_are_normalized():
    w = distinct_weight((3, 4, 5), 4)
    assert torch.equal(sparsity.keep_mask(w, 10, 1, (0, -1)), sparsity.keep_mask(w, 10, 1, (0, 2)))


# -------------------------------------------------------------------------- nonzero_budget
def test_nonzero_budget():
    assert sparsity.nonzero_budget(1000, 1 / 64) == 15
    assert sparsity.nonzero_budget(1000, 1.0) == 1000
    assert sparsity.nonzero_budget(10, 1e-6) == 1
    for bad in (0.0, -0.5, 1.5, float("nan")):
        with pytest.raises(ValueError, match=r"l0 must be in \(0, 1\]"):
            sparsity.nonzero_budget(10, bad)


# -------------------------------------------------------------------------------- project_
@SETTINGS
@given(cases(max_side=10))
def test_project_zeroes_exactly_the_dropped_entries_and_is_idempotent(case):
    weight, unit_dims, l0, j, _ = case
    param = torch.nn.Parameter(weight.clone())
    kept = sparsity.project_(param, l0, j, unit_dims)
    assert param.grad_fn is None and param.requires_grad
    if l0 == 1.0:
        assert kept == weight.numel() and torch.equal(param.data, weight)
        return
    k = sparsity.nonzero_budget(weight.numel(), l0)
    mask = sparsity.keep_mask(weight, k, j, unit_dims)
    assert kept == int(mask.sum()) == int(param.ne(0).sum())
    assert bool((param.data[~mask] == 0).all())
    # kept entries bit-identical
    assert torch.equal(param.data[mask].view(torch.int32), weight[mask].view(torch.int32))
    after_once = param.data.clone()
    assert sparsity.project_(param, l0, j, unit_dims) == kept
    assert torch.equal(param.data, after_once)


def test_project_dense_is_a_no_op():
    param = torch.nn.Parameter(distinct_weight((6, 5), 1))
    before, ptr = param.data.clone(), param.data_ptr()
    assert sparsity.project_(param, 1.0, 3, (1,)) == 30
    assert torch.equal(param.data, before) and param.data_ptr() == ptr


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_project_any_float_dtype(dtype):
    weight = distinct_weight((16, 24), 5, dtype=torch.float64).to(dtype)
    ref = sparsity.keep_mask(weight.to(torch.float64), 96, 2, (1,))
    w = weight.clone()
    assert sparsity.project_(w, 0.25, 2, (1,)) == 96
    assert w.dtype == dtype and torch.equal(w.ne(0), ref)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA")
def test_project_on_cuda_matches_cpu():
    weight = distinct_weight((64, 4, 32), 6)
    cpu = weight.clone()
    gpu = weight.clone().cuda()
    assert sparsity.project_(cpu, 1 / 16, 3, (0, 2)) == sparsity.project_(gpu, 1 / 16, 3, (0, 2))
    assert torch.equal(gpu.cpu(), cpu)


# ------------------------------------------------------------------------------ l0_at_step
@SETTINGS
@given(
    total=st.integers(1, 400),
    target=st.floats(1e-3, 1.0),
    dense_frac=st.floats(0.0, 1.0),
    span=st.floats(0.0, 1.0),
    kind=st.sampled_from(["linear", "exponential"]),
)
def test_l0_schedule_properties(total, target, dense_frac, span, kind):
    anneal_end_frac = dense_frac + span * (1.0 - dense_frac)
    values = [
        sparsity.l0_at_step(s, total, target, dense_frac, anneal_end_frac, kind) for s in range(total + 3)
    ]
    assert all(target <= v <= 1.0 for v in values)
    assert all(a >= b for a, b in zip(values, values[1:])), "L0 must be non-increasing"
    for s, v in enumerate(values):
        if s < dense_frac * total:
            assert v == 1.0
        if s >= anneal_end_frac * total:
            assert v == target  # exactly


def test_l0_schedule_values():
    f = sparsity.l0_at_step
    # dense for the first 1%, target reached at 50% and held
    assert f(0, 1000, 1 / 64) == 1.0
    assert f(9, 1000, 1 / 64) == 1.0
    assert f(10, 1000, 1 / 64) == 1.0  # annealing starts from 1.0
    assert f(500, 1000, 1 / 64) == 1 / 64
    assert f(999, 1000, 1 / 64) == 1 / 64
    assert 1 / 64 < f(499, 1000, 1 / 64) < f(100, 1000, 1 / 64) < 1.0
    # midpoint of the anneal: arithmetic mean (linear) vs geometric mean (exponential)
    assert f(50, 100, 0.25, 0.0, 1.0, "linear") == pytest.approx(0.625)
    assert f(50, 100, 0.25, 0.0, 1.0, "exponential") == pytest.approx(0.5)
    assert f(25, 100, 1 / 16, 0.0, 1.0, "exponential") == pytest.approx(0.5)
    # target 1 is dense throughout; an empty anneal window jumps straight to the target
    assert all(f(s, 50, 1.0) == 1.0 for s in range(60))
    assert f(19, 100, 0.1, 0.2, 0.2) == 1.0 and f(20, 100, 0.1, 0.2, 0.2) == 0.1


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(target=0.0), "target"),
        (dict(target=1.5), "target"),
        (dict(dense_frac=-0.1), "dense_frac"),
        (dict(dense_frac=0.6, anneal_end_frac=0.5), "anneal_end_frac"),
        (dict(anneal_end_frac=1.2), "anneal_end_frac"),
        (dict(kind="cosine"), "kind"),
        (dict(total_steps=0), "total_steps"),
        (dict(step=-1), "step"),
    ],
)
def test_l0_schedule_validation(kwargs, name):
    args = dict(step=0, total_steps=100, target=0.1) | kwargs
    with pytest.raises(ValueError, match=name):
        sparsity.l0_at_step(**args)


# ------------------------------------------------------------------------------ lr_at_step
def test_lr_schedule_sharkfin():
    f = sparsity.lr_at_step
    total, base = 1000, 1e-2  # warmup 10 steps
    assert f(0, total, base, 1.0) == pytest.approx(base / 10) and f(0, total, base, 1.0) > 0
    assert f(9, total, base, 1.0) == pytest.approx(base)  # end of warmup
    assert f(total, total, base, 1.0) == 0.0 and f(total + 5, total, base, 1.0) == 0.0
    assert f(total - 1, total, base, 1.0) > 0  # the last training step still learns
    assert f(505, total, base, 1.0) == pytest.approx(base / 2)  # linear decay: halfway
    lrs = [f(s, total, base, 1.0) for s in range(total + 1)]
    assert all(a <= b for a, b in zip(lrs[:10], lrs[1:10]))
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))
    # with warmup_frac = 0 the first step has the full LR
    assert f(0, total, base, 1.0, warmup_frac=0.0) == pytest.approx(base)
    # the shark fin: with L0 annealed, the LR rises past base while L0 falls
    l0s = [sparsity.l0_at_step(s, total, 1 / 64) for s in range(total)]
    fin = [f(s, total, base, l0) for s, l0 in enumerate(l0s)]
    peak = max(range(total), key=fin.__getitem__)
    assert 10 < peak <= 500 and fin[peak] > 4 * base


@SETTINGS
@given(
    step=st.integers(0, 500),
    total=st.integers(1, 500),
    l0=st.floats(1e-4, 1.0),
    warmup_frac=st.floats(0.0, 1.0),
)
def test_lr_scales_as_inverse_sqrt_l0(step, total, l0, warmup_frac):
    dense = sparsity.lr_at_step(step, total, 3e-3, 1.0, warmup_frac)
    sparse = sparsity.lr_at_step(step, total, 3e-3, l0, warmup_frac)
    assert sparse == pytest.approx(dense / math.sqrt(l0))
    assert 0.0 <= dense <= 3e-3 * (1 + 1e-12)
    assert (dense > 0) == (step < total)


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(l0=0.0), "l0"),
        (dict(l0=2.0), "l0"),
        (dict(warmup_frac=1.5), "warmup_frac"),
        (dict(base_lr=-1.0), "base_lr"),
        (dict(total_steps=0), "total_steps"),
    ],
)
def test_lr_schedule_validation(kwargs, name):
    args = dict(step=0, total_steps=100, base_lr=1e-3, l0=0.5) | kwargs
    with pytest.raises(ValueError, match=name):
        sparsity.lr_at_step(**args)
