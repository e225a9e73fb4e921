"""Evaluation primitives: a task's answer logits, its loss and accuracy, and the final-logit
calibration. Below both the search (`pruning`) and the `Circuit`, which evaluate through them.

The task loss is the per-example mean of binary cross-entropy over the two candidate logits at
the final position (`tasks.task_loss`); `pair_loss` is the same number from the `[n, 2]`
(correct, contrast) logits that `final_logit_pairs` collects.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from jaxtyping import Float

from sparse_lens.tasks import final_logits


def final_logit_pairs(model, data, masker=None, mask=None, batch_size: int = 128) -> Float[torch.Tensor, "n 2"]:
    """`[n, 2]` logits (correct, contrast) at each example's final position, in batches,
    without gradients. With `masker` (a `NodeMasker` attached to `model`), the batches run
    through it (`masker.logits`: resampling needs the batch) under `mask` if given, else its
    current mask; the masker's own mask is left as it was."""
    order = by_length(data)
    out = torch.empty(len(data), 2, device=data.tokens.device)
    with torch.no_grad():
        for start in range(0, len(data), batch_size):
            rows = order[start:start + batch_size]
            part = data[rows]  # trimmed to its longest prompt: similar lengths batch together
            if masker is None:
                logits = model(part.tokens)
            else:
                with masker.using(mask):
                    logits = masker.logits(model, part)
            out[rows.to(out.device)] = answer_pairs(logits, part).to(out.dtype)
    return out


def by_length(data) -> torch.Tensor:
    """Example indices sorted by prompt length (stable), on the CPU."""
    return torch.argsort(data.last_pos.cpu(), stable=True)


def answer_pairs(logits, data) -> Float[torch.Tensor, "batch 2"]:
    """[batch, 2] logits of (correct, contrast) at each example's final position."""
    last = final_logits(logits, data)
    rows = torch.arange(len(data), device=logits.device)
    return torch.stack([last[rows, data.correct], last[rows, data.contrast]], dim=1)


def pair_loss(pairs: Float[torch.Tensor, "n 2"]) -> float:
    """Mean binary cross-entropy of the correct candidate (nats)."""
    return F.softplus(pairs[:, 1] - pairs[:, 0]).mean().item()


def pair_accuracy(pairs: Float[torch.Tensor, "n 2"]) -> float:
    return (pairs[:, 0] > pairs[:, 1]).float().mean().item()


@dataclass
class Calibration:
    """Final-logit calibration: `logits * scale + bias[token]` for the task's candidate tokens."""

    scale: float
    bias: dict[int, float]

    def apply_pairs(self, pairs: torch.Tensor, data) -> torch.Tensor:
        tokens = torch.stack([data.correct, data.contrast], dim=1)
        b = self._bias_vector(int(tokens.max()) + 1 if tokens.numel() else 0, pairs.device)
        return pairs * self.scale + b[tokens.to(b.device)]

    def apply_logits(self, logits: torch.Tensor) -> torch.Tensor:
        out = logits * self.scale
        for token, value in self.bias.items():
            out[..., token] += value
        return out

    def _bias_vector(self, at_least: int, device) -> torch.Tensor:
        """The bias of every token id up to the largest biased one or `at_least - 1` (0 where
        none was fitted: a candidate the calibration never saw gets no bias)."""
        size = max(max(self.bias, default=-1) + 1, at_least)
        b = torch.zeros(size, device=device)
        for token, value in self.bias.items():
            b[token] = value
        return b


def fit_calibration(pairs: torch.Tensor, data, max_iter: int = 50) -> Calibration:
    """Fit `scale` and a bias per candidate token minimising the mean binary CE, with LBFGS."""
    tokens = sorted(set(data.correct.tolist()) | set(data.contrast.tolist()))
    index = {t: i for i, t in enumerate(tokens)}
    ci = torch.tensor([index[t] for t in data.correct.tolist()])
    xi = torch.tensor([index[t] for t in data.contrast.tolist()])
    pairs = pairs.detach().cpu().double()
    log_scale = torch.zeros((), dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(len(tokens), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([log_scale, bias], max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        diff = log_scale.exp() * (pairs[:, 0] - pairs[:, 1]) + bias[ci] - bias[xi]
        loss = F.softplus(-diff).mean()
        loss.backward()
        return loss

    opt.step(closure)
    return Calibration(scale=float(log_scale.detach().exp()),
                       bias={t: float(bias[i].detach()) for t, i in index.items()})


def calibrated_loss(pairs, data, calibration: Calibration | None) -> float:
    """`pair_loss` after `calibration` (if any)."""
    return pair_loss(calibration.apply_pairs(pairs, data) if calibration else pairs)
