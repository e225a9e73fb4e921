"""Checkpoints shipped inside the package: their compact format, where they live, how they were
made, and building a model class from one. Below the model (the class is the caller's);
`sparse_lens.pretrained` is the front door (`load`, `materialise`, shipping a run). See
`sparse_lens.pretrained` for the layout of `sparse_lens/pretrained_data/<name>/`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch

from sparse_lens import checkpoint
from sparse_lens.checkpoint import PROVENANCE_FILE
from sparse_lens.fingerprint import weights_digest

PRETRAINED_DIR = Path(__file__).parent / "pretrained_data"
WEIGHTS_FILE = "weights.safetensors"
LAYOUT_KEY = "sparse_lens.pretrained.layout"
#: store a parameter as mask + values when at most this fraction of its entries is nonzero
#: (a mask costs 1 bit an entry, the values 32 bits a nonzero)
SPARSE_MAX_DENSITY = 0.5
M = TypeVar("M", bound=torch.nn.Module)


# ------------------------------------------------------------------------------ the format
def pack_tensors(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """`tensors` (float32 parameters) as the compact layout: the safetensors tensors and the
    metadata that `unpack_tensors` needs. "Nonzero" means any bit set, so -0.0 is kept."""
    out: dict[str, torch.Tensor] = {}
    layout: dict[str, dict[str, Any]] = {}
    for name, t in tensors.items():
        t = t.detach().contiguous().cpu()
        if t.dtype != torch.float32:
            raise ValueError(f"pack_tensors stores float32 parameters; {name} is {t.dtype}")
        bits = t.view(torch.int32).reshape(-1)
        nonzero = bits != 0
        if t.numel() and nonzero.float().mean().item() <= SPARSE_MAX_DENSITY:
            out[f"{name}.mask"] = torch.from_numpy(np.packbits(nonzero.numpy()))
            out[f"{name}.values"] = t.reshape(-1)[nonzero].clone()
            layout[name] = dict(shape=list(t.shape), kind="mask+values")
        else:
            out[name] = t
            layout[name] = dict(shape=list(t.shape), kind="dense")
    return out, {LAYOUT_KEY: json.dumps(layout)}


def unpack_tensors(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> dict[str, torch.Tensor]:
    """The parameters `pack_tensors` stored, bit for bit."""
    if LAYOUT_KEY not in (metadata or {}):
        raise checkpoint.CheckpointError(f"not a packed checkpoint: no {LAYOUT_KEY!r} metadata")
    out = {}
    for name, spec in json.loads(metadata[LAYOUT_KEY]).items():
        shape = tuple(spec["shape"])
        if spec["kind"] == "dense":
            t = tensors[name]
        else:
            numel = int(np.prod(shape, dtype=np.int64))
            nonzero = torch.from_numpy(
                np.unpackbits(tensors[f"{name}.mask"].numpy(), count=numel).astype(bool))
            values = tensors[f"{name}.values"]
            if int(nonzero.sum()) != values.numel():
                raise checkpoint.CheckpointError(f"packed {name}: the mask and the values disagree")
            t = torch.zeros(numel, dtype=values.dtype)
            t[nonzero] = values
            t = t.reshape(shape)
        if tuple(t.shape) != shape:
            raise checkpoint.CheckpointError(f"packed {name}: shape {tuple(t.shape)}, expected {shape}")
        out[name] = t
    return out


def save_packed(tensors: dict[str, torch.Tensor], path: Path) -> None:
    from safetensors.torch import save_file

    packed, metadata = pack_tensors(tensors)
    save_file(packed, str(path), metadata=metadata)


def load_packed(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    if not path.is_file():
        raise checkpoint.CheckpointError(f"missing packed weights {path}")
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    try:
        return unpack_tensors(tensors, metadata)
    except (KeyError, checkpoint.CheckpointError) as err:
        detail = f"missing tensor or layout field {err}" if isinstance(err, KeyError) else str(err)
        raise checkpoint.CheckpointError(f"{path}: {detail}") from err


# ------------------------------------------------------------------------------ shipped models
def available() -> list[str]:
    """The names of the shipped checkpoints."""
    if not PRETRAINED_DIR.is_dir():
        return []
    return sorted(p.name for p in PRETRAINED_DIR.iterdir() if (p / WEIGHTS_FILE).is_file())


def path(name: str, root: Path | None = None) -> Path:
    """The directory of the shipped checkpoint `name`; ValueError naming the shipped ones."""
    d = (root or PRETRAINED_DIR) / name
    if not (d / WEIGHTS_FILE).is_file():
        known = available() if root is None else sorted(p.name for p in root.iterdir())
        raise ValueError(f"no shipped checkpoint {name!r}; shipped: {known}")
    return d


def provenance(name: str, root: Path | None = None) -> dict[str, Any]:
    """How the shipped checkpoint `name` was made (its `provenance.json`)."""
    return checkpoint.read_json(path(name, root) / PROVENANCE_FILE)


def describe(name: str, root: Path | None = None) -> str:
    """One line saying how the shipped checkpoint `name` was made."""
    return describe_record(provenance(name, root))


def describe_record(p: dict[str, Any]) -> str:
    """One line saying how a checkpoint with the provenance record `p` was made."""
    return (f"made by `{p['command']}` at commit {p['git_commit'][:10]} (preset {p['preset']}, "
            f"{p['steps']} steps, seed {p['seed']}, torch {p['torch_version']} on "
            f"{p['torch_threads']} CPU threads; validation loss {p['val_loss']:.4f} nats/token)")


def shipped_provenance_of(model_dir: str | Path) -> dict[str, Any] | None:
    """The provenance of the shipped checkpoint `model_dir` was materialised from, or None."""
    f = Path(model_dir) / PROVENANCE_FILE
    return checkpoint.read_json(f) if f.is_file() else None


def load_into(cls: type[M], name: str = "small", device: str | torch.device | None = None,
              root: Path | None = None) -> M:
    """The shipped checkpoint `name` as a model of `cls`, with the shipped tokenizer."""
    from sparse_lens.config import SparseHookedTransformerConfig
    from sparse_lens.tokenizer import load_tokenizer

    d = path(name, root)
    header = checkpoint.read_json(d / checkpoint.CONFIG_FILE)
    if "config" not in header:
        raise checkpoint.CheckpointError(f"{d / checkpoint.CONFIG_FILE} has no field 'config'")
    cfg = SparseHookedTransformerConfig.from_json_dict(
        header["config"], **({"device": str(device)} if device is not None else {}))
    tensors = load_packed(d / WEIGHTS_FILE)
    expected = provenance(name, root).get("weights_sha256")
    if expected is not None and weights_digest(tensors) != expected:
        raise checkpoint.CheckpointError(f"{d / WEIGHTS_FILE} does not unpack to the weights its "
                                         f"{PROVENANCE_FILE} records (sha256 {expected[:12]}...)")
    model = cls(cfg, tokenizer=load_tokenizer())
    checkpoint.load_parameters(model, tensors, source=d / WEIGHTS_FILE)
    model.loaded_from = d  # its provenance records the corpus (hooks.node_means_for)
    return model
