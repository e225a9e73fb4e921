"""sparse_lens.native: the C kernels give the same bits as their PyTorch/NumPy twins.

Every comparison is bitwise: AbsTopK's output, mask and gradient against the NumPy path (the
library disabled), the weight projection against `keep_mask` + `masked_fill_` (fast kernels
off). The library is built twice here, with this CPU's flags (AVX-512 where it has it) and
portably (`-march` dropped: the plain-C selection), and the two must agree as well.
"""

from __future__ import annotations

import ctypes
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sparse_lens import abstopk, native, sparsity
from sparse_lens.kernels import reference_kernels
from sparse_lens.native import selection

pytestmark = pytest.mark.skipif(native.compiler() is None, reason="no C compiler on this machine")


@pytest.fixture
def without_native(monkeypatch):
    """Run the body with the native kernels off (the NumPy/PyTorch twins)."""
    def off() -> None:
        monkeypatch.setenv("SPARSE_LENS_NATIVE", "0")
        native.library.cache_clear()

    yield off
    monkeypatch.delenv("SPARSE_LENS_NATIVE", raising=False)
    native.library.cache_clear()


def _forward_backward(x: torch.Tensor, k: int, grad: torch.Tensor):
    leaf = x.clone().requires_grad_(True)
    out = abstopk.abs_topk(leaf, k)
    out.backward(grad)
    return out.detach(), leaf.grad


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int32)


def _inputs(kind: str, shape: tuple[int, ...], k: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    if kind == "ties":  # few distinct magnitudes: ties with the k-th largest in most rows
        return torch.randint(-3, 4, shape, generator=gen).float()
    x = torch.randn(shape, generator=gen)
    if kind == "special":  # NaN, infinities, signed zeros
        x[..., 0] = float("nan")
        x[..., 1] = -float("inf")
        x[..., 2] = -0.0
        x.view(-1, shape[-1])[0, : k + 2] = float("inf")  # more infinities than k in one row
    return x


def test_library_builds_loads_and_is_cached(tmp_path):
    first = native.build(tmp_path)
    assert first.exists() and native.build(tmp_path) == first  # the same key: no rebuild
    assert native.library() is not None


@pytest.mark.parametrize("kind", ["gauss", "ties", "special"])
@pytest.mark.parametrize("shape,k", [((8, 16, 256), 64), ((64, 1024), 256), ((5, 7, 300), 7),
                                     ((33, 2100), 100), ((40, 17), 16), ((3, 65), 1)])
def test_abstopk_is_bitwise_the_numpy_path(kind, shape, k, without_native):
    x = _inputs(kind, shape, k, seed=sum(shape) + k)
    grad = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    out, x_grad = _forward_backward(x, k, grad)
    keep = selection.abs_topk(x, k, abstopk._kth_largest)[1]
    without_native()
    assert native.library() is None and selection.abs_topk(x, k, abstopk._kth_largest) is None
    ref_out, ref_grad = _forward_backward(x, k, grad)
    assert torch.equal(_bits(out), _bits(ref_out))
    assert torch.equal(_bits(x_grad), _bits(ref_grad))
    assert torch.equal(keep.bool(), abstopk.abs_topk_mask(x, k))
    assert bool((keep.view(-1, shape[-1]).sum(dim=1) == k).all())


def test_abstopk_takes_noncontiguous_inputs_and_gradients():
    x = torch.randn(16, 300)[:, ::2]  # stride 2
    grad = torch.randn(150, 16).t()  # transposed
    out, x_grad = _forward_backward(x, 40, grad)
    keep = abstopk.abs_topk_mask(x, 40)
    assert torch.equal(out, x * keep) and torch.equal(x_grad, grad * keep)


def test_flags_the_compiler_refuses_are_dropped(tmp_path, monkeypatch):
    monkeypatch.setattr(native, "FLAGS", ("-O3", "-march=no-such-cpu", "-shared", "-fPIC"))
    monkeypatch.setattr(native, "_OPTIONAL_FLAGS", ("-march=no-such-cpu",))
    lib = ctypes.CDLL(str(native.build(tmp_path)))
    assert lib.select_is_vectorised() == 0


def _portable_library(tmp_path, monkeypatch) -> ctypes.CDLL:
    """The same source built without `-march=native`: the plain-C selection."""
    monkeypatch.setattr(native, "FLAGS", tuple(f for f in native.FLAGS if not f.startswith("-march")))
    lib = ctypes.CDLL(str(native.build(tmp_path)))
    for name, argtypes in native._SIGNATURES.items():
        getattr(lib, name).argtypes = argtypes
    lib.select_is_vectorised.restype = ctypes.c_int
    return lib


@pytest.mark.parametrize("kind", ["gauss", "ties", "special"])
def test_both_selections_agree(kind, tmp_path, monkeypatch):
    fast = native.library()
    portable = _portable_library(tmp_path, monkeypatch)
    assert portable.select_is_vectorised() == 0
    for dim, k in [(256, 64), (1024, 256), (5000, 33), (17, 16)]:
        x = _inputs(kind, (24, dim), k, seed=dim).contiguous()
        results = []
        for lib in (fast, portable):
            kth = torch.empty(24, dtype=torch.int32)
            out, keep = torch.empty_like(x), torch.empty(x.shape, dtype=torch.uint8)
            lib.abstopk_rows(x.data_ptr(), kth.data_ptr(), out.data_ptr(), keep.data_ptr(), 24, dim, k, 2)
            results.append((kth, _bits(out), keep))
        for a, b in zip(*results):
            assert torch.equal(a, b)
        assert torch.equal(results[0][2].bool(), abstopk.abs_topk_mask(x, k))


# ------------------------------------------------------------------------- the projection
def _distinct(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Magnitudes a permutation of 1..numel plus noise, random signs: no ties."""
    gen = torch.Generator().manual_seed(seed)
    numel = math.prod(shape)
    mags = torch.randperm(numel, generator=gen).double() + 1 + torch.rand(numel, generator=gen) * 0.5
    signs = torch.randint(0, 2, (numel,), generator=gen) * 2 - 1
    return (mags * signs).reshape(shape).float()


def _project_both(weight: torch.Tensor, l0: float, j: int, unit_dims) -> tuple[torch.Tensor, torch.Tensor]:
    fast, ref = weight.clone(), weight.clone()
    kept = sparsity.project_(fast, l0, j, unit_dims)
    with reference_kernels():
        assert sparsity.project_(ref, l0, j, unit_dims) == kept
    return fast, ref


@settings(max_examples=60, deadline=None)
@given(shape=st.lists(st.integers(1, 9), min_size=2, max_size=3), data=st.data())
def test_projection_is_bitwise_the_pytorch_path(shape, data):
    ndim = len(shape)
    unit_dims = tuple(data.draw(st.permutations(range(ndim)))[: data.draw(st.integers(0, ndim))])
    fan_in = math.prod(s for d, s in enumerate(shape) if d not in unit_dims)
    weight = _distinct(tuple(shape), data.draw(st.integers(0, 2**31 - 1)))
    fast, ref = _project_both(weight, data.draw(st.floats(1e-3, 1.0)), data.draw(st.integers(0, fan_in)),
                              unit_dims)
    assert torch.equal(_bits(fast), _bits(ref))


@pytest.mark.parametrize("shape,unit_dims", [((2048, 256), (0,)), ((16, 256, 16), (0, 2)),
                                             ((16, 16, 256), (2,)), ((256, 1024), (1,))])
def test_projection_of_the_models_layouts_runs_natively(shape, unit_dims, monkeypatch):
    weight = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    assert selection.unit_blocks(shape, unit_dims) is not None
    calls = []
    original = selection.project_
    monkeypatch.setattr(selection, "project_", lambda *a: calls.append(original(*a)) or calls[-1])
    fast, ref = _project_both(weight, 1 / 16, 4, unit_dims)
    assert calls == [True]  # the native path ran (no fallback); under reference_kernels it is skipped
    assert torch.equal(_bits(fast), _bits(ref))


def test_projection_ties_keep_exactly_k_at_the_lowest_positions():
    weight = torch.tensor([[3.0, -1.0, 1.0, 2.0], [1.0, -1.0, 0.5, 1.0]])
    kept = sparsity.project_(weight, 0.5, 0, (0,))  # k = 4: 3, 2, then two of the four 1s
    assert kept == 4 and int(weight.ne(0).sum()) == 4
    assert weight.tolist() == [[3.0, -1.0, 1.0, 2.0], [0.0, 0.0, 0.0, 0.0]]
    assert not bool(weight[1].signbit().any())  # dropped entries are +0.0


def test_a_failed_build_warns_once_and_falls_back(monkeypatch, tmp_path):
    monkeypatch.setenv("CC", "false")  # a compiler that always fails
    monkeypatch.setenv("SPARSE_LENS_CACHE", str(tmp_path))
    monkeypatch.setattr(native, "compiler", lambda: ["false"])
    native.library.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match="native kernels unavailable"):
            assert native.library() is None
        x = torch.randn(4, 32)
        assert torch.equal(abstopk.abs_topk(x, 8), x * abstopk.abs_topk_mask(x, 8))
    finally:
        native.library.cache_clear()



# --------------------------------------------------------------------------- attention
def _attention_case(shape, seed, sinks):
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(shape, generator=gen, requires_grad=True) for _ in range(3))
    s = torch.randn(shape[2], generator=gen, requires_grad=True) if sinks else None
    return q, k, v, s, torch.randn(shape, generator=gen)


def _z_and_grads(fn, q, k, v, s, dz):
    leaves = [q, k, v] + ([s] if s is not None else [])
    for t in leaves:
        t.grad = None
    z = fn(q, k, v, 0.25, s)
    z.backward(dz)
    return [z.detach()] + [t.grad.clone() for t in leaves]


def _written_out_attention(q, k, v, scale, s):
    """The attention TransformerLens computes, written out: scores, causal mask, sink column."""
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) * scale
    causal = torch.ones(scores.shape[-2:], dtype=torch.bool).triu(1)
    scores = scores.masked_fill(causal, float("-inf"))
    if s is not None:
        scores = torch.cat([scores, s[None, :, None, None].expand(*scores.shape[:-1], 1)], dim=-1)
    pattern = scores.softmax(dim=-1)[..., : q.shape[1]]
    return torch.einsum("bhqk,bkhd->bqhd", pattern, v)


@pytest.mark.parametrize("sinks", [True, False])
@pytest.mark.parametrize("shape", [(2, 9, 3, 16), (1, 1, 2, 16), (3, 33, 4, 16), (2, 128, 16, 16)])
def test_attention_matches_transformer_lens_to_float_tolerance(shape, sinks):
    from sparse_lens.native import attention as native_attention

    case = _attention_case(shape, seed=sum(shape), sinks=sinks)
    got = _z_and_grads(native_attention.causal_attention, *case)
    want = _z_and_grads(_written_out_attention, *case)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_attention_other_head_widths_fall_back():
    from sparse_lens.native import attention as native_attention

    q = torch.randn(1, 4, 2, 8)
    assert native_attention.causal_attention(q, q, q, 0.5) is None
    assert native_attention.causal_attention(q.double(), q.double(), q.double(), 0.5) is None


def test_attention_does_not_depend_on_the_thread_count():
    from sparse_lens.native import attention as native_attention

    case = _attention_case((4, 40, 6, 16), seed=3, sinks=True)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _z_and_grads(native_attention.causal_attention, *case)
        torch.set_num_threads(2)
        two = _z_and_grads(native_attention.causal_attention, *case)
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(a, b) for a, b in zip(one, two))


# --------------------------------------------------------------------------- RMS norm
def test_rms_norm_matches_transformer_lens_and_hooks_take_its_own_path():
    from transformer_lens.components import RMSNorm

    from sparse_lens.components import SparseRMSNorm
    from sparse_lens.config import SparseHookedTransformerConfig

    cfg = SparseHookedTransformerConfig.preset("tiny")
    gen = torch.Generator().manual_seed(0)
    plain, fused = RMSNorm(cfg, 48), SparseRMSNorm(cfg, 48)
    with torch.no_grad():
        plain.w.normal_(generator=gen)
        fused.w.copy_(plain.w)
    x = torch.randn(3, 70, 48, generator=gen, requires_grad=True)  # 210 rows: 4 blocks of 64
    dy = torch.randn(3, 70, 48, generator=gen)
    results = []
    for norm in (plain, fused):
        x.grad = None
        y = norm(x)
        y.backward(dy)
        results.append((y.detach(), x.grad.clone(), norm.w.grad.clone()))
    for a, b in zip(*results):  # dw sums 210 rows: float32 rounding in another order
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)
    seen = []
    fused.hook_normalized.add_hook(lambda t, hook: seen.append(t.shape))
    torch.testing.assert_close(fused(x), results[0][0], rtol=1e-5, atol=1e-6)
    assert seen == [x.shape]  # a hook inside the norm: TransformerLens's forward runs
    fused.hook_normalized.remove_hooks()


def test_rms_norm_does_not_depend_on_the_thread_count():
    from sparse_lens.native import norm as native_norm

    gen = torch.Generator().manual_seed(1)
    x = torch.randn(300, 256, generator=gen, requires_grad=True)
    w = torch.randn(256, generator=gen, requires_grad=True)
    dy = torch.randn(300, 256, generator=gen)
    threads, out = torch.get_num_threads(), []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            x.grad = w.grad = None
            y = native_norm.rms_norm(x, w, 1e-5)
            y.backward(dy)
            out.append((y.detach(), x.grad.clone(), w.grad.clone()))
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(a, b) for a, b in zip(*out))
