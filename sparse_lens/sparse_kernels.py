"""Sparse kernels for frozen models: the sparsified matrices multiply as CSR (`torch.sparse`).

Once a model is trained its weights are fixed and, at the paper's L0 (1/1000), almost all zero:
the dense matmuls of evaluation, node means, pruning and circuit runs mostly multiply by zero.

    with sparse_matmuls(model):          # or: with sparse_matmuls(model, "auto"): ...
        logits = model(tokens)           # the same logits (to float rounding), CSR products

How, without touching the model's code. Inside the context each sparsified matrix (W_Q, W_K, W_V,
W_O, W_in, W_out, W_U; the embedding is a lookup, not a product) is replaced in its module by a
`CSRWeight`: a tensor subclass that *is* the dense weight (same storage, so every other use of it
is unchanged) and that intercepts the matrix products it takes part in (`F.linear`,
`torch.addmm`, `torch.matmul`, `@`). The reshapes TransformerLens applies first (einops
rearranges of W_Q/W_O, `W_U.T`, `.contiguous()`) are followed and give derived `CSRWeight`s;
each derived 2-D matrix is converted to CSR once, at its first product, and cached for the
context. Everything else touching a weight computes densely and returns a plain tensor.

Gradients flow to the activations (and so to masks on them) through a custom autograd function
(the backward multiplies by the transposed CSR), never to the weights: inside the context the
swapped weights do not require grad, and they must not change (the context checks on exit).

`"auto"` (the default of `prune`, node means and circuit runs) uses CSR only where it was
measured faster: on CPU, when the sparsified matrices' achieved density is at most
`AUTO_MAX_DENSITY` (see `benchmarks/bench_sparse_kernels.py`). On CUDA, `True` works
(cuSPARSE) but is unmeasured, so "auto" keeps the dense path there.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch.utils._pytree import tree_map

#: "auto" uses CSR when the sparsified matrices hold at most this fraction of nonzeros. Measured
#: by benchmarks/bench_sparse_kernels.py on one CPU thread (figures in its docstring): at the
#: paper's 1/1000 CSR is faster (forward 4.7x, a pruning step 2.3x), at the small preset's 1/16
#: slower (pruning step 0.75x); the products alone break even well above 1/16 and gain 4x at 1/64.
AUTO_MAX_DENSITY = 0.01
#: matrices that are multiplied (the token embedding is indexed, so it stays as it is)
SWAPPED_SUFFIXES = ("attn.W_Q", "attn.W_K", "attn.W_V", "attn.W_O", "mlp.W_in", "mlp.W_out",
                    "unembed.W_U")

_T = torch.Tensor
# shape-only operations: their result is the same weight, rearranged (followed, not computed on)
_RESHAPES = {_T.permute, _T.reshape, _T.view, _T.contiguous, _T.t, _T.transpose, _T.flatten,
             _T.T.__get__, torch.permute, torch.reshape, torch.transpose, torch.t, torch.flatten}
# what only reads a tensor's metadata (answered without replaying a reshape's data)
_METADATA = {_T.device.__get__, _T.dtype.__get__, _T.shape.__get__, _T.ndim.__get__,
             _T.layout.__get__, _T.requires_grad.__get__, _T.is_cuda.__get__, _T.size, _T.dim,
             _T.is_floating_point}


class _CSRMatmul(torch.autograd.Function):
    """`A @ x` for a constant CSR matrix `A` [out, in] and dense `x` [in, n]; backward `A^T @ g`."""

    @staticmethod
    def forward(ctx, x, a, a_t_getter):
        ctx.a_t_getter = a_t_getter
        return a @ x

    @staticmethod
    def backward(ctx, grad):
        return ctx.a_t_getter() @ grad, None, None


class CSRWeight(torch.Tensor):
    """A weight (or a reshape of one) whose matrix products run as CSR; see the module docstring.

    The root wraps the dense weight itself (same storage). A reshape of it (`permute`,
    `reshape`, `.T`, `.contiguous()`, ...) costs nothing: it is a zero-stride placeholder of the
    right shape that remembers its steps; its dense value is replayed from the root only where
    some other operation needs it, and its CSR is converted once, at its first product, and
    cached on the root (`_cache`, keyed by the steps) for the rest of the context."""

    _root: CSRWeight
    _steps: tuple  # ((func, args after the tensor, kwargs), ...) from the root
    _meta: torch.Tensor  # a data-less tensor of this shape and strides

    @staticmethod
    def wrap(weight: torch.Tensor) -> CSRWeight:
        plain = weight.detach()
        out = torch.Tensor._make_subclass(CSRWeight, plain, False)
        out._root, out._steps, out._cache, out._plain = out, (), {}, plain
        out._meta = torch.empty_strided(plain.shape, plain.stride(), dtype=plain.dtype, device="meta")
        return out

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _RESHAPES and isinstance(args[0], CSRWeight):
            return args[0]._derive(func, args[1:], kwargs)
        product = _product(func, args, kwargs)
        if product is not None:
            return product
        if func in _METADATA:  # shape, device, dtype, ...: the placeholder has them, no data needed
            with torch._C.DisableTorchFunctionSubclass():
                return func(*args, **kwargs)
        args, kwargs = tree_map(_dense_value, (args, kwargs))
        with torch._C.DisableTorchFunctionSubclass():  # any other use: dense, a plain tensor
            return func(*args, **kwargs)

    def _derive(self, func, rest: tuple, kwargs: dict) -> CSRWeight:
        with torch._C.DisableTorchFunctionSubclass():
            meta = func(self._meta, *rest, **kwargs)
            placeholder = torch.zeros((), dtype=meta.dtype, device=self._plain_root().device)
            derived = torch.Tensor._make_subclass(CSRWeight, placeholder.expand(meta.shape), False)
        derived._root, derived._meta = self._root, meta
        derived._steps = self._steps + ((func, rest, kwargs),)
        return derived

    def _plain_root(self) -> torch.Tensor:
        return self._root._plain

    def dense(self) -> torch.Tensor:
        """The plain dense tensor this stands for (the root's steps replayed)."""
        with torch._C.DisableTorchFunctionSubclass():
            out = self._plain_root()
            for func, rest, kwargs in self._steps:
                out = func(out, *rest, **kwargs)
            return out

    def csr(self, transposed: bool) -> torch.Tensor:
        """This 2-D matrix (or its transpose) as CSR, converted once per context."""
        key = (tuple((f, repr(r), repr(k)) for f, r, k in self._steps), transposed)
        cache = self._root._cache
        if key not in cache:
            with torch._C.DisableTorchFunctionSubclass(), warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
                dense = self.dense()
                dense = dense.t() if transposed else dense
                cache[key] = dense.detach().contiguous().to_sparse_csr()
        return cache[key]


def _dense_value(value):
    return value.dense() if isinstance(value, CSRWeight) else value


def _product(func, args, kwargs) -> torch.Tensor | None:
    """The CSR result of a matrix product whose weight operand is a `CSRWeight`, else None."""
    if func is F.linear and isinstance(args[1], CSRWeight) and not isinstance(args[0], CSRWeight):
        bias = args[2] if len(args) > 2 else kwargs.get("bias")
        return _apply(args[0], args[1], transposed=False, bias=bias)  # x @ W^T, W [out, in]
    if func in (torch.addmm, _T.addmm) and isinstance(args[2], CSRWeight) and not kwargs:
        return _apply(args[1], args[2], transposed=True, bias=args[0])  # b + x @ W, W [in, out]
    if func in (torch.matmul, _T.matmul, _T.__matmul__) and isinstance(args[1], CSRWeight) \
            and not isinstance(args[0], CSRWeight) and args[1].ndim == 2:
        return _apply(args[0], args[1], transposed=True, bias=None)
    return None


def _apply(x: Float[torch.Tensor, "... d_in"], weight: CSRWeight, transposed: bool,
           bias: torch.Tensor | None) -> Float[torch.Tensor, "... d_out"]:
    """`x @ M^T (+ bias)` where `M` = `weight` (transposed=False, [d_out, d_in]) or its
    transpose (transposed=True, weight [d_in, d_out]), with M as CSR: (M @ x^T)^T."""
    if weight.ndim != 2:
        with torch._C.DisableTorchFunctionSubclass():
            raise ValueError(f"a CSR product needs a 2-D weight; got shape {tuple(weight.shape)}")
    a = weight.csr(transposed)
    with torch._C.DisableTorchFunctionSubclass():
        flat = x.reshape(-1, x.shape[-1])
        out = _CSRMatmul.apply(flat.t(), a, lambda: weight.csr(not transposed)).t().contiguous()
        out = out.reshape(*x.shape[:-1], out.shape[-1])
        return out if bias is None else out + bias


def sparsified_density(model) -> float:
    """Nonzeros over entries of the matrices `sparse_matmuls` would swap."""
    weights = [p for name, p in model.named_parameters() if name.endswith(SWAPPED_SUFFIXES)]
    nonzero = sum(int(torch.count_nonzero(w)) for w in weights)
    return nonzero / max(sum(w.numel() for w in weights), 1)


def use_csr(model, mode: bool | str = "auto") -> bool:
    """Whether `mode` (True, False or "auto") runs `model` with CSR matmuls."""
    if mode not in (True, False, "auto"):
        raise ValueError(f"sparse kernels mode must be True, False or 'auto'; got {mode!r}")
    if mode == "auto":  # measured on CPU only: on a GPU the dense path stays the default
        on_cpu = next(model.parameters()).device.type == "cpu"
        return on_cpu and sparsified_density(model) <= AUTO_MAX_DENSITY
    return bool(mode)


@contextlib.contextmanager
def sparse_matmuls(model, mode: bool | str = True) -> Iterator[bool]:
    """Run `model`'s sparsified matrices as CSR inside the body (see the module docstring);
    yields whether CSR is on (`mode="auto"` decides by density, False is a no-op). The weights
    are frozen inside: their `requires_grad` is off and they must not change; both, and the
    model's own parameters, are restored on exit, exception or not. Inside an active context
    another one (e.g. `Circuit.run` within `with sparse_matmuls(model):`) changes nothing."""
    targets = [(name, p) for name, p in model.named_parameters() if name.endswith(SWAPPED_SUFFIXES)]
    if any(isinstance(p, CSRWeight) for _, p in targets):  # nested in an active context: it rules
        yield True
        return
    if not use_csr(model, mode):
        yield False
        return
    swapped = []  # (module, attribute, original Parameter, its version)
    try:
        for name, param in targets:
            owner_name, attr = name.rsplit(".", 1)
            owner = model.get_submodule(owner_name)
            owner._parameters[attr] = CSRWeight.wrap(param)
            swapped.append((owner, attr, param, param._version))
        yield True
    finally:
        for owner, attr, param, _ in swapped:
            owner._parameters[attr] = param
    changed = [attr for _, attr, param, version in swapped if param._version != version]
    if changed:
        raise RuntimeError(f"weights changed inside sparse_matmuls ({', '.join(changed)}): the CSR "
                           "products used stale copies; the context is for frozen models")
