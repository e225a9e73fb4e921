"""The `sparse-lens` command. Heavy imports (torch, TransformerLens) happen inside subcommands,
so `sparse-lens --help` answers at once."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sparse-lens",
        description="Weight-sparse transformers and their circuits, in TransformerLens.")
    sub = parser.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a weight-sparse (or --dense) model on Python source",
                       description="Train a weight-sparse transformer (or the dense baseline) on "
                       "the running interpreter's standard library, or on --sources.")
    t.add_argument("--preset", default="small", help="model preset: tiny, small, paper (default small)")
    t.add_argument("--out", type=Path, default=None, help="run directory (default runs/<preset>[-dense])")
    t.add_argument("--dense", action="store_true", help="train the dense baseline (weight_l0 = 1)")
    t.add_argument("--weight-l0", type=float, default=None, help="fraction of nonzeros per matrix")
    t.add_argument("--steps", type=int, default=None)
    t.add_argument("--batch-size", type=int, default=None)
    t.add_argument("--seq-len", type=int, default=None)
    t.add_argument("--lr", type=float, default=None, help="base learning rate (before 1/sqrt(L0))")
    t.add_argument("--seed", type=int, default=None)
    t.add_argument("--device", default=None, help="cpu (default) or cuda")
    t.add_argument("--sources", nargs="+", default=None,
                   help="directories, files or globs of .py files (default: the standard library)")
    t.add_argument("--max-files", type=int, default=None, help="use a deterministic subset of files")
    t.add_argument("--eval-every", type=int, default=None)
    t.add_argument("--checkpoint-every", type=int, default=None)
    t.add_argument("--resume", action="store_true", help="continue the run in --out")
    t.add_argument("--no-progress", action="store_true")
    t.set_defaults(func=cmd_train)
    return parser


def cmd_train(args: argparse.Namespace) -> int:
    from sparse_lens.config import SparseHookedTransformerConfig
    from sparse_lens.training import TrainConfig, train

    overrides = {} if args.weight_l0 is None else {"weight_l0": args.weight_l0}
    if args.dense:
        overrides["weight_l0"] = 1.0
    model_cfg = SparseHookedTransformerConfig.preset(args.preset, **overrides)
    tc_fields = dict(steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len,
                     lr=args.lr, seed=args.seed, device=args.device, sources=args.sources,
                     max_files=args.max_files, eval_every=args.eval_every,
                     checkpoint_every=args.checkpoint_every)
    tc = TrainConfig(**{k: v for k, v in tc_fields.items() if v is not None})
    out = args.out or Path("runs") / f"{args.preset}{'-dense' if args.dense else ''}"
    kind = "dense baseline" if not model_cfg.is_weight_sparse else f"weight L0 {model_cfg.weight_l0:.4g}"
    print(f"training {args.preset} ({kind}) for {tc.steps} steps of {tc.batch_size} x "
          f"{tc.seq_len or model_cfg.n_ctx} tokens on {'the standard library' if not tc.sources else tc.sources}")
    result = train(model_cfg, tc, out, resume=args.resume, progress=not args.no_progress)
    table = result.model.weight_sparsity()
    print(f"saved to {result.out_dir}")
    print(f"validation loss {result.val_loss:.4f} nats/token "
          f"(unigram baseline {result.unigram_val_loss:.4f}); {result.seconds:.0f} s")
    if model_cfg.is_weight_sparse:
        print(f"weights: {table.nonzeros.sum():,} nonzeros of {table.numel.sum():,} "
              f"(achieved L0 {table.nonzeros.sum() / table.numel.sum():.4f}, "
              f"target {model_cfg.weight_l0:.4f}); fewest nonzeros of any unit: "
              f"{table.min_nonzeros_per_unit.min()}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as err:
        print(f"sparse-lens {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
