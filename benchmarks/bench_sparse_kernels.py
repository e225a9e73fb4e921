"""Dense vs CSR matmuls (`sparse_lens.sparse_kernels.sparse_matmuls`) on frozen weight-sparse models.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/bench_sparse_kernels.py            # both shapes
    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/bench_sparse_kernels.py --paper-layers 8

Side by side in one run, for each shape: the forward pass (no grad) and one pruning step (node
masks on every node site, forward + backward to the mask logits), dense and CSR alternated,
median of `--repeats`; prints the times, the ratio dense / CSR, the largest logit difference
and the one-off CSR conversion time. Shapes: the `paper` preset at its L0 1/1000 (by default
with 2 of its 8 layers: every layer has the paper's shape, d_model 2048, d_mlp 8192, n_ctx 256,
so the per-layer ratio is the paper's; the full 8 layers hold 1.6 GB of float32 and take
minutes to build on 2 cores) and the `small` preset at its 1/16. Weights are random, projected
to the L0 (the speed depends on the shapes and the density, not on training).

Measured 2026-12-02 (session 4), `--only paper --threads 1 --repeats 3`, the other core busy:
| | dense | CSR | dense / CSR |
|---|---|---|---|
| paper shape (2 of 8 layers), L0 1/1000: forward 4 x 256 | 3.19 s | 0.67 s | 4.74x |
| same, one pruning step 32 x 64 | 11.9 s | 5.09 s | 2.34x |
| (a second run, beside a 1-thread analysis) forward / pruning step | | | 3.25x / 2.16x |
| small preset, L0 1/16: forward 8 x 128 (`--only small`) | 164 ms | 141 ms | 1.16x |
| same, one pruning step 32 x 64 | 641 ms | 856 ms | 0.75x |
Before this session (fused attention skipped under CSR, column-major CSR outputs) the paper-shape
forward gained 1.67x and the pruning step 1.43x. Now AbsTopK (single-threaded NumPy selection on
2,048- and 8,192-wide rows), the CSR products' own copies and fills, and the pruning masks'
element-wise passes are most of the CSR time, so the issue's 10x / 5x are not reached; at 1/16
CSR loses. Hence "auto" = CSR at density <= 1/100 only (`sparse_kernels.AUTO_MAX_DENSITY`).
Session 5, the same `--only paper --threads 1 --repeats 3` (the other core training), once with
the process keeping freed memory (`sparse_lens.allocator`, now the default here) and once with
`--no-retain-freed-memory`: pruning step 4.33 s vs 5.49 s CSR (dense/CSR 3.36x vs 2.70x; dense
~14.6 s both), forward 0.85 vs 0.77 s CSR (3.98x vs 4.37x, within this machine's spread).
The product alone (`--only matmul`, an earlier run on a loaded machine): 1.75x at 1/16, 3.97x at
1/64, 8.88x at 1/256, 10.6x at 1/1000.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def build(preset: str, **overrides):
    from sparse_lens.config import SparseHookedTransformerConfig
    from sparse_lens.model import SparseHookedTransformer

    torch.manual_seed(0)
    model = SparseHookedTransformer(SparseHookedTransformerConfig.preset(preset, **overrides))
    model.project_weights_()
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def timed(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def prune_step(model, registry, means, tokens):
    """One mask-optimisation step's work: masked forward, loss, backward to the mask logits."""
    from sparse_lens.hooks import masked_nodes
    from sparse_lens.pruning import heaviside_ste

    tau = torch.full((registry.n_nodes,), 0.1, requires_grad=True)
    with masked_nodes(model, registry, heaviside_ste(tau), means):
        logits = model(tokens)
        loss = torch.nn.functional.cross_entropy(logits[:, -1], tokens[:, 0]) + 1e-4 * tau.sum()
    loss.backward()
    return tau.grad


def compare(name: str, model, eval_shape, prune_shape, repeats: int) -> None:
    from sparse_lens.hooks import NodeRegistry
    from sparse_lens.sparse_kernels import sparse_matmuls, sparsified_density

    gen = torch.Generator().manual_seed(0)
    vocab = model.cfg.d_vocab
    eval_tokens = torch.randint(0, vocab, eval_shape, generator=gen)
    prune_tokens = torch.randint(0, vocab, prune_shape, generator=gen)
    registry = NodeRegistry.for_model(model)
    means = torch.randn(registry.n_nodes, generator=gen) * 0.01

    def forward():
        with torch.no_grad():
            return model(eval_tokens)

    with torch.no_grad():
        dense_logits = model(eval_tokens)
    t0 = time.perf_counter()
    with sparse_matmuls(model):
        forward()  # the first product of each matrix converts it to CSR
        convert = time.perf_counter() - t0
        csr_logits = forward()
        results = {"forward": [], "prune step": []}
        for _ in range(repeats):
            for kind, fn in (("forward", forward), ("prune step", lambda: prune_step(
                    model, registry, means, prune_tokens))):
                csr = timed(fn, 1)
                results[kind].append(csr)
        grads_csr = prune_step(model, registry, means, prune_tokens)
    dense = {"forward": [timed(forward, 1) for _ in range(repeats)],
             "prune step": [timed(lambda: prune_step(model, registry, means, prune_tokens), 1)
                            for _ in range(repeats)]}
    grads_dense = prune_step(model, registry, means, prune_tokens)
    print(f"{name}: achieved density {sparsified_density(model):.5f}; forward on "
          f"{tuple(eval_shape)} tokens, prune step on {tuple(prune_shape)}; {torch.get_num_threads()} "
          f"threads; CSR conversion (once) {convert:.3f} s")
    for kind in results:
        d, c = statistics.median(dense[kind]), statistics.median(results[kind])
        print(f"  {kind:10s}  dense {d * 1e3:9.1f} ms   CSR {c * 1e3:9.1f} ms   dense/CSR {d / c:6.2f}x")
    print(f"  max |logit diff| {float((dense_logits - csr_logits).abs().max()):.2e}; max |mask grad "
          f"diff| {float((grads_dense - grads_csr).abs().max()):.2e}")


def matmul_sweep(repeats: int, n_tokens: int = 512, shape=(2048, 8192)) -> None:
    """The product alone: x [n_tokens, d_in] @ W [d_in, d_out] dense vs CSR, W at several
    densities (what the model's products gain, before AbsTopK and attention are counted)."""
    from sparse_lens.sparse_kernels import CSRWeight, sparse_matmuls  # noqa: F401 (the class runs it)

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n_tokens, shape[0], generator=gen)
    print(f"the product alone: [{n_tokens}, {shape[0]}] @ [{shape[0]}, {shape[1]}]")
    for density in (1 / 16, 1 / 64, 1 / 256, 1 / 1000):
        w = torch.randn(*shape, generator=gen)
        w = w * (torch.rand(*shape, generator=gen) < density)
        csr = CSRWeight.wrap(w)
        csr.csr(True)  # converted once, as in a context
        dense_s = timed(lambda: x @ w, repeats)
        csr_s = timed(lambda: torch.matmul(x, csr), repeats)
        print(f"  density 1/{round(1 / density):<5d} dense {dense_s * 1e3:8.1f} ms   CSR "
              f"{csr_s * 1e3:8.1f} ms   dense/CSR {dense_s / csr_s:6.2f}x")


def main(argv: list[str] | None = None) -> None:
    from sparse_lens.allocator import add_retain_flag, apply_retain_flag

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--paper-layers", type=int, default=2, help="layers of the paper shape (8 = full)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--only", choices=["paper", "small", "matmul"], default=None)
    add_retain_flag(parser)
    args = parser.parse_args(argv)
    apply_retain_flag(args)
    torch.set_num_threads(args.threads)
    if args.only in (None, "matmul"):
        matmul_sweep(args.repeats)
    if args.only in (None, "paper"):
        model = build("paper", n_layers=args.paper_layers)
        compare(f"paper shape, {args.paper_layers} of 8 layers, L0 1/1000", model, (4, 256), (32, 64),
                args.repeats)
        del model
    if args.only in (None, "small"):
        compare("small preset, L0 1/16", build("small"), (8, 128), (32, 64), args.repeats)


if __name__ == "__main__":
    main()
