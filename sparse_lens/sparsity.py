"""Weight sparsity: the top-k projection with a per-unit floor, and the L0 and LR schedules.

The method of Gao et al. (2025), "Weight-sparse transformers have interpretable circuits": after
every optimizer step each sparsified matrix is projected onto the set of matrices with at most
`k = floor(L0 * numel)` nonzeros by keeping its `k` largest-magnitude entries and zeroing the rest,
except that no *output unit* (a neuron, a head's q/k/v channel, a residual channel written, a
token's embedding, a logit) may be left with fewer than `min_per_unit` nonzeros. The target L0 is
reached gradually (`l0_at_step`), and the learning rate is scaled by `1 / sqrt(L0)`
(`lr_at_step`).

Everything here is a pure function of tensors and integers; nothing imports the model.

Layout. A weight is viewed as a set of output units (the axes in `unit_dims`) each with a fan-in
(the remaining axes), in TransformerLens layout for example:

=========  ======================  =========  =========================
matrix     shape                   unit_dims  fan-in of one unit
=========  ======================  =========  =========================
W_E        [d_vocab, d_model]      (0,)       d_model
W_Q/K/V    [n_heads, d_model, dh]  (0, 2)     d_model
W_O        [n_heads, dh, d_model]  (2,)       n_heads * dh
W_in       [d_model, d_mlp]        (1,)       d_model
W_out      [d_mlp, d_model]        (1,)       d_mlp
W_U        [d_model, d_vocab]      (1,)       d_model
=========  ======================  =========  =========================

Selection method. `project_` on CPU float32, with the fast kernels on (`kernels`), runs the
native kernel (`native.selection.project_`): one bisection on the magnitudes' bit patterns for
the k-th largest, the per-unit counts, and the zeroing, in C (the `small` preset's 26 matrices:
5.0 ms against 23.2 ms, `benchmarks/bench_training.py`); where the plain top-k leaves a unit
under its floor, or elsewhere, it runs `keep_mask`. (Ties with the k-th largest |w|: the native
kernel keeps the lowest positions, `keep_mask` those `torch.topk` returns.) There the floor is
one `topk(j)` along the fan-in of a `[units, fan_in]` view, and the global selection over the
rest is exact top-r: on CPU, for large matrices, it first narrows the candidates with a
threshold estimated from a fixed-seed random sample (n // 64 entries, clamped to [2**12,
2**16]; set a few standard deviations *below* the r-th largest, so that almost surely at least
r entries pass), then runs `topk(r)` on them, or over everything if fewer than r pass: always exact, and 4-5x
faster than `torch.topk` on a 2048 x 8192 weight. CUDA (and small inputs) use `torch.topk`.
"""

from __future__ import annotations

import functools
import math
import numbers
import operator
from collections.abc import Sequence

import torch
from jaxtyping import Bool, Float

from sparse_lens.kernels import fast_kernels_enabled
from sparse_lens.native import selection

__all__ = ["nonzero_budget", "unit_layout", "units_view", "keep_mask", "project_", "l0_at_step", "lr_at_step",
           "ANNEAL_KINDS"]

#: The interpolations `l0_at_step` supports.
ANNEAL_KINDS = ("linear", "exponential")

# Sampled pre-selection: sample size bounds (n // 64, clamped), safety margin (in binomial
# standard deviations), and the smallest matrix it is used for (below, a plain topk is as fast).
_SAMPLE_SIZE_MIN = 1 << 12
_SAMPLE_SIZE_MAX = 1 << 16
_SAMPLE_MARGIN_SIGMAS = 5.0
_SAMPLE_MIN_NUMEL = 1 << 15
_SAMPLE_SEED = 0


# ----------------------------------------------------------------------------- budgets and views
def nonzero_budget(numel: int, l0: float) -> int:
    """The number of nonzeros a matrix of `numel` entries may keep at density `l0`:
    `max(1, floor(numel * l0))`. `l0` must be in (0, 1]."""
    _check_l0(l0, "l0")
    if numel < 1:
        raise ValueError(f"numel must be >= 1; got {numel}")
    return max(1, math.floor(numel * l0))


def _check_l0(value: float, name: str) -> None:
    if not (isinstance(value, numbers.Real) and 0.0 < value <= 1.0):
        raise ValueError(f"{name} must be in (0, 1]; got {value!r}")


def _normalize_unit_dims(ndim: int, unit_dims: Sequence[int]) -> tuple[int, ...]:
    """`unit_dims` as non-negative axes, validated (in range, no repeats)."""
    try:
        dims = tuple(int(d) for d in unit_dims)
    except TypeError as err:
        raise ValueError(f"unit_dims must be a tuple of axes; got {unit_dims!r}") from err
    out = []
    for d in dims:
        if not -ndim <= d < ndim:
            raise ValueError(f"unit_dims={dims} has axis {d} out of range for a {ndim}-D weight")
        out.append(d % ndim)
    if len(set(out)) != len(out):
        raise ValueError(f"unit_dims={dims} repeats an axis")
    return tuple(out)


def _as_int(value: object, name: str) -> int:
    try:
        return operator.index(value)  # type: ignore[arg-type]
    except TypeError as err:
        raise ValueError(f"{name} must be an integer; got {value!r}") from err


def unit_layout(
    shape: Sequence[int], min_per_unit: int, unit_dims: Sequence[int]
) -> tuple[tuple[int, ...], tuple[int, ...], int, int]:
    """Validate `min_per_unit` and `unit_dims` against `shape`; return the permutation putting
    unit axes first, the permuted shape, the number of units and the fan-in of each."""
    min_per_unit = _as_int(min_per_unit, "min_per_unit")
    if min_per_unit < 0:
        raise ValueError(f"min_per_unit must be >= 0; got {min_per_unit}")
    perm, n_unit_axes = _unit_permutation(len(shape), unit_dims)
    permuted_shape = tuple(int(shape[d]) for d in perm)
    n_units = math.prod(permuted_shape[:n_unit_axes])
    fan_in = math.prod(permuted_shape[n_unit_axes:])
    if min_per_unit > fan_in:
        raise ValueError(
            f"min_per_unit={min_per_unit} exceeds the fan-in {fan_in} of each unit of a weight of "
            f"shape {tuple(shape)} with unit_dims={tuple(unit_dims)}"
        )
    return perm, permuted_shape, n_units, fan_in


def _unit_permutation(ndim: int, unit_dims: Sequence[int]) -> tuple[tuple[int, ...], int]:
    """The permutation putting the unit axes first (in the order given), then the fan-in axes
    (in their original order); and the number of unit axes."""
    dims = _normalize_unit_dims(ndim, unit_dims)
    rest = tuple(d for d in range(ndim) if d not in dims)
    return dims + rest, len(dims)


def units_view(
    weight: Float[torch.Tensor, "*shape"], unit_dims: Sequence[int]
) -> Float[torch.Tensor, "units fan_in"]:
    """`weight` as a `[n_units, fan_in]` matrix: row `u` holds the fan-in of output unit `u`.

    The unit axes (`unit_dims`, in the order given) are flattened into rows, the remaining axes
    (in their original order) into columns. A view when the layout allows it, else a copy (e.g.
    for `unit_dims=(1,)` of a 2-D weight), so treat it as read-only. An empty `unit_dims` means
    one unit with the whole tensor as its fan-in; all axes means units with fan-in 1."""
    perm, n_unit_axes = _unit_permutation(weight.dim(), unit_dims)
    shape = weight.shape
    n_units = math.prod(shape[d] for d in perm[:n_unit_axes])
    fan_in = math.prod(shape[d] for d in perm[n_unit_axes:])
    return weight.permute(perm).reshape(n_units, fan_in)


# ------------------------------------------------------------------------------------ selection
def _topk_flat_mask(scores: Float[torch.Tensor, " n"], r: int) -> Bool[torch.Tensor, " n"]:
    """Boolean mask of exactly `r` largest entries of the 1-D `scores` (`0 < r <= n`)."""
    mask = torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)
    mask[_topk_flat_indices(scores, r)] = True
    return mask


def _topk_flat_indices(scores: Float[torch.Tensor, " n"], r: int) -> torch.Tensor:
    """Indices of exactly `r` largest entries of the 1-D `scores` (`0 < r <= n`), unsorted.

    On CPU for large inputs: prefilter with a threshold estimated from a fixed-seed sample, then
    an exact `topk` over the candidates, falling back to a plain `topk` if the prefilter let
    through fewer than `r` entries. Exact either way; deterministic (the sample's seed is fixed)."""
    n = scores.numel()
    if scores.device.type == "cpu" and n >= _SAMPLE_MIN_NUMEL and r < n:
        m = min(max(n // 64, _SAMPLE_SIZE_MIN), _SAMPLE_SIZE_MAX)
        p = r / n
        # rank, within the sample, of a value safely below the r-th largest of the full tensor
        rank = max(1, math.ceil(m * p + _SAMPLE_MARGIN_SIGMAS * math.sqrt(m * p * (1.0 - p)) + 16))
        if rank < m:
            sample = scores[_sample_indices(n, m)]
            lo = sample.topk(rank, sorted=False).values.min()
            candidates = torch.nonzero(scores >= lo).squeeze(1)
            if candidates.numel() >= r:
                return candidates[scores[candidates].topk(r, sorted=False).indices]
    return scores.topk(r, sorted=False).indices


@functools.lru_cache(maxsize=64)
def _sample_indices(n: int, m: int) -> torch.Tensor:
    """`m` indices into `range(n)`, uniform with replacement from a fixed seed (cached: the
    same matrices are projected every step)."""
    gen = torch.Generator().manual_seed(_SAMPLE_SEED)
    return torch.randint(n, (m,), generator=gen)


@torch.no_grad()
def keep_mask(weight: Float[torch.Tensor, "*shape"], k: int, min_per_unit: int,
              unit_dims: Sequence[int]) -> Bool[torch.Tensor, "*shape"]:
    """Which entries of `weight` the projection keeps: the `k` largest |w|, with a per-unit floor.

    Args:
        weight: any float tensor (not modified), viewed as output units (the axes `unit_dims`)
            each with a fan-in (the other axes); see the module docstring for TransformerLens
            layouts.
        k: the global budget of kept entries, `0 <= k <= weight.numel()`.
        min_per_unit: `j`, the fewest entries any unit keeps (`0` = no floor); `j <= fan_in`.
        unit_dims: the axes that index output units (negative axes allowed).

    Returns:
        A bool tensor of `weight`'s shape with exactly `max(k, n_units * j)` True entries: the `j`
        largest |w| of every unit (protected), plus the `max(k - n_units * j, 0)` largest |w|
        among the unprotected entries. When `n_units * j > k` the result is denser than the
        budget `k`; that is by design and callers must report it (see
        `SparseHookedTransformer.weight_sparsity`). With `j == 0` this is plain global top-k.
        Ties are broken deterministically (by `torch.topk`).
    """
    k = _as_int(k, "k")
    if not 0 <= k <= weight.numel():
        raise ValueError(f"k must be in [0, numel={weight.numel()}]; got {k}")
    perm, permuted_shape, n_units, fan_in = unit_layout(weight.shape, min_per_unit, unit_dims)

    # |w| in weight's own layout (one weight-sized temporary); the mask too, so that project_'s
    # masked_fill_ and the global selection run on contiguous memory.
    shape = weight.shape
    scores = torch.empty(shape, dtype=weight.dtype, device=weight.device)
    torch.abs(weight.detach(), out=scores)
    mask = torch.zeros(shape, dtype=torch.bool, device=weight.device)

    if 0 < n_units * min_per_unit <= k and k > 0:
        # Fast path: the plain top-k. If it already gives every unit >= j entries, it *is* the
        # answer: each unit's j largest are then inside it, and the rest of it is the top
        # (k - n_units * j) of what remains. After the L0 anneal this is the usual case, and it
        # skips the per-unit top-j (the costliest part of the projection).
        mask.view(-1)[_topk_flat_indices(scores.view(-1), k)] = True
        if int(units_view(mask, unit_dims).sum(dim=1).min()) >= min_per_unit:
            return mask
        mask.zero_()

    if min_per_unit > 0 and n_units > 0:
        _protect_floor_(scores, mask, perm, permuted_shape, n_units, fan_in, min_per_unit)

    rest = max(k - n_units * min_per_unit, 0)
    if rest > 0:
        mask.view(-1)[_topk_flat_indices(scores.view(-1), rest)] = True
    return mask


def _protect_floor_(scores: torch.Tensor, mask: torch.Tensor, perm: Sequence[int], permuted_shape,
                    n_units: int, fan_in: int, min_per_unit: int) -> None:
    """The floor: set in `mask` the `min_per_unit` largest scores of every unit, and mark them in
    `scores` (-1) so that the global selection never picks them again. On a [units, fan_in] view
    when the layout has one (e.g. W_in, W_out, W_U, W_E, W_O), else on a copy (W_Q/K/V)."""
    units_scores = _view_or_none(scores.permute(perm), (n_units, fan_in))
    if units_scores is not None:
        units_mask = mask.permute(perm).view(n_units, fan_in)
        protected = units_scores.topk(min_per_unit, dim=1, sorted=False).indices
        units_mask.scatter_(1, protected, True)
        units_scores.scatter_(1, protected, -1.0)  # |w| >= 0: protected are never re-picked
    else:
        units_scores = scores.permute(perm).reshape(n_units, fan_in)
        protected = units_scores.topk(min_per_unit, dim=1, sorted=False).indices
        del units_scores
        units_mask = torch.zeros((n_units, fan_in), dtype=torch.bool, device=mask.device)
        units_mask.scatter_(1, protected, True)
        inverse = sorted(range(len(perm)), key=perm.__getitem__)
        mask.copy_(units_mask.view(permuted_shape).permute(inverse))
        del units_mask
        scores.masked_fill_(mask, -1.0)


def _view_or_none(tensor: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor | None:
    """`tensor.view(shape)` if the strides allow a view (sharing memory), else None."""
    try:
        return tensor.view(shape)
    except RuntimeError:
        return None


@torch.no_grad()
def project_(
    weight: Float[torch.Tensor, "*shape"],
    l0: float,
    min_per_unit: int,
    unit_dims: Sequence[int],
) -> int:
    """Project `weight` in place onto its top-`l0` fraction with a per-unit floor.

    Zeroes every entry outside `keep_mask(weight, nonzero_budget(weight.numel(), l0),
    min_per_unit, unit_dims)` (ties with the k-th largest: see the module docstring); kept
    entries are left bit-identical. Works on `nn.Parameter`s (no autograd record), on any device
    and float dtype. `l0 == 1.0` is a no-op (dense). Returns the number of entries kept,
    `max(nonzero_budget(numel, l0), n_units * min_per_unit)` (`numel` when `l0 == 1`); entries
    that were already zero count as kept if selected.
    """
    _check_l0(l0, "l0")
    numel = weight.numel()
    _, _, n_units, _ = unit_layout(weight.shape, min_per_unit, unit_dims)  # validates the arguments
    if l0 == 1.0:
        return numel
    k = nonzero_budget(numel, l0)
    if not (fast_kernels_enabled() and selection.project_(weight, k, min_per_unit, unit_dims)):
        drop = keep_mask(weight, k, min_per_unit, unit_dims).logical_not_()
        weight.masked_fill_(drop, 0)
    return max(k, n_units * min_per_unit)


# ------------------------------------------------------------------------------------ schedules
def l0_at_step(
    step: int,
    total_steps: int,
    target: float,
    dense_frac: float = 0.01,
    anneal_end_frac: float = 0.5,
    kind: str = "linear",
) -> float:
    """The weight density (fraction of nonzeros, L0) to project onto at optimizer step `step`.

    Dense (1.0) for `step < dense_frac * total_steps`; then annealed from 1.0 down to `target`,
    which is reached at `step >= anneal_end_frac * total_steps` and held after. `kind="linear"`
    interpolates L0 linearly, `kind="exponential"` interpolates log(L0) linearly (geometric
    decay: equal *ratios* per step). Non-increasing in `step`. `target == 1.0` is always 1.0.

    Args:
        step: the 0-based optimizer step (>= 0).
        total_steps: the run's length in steps (>= 1).
        target: the final L0, in (0, 1].
        dense_frac, anneal_end_frac: fractions of `total_steps`,
            `0 <= dense_frac <= anneal_end_frac <= 1`.
        kind: "linear" or "exponential".
    """
    _check_schedule_args(step, total_steps)
    _check_l0(target, "target")
    if not (isinstance(dense_frac, numbers.Real) and 0.0 <= dense_frac <= 1.0):
        raise ValueError(f"dense_frac must be in [0, 1]; got {dense_frac!r}")
    if not (isinstance(anneal_end_frac, numbers.Real) and dense_frac <= anneal_end_frac <= 1.0):
        raise ValueError(
            f"anneal_end_frac must be in [dense_frac, 1] = [{dense_frac}, 1]; got {anneal_end_frac!r}"
        )
    if kind not in ANNEAL_KINDS:
        raise ValueError(f"kind must be one of {ANNEAL_KINDS}; got {kind!r}")
    if target == 1.0:
        return 1.0
    dense_end = dense_frac * total_steps
    anneal_end = anneal_end_frac * total_steps
    if step >= anneal_end:
        return float(target)
    if step < dense_end:
        return 1.0
    frac = (step - dense_end) / (anneal_end - dense_end)  # in [0, 1); anneal_end > dense_end here
    if kind == "linear":
        value = 1.0 + frac * (target - 1.0)
    else:
        value = math.exp(frac * math.log(target))
    return min(1.0, max(float(target), value))


def lr_at_step(
    step: int,
    total_steps: int,
    base_lr: float,
    l0: float,
    warmup_frac: float = 0.01,
) -> float:
    """The learning rate at optimizer step `step`: the paper's "sharkfin" schedule,
    `base_lr * shape(step) / sqrt(l0)`.

    `shape` warms up linearly, `(step + 1) / warmup_steps` with
    `warmup_steps = max(1, ceil(warmup_frac * total_steps))` (so step 0 already has a nonzero
    LR and step `warmup_steps - 1` the full one), then decays linearly to 0 at `step ==
    total_steps` (0 after too). Dividing by `sqrt(l0)` raises the LR as the weights get sparser
    (fewer nonzeros each need larger updates); with `l0` annealed by `l0_at_step` the LR curve
    rises during warmup, keeps rising while L0 falls, then decays linearly: a shark fin.

    Args:
        step: the 0-based optimizer step (>= 0).
        total_steps: the run's length in steps (>= 1).
        base_lr: the LR of a dense model at the end of warmup (>= 0).
        l0: the current weight density, in (0, 1] (usually `l0_at_step(step, ...)`).
        warmup_frac: the fraction of `total_steps` spent warming up, in [0, 1].
    """
    _check_schedule_args(step, total_steps)
    _check_l0(l0, "l0")
    if not (isinstance(base_lr, numbers.Real) and base_lr >= 0 and math.isfinite(base_lr)):
        raise ValueError(f"base_lr must be a finite number >= 0; got {base_lr!r}")
    if not (isinstance(warmup_frac, numbers.Real) and 0.0 <= warmup_frac <= 1.0):
        raise ValueError(f"warmup_frac must be in [0, 1]; got {warmup_frac!r}")
    warmup_steps = max(1, math.ceil(warmup_frac * total_steps - 1e-9))  # 1e-9: float noise
    if step >= total_steps:
        shape = 0.0
    elif step < warmup_steps:
        shape = (step + 1) / warmup_steps
    else:
        shape = (total_steps - step) / (total_steps - warmup_steps)
    return base_lr * shape / math.sqrt(l0)


def _check_schedule_args(step: int, total_steps: int) -> None:
    if _as_int(total_steps, "total_steps") < 1:
        raise ValueError(f"total_steps must be >= 1; got {total_steps!r}")
    if _as_int(step, "step") < 0:
        raise ValueError(f"step must be >= 0; got {step!r}")
