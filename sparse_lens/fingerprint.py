"""One definition of "these weights": a SHA-256 over parameter names, shapes, dtypes and bytes.

Every check that something belongs to a model's exact weights uses these two functions: a saved
circuit (`Circuit.load`), bridges and their dense model (`Bridges.check_pair`), a checkpoint and
the `provenance.json` that records how it was made (`checkpoint.check_recorded_digest`,
`pretrained`). Bytes are read as raw storage, so bf16 and other dtypes NumPy lacks hash too.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping

import torch


def weights_digest(tensors: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 (hex) over each tensor's name, shape, dtype and bytes, in name order: the same
    for a model and its packed copy, and for two bitwise-identical training runs."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous().cpu()
        h.update(f"{name}\0{tuple(t.shape)}\0{t.dtype}\0".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def model_fingerprint(model: torch.nn.Module) -> str:
    """SHA-256 (hex) of a model's weights (`weights_digest` of its named parameters) and, when
    it has one, its config (`model.cfg.to_json_dict()`): two models share a fingerprint exactly
    when they compute the same function from the same bytes."""
    h = hashlib.sha256(weights_digest(dict(model.named_parameters())).encode())
    cfg = getattr(model, "cfg", None)
    if cfg is not None and hasattr(cfg, "to_json_dict"):
        h.update(json.dumps(cfg.to_json_dict(), sort_keys=True, default=str).encode())
    return h.hexdigest()
