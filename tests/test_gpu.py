"""The GPU path: bf16 autocast training (CPU-checked), and CUDA training, node means, pruning and
CSR products where a GPU exists (skipped without one: no GPU in CI)."""

import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch
from conftest import load_script

from sparse_lens import data
from sparse_lens.config import SparseHookedTransformerConfig
from sparse_lens.training import TrainConfig, train

ROOT = Path(__file__).resolve().parents[1]
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


@pytest.fixture(scope="module")
def corpus():
    stream = torch.randint(1, 2048, (20_000,), generator=torch.Generator().manual_seed(0))
    return data.TokenCorpus(train=stream, val=stream[:4096])


def short(**overrides):
    return TrainConfig(**{**dict(steps=3, batch_size=2, seq_len=32, eval_every=3, eval_batches=1,
                                 checkpoint_every=3), **overrides})


def test_bf16_autocast_runs_the_forward_in_bfloat16_and_keeps_float32_weights(corpus, tmp_path):
    tiny = SparseHookedTransformerConfig.preset("tiny")
    fp32 = train(tiny, short(), tmp_path / "fp32", corpus=corpus, progress=False)
    bf16 = train(tiny, short(dtype="bf16"), tmp_path / "bf16", corpus=corpus, progress=False)
    assert all(p.dtype == torch.float32 for p in bf16.model.parameters())
    a, b = fp32.history[0]["loss"], bf16.history[0]["loss"]
    assert a != b and abs(a - b) < 0.05  # bfloat16 rounding: close, not equal


def test_an_unknown_dtype_is_refused():
    with pytest.raises(ValueError, match="TrainConfig.dtype"):
        TrainConfig(dtype="fp16")


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="measures on CUDA instead")
def test_the_gpu_benchmark_skips_cleanly_without_cuda():
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_gpu.py")],
                         capture_output=True, text=True, timeout=120,
                         env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert run.returncode == 0 and "skipped, nothing measured" in run.stdout, run.stderr


def test_the_graph_step_benchmark_runs_uncaptured_on_cpu(capsys):
    """`bench_gpu.bench_graphed`, what the GPU recipe probes with, checked where no GPU is (the
    step runs uncaptured: nothing about graphs is measured)."""
    bench_gpu = load_script("benchmarks/bench_gpu.py")
    eager = bench_gpu.bench("tiny", "float32", 2, steps=1, warmup=1, device="cpu")
    seconds = bench_gpu.bench_graphed("tiny", "float32", 2, 2, sum(eager.values()), device="cpu")
    assert seconds > 0 and "graph-ready step, uncaptured" in capsys.readouterr().out


@needs_cuda
def test_cuda_bf16_training_node_means_pruning_and_csr(corpus, tmp_path):
    from sparse_lens.hooks import NodeRegistry, compute_node_means
    from sparse_lens.pruning import prune
    from sparse_lens.sparse_kernels import sparse_matmuls

    result = train(SparseHookedTransformerConfig.preset("tiny"), short(steps=6, device="cuda", dtype="bf16"),
                   tmp_path / "run", corpus=corpus, progress=False)
    model = result.model.eval()
    assert next(model.parameters()).is_cuda and result.history[-1]["loss"] < 9
    means = compute_node_means(model, NodeRegistry.for_model(model), corpus.train.cuda(), n_tokens=2048)
    assert means.is_cuda and torch.isfinite(means).all()
    circuit = prune(model, "with_as", means=means, steps=3, target_loss=5, progress=False)
    assert circuit.solved
    tokens = corpus.val[:64].view(2, 32).cuda()
    with torch.no_grad():
        dense = model(tokens)
        with sparse_matmuls(model, True):
            csr = model(tokens)
    torch.testing.assert_close(csr, dense, rtol=0, atol=1e-4)


@needs_cuda
@pytest.mark.parametrize("dtype", ["float32", "bf16"])
def test_the_captured_step_replays_what_the_eager_static_step_computes(dtype):
    """`StaticStep` on CUDA: three eager warm-up steps, a capture, then replays; against the same
    step run eagerly on the same device (no capture), step for step."""
    from sparse_lens.model import SparseHookedTransformer
    from sparse_lens.training import make_optimizer
    from sparse_lens.training.graphed import StaticStep

    cfg = SparseHookedTransformerConfig.preset("tiny", n_ctx=32, device="cuda")
    tc = TrainConfig(batch_size=2, seq_len=32, dtype=dtype, device="cuda", cuda_graph=True)
    models, steps = [], []
    for capture in (True, False):
        torch.manual_seed(0)
        model = SparseHookedTransformer(cfg).train()
        models.append(model)
        steps.append(StaticStep(model, make_optimizer(model, tc), tc, (2, 32), capture=capture))
    for i in range(6):
        tokens = torch.randint(0, cfg.d_vocab, (2, 32), device="cuda",
                               generator=torch.Generator("cuda").manual_seed(i))
        l0, lr = tc.schedule(i, cfg.weight_l0)
        losses = [step(tokens, lr, l0) for step in steps]
        assert abs(losses[0] - losses[1]) < 1e-4, (i, losses)
    assert steps[0].graph is not None and steps[1].graph is None
    for (name, a), (_, b) in zip(*(m.named_parameters() for m in models)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=name)


def _gpu_recipe():
    return load_script("scripts/gpu_train_wide.py")


def test_the_gpu_recipe_fits_the_most_tokens_into_its_budget_with_enough_steps():
    """`scripts/gpu_train_wide.py` picks the candidate with the most tokens among those whose
    steps (10% kept for evaluation, a multiple of 100) reach the minimum; else the most steps.
    The figures are the H200's probes of 2026-12-04 (results/gpu/summary.md)."""
    choose = _gpu_recipe().choose
    probes = [(64, "bf16", False, 0.0639), (256, "bf16", False, 0.1068), (256, "float32", False, 0.1323)]
    assert choose(probes, budget_s=250, min_steps=2000) == (256, "bf16", False, 2100)
    assert choose(probes, budget_s=250, min_steps=3000) == (64, "bf16", False, 3500)
    assert choose(probes, budget_s=10, min_steps=2000) == (64, "bf16", False, 100)  # none reaches it
    # a captured step (made-up timings) that fits the minimum wins on tokens
    graphed = [*probes, (64, "bf16", True, 0.008), (256, "bf16", True, 0.03)]
    assert choose(graphed, budget_s=250, min_steps=8000) == (64, "bf16", True, 28400)


def test_the_gpu_recipe_splits_what_it_ships_into_parts_that_join_back(tmp_path, monkeypatch):
    recipe = _gpu_recipe()
    monkeypatch.setattr(recipe, "PART_BYTES", 4096)
    (tmp_path / "run" / "sub").mkdir(parents=True)
    payload = torch.randint(0, 255, (20_000,), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    (tmp_path / "run" / "sub" / "blob.bin").write_bytes(bytes(payload.tolist()))
    driver = recipe.Driver(recipe.argparse.Namespace(out=tmp_path / "out", deadline_s=60))
    recipe.ship(driver, "x.tar", tmp_path / "run", ["sub", "missing"])
    parts = sorted((tmp_path / "out").glob("x.tar.part*"))
    assert len(parts) > 1 and all(p.stat().st_size <= 4096 for p in parts)
    joined = tmp_path / "joined.tar"
    joined.write_bytes(b"".join(p.read_bytes() for p in parts))
    with tarfile.open(joined) as tar:
        assert tar.extractfile("sub/blob.bin").read() == bytes(payload.tolist())
