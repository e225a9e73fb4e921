"""Training on a GPU: tokens/s, where a step's time goes, peak memory (small and paper presets).

    .venv/bin/python benchmarks/bench_gpu.py                      # both presets, float32 and bf16
    .venv/bin/python benchmarks/bench_gpu.py --presets paper --dtypes bf16 --batch-size 32

Without CUDA it says so and exits 0 (nothing is measured). For each preset and dtype it runs
`--warmup` steps, then times `--steps` steps of the real training step split into its phases
(forward + loss, backward, gradient RMS rescale + AdamW step, projection onto the top-k), each
phase bracketed by `torch.cuda.synchronize()`; prints the median per phase, its share of the
step, tokens/s and the peak allocated memory. The goal: the projection under 10% of a step at
`paper` size. Weights are random at the preset's target L0 (the cost does not depend on training).

Then (unless `--no-graph`) the same step as one CUDA graph (`training.graphed.StaticStep`,
`sparse-lens train --cuda-graph`): the median of `--steps` replays after its warm-up and capture,
side by side with the eager step, and the ratio of their tokens/s.

    .venv/bin/python benchmarks/bench_gpu.py --presets wide --dtypes float32 bf16 --batch-size 64
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def phases_of_a_step(model, optimizer, tokens, l0: float, tc, device: str = "cuda") -> dict[str, float]:
    """One training step (as `training.train_step` does it), timed per phase in seconds."""
    from sparse_lens.training import autocast, rescale_grad_rms_

    times = {}

    def mark(name, t0):
        if device == "cuda":
            torch.cuda.synchronize()
        times[name] = time.perf_counter() - t0
        return time.perf_counter()

    t = time.perf_counter()
    with autocast(tc.dtype, device):
        loss = model(tokens, return_type="loss")
    t = mark("forward", t)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    t = mark("backward", t)
    rescale_grad_rms_(list(model.parameters()), tc.grad_rms, tc.grad_rms_mode)
    optimizer.step()
    t = mark("optimizer", t)
    model.project_weights_(l0)
    mark("projection", t)
    return times


def random_model_and_batch(preset: str, batch_size: int, device: str):
    """A `preset` model (seed 0) in training mode with its weights at the target L0, and a random
    batch of `batch_size` full-context sequences on `device`."""
    from sparse_lens.config import SparseHookedTransformerConfig
    from sparse_lens.model import SparseHookedTransformer

    cfg = SparseHookedTransformerConfig.preset(preset, device=device)
    torch.manual_seed(0)
    model = SparseHookedTransformer(cfg).train()
    model.project_weights_()
    return model, torch.randint(0, cfg.d_vocab, (batch_size, cfg.n_ctx), device=device)


def bench(preset: str, dtype: str, batch_size: int, steps: int, warmup: int,
          device: str = "cuda") -> dict[str, float]:
    """Times `steps` training steps after `warmup`; prints and returns the median seconds per phase."""
    from sparse_lens.training import TrainConfig, make_optimizer

    cuda = device == "cuda"
    model, tokens = random_model_and_batch(preset, batch_size, device)
    cfg = model.cfg
    tc = TrainConfig(batch_size=batch_size, dtype=dtype, device=device)
    optimizer = make_optimizer(model, tc)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    runs = [phases_of_a_step(model, optimizer, tokens, cfg.weight_l0, tc, device)
            for _ in range(warmup + steps)]
    runs = runs[warmup:]
    median = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    total = sum(median.values())
    print(f"{preset} ({cfg.n_layers} layers, d_model {cfg.d_model}, L0 {cfg.weight_l0:.4g}), {dtype}, "
          f"batch {batch_size} x {cfg.n_ctx}: {batch_size * cfg.n_ctx / total:,.0f} tokens/s, "
          f"step {total * 1e3:.1f} ms, peak memory "
          f"{torch.cuda.max_memory_allocated() / 2**30 if cuda else float('nan'):.2f} GiB")
    for name, seconds in median.items():
        print(f"  {name:10s} {seconds * 1e3:8.1f} ms  {seconds / total:6.1%}")
    share = median["projection"] / total
    if preset == "paper":
        print(f"  projection share {share:.1%}: goal < 10% {'met' if share < 0.10 else 'MISSED'}")
    del model, optimizer
    if cuda:
        torch.cuda.empty_cache()
    return median


def bench_graphed(preset: str, dtype: str, batch_size: int, steps: int, eager_seconds: float,
                  device: str = "cuda") -> float:
    """Median seconds of one replay of the captured step (`StaticStep`), printed beside the eager
    step's `eager_seconds`. On `device="cpu"` the same step runs uncaptured (a check of this
    function, not a measurement of graphs)."""
    from sparse_lens.training import TrainConfig, make_optimizer
    from sparse_lens.training.graphed import WARMUP_STEPS, StaticStep

    cuda = device == "cuda"
    model, tokens = random_model_and_batch(preset, batch_size, device)
    cfg = model.cfg
    tc = TrainConfig(batch_size=batch_size, dtype=dtype, device=device, cuda_graph=True)
    step = StaticStep(model, make_optimizer(model, tc), tc, (batch_size, cfg.n_ctx))
    t = time.perf_counter()
    for _ in range(WARMUP_STEPS + 1):  # eager warm-up, then the capture and its first replay
        step(tokens, 1e-3, cfg.weight_l0)
    capture_s = time.perf_counter() - t
    times = []
    for _ in range(steps):
        if cuda:
            torch.cuda.synchronize()
        t = time.perf_counter()
        step(tokens, 1e-3, cfg.weight_l0)  # reads the loss back: synchronised
        times.append(time.perf_counter() - t)
    median = statistics.median(times)
    tokens_per_step = batch_size * cfg.n_ctx
    print(f"  {'CUDA graph' if step.graph is not None else 'graph-ready step, uncaptured'}: step "
          f"{median * 1e3:.1f} ms, {tokens_per_step / median:,.0f} tokens/s against "
          f"{tokens_per_step / eager_seconds:,.0f} eager: {eager_seconds / median:.2f}x "
          f"(warm-up and capture {capture_s:.1f} s)")
    del model, step
    if cuda:
        torch.cuda.empty_cache()
    return median


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--presets", nargs="+", default=["small", "paper"])
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bf16"])
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--no-graph", action="store_true", help="skip the CUDA-graph step")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_gpu: no CUDA device (torch.cuda.is_available() is False): skipped, nothing measured")
        return 0
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}")
    for preset in args.presets:
        for dtype in args.dtypes:
            eager = bench(preset, dtype, args.batch_size, args.steps, args.warmup)
            if not args.no_graph:
                bench_graphed(preset, dtype, args.batch_size, args.steps, sum(eager.values()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
