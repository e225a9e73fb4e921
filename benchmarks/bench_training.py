"""Cost of weight sparsity in training, measured side by side in one run.

Times the full training step (`training.train_step`: forward, backward, gradient RMS rescale, AdamW,
projection) of a weight-sparse model and of its dense counterpart (same architecture, weight_l0 = 1,
so the projection is skipped), alternating them step by step so both see the same machine state.
Also times the pieces of the sparse step on their own: the projection (`project_weights_`) and the
AdamW step it follows.

    .venv/bin/python benchmarks/bench_training.py                 # small preset, 8 x 128, 2 threads
    .venv/bin/python benchmarks/bench_training.py --preset tiny --steps 5

Prints medians in milliseconds and the two ratios the foundation issue targets:
sparse step / dense step (target <= 1.10) and projection / optimizer step.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def _median_ms(samples: list[float]) -> float:
    return 1000 * statistics.median(samples)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="small")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=20, help="timed steps per model")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)

    from sparse_lens import data
    from sparse_lens.config import SparseHookedTransformerConfig
    from sparse_lens.model import SparseHookedTransformer
    from sparse_lens.tokenizer import load_tokenizer
    from sparse_lens.training import TrainConfig, make_optimizer, rescale_grad_rms_, train_step

    torch.set_num_threads(args.threads)
    sparse_cfg = SparseHookedTransformerConfig.preset(args.preset, device=args.device)
    tc = TrainConfig(batch_size=args.batch_size, seq_len=args.seq_len, device=args.device)
    corpus = data.load_corpus(None, load_tokenizer(), max_files=60)
    l0 = sparse_cfg.weight_l0

    runs = {}
    for label, cfg in (("sparse", sparse_cfg), ("dense", sparse_cfg.dense_counterpart())):
        torch.manual_seed(0)
        model = SparseHookedTransformer(cfg)
        model.project_weights_(cfg.weight_l0)
        runs[label] = (model, make_optimizer(model, tc), cfg.weight_l0)

    def sync() -> None:
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()

    step_times: dict[str, list[float]] = {"sparse": [], "dense": []}
    for step in range(args.warmup + args.steps):
        tokens = data.sample_batch(corpus.train, args.batch_size, args.seq_len, step, seed=0)
        tokens = tokens.to(args.device)
        for label, (model, optimizer, target) in runs.items():
            sync()
            start = time.perf_counter()
            train_step(model, optimizer, tokens, tc.lr, target, tc)
            sync()
            if step >= args.warmup:
                step_times[label].append(time.perf_counter() - start)

    # the sparse step's pieces, on their own (gradients from one more backward pass)
    model, optimizer, _ = runs["sparse"]
    proj_times, opt_times = [], []
    for step in range(args.warmup + args.steps):
        tokens = data.sample_batch(corpus.train, args.batch_size, args.seq_len, 1000 + step, seed=0)
        optimizer.zero_grad(set_to_none=True)
        model(tokens.to(args.device), return_type="loss").backward()
        rescale_grad_rms_(list(model.parameters()), tc.grad_rms, tc.grad_rms_mode)
        sync()
        t0 = time.perf_counter()
        optimizer.step()
        sync()
        t1 = time.perf_counter()
        model.project_weights_(l0)
        sync()
        t2 = time.perf_counter()
        if step >= args.warmup:
            opt_times.append(t1 - t0)
            proj_times.append(t2 - t1)

    n_matrix = sum(m.weight.numel() for m in model.sparsified_matrices())
    print(f"preset {args.preset}: {sparse_cfg.n_layers} layers, d_model {sparse_cfg.d_model}, "
          f"{n_matrix / 1e6:.2f}M sparsified weights at L0 {l0:.4g}; batch {args.batch_size} x "
          f"{args.seq_len}; {torch.get_num_threads()} threads on {args.device}; "
          f"medians of {args.steps} steps")
    sparse_ms, dense_ms = _median_ms(step_times["sparse"]), _median_ms(step_times["dense"])
    proj_ms, opt_ms = _median_ms(proj_times), _median_ms(opt_times)
    print(f"  sparse training step   {sparse_ms:8.1f} ms")
    print(f"  dense training step    {dense_ms:8.1f} ms")
    print(f"  projection alone       {proj_ms:8.1f} ms")
    print(f"  AdamW step alone       {opt_ms:8.1f} ms")
    print(f"sparse step / dense step = {sparse_ms / dense_ms:.3f}  (target <= 1.10)")
    print(f"projection / optimizer step = {proj_ms / opt_ms:.3f}")


if __name__ == "__main__":
    main()
