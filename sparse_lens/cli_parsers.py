"""What each `sparse-lens` subcommand accepts: its flags, added when the subcommand is used
(`cli_flags.LazyParser`). Flags for config fields are made from the dataclasses
(`cli_flags.add_config_flags`); the analyses declare their own (`analyses.add_arguments`)."""

from __future__ import annotations

import argparse
from pathlib import Path

from sparse_lens.cli_flags import LazyParser, add_config_flags

ABLATION_CHOICES = ("mean", "zero", "task_mean", "resample")  # sparse_lens.ablation.ABLATION_MODES


#: The model fields `train` may override on top of its preset (a new shape: `--d-model 384 --d-mlp 1536`).
MODEL_SHAPE_FIELDS = ["weight_l0", "n_layers", "d_model", "d_mlp", "d_head", "n_ctx"]
MODEL_SHAPE_HELP = {"weight_l0": "fraction of nonzeros per matrix (default: the preset's)",
                    **{f: "the preset's unless given" for f in MODEL_SHAPE_FIELDS[1:]}}


def add_train_flags(t: argparse.ArgumentParser) -> None:
    from sparse_lens.config import PRESETS, SparseHookedTransformerConfig
    from sparse_lens.training import TrainConfig

    t.add_argument("--preset", default=None,
                   help=f"model preset: {', '.join(PRESETS)} (default small)")
    t.add_argument("--out", type=Path, default=None, help="run directory (default runs/<preset>[-dense])")
    t.add_argument("--dense", action="store_true", help="train the dense baseline (weight_l0 = 1)")
    add_config_flags(t, SparseHookedTransformerConfig, MODEL_SHAPE_FIELDS, help=MODEL_SHAPE_HELP,
                     show_defaults=False)
    add_config_flags(t, TrainConfig, choices=dict(dtype=("float32", "bf16"), anneal_kind=(
        "linear", "exponential"), grad_rms_mode=("rescale", "clip")), help=TRAIN_HELP)
    t.add_argument("--resume", action="store_true",
                   help="continue the run in --out with its saved settings (flags given must match them)")
    t.add_argument("--overwrite", action="store_true",
                   help="start a new run even if --out already holds a model (replaces it)")
    t.add_argument("--no-progress", action="store_true")
    t.epilog = ("Data-parallel: torchrun --standalone --nproc_per_node=N -m sparse_lens train ... "
                "(--batch-size is then per process; the global batch is N times it).")


#: `train`'s help where the command line says more than TrainConfig's comments
TRAIN_HELP = dict(
    device="cpu or cuda (under torchrun: one GPU a process)",
    dtype="float32, or bf16: the forward pass under bfloat16 autocast (for CUDA)",
    cuda_graph="capture the whole step once in a CUDA graph and replay it (training.graphed; "
    "the small presets' GPU step is launch-bound; off CUDA it runs eagerly, slower)",
    sources="directories, files or globs of .py files (default: the standard library)",
    max_files="use a deterministic subset of files",
    snapshot_every="keep a model directory every N steps in <out>/snapshots/ (learning curves)",
    anneal_kind="how weight L0 falls to its target", grad_rms_mode="what a large gradient gets")
#: `prune`'s help for PruneConfig's fields
PRUNE_HELP = dict(
    level="task level: core (the named behaviour) or hard (with distractors)",
    source="task examples generated or taken from real code (the stdlib validation "
    "files; quote and bracket tasks; all means those)",
    steps="mask-optimisation steps", calibrate="fit a logit scale and bias (LBFGS)",
    ablation="what pruned nodes take: the mean over the corpus, zero, the task's own mean, "
    "or another task prompt's activation (resample)", progress="show progress bars")
PRUNE_CHOICES = dict(level=("core", "hard"), source=("generated", "corpus"), ablation=ABLATION_CHOICES)


def add_prune_flags(p: argparse.ArgumentParser) -> None:
    from sparse_lens.pruning import PruneConfig

    p.add_argument("--model", type=Path, required=True, help="model directory (from `train`)")
    p.add_argument("--task", nargs="+", default=["all"], help="task names, or all (default)")
    p.add_argument("--out", type=Path, default=None, help="output directory (default <model>/circuits)")
    add_config_flags(p, PruneConfig, exclude=["sparse_kernels"], help=PRUNE_HELP, choices=PRUNE_CHOICES)
    p.add_argument("--device", default=None, help="cpu (default) or cuda")
    p.add_argument("--no-verify", action="store_true", help="skip the verification table")
    p.add_argument("--jobs", type=int, default=1,
                   help="prune tasks in N processes (with --device cuda, spread over the GPUs); "
                   "the circuits are those of the serial run")


def add_demo_flags(d: argparse.ArgumentParser) -> None:
    d.add_argument("--out", type=Path, default=None, help="run directory (default runs/<preset>)")
    d.add_argument("--preset", default=None,
                   help="wide (default) or small: the checkpoint shipped for it is used")
    d.add_argument("--steps", type=int, default=None,
                   help="training steps (default: those the shipped checkpoint records; the demo prints them)")
    d.add_argument("--retrain", action="store_true",
                   help="train from scratch instead of copying the shipped checkpoint (hours on 2 CPU "
                   "cores; the demo prints its estimate); a training run already in --out is resumed "
                   "or reused")
    d.add_argument("--tasks", nargs="+", default=None, help="tasks to prune (default: four)")
    d.add_argument("--target-loss", type=float, default=None,
                   help="task loss a circuit must reach (default 0.15, the paper's; a task the "
                   "full model misses gets no circuit)")
    d.add_argument("--no-progress", action="store_true")


def add_faithfulness_flags(f: argparse.ArgumentParser) -> None:
    from sparse_lens.faithfulness import FaithfulnessConfig
    from sparse_lens.pruning import PruneConfig

    f.add_argument("--model", type=Path, required=True, help="model directory (from `train`)")
    f.add_argument("--task", default="all", help="a task name, or all (default)")
    f.add_argument("--circuits", type=Path, default=None,
                   help="directory of saved circuits (default <model>/circuits)")
    f.add_argument("--out", type=Path, default=None, help="where the tables go (default --circuits)")
    add_config_flags(f, PruneConfig, FAITHFULNESS_PRUNE_FIELDS, choices=PRUNE_CHOICES, help=dict(
        target_loss="for circuits pruned here", k_coef="penalty per kept node, for circuits pruned here",
        steps="mask-optimisation steps, for circuits pruned "
        "here", ablation="for circuits pruned here", level="task level, for circuits pruned here"))
    add_config_flags(f, FaithfulnessConfig, ["n", "draws", "control_steps", "controls", "seed"],
                     help=dict(controls="the nonsense and random-model searches"))
    f.add_argument("--device", default=None, help="cpu (default) or cuda")


FAITHFULNESS_PRUNE_FIELDS = ("target_loss", "k_coef", "steps", "ablation", "level", "progress")


def add_report_flags(r: argparse.ArgumentParser) -> None:
    r.add_argument("--model", type=Path, required=True, help="model directory (from `train`)")
    r.add_argument("--circuits", type=Path, default=None,
                   help="directory of saved circuits, one subdirectory each (default <model>/circuits)")
    r.add_argument("--out", type=Path, default=None, help="HTML file (default <model>/report.html)")
    r.add_argument("--prompts", type=int, default=4, help="task prompts per view (default 4)")
    r.add_argument("--verify-prompts", type=int, default=128,
                   help="held-out prompts for each circuit's verification table (default 128)")
    r.add_argument("--corpus-files", type=int, default=200,
                   help="standard-library files whose validation part gives the corpus snippets")
    r.add_argument("--device", default=None, help="cpu (default) or cuda")


def add_import_flags(i: argparse.ArgumentParser) -> None:
    i.add_argument("path", type=Path, help="the release model folder")
    i.add_argument("out", type=Path, help="the sparse_lens model directory to write")
    i.add_argument("--tokenizer", type=Path, default=None,
                   help="the release's tinypython_2k folder (encoder.json + vocab.bpe)")


def add_analyze_flags(a: argparse.ArgumentParser) -> None:
    from functools import partial

    from sparse_lens import analyses

    names = a.add_subparsers(dest="analysis", required=True, parser_class=LazyParser, metavar="NAME")
    for name, text in analyses.ABOUT.items():
        names.add_parser(name, help=text, description=text, conflict_handler="resolve",
                         populate=partial(analyses.add_arguments, name=name))
