"""How well a model's logits solve a task: logit difference, binary cross-entropy, accuracy.

All three read only the final position of each prompt (`data.last_pos`), so right padding never
matters, and only the two candidate logits there.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor

from sparse_lens.tasks.dataset import TaskData


def final_logits(logits: Float[Tensor, "batch pos d_vocab"],
                 data: TaskData) -> Float[Tensor, "batch d_vocab"]:
    """The logits at each example's last prompt token: `logits[b, data.last_pos[b]]`."""
    if logits.ndim != 3 or logits.shape[0] != len(data):
        raise ValueError(f"logits must be [batch={len(data)}, pos, d_vocab], got {tuple(logits.shape)}")
    last_pos = data.last_pos.to(logits.device)
    if len(data) and int(last_pos.max()) >= logits.shape[1]:
        raise ValueError(f"logits have {logits.shape[1]} positions but a prompt ends at "
                         f"{int(last_pos.max())}")
    rows = torch.arange(len(data), device=logits.device)
    return logits[rows, last_pos]


def task_logit_diff(logits: Float[Tensor, "batch pos d_vocab"], data: TaskData) -> Float[Tensor, " batch"]:
    """[batch] logit(correct) - logit(contrast) at each prompt's final position."""
    last = final_logits(logits, data)
    rows = torch.arange(len(data), device=logits.device)
    return last[rows, data.correct.to(logits.device)] - last[rows, data.contrast.to(logits.device)]


def task_loss(logits: Float[Tensor, "batch pos d_vocab"], data: TaskData,
              reduction: Literal["mean", "sum", "none"] = "mean") -> Tensor:
    """Binary cross-entropy between the two candidates at the final position:
    `softplus(-(l_correct - l_contrast))` per example ([batch] with reduction="none"), averaged
    over examples by default. The paper's target task loss of 0.15 (nats) applies to this
    per-example mean."""
    per_example = F.softplus(-task_logit_diff(logits, data))
    if reduction == "none":
        return per_example
    if reduction == "mean":
        return per_example.mean()
    if reduction == "sum":
        return per_example.sum()
    raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")


def task_accuracy(logits: Float[Tensor, "batch pos d_vocab"], data: TaskData) -> float:
    """The fraction of examples with logit(correct) > logit(contrast) (ties count as wrong)."""
    return (task_logit_diff(logits, data) > 0).float().mean().item()
