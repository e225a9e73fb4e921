"""`sparse-lens bridges ...`: train a bridged sparse model, tabulate hybrid KLs, carry an edit.

    sparse-lens bridges train --dense runs/small-dense --out runs/small-bridged --steps 300
    sparse-lens bridges eval  --dense runs/small-dense --model runs/small-bridged --out results/bridges
    sparse-lens bridges edit  --dense runs/small-dense --model runs/small-bridged --out results/bridges

Only argparse is imported at module level, so `sparse-lens --help` stays fast.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def add_bridges_parser(sub) -> None:
    """Add the `bridges` command (with its subcommands) to the `sparse-lens` subparsers."""
    b = sub.add_parser("bridges", help="bridge a dense model and a weight-sparse one (train, eval, edit)",
                       description="Bridges map the residual stream of a dense model to a weight-sparse "
                       "model's and back at every layer boundary, so that an edit in the sparse "
                       "model can be carried into the dense one.")
    bsub = b.add_subparsers(dest="bridges_command", required=True)
    _add_train_parser(bsub)
    _add_eval_parser(bsub)
    _add_edit_parser(bsub)


def _add_train_parser(bsub) -> None:
    t = bsub.add_parser("train", help="train a sparse model with its bridges against a frozen dense model")
    t.add_argument("--dense", type=Path, required=True,
                   help="the dense model directory (e.g. runs/small-dense)")
    t.add_argument("--out", type=Path, required=True, help="the bridged model directory to write")
    t.add_argument("--preset", default=None, help="sparse model preset (default: the dense model's shape)")
    t.add_argument("--weight-l0", type=float, default=None, help="sparse model's fraction of nonzeros")
    t.add_argument("--init-from", type=Path, default=None,
                   help="continue training this sparse model directory (L0 held at its target)")
    t.add_argument("--steps", type=int, default=None)
    t.add_argument("--batch-size", type=int, default=None)
    t.add_argument("--seq-len", type=int, default=None)
    t.add_argument("--lr", type=float, default=None)
    t.add_argument("--seed", type=int, default=None)
    t.add_argument("--hybrid-sites", type=int, default=None,
                   help="sites whose hybrid passes run per step (default: all 2L+1)")
    t.add_argument("--encoder-topk", default="0.25", help="AbsTopK fraction after the encoders, or none")
    t.add_argument("--max-files", type=int, default=None)
    t.add_argument("--eval-every", type=int, default=None)
    t.add_argument("--checkpoint-every", type=int, default=None)
    t.add_argument("--device", default=None)
    t.add_argument("--resume", action="store_true",
                   help="continue the bridged run in --out with its saved settings")
    t.add_argument("--overwrite", action="store_true",
                   help="start a new run even if --out already holds a model (replaces it)")
    t.add_argument("--no-progress", action="store_true")
    t.set_defaults(func=cmd_bridges_train)


def _add_eval_parser(bsub) -> None:
    e = bsub.add_parser("eval", help="the table of hybrid-pass KL at each residual site")
    e.add_argument("--dense", type=Path, required=True)
    e.add_argument("--model", type=Path, required=True, help="the bridged model directory")
    e.add_argument("--batches", type=int, default=8, help="validation batches (default 8)")
    e.add_argument("--batch-size", type=int, default=8)
    e.add_argument("--max-files", type=int, default=None, help="corpus subset (default: the whole stdlib)")
    e.add_argument("--out", type=Path, default=None, help="folder for hybrid_kl.csv / hybrid_kl.md")
    e.add_argument("--device", default=None)
    e.set_defaults(func=cmd_bridges_eval)


def _add_edit_parser(bsub) -> None:
    d = bsub.add_parser("edit", help="perturb a sparse-model node, carry it into the dense model")
    d.add_argument("--dense", type=Path, required=True)
    d.add_argument("--model", type=Path, required=True, help="the bridged model directory")
    d.add_argument("--task", default="single_double_quote")
    d.add_argument("--node", default="auto",
                   help="a node label like L1.mlp_write[12], or auto: among the circuit's nodes (or, "
                   "with --target-loss none or no circuit, all nodes) that best separate the task's "
                   "two classes, the one whose edit moves the sparse model most (see --candidates)")
    d.add_argument("--target-loss", default="0.7",
                   help="prune to this task loss to find the circuit the auto node comes from "
                   "(default 0.7; none: no pruning)")
    d.add_argument("--candidates", type=int, default=16,
                   help="with --node auto: how many of the best-separating nodes to try on the sparse "
                   "model (train prompts); the one whose edit moves it most is carried (default 16)")
    d.add_argument("--prune-steps", type=int, default=100)
    d.add_argument("--strength", type=float, default=1.0,
                   help="shift = strength x (other class's mean - own class's mean)")
    d.add_argument("--n", type=int, default=256, help="test prompts (default 256)")
    d.add_argument("--out", type=Path, default=None, help="folder for edit_*.csv / edit.md")
    d.add_argument("--device", default=None)
    d.add_argument("--no-progress", action="store_true")
    d.set_defaults(func=cmd_bridges_edit)


# ------------------------------------------------------------------------------ train
def cmd_bridges_train(args: argparse.Namespace) -> int:
    from sparse_lens.bridges.training import BridgeTrainConfig, train_bridged
    from sparse_lens.config import SparseHookedTransformerConfig
    from sparse_lens.model import SparseHookedTransformer
    from sparse_lens.training import TrainConfig

    device = args.device or "cpu"
    dense = SparseHookedTransformer.from_pretrained(args.dense, device=device)
    if args.resume:  # the saved sparse model, bridges and settings
        print(f"resuming the bridged run in {args.out}")
        return _report_bridged(train_bridged(dense, None, None, args.out, progress=not args.no_progress,
                                             dense_ref=str(args.dense), resume=True))
    tc_fields = dict(steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len, lr=args.lr,
                     seed=args.seed, device=device, max_files=args.max_files,
                     eval_every=args.eval_every, checkpoint_every=args.checkpoint_every)
    tc_fields = {k: v for k, v in tc_fields.items() if v is not None}
    if args.init_from is not None:
        if args.preset or args.weight_l0:
            raise ValueError("--init-from takes the sparse model as it is: drop --preset / --weight-l0")
        sparse = SparseHookedTransformer.from_pretrained(args.init_from, device=device)
        tc_fields.update(dense_frac=0.0, anneal_end_frac=0.0)  # already at its L0
    else:
        overrides = {} if args.weight_l0 is None else {"weight_l0": args.weight_l0}
        if args.preset:
            sparse = SparseHookedTransformerConfig.preset(args.preset, **overrides)
        else:  # the dense model's architecture, weight-sparse
            dense_cfg = dense.cfg.to_json_dict()
            dense_cfg["weight_l0"] = overrides.get("weight_l0", 1 / 16)
            dense_cfg["model_name"] = f"{dense.cfg.model_name}-bridged"
            sparse = SparseHookedTransformerConfig.from_json_dict(dense_cfg)
    topk = None if str(args.encoder_topk).lower() == "none" else float(args.encoder_topk)
    config = BridgeTrainConfig(train=TrainConfig(**tc_fields), hybrid_sites=args.hybrid_sites,
                               encoder_topk_frac=topk)
    print(f"training a bridged sparse model against {args.dense} for {config.train.steps} steps "
          f"({'all' if args.hybrid_sites is None else args.hybrid_sites} sites' hybrid passes per step)")
    return _report_bridged(train_bridged(dense, sparse, config, args.out, progress=not args.no_progress,
                                         dense_ref=str(args.dense), overwrite=args.overwrite))


def _report_bridged(result) -> int:
    last = result.history[-1]
    print(f"saved to {result.out_dir} ({result.seconds:.0f} s)")
    print(f"validation: sparse CE {last['val_ce']:.4f}, KL(dense||sparse) {last['val_kl']:.4f}, "
          f"hybrid KL d->s {last['val_hybrid_d2s']:.4f}, s->d {last['val_hybrid_s2d']:.4f} "
          f"(mean over sites), encoder NMSE {last['val_enc_nmse']:.3f}, "
          f"decoder NMSE {last['val_dec_nmse']:.3f}")
    return 0


# ------------------------------------------------------------------------------- eval
def cmd_bridges_eval(args: argparse.Namespace) -> int:
    from sparse_lens import data
    from sparse_lens.bridges.hybrid import hybrid_kl_table

    dense, sparse, bridges = _load_pair(args)
    corpus = data.load_corpus(None, sparse.tokenizer, max_files=args.max_files)
    seq_len = min(dense.cfg.n_ctx, sparse.cfg.n_ctx)
    batches = data.validation_batches(corpus.val, args.batch_size, seq_len, args.batches)
    table = hybrid_kl_table(dense, sparse, bridges, batches)
    base = table.attrs["kl_dense_sparse"]
    n_tokens = args.batches * args.batch_size * seq_len
    text = (f"Hybrid-pass KL (nats/token) at each residual site, {n_tokens:,} held-out tokens "
            f"(standard-library validation files).\n\n"
            f"KL(dense || sparse), the two models themselves: {base:.4f}\n\n"
            + markdown_table(table.drop(columns=["hook_name"])))
    print(text)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        table.assign(kl_dense_sparse=base).to_csv(args.out / "hybrid_kl.csv", index=False)
        (args.out / "hybrid_kl.md").write_text(text + "\n")
        print(f"written to {args.out / 'hybrid_kl.csv'} and hybrid_kl.md")
    return 0


# ------------------------------------------------------------------------------- edit
def cmd_bridges_edit(args: argparse.Namespace) -> int:
    from sparse_lens.bridges.edit import (
        choose_edit_node, class_flip_shift, class_separation, node_shift, task_edit_effect,
    )
    from sparse_lens.hooks import NodeRegistry
    from sparse_lens.tasks import get_task

    dense, sparse, bridges = _load_pair(args)
    registry = NodeRegistry.for_model(sparse)
    probe = get_task(args.task, sparse.tokenizer, n=args.n, split="train", seed=0)
    test = get_task(args.task, sparse.tokenizer, n=args.n, split="test", seed=0)
    separation = class_separation(sparse, probe, registry)
    target = None if str(args.target_loss).lower() == "none" else float(args.target_loss)
    row, notes = choose_edit_node(sparse, args.task, probe, separation, args.node, target,
                                  args.candidates, args.prune_steps, args.strength,
                                  model_dir=args.model, progress=not args.no_progress)
    edit = node_shift(registry, int(row.id), class_flip_shift(row, test.labels, args.strength))
    table, summary = task_edit_effect(dense, sparse, bridges, test, edit)
    first = int((test.labels == 0).nonzero()[0])
    a, b = test.correct_str[first], test.contrast_str[first]
    head = (f"Edit: {edit.label} (hook {edit.hook_name}, index {edit.index}) of the sparse model, at each "
            f"prompt's last token, shifted by {args.strength} x (other class's mean - own class's mean); "
            f"class means on {args.n} train prompts: {row.mean_0:.4f} (class 0, answer {a!r}), "
            f"{row.mean_1:.4f} (class 1, answer {b!r}), separation {row.separation:.2f} pooled std.\n"
            f"Carried into the dense model through the decoder at the first bridge site after the node; "
            f"{len(test)} test prompts of {args.task}. a = {a!r}, b = {b!r}; d_logodds = change of "
            f"log P(a) - log P(b); expected: down on class 0 prompts, up on class 1. control = the dense "
            f"model given a random residual change of the same norm.\n")
    text = head + "\n" + "\n".join(notes) + "\n\n" + markdown_table(summary)
    print(text)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        summary.to_csv(args.out / "edit_summary.csv", index=False)
        table.to_csv(args.out / "edit_prompts.csv", index=False)
        separation.head(50).to_csv(args.out / "edit_separation_top50.csv", index=False)
        (args.out / "edit.md").write_text(text + "\n")
        doc = dict(node=edit.label, node_id=edit.node_id, strength=args.strength, task=args.task)
        (args.out / "edit.json").write_text(json.dumps(doc, indent=1))
        print(f"written to {args.out}/edit_summary.csv, edit_prompts.csv, edit.md")
    return 0


# ---------------------------------------------------------------------------- helpers
def _load_pair(args):
    from sparse_lens.bridges.training import load_bridged
    from sparse_lens.model import SparseHookedTransformer

    device = args.device or "cpu"
    sparse, bridges = load_bridged(args.model, device=device)
    dense = SparseHookedTransformer.from_pretrained(args.dense, device=device)
    bridges.check_pair(dense, sparse)
    dense.eval()
    sparse.eval()
    return dense, sparse, bridges


def markdown_table(frame, digits: int = 4) -> str:
    """A pandas DataFrame as a GitHub markdown table (floats to `digits` places)."""
    import numpy as np

    def cell(v) -> str:
        return f"{v:.{digits}f}" if isinstance(v, (float, np.floating)) else str(v)

    lines = ["| " + " | ".join(map(str, frame.columns)) + " |",
             "|" + "|".join("---" for _ in frame.columns) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join(lines)


if __name__ == "__main__":  # pragma: no cover
    sys.exit("run through `sparse-lens bridges ...`")
