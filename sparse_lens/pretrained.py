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
(`--git-commit SHA` when the run was trained at another commit than the tree holding it; see
`pack`); `sparse-lens demo` starts from the checkpoint of its preset (`wide` by default) when
its run directory has no model yet.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path

import torch

from sparse_lens import checkpoint, shipped
from sparse_lens.fingerprint import weights_digest
from sparse_lens.model import SparseHookedTransformer
from sparse_lens.shipped import (  # noqa: F401  (the format and the shipped directory, public here too)
    LAYOUT_KEY, PROVENANCE_FILE, SPARSE_MAX_DENSITY, WEIGHTS_FILE, available, describe,
    describe_record, load_packed, pack_tensors, path, provenance, save_packed, shipped_provenance_of,
    unpack_tensors,
)


def load(name: str = "small", device: str | torch.device | None = None,
         root: Path | None = None) -> SparseHookedTransformer:
    """The shipped checkpoint `name` as a model, with the shipped tokenizer."""
    return shipped.load_into(SparseHookedTransformer, name, device, root)


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


# ------------------------------------------------------------------------------ shipping one
def pack(run_dir: str | Path, name: str, command: str, root: Path | None = None,
         git_commit: str | None = None, preset: str | None = None) -> Path:
    """Ship the finished training run `run_dir` (from `sparse-lens train`) as `name`: its config,
    packed weights (checked to unpack exactly), and a provenance.json recording `command`, the
    git commit the run was trained at (`git_commit`: 40 hex digits; default: the HEAD of the
    source tree `run_dir` lies in, or this package's), and the run's own record (preset, seed,
    steps, validation loss, torch version and threads). The run must be finished and must use
    the shipped tokenizer. `preset`: the run is that preset (checked field by field, the name
    aside) though it was launched another way (e.g. `--preset small` with shape flags before the
    preset existed); the shipped config then carries the preset's `model_name`."""
    from sparse_lens.tokenizer import TOKENIZER_DIR, load_tokenizer

    if git_commit is not None and not re.fullmatch(r"[0-9a-f]{40}", git_commit):
        raise ValueError(f"git_commit must be a full commit hash (40 hex digits); got {git_commit!r}")
    run_dir = Path(run_dir)
    state = checkpoint.read_json(run_dir / "training" / "state.json")
    tc = state["train_config"]
    if state["step"] != tc["steps"]:
        raise ValueError(f"{run_dir} is unfinished (step {state['step']} of {tc['steps']})")
    used = load_tokenizer(run_dir / checkpoint.TOKENIZER_DIR).backend_tokenizer.to_str()
    if used != load_tokenizer(TOKENIZER_DIR).backend_tokenizer.to_str():
        raise ValueError(f"{run_dir} was trained with another tokenizer than the shipped one")
    header = checkpoint.read_json(run_dir / checkpoint.CONFIG_FILE)
    if preset is not None:
        header["config"]["model_name"] = _preset_name_for(header["config"], preset, run_dir)
    tensors = checkpoint.load_tensors(run_dir / checkpoint.WEIGHTS_FILE)
    final = [h for h in state["history"] if h["step"] == state["step"] and "val_loss" in h]
    if not final:
        raise ValueError(f"{run_dir} has no validation loss recorded at its last step")

    out = (root or shipped.PRETRAINED_DIR) / name
    out.mkdir(parents=True, exist_ok=True)
    (out / checkpoint.CONFIG_FILE).write_text(json.dumps(header, indent=2))
    save_packed(tensors, out / WEIGHTS_FILE)
    back = load_packed(out / WEIGHTS_FILE)
    for k, v in tensors.items():
        if not torch.equal(v.view(torch.int32), back[k].view(torch.int32)):
            raise AssertionError(f"packing {k} is not exact")
    record = dict(
        command=command,
        git_commit=git_commit or _git_commit(run_dir),
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


def _preset_name_for(config: dict, preset: str, run_dir: Path) -> str:
    """The `model_name` of `preset`, after checking that `config` (a config.json's "config") is
    that preset in every other field."""
    from sparse_lens.config import PRESETS, preset_differences

    diffs = [k for k in preset_differences(config, preset) if k != "model_name"]
    if diffs:
        raise ValueError(f"{run_dir} is not the {preset!r} preset: it differs in {', '.join(diffs)}")
    return PRESETS[preset]["model_name"]


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
    parser.add_argument("--git-commit", default=None,
                        help="the commit run_dir was trained at (default: HEAD of the tree it lies in)")
    parser.add_argument("--preset", default=None,
                        help="the preset the run is (checked), if it was launched another way")
    args = parser.parse_args(argv)
    out = pack(args.run_dir, args.name, args.command, root=args.root, git_commit=args.git_commit,
               preset=args.preset)
    size = sum(f.stat().st_size for f in out.iterdir())
    print(f"{out}: {size / 1e6:.2f} MB; {describe(args.name, args.root)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
