"""The training step with no host synchronisation, captured once in a CUDA graph and replayed.

On a GPU the small presets' step is bound by the host, not the arithmetic: the `wide` step at
batch 64 x 128 took 64 ms on an H200 (results/gpu/summary.md; 4x the batch cost 1.7x the time),
and a 1 x 4 batch, where the arithmetic is nothing, still took 13 ms forward and 35 ms forward
and backward on one (busy) CPU thread: Python and dispatch, paid per step. A CUDA graph
records the whole step once (forward, backward, gradient rescale, AdamW, projection) and replays
it with one launch. That needs a step whose shapes never change and which never reads a device
value on the host. `StaticStep` is that step:

- the model runs its reference kernels (`kernels.reference_kernels`: topk + scatter AbsTopK,
  TransformerLens's attention, norms and loss), none of which reads back (the fast paths are CPU
  kernels);
- AdamW is PyTorch's fused one with `capturable=True` and a tensor learning rate
  (`make_optimizer(..., capturable=True)`), written before each step;
- the gradient's global RMS rescale is computed on the device (`rescale_grad_rms_on_device_`);
- the projection (`StaticProjection`) ranks |w| with one stable sort per matrix and keeps the
  entries ranked below `max(k, units x j)`, each unit's `j` largest ranked first: exactly
  `sparsity.keep_mask`'s set (ties with the k-th largest: the lowest positions), with `k` a device
  tensor written when L0 changes;
- the loss and the gradient's RMS land in device scalars that the host reads once after the
  step; a non-finite one raises `NonFiniteLossError` like `train_step`. The weights in memory have
  then taken the bad step already; the loop stops without saving, so the last checkpoint is the
  good one, as with `train_step`.

On CUDA (`capture=True`, the default there) the first `WARMUP_STEPS` steps run eagerly on a side
stream (the allocator and the kernels' workspaces settle), the next is captured, and every step
from then on is a replay. Elsewhere the same step runs eagerly: the tests compare it with
`train_step` and check that it never reads a value back. The numbers differ from `train_step`'s
(reference kernels, a device-side rescale, AdamW's capturable form), so a run keeps to one step
kind from start to end (`TrainConfig.cuda_graph` is part of the run's settings).
"""

from __future__ import annotations

import contextlib
import math

import torch
from jaxtyping import Int

from sparse_lens import sparsity
from sparse_lens.kernels import reference_kernels
from sparse_lens.model import SparseHookedTransformer, SparsifiedMatrix
from sparse_lens.training.config import AUTOCAST_DTYPES, NonFiniteLossError, TrainConfig

#: eager steps on a side stream before the capture (PyTorch's recipe for whole-network capture: 3)
WARMUP_STEPS = 3


class StaticProjection:
    """`SparseHookedTransformer.project_weights_` with fixed shapes and no host reads: one stable
    descending sort of each matrix's scores per step, where a score is |w|, or +inf for the
    `min_nonzero_per_unit` largest of each output unit; the entries ranked `max(k, units x j)` or
    later are set to +0.0. `set_l0` writes each matrix's count to the device (outside a graph)."""

    def __init__(self, matrices: list[SparsifiedMatrix], min_per_unit: int):
        """`matrices`: what `model.sparsified_matrices()` returns; `min_per_unit`: the model's
        `cfg.min_nonzero_per_unit`."""
        self.matrices, self.min_per_unit = matrices, min_per_unit
        device = matrices[0].weight.device
        # (perm, permuted shape, units, fan-in, inverse perm) of each matrix, fixed for the run
        self.layouts = [(*layout, sorted(range(len(layout[0])), key=layout[0].__getitem__))
                        for layout in (sparsity.unit_layout(m.weight.shape, min_per_unit, m.unit_dims)
                                       for m in matrices)]
        self.kept = torch.zeros(len(self.matrices), dtype=torch.long, device=device)
        largest = max(m.weight.numel() for m in matrices)
        self.positions = torch.arange(largest, device=device)  # sliced per matrix: one buffer
        self.l0: float | None = None

    def set_l0(self, l0: float) -> None:
        """Write each matrix's kept count for density `l0` (`sparsity.project_`'s count)."""
        if l0 == self.l0:
            return
        counts = [max(sparsity.nonzero_budget(m.weight.numel(), l0), layout[2] * self.min_per_unit)
                  for m, layout in zip(self.matrices, self.layouts)]
        self.kept.copy_(torch.tensor(counts, dtype=torch.long))
        self.l0 = l0

    @torch.no_grad()
    def __call__(self) -> None:
        for i, (m, layout) in enumerate(zip(self.matrices, self.layouts)):
            scores = self._scores(m.weight, layout)
            order = torch.sort(scores.view(-1), descending=True, stable=True).indices
            rank = torch.empty_like(order).scatter_(0, order, self.positions[:order.numel()])
            m.weight.masked_fill_((rank >= self.kept[i]).view(m.weight.shape), 0)

    def _scores(self, weight: torch.Tensor, layout) -> torch.Tensor:
        """|w| (float32, contiguous), with each unit's `min_per_unit` largest set to +inf."""
        perm, permuted_shape, n_units, fan_in, inverse = layout
        scores = weight.detach().abs().float()
        if self.min_per_unit == 0 or n_units == 0:
            return scores
        units = scores.permute(perm).reshape(n_units, fan_in)
        protected = units.topk(self.min_per_unit, dim=1, sorted=False).indices
        units = units.scatter(1, protected, float("inf"))
        return units.view(permuted_shape).permute(inverse).contiguous()


@torch.no_grad()
def rescale_grad_rms_on_device_(grads: list[torch.Tensor], target: float, mode: str) -> torch.Tensor:
    """`step.rescale_grad_rms_` without reading the RMS on the host: scale every gradient by
    `target / rms` ("rescale", when rms > 0) or by `min(1, target / rms)` ("clip"). Returns the
    RMS before scaling, a device scalar."""
    n = sum(g.numel() for g in grads)
    rms = (torch.stack([g.float().pow(2).sum() for g in grads]).sum() / n).sqrt()
    limit = rms > 0 if mode == "rescale" else rms > target
    scale = torch.where(limit, target / rms, torch.ones_like(rms))
    torch._foreach_mul_(grads, scale)
    return rms


class StaticStep:
    """`train_step` for a fixed batch shape, as a CUDA graph on CUDA (see the module docstring).

    `optimizer` must be capturable with a tensor learning rate (`make_optimizer(model, tc,
    capturable=True)`); `capture` defaults to whether the model is on CUDA."""

    def __init__(self, model: SparseHookedTransformer, optimizer: torch.optim.Optimizer,
                 tc: TrainConfig, batch_shape: tuple[int, int], capture: bool | None = None):
        if not (optimizer.defaults.get("capturable") and torch.is_tensor(optimizer.param_groups[0]["lr"])):
            raise ValueError("StaticStep needs an AdamW built with make_optimizer(..., capturable=True)")
        self.model, self.optimizer, self.tc = model, optimizer, tc
        self.device = next(model.parameters()).device
        self.capture = self.device.type == "cuda" if capture is None else capture
        if self.capture and self.device.type != "cuda":
            raise ValueError(f"a CUDA graph needs the model on CUDA; it is on {self.device}")
        self.tokens = torch.zeros(batch_shape, dtype=torch.long, device=self.device)
        self.projection = (StaticProjection(model.sparsified_matrices(), model.cfg.min_nonzero_per_unit)
                           if model.cfg.is_weight_sparse else None)
        self.figures = torch.zeros(2, dtype=torch.float32, device=self.device)  # loss, grad RMS
        self.graph: torch.cuda.CUDAGraph | None = None
        self.eager_steps = 0

    def __call__(self, tokens: Int[torch.Tensor, "batch pos"], lr: float, l0: float) -> float:
        """One optimisation step on `tokens` at `lr` and density `l0`; returns the loss before it
        (nats/token). Raises `NonFiniteLossError` on a non-finite loss or gradient RMS."""
        if tuple(tokens.shape) != tuple(self.tokens.shape):
            raise ValueError(f"StaticStep was built for batches of shape {tuple(self.tokens.shape)}; "
                             f"got {tuple(tokens.shape)}")
        self.tokens.copy_(tokens)
        for group in self.optimizer.param_groups:
            group["lr"].fill_(lr)
        if self.projection is not None:
            self.projection.set_l0(l0)
        if self.graph is not None:
            self.graph.replay()
        elif self.capture and self.eager_steps >= WARMUP_STEPS:
            self.graph = self._captured()
            self.graph.replay()
        else:
            self._eager()
        loss, rms = self.figures.tolist()
        if not (math.isfinite(loss) and math.isfinite(rms)):
            raise NonFiniteLossError(f"non-finite loss {loss} or gradient RMS {rms}")
        return loss

    def _body(self) -> None:
        """The step itself: no host reads, no shape that depends on values."""
        self.optimizer.zero_grad(set_to_none=True)
        with reference_kernels(), self._autocast():
            loss = self.model(self.tokens, return_type="loss")
        loss.backward()
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        rms = rescale_grad_rms_on_device_(grads, self.tc.grad_rms, self.tc.grad_rms_mode)
        self.optimizer.step()
        if self.projection is not None:
            self.projection()
        self.figures.copy_(torch.stack([loss.detach().float(), rms]))

    def _autocast(self):
        """`step.autocast`, without its cast cache (which a graph must not keep across replays)."""
        dtype = AUTOCAST_DTYPES[self.tc.dtype]
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=dtype, cache_enabled=False)

    def _eager(self) -> None:
        if self.device.type == "cuda":  # warm-up: on a side stream, as the capture will be
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                self._body()
            torch.cuda.current_stream().wait_stream(stream)
        else:
            self._body()
        self.eager_steps += 1

    def _captured(self) -> torch.cuda.CUDAGraph:
        graph = torch.cuda.CUDAGraph()
        self.optimizer.zero_grad(set_to_none=True)  # the graph allocates the gradients it writes
        with torch.cuda.graph(graph):
            self._body()
        return graph
