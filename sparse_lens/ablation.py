"""Ablation modes: what a node outside the circuit is replaced by, for the search and the checks.

==============  ==================================================================================
mode            a pruned node takes, at every position
==============  ==================================================================================
`mean`          its mean over the pretraining corpus (the paper's choice; `hooks.means`)
`zero`          0
`task_mean`     its mean over the task's own prompts (every real, non-padding position)
`resample`      its activation in *another* prompt of the same batch (a clean, unmasked pass on
                that prompt), at the same absolute position
==============  ==================================================================================

Resampling and prompt lengths: each prompt of a batch draws its donor by a random derangement of
the batch (seeded, so the same batch always gets the same donors: evaluations stay
deterministic). Prompts are right-padded, so positions 0..len-1 of two prompts line up; where the
donor is shorter than the prompt (positions past the donor's last token), the node takes its
task mean instead (`Ablation.values`). A batch of one prompt has no other prompt to draw from: it
gets the task mean everywhere. Pruning batches are windows of length-sorted prompts, so donors
are close in length and the fallback is rare.

    ablation = Ablation.build("resample", model, corpus_means, task_data)
    with ablated_nodes(model, registry, mask, ablation) as masker:
        logits = masker.logits(model, batch)      # a TaskData batch: donors come from it
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from jaxtyping import Float, Int

from sparse_lens.hooks import NodeRegistry
from sparse_lens.hooks.masking import NodeMasker, attached

#: The ablation modes, the search's default first.
ABLATION_MODES: tuple[str, ...] = ("mean", "zero", "task_mean", "resample")


def check_mode(mode: str) -> str:
    """`mode` if it is one of `ABLATION_MODES`; ValueError naming them otherwise."""
    if mode not in ABLATION_MODES:
        raise ValueError(f"unknown ablation mode {mode!r}; modes are {', '.join(ABLATION_MODES)}")
    return mode


@torch.no_grad()
def task_means(model, registry: NodeRegistry, data, batch_size: int = 64) -> Float[torch.Tensor, " n_nodes"]:
    """Every node's mean over all real (non-padding) positions of the prompts in `data` (a
    `TaskData`), from a clean forward pass (the same pass, AbsTopK included, that masking
    hooks into). Sums in float64."""
    sums = {s.hook_name: torch.zeros(s.size, dtype=torch.float64, device=model.cfg.device)
            for s in registry.sites}
    count = 0
    for batch in data.batches(batch_size):
        batch = batch.to(model.cfg.device)
        real = torch.arange(batch.tokens.shape[1], device=model.cfg.device)[None, :] <= batch.last_pos[:, None]

        def accumulate(activation: torch.Tensor, hook) -> None:
            flat = activation.flatten(2)[real]  # [n_real, site size]
            sums[hook.name] += flat.sum(0, dtype=torch.float64)

        model.run_with_hooks(batch.tokens, return_type=None,
                             fwd_hooks=[(s.hook_name, accumulate) for s in registry.sites])
        count += int(real.sum())
    if count == 0:
        raise ValueError("task_means needs at least one prompt")
    return (torch.cat([sums[s.hook_name] for s in registry.sites]) / count).to(model.cfg.dtype)


@dataclass(frozen=True)
class Ablation:
    """An ablation mode and its constant replacement values ([n_nodes]: the corpus means for
    `mean`, zeros for `zero`, the task means for `task_mean` and as `resample`'s fallback).
    `seed` fixes resampling's donor draws."""

    mode: str
    values: Float[torch.Tensor, " n_nodes"]
    seed: int = 0

    def __post_init__(self) -> None:
        check_mode(self.mode)

    @classmethod
    def build(cls, mode: str, model, corpus_means: Float[torch.Tensor, " n_nodes"], data=None,
              seed: int = 0) -> Ablation:
        """The ablation `mode` for `model`; `data` (a `TaskData`) gives the task means that
        `task_mean` and `resample` need."""
        check_mode(mode)
        if mode == "mean":
            values = corpus_means
        elif mode == "zero":
            values = torch.zeros_like(corpus_means)
        else:
            if data is None:
                raise ValueError(f"ablation mode {mode!r} needs the task's prompts (data=...)")
            values = task_means(model, NodeRegistry.for_model(model), data)
        return cls(mode, values.detach().to(model.cfg.device), seed)


def derangement(n: int, seed: int) -> Int[torch.Tensor, " n"]:
    """A random permutation of 0..n-1 with no fixed point (one cycle through a shuffled order),
    the same for the same (n, seed). `n` must be >= 2."""
    if n < 2:
        raise ValueError(f"a derangement needs n >= 2; got {n}")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    donors = torch.empty(n, dtype=torch.long)
    donors[order] = order.roll(-1)
    return donors


class AblationMasker(NodeMasker):
    """A `NodeMasker` for any `Ablation`. Constant modes behave exactly like mean ablation with
    other values. Per-batch replacements (resampling, or interchange patching with explicit
    donors) need `logits(model, data, donors)`, which records the donors' clean activations
    first; a plain `model(tokens)` call then refuses, unless every node is kept."""

    def __init__(self, registry: NodeRegistry, mask: torch.Tensor, ablation: Ablation):
        super().__init__(registry, mask, ablation.values)
        self.ablation = ablation
        self._replacement: dict[str, torch.Tensor] | None = None  # [batch, pos, *site shape]
        self._recording: dict[str, torch.Tensor] | None = None

    def hook_for(self, hook_name: str):
        constant = super().hook_for(hook_name)

        def ablate(activation: torch.Tensor, hook) -> torch.Tensor:
            if self._recording is not None:  # the donors' clean pass
                self._recording[hook_name] = activation.detach()
                return activation
            if self._replacement is not None:
                r = self._replacement[hook_name]
                return r + (activation - r) * self._mask_parts[hook_name]
            if self.ablation.mode == "resample" and not bool((self.mask == 1).all()):
                raise RuntimeError("resample ablation needs the batch: call masker.logits(model, data)")
            return constant(activation, hook)

        ablate.__name__ = f"sparse_lens_ablate[{hook_name}]"
        return ablate

    def logits(self, model, data, donors=None) -> Float[torch.Tensor, "batch pos d_vocab"]:
        """Logits on the `TaskData` batch `data` under the current mask. Ablated nodes take the
        activations of `donors` (a `TaskData` as long as `data`, row for row) if given; else, in
        `resample` mode, of other prompts of `data` (see the module docstring); else the
        constant values."""
        if donors is None and (self.ablation.mode != "resample" or len(data) < 2):
            return model(data.tokens)
        if donors is None:
            donors = data[derangement(len(data), self.ablation.seed)]
        if len(donors) != len(data):
            raise ValueError(f"donors must have one prompt per prompt of data ({len(data)}); got {len(donors)}")
        self._replacement = self._donor_activations(model, donors, data.tokens.shape[1])
        try:
            return model(data.tokens)
        finally:
            self._replacement = None

    @torch.no_grad()
    def _donor_activations(self, model, donors, width: int) -> dict[str, torch.Tensor]:
        """Each site's clean activations on `donors`, cut or extended to `width` positions:
        positions past a donor's last token take the constant values (task means)."""
        self._recording = {}
        try:
            model(donors.tokens.to(model.cfg.device), return_type=None)
            recorded = self._recording
        finally:
            self._recording = None
        device = model.cfg.device
        valid = torch.arange(width, device=device)[None, :] <= donors.last_pos.to(device)[:, None]
        out = {}
        for name, activation in recorded.items():
            fill = self._mean_parts[name].expand(len(donors), width, *activation.shape[2:]).clone()
            shared = min(width, activation.shape[1])
            keep = valid[:, :shared]
            fill[:, :shared][keep] = activation[:, :shared][keep]
            out[name] = fill
        return out


@contextmanager
def ablated_nodes(
    model,
    registry: NodeRegistry,
    mask: Float[torch.Tensor, " n_nodes"],
    ablation: Ablation,
) -> Iterator[AblationMasker]:
    """`hooks.masked_nodes` for any ablation mode: nodes with mask 0 take `ablation`'s
    replacement. Run batches through `masker.logits(model, data)`; hooks are removed on exit."""
    ablation = Ablation(ablation.mode, ablation.values.to(model.cfg.device), ablation.seed)
    with attached(model, AblationMasker(registry, mask.to(model.cfg.device), ablation)) as masker:
        yield masker
