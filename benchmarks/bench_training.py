"""Training-step speed against the machine's matmul limit, old and new kernels side by side.

One run times four training steps (`training.train_step`: forward, backward, gradient RMS
rescale, AdamW, projection, under `deterministic_algorithms()` as `train` runs them on CPU):
the weight-sparse model and its dense counterpart (weight_l0 = 1, no projection), each with
the reference kernels ("old": topk + scatter AbsTopK, TransformerLens attention, AdamW's
per-parameter loop; selected with `kernels.reference_kernels()`) and the fast ones ("new").
Every repetition runs the four steps and one pass of the step's own matmuls in turn (A/B/A/B),
so that other processes on the machine slow all of them alike; the figures are medians over
repetitions.

    .venv/bin/python benchmarks/bench_training.py                 # small preset, 8 x 128, 2 threads
    .venv/bin/python benchmarks/bench_training.py --preset tiny --reps 5 --no-passes

Prints, for each step, milliseconds and tokens/s, and:
- the matmul limit: GFLOP/s of `torch.mm`/`torch.bmm` on exactly the GEMMs of one training step
  (each linear layer's forward product and its two backward products, at the model's shapes,
  plus the attention score and value products), and MFU = the step's matmul FLOPs per second
  over that limit. Attention products are counted over the full (not causal-halved) square;
- new / old tokens/s (issue 17's target: >= 1.6x for the sparse step) and sparse / dense
  step time (target <= 1.10);
- a per-op breakdown of the sparse step, old and new: its phases timed one by one (forward,
  backward, gradient RMS + AdamW, projection), and, isolated, all the step's AbsTopK calls and
  all its attention layers (forward + backward; attention includes the q/k/v projections and
  their AbsTopK, so the isolated lines overlap);
- with `--passes` (default): the same forward outside training, old and new: node means
  (`hooks.compute_node_means`) and one pruning step (masked forward and backward to the mask
  logits, as `pruning` runs it).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch


def _median_ms(samples: list[float]) -> float:
    return 1000 * statistics.median(samples)


#: the clock every figure is taken with: wall time, or with `--clock cpu` this process's CPU
#: time (meaningful with `--threads 1` only: it leaves out time spent waiting for a core on a
#: loaded machine, not the slowdown of sharing caches with other processes)
_CLOCK = {"now": time.perf_counter}


def _timed(fn: Callable[[], object]) -> float:
    start = _CLOCK["now"]()
    fn()
    return _CLOCK["now"]() - start


# ------------------------------------------------------------------------- the matmul limit
def step_gemms(cfg, batch: int, seq: int) -> list[tuple[int, int, int, int]]:
    """The GEMMs of one training step as (count, m, k, n) for `[count, m, k] @ [count, k, n]`:
    each linear layer's forward product and its input- and weight-gradient products, and the
    attention products (scores q.k and pattern.v, forward and both backward ones)."""
    tokens = batch * seq
    hd = cfg.n_heads * cfg.d_head
    linears = [(cfg.d_read, hd)] * 3 + [(hd, cfg.d_model), (cfg.d_read, cfg.d_mlp),
                                        (cfg.d_mlp, cfg.d_model)]
    gemms = []
    for fan_in, fan_out in linears * cfg.n_layers + [(cfg.d_model, cfg.d_vocab_out)]:
        gemms += [(1, tokens, fan_in, fan_out), (1, tokens, fan_out, fan_in),
                  (1, fan_in, tokens, fan_out)]
    heads = batch * cfg.n_heads
    attention = [(heads, seq, cfg.d_head, seq), (heads, seq, seq, cfg.d_head)] * 3
    return gemms + attention * cfg.n_layers


def gemm_flops(gemms: list[tuple[int, int, int, int]]) -> int:
    return sum(2 * count * m * k * n for count, m, k, n in gemms)


def make_gemm_pass(gemms: list[tuple[int, int, int, int]]) -> Callable[[], None]:
    """A function running every GEMM of `gemms` once on random operands (allocated here)."""
    gen = torch.Generator().manual_seed(0)
    operands = [(torch.randn(c, m, k, generator=gen), torch.randn(c, k, n, generator=gen))
                for c, m, k, n in gemms]

    def run() -> None:
        for a, b in operands:
            torch.mm(a[0], b[0]) if a.shape[0] == 1 else torch.bmm(a, b)

    return run


# ---------------------------------------------------------------------------- the steps
def build_runs(cfg, tc, device: str) -> dict[str, tuple]:
    """label -> (model, optimizer, l0, use_reference_kernels) for sparse/dense x old/new, each
    from the same seed so old and new start from the same weights."""
    from sparse_lens.kernels import reference_kernels
    from sparse_lens.model import SparseHookedTransformer
    from sparse_lens.training import make_optimizer

    runs = {}
    for kind, model_cfg in (("sparse", cfg), ("dense", cfg.dense_counterpart())):
        for version in ("old", "new"):
            torch.manual_seed(0)
            model = SparseHookedTransformer(model_cfg, move_to_device=True)
            model.project_weights_(model_cfg.weight_l0)
            with reference_kernels(version == "old"):  # old: AdamW's per-parameter loop
                optimizer = make_optimizer(model, tc)
            runs[f"{kind} {version}"] = (model, optimizer, model_cfg.weight_l0, version == "old")
    return runs


def time_steps(runs: dict, batches: list[torch.Tensor], tc, gemm_pass, warmup: int) -> dict:
    """Interleaved: per batch, the matmul pass then one step of every run. -> label -> seconds."""
    from sparse_lens.kernels import reference_kernels
    from sparse_lens.training import deterministic_algorithms, train_step

    times: dict[str, list[float]] = {"matmuls": [], **{label: [] for label in runs}}
    with deterministic_algorithms(batches[0].device.type == "cpu"):
        for i, tokens in enumerate(batches):
            samples = {"matmuls": _timed(gemm_pass)}
            for label, (model, optimizer, l0, old) in runs.items():
                with reference_kernels(old):
                    samples[label] = _timed(lambda: train_step(model, optimizer, tokens, tc.lr, l0, tc))
            if i >= warmup:
                for label, seconds in samples.items():
                    times[label].append(seconds)
    return times


# ------------------------------------------------------------------------- the breakdown
def time_phases(model, optimizer, tokens: torch.Tensor, tc, old: bool) -> dict[str, float]:
    """One sparse step split into its phases, each timed on its own (seconds)."""
    from sparse_lens.kernels import reference_kernels
    from sparse_lens.training import rescale_grad_rms_

    out: dict[str, float] = {}
    with reference_kernels(old):
        start = _CLOCK["now"]()
        loss = model(tokens, return_type="loss")
        out["forward (with loss)"] = _CLOCK["now"]() - start
        optimizer.zero_grad(set_to_none=True)
        out["backward"] = _timed(loss.backward)
        out["grad RMS + AdamW"] = _timed(lambda: (
            rescale_grad_rms_(list(model.parameters()), tc.grad_rms, tc.grad_rms_mode),
            optimizer.step()))
        out["projection"] = _timed(lambda: model.project_weights_(model.cfg.weight_l0))
    return out


def time_kernels(cfg, batch: int, seq: int, old: bool) -> dict[str, float]:
    """All AbsTopK calls of one step, and all attention layers, forward + backward (seconds)."""
    from sparse_lens.abstopk import abs_topk
    from sparse_lens.components import SparseAttention
    from sparse_lens.kernels import reference_kernels

    widths = {"attn_in": cfg.d_read, "attn_q": cfg.n_heads * cfg.d_head, "attn_out": cfg.d_model,
              "mlp_in": cfg.d_read, "mlp_neuron": cfg.d_mlp, "mlp_out": cfg.d_model}
    widths |= {"attn_k": widths["attn_q"], "attn_v": widths["attn_q"]}
    dims = [d for loc, d in widths.items() if cfg.topk_at(loc)] * cfg.n_layers
    gen = torch.Generator().manual_seed(0)
    inputs = [torch.randn(batch, seq, d, generator=gen, requires_grad=True) for d in dims]

    def all_topk() -> None:
        for x in inputs:
            abs_topk(x, cfg.topk_k(x.shape[-1])).sum().backward()

    attn = SparseAttention(cfg, "global", 0)
    with torch.no_grad():
        for param in attn.parameters():
            param.normal_(0.0, 0.02, generator=gen) if param.ndim > 1 else param.zero_()
    x = torch.randn(batch, seq, cfg.d_read, generator=gen, requires_grad=True)

    def all_attention() -> None:
        for _ in range(cfg.n_layers):
            attn(x, x, x).sum().backward()

    with reference_kernels(old):
        all_topk()  # warm-up
        return {"AbsTopK (isolated)": _timed(all_topk), "attention (isolated)": _timed(all_attention)}


def time_passes(model, corpus_tokens: torch.Tensor, old: bool) -> dict[str, float]:
    """The forward outside training: node means over 8192 tokens, one pruning step (seconds)."""
    from sparse_lens import tasks
    from sparse_lens.hooks import NodeRegistry, compute_node_means, masked_nodes
    from sparse_lens.kernels import reference_kernels
    from sparse_lens.pruning import heaviside_ste

    registry = NodeRegistry.for_model(model)
    data = tasks.get_task("single_double_quote", model.tokenizer, n=64, seed=0)
    tau = torch.full((registry.n_nodes,), 0.1, requires_grad=True)
    with reference_kernels(old):
        means_s = _timed(lambda: compute_node_means(model, registry, corpus_tokens, n_tokens=8192))
        means = torch.zeros(registry.n_nodes)
        with masked_nodes(model, registry, torch.ones(registry.n_nodes), means) as masker:
            def prune_step() -> None:
                masker.mask = heaviside_ste(tau)
                tasks.task_loss(model(data.tokens), data).backward()
            prune_step()  # warm-up
            prune_s = statistics.median(_timed(prune_step) for _ in range(5))
    return {"node means, 8192 tokens": means_s, "pruning step, 64 prompts": prune_s}


# ---------------------------------------------------------------------------------- main
def _medians(samples: list[dict[str, float]]) -> dict[str, float]:
    return {key: _median_ms([s[key] for s in samples]) for key in samples[0]}


def _print_table(title: str, old: dict[str, float], new: dict[str, float]) -> None:
    print(title)
    for key in old:
        print(f"  {key:<28} old {old[key]:8.1f} ms   new {new[key]:8.1f} ms   "
              f"old/new {old[key] / new[key]:5.2f}x")


def report_steps(times: dict, flops: int, tokens: int) -> None:
    """Step times, tokens/s, MFU and the issue's two ratios."""
    limit = flops / statistics.median(times["matmuls"]) / 1e9
    print(f"matmul limit: {limit:.1f} GFLOP/s (the step's own GEMMs alone, "
          f"{flops / 1e9:.2f} GFLOP = {flops / tokens / 1e6:.1f} MFLOP per token)")
    med = {label: statistics.median(t) for label, t in times.items() if label != "matmuls"}
    for label, seconds in med.items():
        mfu = flops / seconds / 1e9 / limit
        print(f"  {label:<11} step {1000 * seconds:8.1f} ms  {tokens / seconds:8.0f} tokens/s  "
              f"MFU {100 * mfu:5.1f}%")
    print(f"sparse new / old tokens/s = {med['sparse old'] / med['sparse new']:.2f}x  (target >= 1.6)")
    print(f"dense  new / old tokens/s = {med['dense old'] / med['dense new']:.2f}x")
    print(f"sparse / dense step: new {med['sparse new'] / med['dense new']:.3f}, old "
          f"{med['sparse old'] / med['dense old']:.3f}  (target <= 1.10)")


def main(argv: list[str] | None = None) -> None:
    from sparse_lens.allocator import add_retain_flag, apply_retain_flag

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="small")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=None, help="default: min(128, n_ctx)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reps", type=int, default=15, help="timed repetitions of each step")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--passes", action=argparse.BooleanOptionalAction, default=True,
                        help="also time node means and a pruning step")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="cpu: this process's CPU time, for a loaded machine (with --threads 1)")
    add_retain_flag(parser)
    args = parser.parse_args(argv)
    apply_retain_flag(args)
    if args.clock == "cpu":
        if args.threads != 1:
            parser.error("--clock cpu needs --threads 1 (CPU time adds up every thread's time)")
        _CLOCK["now"] = time.process_time

    from sparse_lens import data
    from sparse_lens.config import SparseHookedTransformerConfig
    from sparse_lens.model import SparseHookedTransformer
    from sparse_lens.tokenizer import load_tokenizer
    from sparse_lens.training import TrainConfig

    torch.set_num_threads(args.threads)
    cfg = SparseHookedTransformerConfig.preset(args.preset, device="cpu")
    args.seq_len = args.seq_len or min(128, cfg.n_ctx)
    tc = TrainConfig(batch_size=args.batch_size, seq_len=args.seq_len)
    corpus = data.load_corpus(None, load_tokenizer(), max_files=60)
    batches = [data.sample_batch(corpus.train, args.batch_size, args.seq_len, i, seed=0)
               for i in range(args.warmup + args.reps)]
    gemms = step_gemms(cfg, args.batch_size, args.seq_len)
    tokens = args.batch_size * args.seq_len
    print(f"preset {args.preset}: {cfg.n_layers} layers, d_model {cfg.d_model}, d_mlp {cfg.d_mlp}, "
          f"L0 {cfg.weight_l0:.4g}; batch {args.batch_size} x {args.seq_len}; "
          f"{torch.get_num_threads()} threads, {args.clock} clock; medians of {args.reps} "
          f"interleaved repetitions")
    runs = build_runs(cfg, tc, "cpu")
    times = time_steps(runs, batches, tc, make_gemm_pass(gemms), args.warmup)
    report_steps(times, gemm_flops(gemms), tokens)

    report_breakdown(runs, cfg, tc, batches, corpus.train if args.passes else None)


def report_breakdown(runs: dict, cfg, tc, batches: list[torch.Tensor], corpus_tokens) -> None:
    """The sparse step per op, old and new; then (given `corpus_tokens`) node means and a
    pruning step on a fresh model."""
    from sparse_lens.model import SparseHookedTransformer
    from sparse_lens.tokenizer import load_tokenizer

    model, optimizer, _, _ = runs["sparse new"]
    batch, seq = batches[0].shape
    phases: dict[str, list] = {"old": [], "new": []}
    for i in range(5):
        for version in ("old", "new"):
            phases[version].append(time_phases(model, optimizer, batches[i % len(batches)], tc, version == "old")
                                   | time_kernels(cfg, batch, seq, version == "old"))
    _print_table("sparse step, per op (medians of 5, interleaved):",
                 _medians(phases["old"]), _medians(phases["new"]))
    if corpus_tokens is None:
        return
    model = SparseHookedTransformer(cfg, tokenizer=load_tokenizer())
    model.requires_grad_(False)
    passes: dict[str, list] = {"old": [], "new": []}
    for _ in range(3):
        for version in ("old", "new"):
            passes[version].append(time_passes(model, corpus_tokens, version == "old"))
    _print_table("outside training (medians of 3, interleaved):",
                 _medians(passes["old"]), _medians(passes["new"]))

if __name__ == "__main__":
    main()
