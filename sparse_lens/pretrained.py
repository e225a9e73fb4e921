"""Checkpoints shipped inside the package, stored compactly, and how they were made.

`sparse_lens/pretrained_data/<name>/` holds a model the project's own training command produced:

    config.json                 the model directory's config.json, unchanged
    weights.safetensors         the parameters, compact: a parameter that is mostly zeros is stored
                                as `<name>.mask` (its nonzero pattern, one bit per entry, packed
                                with numpy's `packbits`) and `<name>.values` (its nonzeros in
                                row-major order); any other parameter as `<name>`. Shapes and
                                layouts are in the safetensors metadata. Exact: the weights
                                unpack bit for bit (-0.0 and NaN included).
    provenance.json             the command that made it, the git commit, seed, steps, torch
                                version and thread count, the resulting validation loss, and
                                a SHA-256 of the weights (checked on every load)

No optimizer state is shipped (a shipped model cannot be resumed, only used or retrained), and
no tokenizer: the shipped one (`sparse_lens.tokenizer`), which `pack` checks the run used.

    sparse_lens.pretrained.load("small")                  # a SparseHookedTransformer
    sparse_lens.pretrained.materialise("small", "runs/small")   # an ordinary model directory

Maintainers ship a new one with `python -m sparse_lens.pretrained RUN_DIR NAME --command "..."`
(see `pack`); `sparse-lens demo` starts from `small` when its run directory has no model yet.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from sparse_lens import checkpoint
from sparse_lens.fingerprint import weights_digest

if TYPE_CHECKING:
    from sparse_lens.model import SparseHookedTransformer

PRETRAINED_DIR = Path(__file__).parent / "pretrained_data"
WEIGHTS_FILE = "weights.safetensors"
PROVENANCE_FILE = "provenance.json"
LAYOUT_KEY = "sparse_lens.pretrained.layout"
#: store a parameter as mask + values when at most this fraction of its entries is nonzero
#: (a mask costs 1 bit an entry, the values 32 bits a nonzero)
SPARSE_MAX_DENSITY = 0.5


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


def load(name: str = "small", device: str | torch.device | None = None,
         root: Path | None = None) -> SparseHookedTransformer:
    """The shipped checkpoint `name` as a model, with the shipped tokenizer."""
    from sparse_lens.config import SparseHookedTransformerConfig
    from sparse_lens.model import SparseHookedTransformer
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
    model = SparseHookedTransformer(cfg, tokenizer=load_tokenizer())
    checkpoint.load_parameters(model, tensors, source=d / WEIGHTS_FILE)
    model.loaded_from = d  # its provenance records the corpus (hooks.node_means_for)
    return model


def materialise(name: str, out_dir: str | Path, root: Path | None = None) -> Path:
    """Write the shipped checkpoint `name` as an ordinary model directory at `out_dir` (config,
    safetensors weights, tokenizer) with its `provenance.json` beside them. Like training, this
    replaces only those entries of `out_dir`."""
    import shutil

    source = path(name, root)
    model = load(name, root=root)
    return checkpoint.save_model(
        model, Path(out_dir),
        write_extra=lambda tmp: shutil.copyfile(source / PROVENANCE_FILE, tmp / PROVENANCE_FILE))


def shipped_provenance_of(model_dir: str | Path) -> dict[str, Any] | None:
    """The provenance of the shipped checkpoint `model_dir` was materialised from, or None."""
    f = Path(model_dir) / PROVENANCE_FILE
    return checkpoint.read_json(f) if f.is_file() else None


# ------------------------------------------------------------------------------ shipping one
def pack(run_dir: str | Path, name: str, command: str, root: Path | None = None) -> Path:
    """Ship the finished training run `run_dir` (from `sparse-lens train`) as `name`: its config,
    packed weights (checked to unpack exactly), and a provenance.json recording `command`, the
    git commit of the source tree `run_dir` lies in (or this package's), and the run's own
    record (preset, seed, steps, validation loss, torch version and threads). The run must be
    finished and must use the shipped tokenizer."""
    from sparse_lens.tokenizer import TOKENIZER_DIR, load_tokenizer

    run_dir = Path(run_dir)
    state = checkpoint.read_json(run_dir / "training" / "state.json")
    tc = state["train_config"]
    if state["step"] != tc["steps"]:
        raise ValueError(f"{run_dir} is unfinished (step {state['step']} of {tc['steps']})")
    used = load_tokenizer(run_dir / checkpoint.TOKENIZER_DIR).backend_tokenizer.to_str()
    if used != load_tokenizer(TOKENIZER_DIR).backend_tokenizer.to_str():
        raise ValueError(f"{run_dir} was trained with another tokenizer than the shipped one")
    header = checkpoint.read_json(run_dir / checkpoint.CONFIG_FILE)
    tensors = checkpoint.load_tensors(run_dir / checkpoint.WEIGHTS_FILE)
    final = [h for h in state["history"] if h["step"] == state["step"] and "val_loss" in h]
    if not final:
        raise ValueError(f"{run_dir} has no validation loss recorded at its last step")

    out = (root or PRETRAINED_DIR) / name
    out.mkdir(parents=True, exist_ok=True)
    (out / checkpoint.CONFIG_FILE).write_text(json.dumps(header, indent=2))
    save_packed(tensors, out / WEIGHTS_FILE)
    back = load_packed(out / WEIGHTS_FILE)
    for k, v in tensors.items():
        if not torch.equal(v.view(torch.int32), back[k].view(torch.int32)):
            raise AssertionError(f"packing {k} is not exact")
    record = dict(
        command=command,
        git_commit=_git_commit(run_dir),
        preset=header["config"].get("model_name", "").removeprefix("sparse-"),
        seed=tc["seed"], steps=state["step"], batch_size=tc["batch_size"],
        val_loss=final[0]["val_loss"], unigram_val_loss=state["unigram_val_loss"],
        weights_sha256=weights_digest(tensors),
        torch_version=state.get("torch_version"), torch_threads=state.get("torch_threads"),
        python_version=sys.version.split()[0],
        corpus="the standard library of the Python above" if tc["sources"] is None else tc["sources"],
        train_config=tc,
        history=state["history"],
        note="Bitwise reproducible with the same command, commit, torch build, CPU and thread count "
             "(sparse_lens.training); elsewhere a retrain gives close but not identical weights.",
    )
    (out / PROVENANCE_FILE).write_text(json.dumps(record, indent=1) + "\n")
    return out


def _git_commit(where: Path) -> str:
    """HEAD of the git checkout `where` lies in (else this package's), "-dirty" when tracked
    files differ from it; "unknown" outside git."""
    def git(folder: Path, *args: str) -> str:
        return subprocess.run(["git", *args], cwd=folder, capture_output=True, text=True,
                              check=True).stdout.strip()

    for folder in (where if where.is_dir() else where.parent, Path(__file__).parent):
        try:
            dirty = git(folder, "status", "--porcelain", "--untracked-files=no")
            return git(folder, "rev-parse", "HEAD") + ("-dirty" if dirty else "")
        except (OSError, subprocess.CalledProcessError):
            continue
    return "unknown"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sparse_lens.pretrained",
                                     description="Ship a finished training run as a packed checkpoint.")
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("name")
    parser.add_argument("--command", required=True, help="the exact command that trained run_dir")
    parser.add_argument("--root", type=Path, default=None, help="default: the package's pretrained_data")
    args = parser.parse_args(argv)
    out = pack(args.run_dir, args.name, args.command, root=args.root)
    size = sum(f.stat().st_size for f in out.iterdir())
    print(f"{out}: {size / 1e6:.2f} MB; {describe(args.name, args.root)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
