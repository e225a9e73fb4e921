"""The `sparse-lens` command. Heavy imports (torch, TransformerLens) happen inside subcommands,
so `sparse-lens --help` answers at once."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from sparse_lens.cli_flags import LazyParser, given_fields
from sparse_lens.cli_parsers import (
    FAITHFULNESS_PRUNE_FIELDS, MODEL_SHAPE_FIELDS, add_analyze_flags, add_demo_flags, add_faithfulness_flags,
    add_import_flags, add_prune_flags, add_report_flags, add_train_flags,
)


def build_parser() -> argparse.ArgumentParser:
    """The `sparse-lens` parser. Each subcommand's flags are added when it is used (`LazyParser`),
    so `sparse-lens --help` imports no config module (torch)."""
    parser = argparse.ArgumentParser(
        prog="sparse-lens",
        description="Weight-sparse transformers and their circuits, in TransformerLens.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=LazyParser)
    for name, (func, populate, text, description) in SUBCOMMANDS.items():
        if name == "bridges":
            from sparse_lens.bridges.cli import add_bridges_parser  # argparse only: --help stays fast

            add_bridges_parser(sub)
            continue
        sub.add_parser(name, help=text, description=description, populate=populate).set_defaults(func=func)
    return parser


def cmd_train(args: argparse.Namespace) -> int:
    from sparse_lens import distributed

    ranks = distributed.init_from_env(args.device or "cpu")  # a single process without torchrun
    try:
        return _train_command(args, ranks)
    finally:
        distributed.shutdown()


def _train_command(args: argparse.Namespace, ranks) -> int:
    import dataclasses
    import logging

    from sparse_lens import distributed
    from sparse_lens.config import SparseHookedTransformerConfig
    from sparse_lens.training import NonFiniteLossError, TrainConfig, TrainingInterrupted, saved_configs, train

    preset = args.preset or "small"
    out = args.out or Path("runs") / f"{preset}{'-dense' if args.dense else ''}"
    overrides = given_fields(args, SparseHookedTransformerConfig, MODEL_SHAPE_FIELDS)
    if args.dense:
        overrides["weight_l0"] = 1.0
    tc_fields = given_fields(args, TrainConfig)
    if args.resume:  # the saved settings, with what was given on top (checked against them)
        model_cfg, tc = saved_configs(out)
        if args.preset is not None:
            model_cfg = SparseHookedTransformerConfig.preset(args.preset)
        model_cfg, tc = dataclasses.replace(model_cfg, **overrides), dataclasses.replace(tc, **tc_fields)
    else:
        model_cfg = SparseHookedTransformerConfig.preset(preset, **overrides)
        tc = TrainConfig(**tc_fields)
    shape = [f"{f} {getattr(model_cfg, f)}" for f in MODEL_SHAPE_FIELDS[1:] if f in overrides]
    kind = ", ".join(shape + ["dense baseline" if not model_cfg.is_weight_sparse
                              else f"weight L0 {model_cfg.weight_l0:.4g}"])
    say = print if ranks.is_main else (lambda *a, **k: None)
    if not ranks.is_main:
        logging.getLogger("sparse_lens").setLevel(logging.WARNING)
    parallel = (f" on each of {ranks.world_size} processes (global batch {tc.batch_size * ranks.world_size})"
                if ranks.distributed else "")
    say(f"{'resuming' if args.resume else 'training'} {preset if not args.resume else out} ({kind}) "
          f"for {tc.steps} steps of {tc.batch_size} x {tc.seq_len or model_cfg.n_ctx} tokens on "
          f"{'the standard library' if not tc.sources else tc.sources}{parallel}")
    try:
        result = train(model_cfg, tc, out, resume=args.resume, progress=not args.no_progress,
                       overwrite=args.overwrite)
    except NonFiniteLossError as err:
        print(f"sparse-lens train: stopped: {err}", file=sys.stderr)
        return 1
    except TrainingInterrupted as err:
        print(f"sparse-lens train: {err}", file=sys.stderr)
        return 130
    if ranks.distributed:  # every rank: the test (and a user) can see they hold the same weights
        print(f"rank {ranks.rank}/{ranks.world_size}: weights checksum "
              f"{int(distributed.weights_checksum(result.model)):#x}", flush=True)
    table = result.model.weight_sparsity()
    if not ranks.is_main:
        return 0
    print(f"saved to {result.out_dir}")
    print(f"validation loss {result.val_loss:.4f} nats/token "
          f"(unigram baseline {result.unigram_val_loss:.4f}); {result.seconds:.0f} s")
    if model_cfg.is_weight_sparse:
        print(f"weights: {table.nonzeros.sum():,} nonzeros of {table.numel.sum():,} "
              f"(achieved L0 {table.nonzeros.sum() / table.numel.sum():.4f}, "
              f"target {model_cfg.weight_l0:.4f}); fewest nonzeros of any unit: "
              f"{table.min_nonzeros_per_unit.min()}")
    return 0


def cmd_prune(args: argparse.Namespace) -> int:
    from sparse_lens.pipeline import SUMMARY_FILE, prune_tasks
    from sparse_lens.pruning import PruneConfig
    from sparse_lens.tasks import CORPUS_TASKS, get_spec, list_tasks

    tasks = list(dict.fromkeys(args.task)) if args.task != ["all"] else \
        list(CORPUS_TASKS) if args.source == "corpus" else list_tasks()
    for task in tasks:
        get_spec(task)  # an unknown name: ValueError listing the known ones
    if args.jobs < 1:
        raise ValueError(f"--jobs must be >= 1; got {args.jobs}")
    config = PruneConfig(**given_fields(args, PruneConfig))
    out = args.out or args.model / "circuits"
    summary = prune_tasks(args.model, tasks, config, out=out, verify=not args.no_verify,
                          device=args.device, jobs=args.jobs,
                          on_done=lambda outcome: print(outcome.report + "\n"))
    print(summary.round(4).to_string(index=False))
    print(f"circuits and {SUMMARY_FILE} written to {out}")
    return 0


def cmd_faithfulness(args: argparse.Namespace) -> int:
    import pandas as pd

    from sparse_lens.circuit import CIRCUIT_FILE, Circuit
    from sparse_lens.faithfulness import FaithfulnessConfig, summary
    from sparse_lens.hooks import node_means_for
    from sparse_lens.model import SparseHookedTransformer
    from sparse_lens.pruning import PruneConfig, prune
    from sparse_lens.tasks import get_spec, list_tasks

    tasks = list_tasks() if args.task == "all" else [args.task]
    for task in tasks:
        get_spec(task)
    config = FaithfulnessConfig(**given_fields(args, FaithfulnessConfig))
    model = SparseHookedTransformer.from_pretrained(args.model, device=args.device)
    circuits_dir = args.circuits or args.model / "circuits"
    out = args.out or circuits_dir
    out.mkdir(parents=True, exist_ok=True)
    prune_config = PruneConfig(**given_fields(args, PruneConfig, FAITHFULNESS_PRUNE_FIELDS))
    means = node_means_for(model, args.model, n_tokens=prune_config.mean_tokens)
    tables = []
    for task in tasks:
        if (circuits_dir / task / CIRCUIT_FILE).is_file():
            circuit = Circuit.load(circuits_dir / task, model)
        else:
            circuit = prune(model, task, prune_config, means=means)
            circuit.save(circuits_dir / task)
        print(circuit)
        if circuit.summary()["nodes"] is None:  # the full model misses the target
            print("  no circuit to check: the full model misses the target\n")
            continue
        table = circuit.faithfulness(config)
        table.to_csv(circuits_dir / task / "faithfulness.csv", index=False)
        table.to_csv(out / f"{task}.csv", index=False)
        print(table.drop(columns=["detail"]).round(4).to_string(index=False))
        print(f"  {summary(table)}\n")
        tables.append(table.assign(task=task, nodes=circuit.n_nodes))
    if tables:
        pd.concat(tables).to_csv(out / "summary.csv", index=False)
        print(f"tables written to {out}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from sparse_lens.circuit import CIRCUIT_FILE, Circuit
    from sparse_lens.data import load_corpus
    from sparse_lens.model import SparseHookedTransformer
    from sparse_lens.viz import write_report

    circuits_dir = args.circuits or args.model / "circuits"
    found = sorted(p.parent for p in circuits_dir.glob(f"*/{CIRCUIT_FILE}"))
    if not found:
        raise FileNotFoundError(f"no saved circuits in {circuits_dir} (subdirectories with "
                                f"{CIRCUIT_FILE}); run `sparse-lens prune --model {args.model}` first")
    model = SparseHookedTransformer.from_pretrained(args.model, device=args.device)
    circuits = [Circuit.load(path, model) for path in found]
    for path, circuit in zip(found, circuits):  # written by `sparse-lens faithfulness`
        if (path / "faithfulness.csv").is_file():
            import pandas as pd

            circuit.results["faithfulness"] = pd.read_csv(path / "faithfulness.csv")
    corpus = load_corpus(None, model.tokenizer, max_files=args.corpus_files)
    out = write_report(model, circuits, args.out or args.model / "report.html",
                       title=f"Circuits of {args.model.resolve().name}", n_prompts=args.prompts,
                       corpus_tokens=corpus.val, verify_n=args.verify_prompts)
    print(f"report on {len(circuits)} circuit(s) ({', '.join(c.task for c in circuits)}) written to {out}")
    return 0


def cmd_import_openai(args: argparse.Namespace) -> int:
    from sparse_lens.model import SparseHookedTransformer
    from sparse_lens.openai_release import weight_l0

    model = SparseHookedTransformer.from_circuit_sparsity(args.path, tokenizer=args.tokenizer)
    model.save_pretrained(args.out)
    c = model.cfg
    topk = f"AbsTopK {c.act_topk_frac} at {', '.join(c.act_topk_locations)}" if c.act_topk_locations else "no AbsTopK"
    print(f"{args.path.name}: {c.n_layers} layers, d_model {c.d_model}, {c.n_heads} heads of "
          f"{c.d_head}, d_mlp {c.d_mlp}, vocab {c.d_vocab}, {topk}; weight L0 "
          f"{weight_l0(model):.5f}; tokenizer: {'yes' if model.tokenizer is not None else 'none (token ids only)'}")
    print(f"written to {args.out}")
    return 0


def cmd_analyze(args: argparse.Namespace) -> int:
    from sparse_lens import analyses
    from sparse_lens.tasks import get_spec

    given = {k: v for k, v in vars(args).items()
             if k not in (*analyses.COMMON_OPTIONS, "command", "func", "analysis")}
    for task in given.get("tasks") or ():
        get_spec(task)
    names = [args.analysis] if args.analysis != "all" else \
        [n for n in analyses.ANALYSES if n not in analyses.RUN_ANALYSES or "runs" in given or args.quick]
    for name in names:
        mine = analyses.option_names(name)
        result = analyses.run(name, args.out, args.models_dir, quick=args.quick, progress=not args.no_progress,
                              **{k: v for k, v in given.items() if k in mine})
        print(f"{name}: {result.folder}")
        print(result.summary)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from sparse_lens.demo import DEMO_PRESET, DEMO_TARGET_LOSS, DEMO_TASKS, run_demo
    from sparse_lens.tasks import get_spec

    tasks = tuple(args.tasks or DEMO_TASKS)
    for task in tasks:
        get_spec(task)
    preset = args.preset or DEMO_PRESET
    out = args.out or Path("runs") / preset
    run_demo(out, preset, tasks, args.steps, progress=not args.no_progress,
             retrain=args.retrain, target_loss=DEMO_TARGET_LOSS if args.target_loss is None else args.target_loss)
    return 0


ANALYZE_TEXT = ("Run an analysis of sparse_lens.analyses (or all). Trains the models it needs into "
                "--models-dir (reused across analyses) and writes <out>/<name>/; "
                "`sparse-lens analyze NAME --help` lists its options.")
#: name -> (command, its flags, help, description)
SUBCOMMANDS = {
    "train": (cmd_train, add_train_flags, "train a weight-sparse (or --dense) model on Python source",
              "Train a weight-sparse transformer (or the dense baseline) on the running interpreter's "
              "standard library, or on --sources."),
    "prune": (cmd_prune, add_prune_flags, "prune a trained model to the circuit of a task (or all)",
              "Prune a model to the smallest set of nodes that solves a task, everything else "
              "mean-ablated; save each circuit and a summary table."),
    "demo": (cmd_demo, add_demo_flags, "the wide model (shipped, or --retrain), prune tasks, write the report",
             "The main job: take the wide weight-sparse model (the checkpoint shipped in the package, "
             "made by `sparse-lens train`; or, with --retrain, train it on the standard library; "
             "--preset small takes the smaller one), prune "
             "a handful of tasks, verify the circuits and write a self-contained HTML report. A model "
             "already in --out is reused."),
    "faithfulness": (cmd_faithfulness, add_faithfulness_flags, "check whether circuits can be trusted "
                     "(controls, partial restoration, interchange, ablation modes)",
                     "For each task: load the circuit saved in --circuits (or prune one and save it "
                     "there), run the faithfulness checks, print the table and write it as "
                     "<circuit>/faithfulness.csv and <out>/<task>.csv."),
    "report": (cmd_report, add_report_flags, "write one offline HTML report of a model's pruned circuits",
               "Load the circuits saved by `prune` and write a self-contained HTML report (graph, "
               "tables, attention heads, neurons; works offline)."),
    "import-openai": (cmd_import_openai, add_import_flags, "convert a model of OpenAI's circuit_sparsity release",
                      "Convert a circuit_sparsity release model folder (beeg_config.json + "
                      "final_model.pt) into a sparse_lens model directory with identical outputs."),
    "analyze": (cmd_analyze, add_analyze_flags, "re-run one of the paper's results (CSV, PNG, summary.md)",
                ANALYZE_TEXT),
    "bridges": (None, None, None, None),  # sparse_lens.bridges.cli declares its own
}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import logging

    from sparse_lens.allocator import retain_freed_memory

    retain_freed_memory()  # large tensors reuse freed memory instead of page-faulting fresh pages

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        return args.func(args)
    except (ValueError, OSError) as err:  # CheckpointError is a ValueError; FileNotFoundError an OSError
        print(f"sparse-lens {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
