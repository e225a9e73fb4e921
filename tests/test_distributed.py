"""Data-parallel training (torchrun + DDP, gloo on CPU): ranks stay bitwise equal and train the
model a single process trains with the same global batch."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sparse_lens import checkpoint, data, distributed, training
from sparse_lens.config import SparseHookedTransformerConfig
from sparse_lens.distributed import RankContext, RankDivergenceError, rank_batch, weights_checksum
from sparse_lens.model import SparseHookedTransformer
from sparse_lens.training import TrainConfig, train

ROOT = Path(__file__).resolve().parents[1]
STEPS, PER_RANK, SEQ, FILES = 6, 2, 32, 30


@pytest.mark.slow
def test_two_gloo_processes_hold_equal_weights_and_follow_the_single_process_curve(tmp_path, tokenizer,
                                                                                     monkeypatch):
    monkeypatch.setenv("SPARSE_LENS_CACHE", str(tmp_path / "cache"))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "sparse_lens", "train", "--preset", "tiny", "--out", str(tmp_path / "ddp"),
           "--steps", str(STEPS), "--batch-size", str(PER_RANK), "--seq-len", str(SEQ),
           "--max-files", str(FILES), "--eval-every", "1", "--checkpoint-every", "3", "--no-progress"]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    checksums = dict(re.findall(r"rank (\d)/2: weights checksum (-?0x[0-9a-f]+)", run.stdout))
    assert set(checksums) == {"0", "1"}, run.stdout
    assert checksums["0"] == checksums["1"]  # bitwise equal weights (also checked during the run)

    ddp_state = checkpoint.read_json(tmp_path / "ddp" / training.TRAINING_DIR / "state.json")
    assert ddp_state["world_size"] == 2 and ddp_state["step"] == STEPS
    saved = SparseHookedTransformer.from_pretrained(tmp_path / "ddp")
    assert hex(int(weights_checksum(saved))) == checksums["0"]  # rank 0 wrote what it held

    # one process, the same global batch (2 ranks x 2 rows): the same tokens at every step
    tc = TrainConfig(steps=STEPS, batch_size=2 * PER_RANK, seq_len=SEQ, max_files=FILES,
                     eval_every=1, checkpoint_every=STEPS)
    single = train(SparseHookedTransformerConfig.preset("tiny"), tc, tmp_path / "single",
                   progress=False, ranks=RankContext())
    ddp_losses = torch.tensor([r["loss"] for r in ddp_state["history"]], dtype=torch.float64)
    single_losses = torch.tensor([r["loss"] for r in single.history], dtype=torch.float64)
    assert len(ddp_losses) == STEPS
    # float reduction order only (gradient sums split over ranks, 1 vs several threads)
    torch.testing.assert_close(ddp_losses, single_losses, rtol=1e-5, atol=1e-5)
    for (name, a), (_, b) in zip(saved.named_parameters(), single.model.named_parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)


def test_rank_batches_are_the_rows_of_the_global_batch():
    tokens = torch.arange(10_000)
    whole = data.sample_batch(tokens, 6, 16, step=7, seed=3)
    parts = [rank_batch(tokens, 2, 16, 7, 3, rank=r, world_size=3) for r in range(3)]
    assert torch.equal(torch.cat(parts), whole)
    assert torch.equal(rank_batch(tokens, 6, 16, 7, 3), whole)  # one rank: the plain batch
    assert not torch.equal(rank_batch(tokens, 2, 16, 8, 3, 1, 3), parts[1])  # another step
    with pytest.raises(ValueError, match="rank must be in"):
        rank_batch(tokens, 2, 16, 7, 3, rank=3, world_size=3)


def test_weights_checksum_sees_one_ulp_and_swapped_entries():
    model = torch.nn.Linear(8, 4)
    before = int(weights_checksum(model))
    assert int(weights_checksum(model)) == before
    with torch.no_grad():
        model.weight[1, 2] = torch.nextafter(model.weight[1, 2], torch.tensor(1.0))
    nudged = int(weights_checksum(model))
    assert nudged != before
    with torch.no_grad():
        a, b = model.weight[0, 0].item(), model.weight[0, 1].item()
        model.weight[0, 0], model.weight[0, 1] = b, a
    assert int(weights_checksum(model)) != nudged


def test_ranks_with_different_weights_are_an_error(monkeypatch):
    def fake_all_gather(out, mine):  # the other rank reports another checksum
        out[0].copy_(mine)
        out[1].copy_(mine + 1)

    monkeypatch.setattr(distributed.dist, "all_gather", fake_all_gather)
    with pytest.raises(RankDivergenceError, match="ranks hold different weights at step 200"):
        RankContext(rank=0, world_size=2).check_weights(torch.nn.Linear(2, 2), 200)


def test_resuming_with_another_world_size_is_a_clear_error(tmp_path, tokenizer, monkeypatch):
    stream = torch.randint(1, 2048, (4096,), generator=torch.Generator().manual_seed(0))
    corpus = data.TokenCorpus(train=stream, val=stream[:2048])
    tc = TrainConfig(steps=2, batch_size=2, seq_len=16, eval_every=1, eval_batches=1, checkpoint_every=1)
    train(SparseHookedTransformerConfig.preset("tiny"), tc, tmp_path / "run", corpus=corpus, progress=False)
    monkeypatch.setattr(distributed.dist, "barrier", lambda: None)
    with pytest.raises(ValueError, match="trained with 1"):
        train(None, None, tmp_path / "run", resume=True, corpus=corpus, progress=False,
              ranks=RankContext(rank=0, world_size=2))


@pytest.mark.slow
def test_python_dash_m_sparse_lens_is_the_cli():
    run = subprocess.run([sys.executable, "-m", "sparse_lens", "train", "--help"],
                         env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True)
    assert run.returncode == 0 and "torchrun" in run.stdout and "--dtype" in run.stdout
