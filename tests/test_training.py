"""Training: it learns real code, resumes bitwise, stops cleanly on NaN, trains the dense baseline."""

import json
import math

import pytest
import torch
from conftest import killed_at_step

from sparse_lens import checkpoint, data, training
from sparse_lens.config import SparseHookedTransformerConfig
from sparse_lens.model import SparseHookedTransformer
from sparse_lens.training import NonFiniteLossError, TrainConfig, train


@pytest.fixture(scope="module")
def corpus(tokenizer, tmp_path_factory):
    """A deterministic slice of the standard library (the real default corpus, fewer files)."""
    return data.load_corpus(None, tokenizer, max_files=120,
                            cache_dir=tmp_path_factory.mktemp("cache"))


def tiny_cfg(**overrides):
    return SparseHookedTransformerConfig.preset("tiny", n_ctx=64, **overrides)


def short(**overrides):
    return TrainConfig(**{**dict(steps=40, batch_size=4, seq_len=32, eval_every=10,
                                 eval_batches=2, checkpoint_every=10, lr=3e-3), **overrides})


@pytest.mark.slow
def test_training_on_the_stdlib_beats_the_unigram_baseline_and_is_sparse(corpus, tmp_path):
    tc = TrainConfig(steps=300, batch_size=8, seq_len=64, eval_every=100, eval_batches=4,
                     checkpoint_every=300, lr=3e-3)
    result = train(tiny_cfg(weight_l0=1 / 8), tc, tmp_path / "run", corpus=corpus, progress=False)
    first_val = result.history[0]["val_loss"]
    # 0.5 nat below the unigram cross-entropy: the model uses context, not just token counts
    assert result.val_loss < result.unigram_val_loss - 0.5, (result.val_loss, result.unigram_val_loss)
    assert result.val_loss < first_val
    table = result.model.weight_sparsity()
    budget = (table.numel / 8).astype(int)
    assert (table.nonzeros == budget.combine(table.floor_nonzeros, max)).all()
    assert (table.min_nonzeros_per_unit >= 4).all()
    # the run directory is a model directory holding the final weights
    loaded = SparseHookedTransformer.from_pretrained(tmp_path / "run")
    for (name, a), (_, b) in zip(result.model.named_parameters(), loaded.named_parameters()):
        assert torch.equal(a, b), name


def test_dense_baseline_uses_the_same_entry_point_and_stays_dense(corpus, tmp_path):
    result = train(tiny_cfg().dense_counterpart(), short(steps=10), tmp_path / "dense",
                   corpus=corpus, progress=False)
    table = result.model.weight_sparsity()
    assert (table.achieved_l0 > 0.99).all()
    assert all(r["l0"] == 1.0 for r in result.history)


@pytest.mark.slow
def test_stop_at_val_loss_stops_at_the_first_evaluation_that_reaches_it(corpus, tmp_path):
    free = train(tiny_cfg(), short(), tmp_path / "free", corpus=corpus, progress=False)
    target = free.history[1]["val_loss"]  # reached at step 20 of 40 (the same run, up to there)
    assert all(r["val_loss"] > target for r in free.history[:1])
    tc = short(stop_at_val_loss=target)
    stopped = train(tiny_cfg(), tc, tmp_path / "stop", corpus=corpus, progress=False)
    assert stopped.steps == 20 and stopped.val_loss == target
    assert [r["step"] for r in stopped.history] == [10, 20]
    # resuming a stopped run trains no further and gives the same weights
    again = train(tiny_cfg(), tc, tmp_path / "stop", resume=True, corpus=corpus, progress=False)
    assert again.steps == 20
    for (_, a), (_, b) in zip(stopped.model.named_parameters(), again.model.named_parameters()):
        assert torch.equal(a, b)


@pytest.mark.slow
def test_l0_is_annealed_over_the_first_half(corpus, tmp_path):
    result = train(tiny_cfg(weight_l0=1 / 8), short(steps=40), tmp_path / "r", corpus=corpus,
                   progress=False)
    l0 = {r["step"]: r["l0"] for r in result.history}
    # history steps count completed steps: step 20 ran optimizer step index 19, still annealing;
    # from index 20 (half of 40) on, the target holds
    assert 1.0 > l0[10] > l0[20] > l0[30]
    assert l0[30] == pytest.approx(1 / 8) and l0[40] == pytest.approx(1 / 8)


@pytest.mark.slow
def test_resume_after_a_kill_gives_bitwise_identical_weights(corpus, tmp_path, monkeypatch):
    cfg, tc = tiny_cfg(weight_l0=1 / 8), short(steps=40)
    uninterrupted = train(cfg, tc, tmp_path / "a", corpus=corpus, progress=False).model

    with killed_at_step(monkeypatch, 25), pytest.raises(KeyboardInterrupt):
        train(cfg, tc, tmp_path / "b", corpus=corpus, progress=False)
    assert checkpoint.read_json(tmp_path / "b" / "training" / "state.json")["step"] == 20
    resumed = train(cfg, tc, tmp_path / "b", resume=True, corpus=corpus, progress=False)
    for (name, a), (_, b) in zip(uninterrupted.named_parameters(), resumed.model.named_parameters()):
        assert torch.equal(a, b), name
    assert [r["step"] for r in resumed.history] == [10, 20, 30, 40]


def test_resume_with_different_settings_is_refused(corpus, tmp_path):
    train(tiny_cfg(), short(steps=10), tmp_path / "r", corpus=corpus, progress=False)
    with pytest.raises(ValueError, match="train.lr: saved 0.003, given 0.001"):
        train(tiny_cfg(), short(steps=10, lr=1e-3), tmp_path / "r", resume=True, corpus=corpus,
              progress=False)


def test_non_finite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(corpus, tmp_path, monkeypatch):
    real_forward = SparseHookedTransformer.forward
    calls = {"train": 0}

    def nan_at_training_step_15(self, *args, **kwargs):
        out = real_forward(self, *args, **kwargs)
        if self.training:
            calls["train"] += 1
            if calls["train"] == 15:
                return out * float("nan")
        return out

    monkeypatch.setattr(SparseHookedTransformer, "forward", nan_at_training_step_15)
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss nan at step 14.*\(step 10\)"):
        train(tiny_cfg(), short(steps=40), tmp_path / "r", corpus=corpus, progress=False)
    monkeypatch.setattr(SparseHookedTransformer, "forward", real_forward)
    assert checkpoint.read_json(tmp_path / "r" / "training" / "state.json")["step"] == 10
    kept = SparseHookedTransformer.from_pretrained(tmp_path / "r")
    assert all(torch.isfinite(p).all() for p in kept.parameters())


def test_gradient_rms_rescale_and_clip():
    p = torch.nn.Parameter(torch.zeros(4))
    p.grad = torch.full((4,), 0.01)
    assert training.rescale_grad_rms_([p], 1.0, "clip") == pytest.approx(0.01)
    assert torch.allclose(p.grad, torch.full((4,), 0.01))
    training.rescale_grad_rms_([p], 1.0, "rescale")
    assert torch.allclose(p.grad, torch.ones(4))
    p.grad = torch.tensor([math.inf, 0, 0, 0])
    with pytest.raises(NonFiniteLossError):
        training.rescale_grad_rms_([p], 1.0, "rescale")


@pytest.mark.parametrize("field, value", [("steps", 0), ("batch_size", -1), ("lr", 0.0),
                                          ("grad_rms_mode", "sometimes"), ("anneal_end_frac", 1.5)])
def test_invalid_train_config(field, value):
    with pytest.raises(ValueError, match=field):
        TrainConfig(**{field: value})


def test_cuda_asked_for_without_cuda_is_a_clear_error(corpus, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(ValueError, match="cuda"):
        train(tiny_cfg(), short(device="cuda"), tmp_path / "r", corpus=corpus, progress=False)


_TRAIN_AND_HASH = """
import hashlib, sys, torch
from sparse_lens import training
from sparse_lens.config import SparseHookedTransformerConfig
torch.set_num_threads(2)  # >1 thread: the embedding backward's parallel atomic adds (see training.py)
if sys.argv[2] == "unguarded":
    import contextlib, sparse_lens.training.run as run
    run.deterministic_algorithms = lambda enabled=True: contextlib.nullcontext()
tc = training.TrainConfig(steps=12, batch_size=8, seq_len=64, max_files=30, eval_every=12,
                          eval_batches=1, checkpoint_every=12)
result = training.train(SparseHookedTransformerConfig.preset("tiny"), tc, sys.argv[1], progress=False)
assert not torch.are_deterministic_algorithms_enabled()  # the caller's setting is restored
h = hashlib.sha256()
for name, p in sorted(result.model.state_dict().items()):
    h.update(name.encode() + p.detach().contiguous().numpy().tobytes())
print(h.hexdigest())
"""


def _train_in_subprocess(tmp_path, name, hash_seed, mode="guarded"):
    import os
    import subprocess
    import sys

    env = {**os.environ, "PYTHONHASHSEED": str(hash_seed), "SPARSE_LENS_CACHE": str(tmp_path / "cache")}
    out = subprocess.run([sys.executable, "-c", _TRAIN_AND_HASH, str(tmp_path / name), mode],
                         env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout.split()[-1]


@pytest.mark.slow
def test_training_from_scratch_is_bitwise_reproducible_across_processes(tmp_path):
    """Two fresh processes (different hash seeds; the first tokenizes the corpus, the second reads
    the token cache) train the same weights, bit for bit, with 2 threads: a batch of 8 x 64
    tokens x d_model 64 is large enough for the embedding backward's multithreaded path."""
    first = _train_in_subprocess(tmp_path, "a", hash_seed=1)
    second = _train_in_subprocess(tmp_path, "b", hash_seed=2)
    assert first == second


# ------------------------------------------------------------------ the run directory is the user's too
def sampling_that_calls(action, at_step: int):
    """`data.sample_batch` that first calls `action()` when asked for step `at_step`."""
    real_sample = data.sample_batch

    def sample(tokens, batch_size, seq_len, step, seed):
        if step == at_step:
            action()
        return real_sample(tokens, batch_size, seq_len, step, seed)

    return sample


def test_a_checkpoint_replaces_only_the_trainers_own_files(corpus, tmp_path, monkeypatch):
    """Pruning and the demo write into the run directory while it trains; checkpoints keep that."""
    run = tmp_path / "run"

    def prune_while_training():
        (run / "circuits" / "quote").mkdir(parents=True)
        (run / "circuits" / "quote" / "circuit.json").write_text("{}")
        (run / "report.html").write_text("<html></html>")

    # at step 12: after the checkpoint at step 10, before the one at 20
    monkeypatch.setattr(data, "sample_batch", sampling_that_calls(prune_while_training, at_step=12))
    train(tiny_cfg(), short(steps=20), run, corpus=corpus, progress=False)
    assert (run / "circuits" / "quote" / "circuit.json").read_text() == "{}"
    assert (run / "report.html").is_file()
    assert checkpoint.read_json(run / "training" / "state.json")["step"] == 20
    assert not any(p.name.startswith(".") for p in run.iterdir())  # no staging left behind


def test_a_new_run_refuses_a_directory_holding_a_model_unless_overwrite(corpus, tmp_path):
    run = tmp_path / "run"
    first = train(tiny_cfg(), short(steps=10), run, corpus=corpus, progress=False).model
    (run / "notes.txt").write_text("mine")
    (run / "node_means.safetensors").write_bytes(b"stale")
    with pytest.raises(ValueError, match="already holds a model.*overwrite"):
        train(tiny_cfg(), short(steps=10, seed=1), run, corpus=corpus, progress=False)
    assert torch.equal(SparseHookedTransformer.from_pretrained(run).W_E, first.W_E)  # untouched
    second = train(tiny_cfg(), short(steps=10, seed=1), run, corpus=corpus, progress=False,
                   overwrite=True).model
    assert not torch.equal(second.W_E, first.W_E)
    assert (run / "notes.txt").read_text() == "mine"
    assert not (run / "node_means.safetensors").exists()  # computed from the replaced weights


def test_resume_with_nothing_to_resume_is_an_error(corpus, tmp_path):
    with pytest.raises(ValueError, match="nothing to resume"):
        train(tiny_cfg(), short(steps=10), tmp_path / "empty", resume=True, corpus=corpus, progress=False)
    assert not (tmp_path / "empty").exists()


@pytest.mark.slow
def test_ctrl_c_saves_a_checkpoint_and_resume_alone_continues_bitwise(corpus, tmp_path, monkeypatch):
    import os
    import signal

    handler_before = signal.getsignal(signal.SIGINT)  # SIG_IGN when run in the background
    cfg, tc = tiny_cfg(weight_l0=1 / 8), short(steps=40)
    uninterrupted = train(cfg, tc, tmp_path / "a", corpus=corpus, progress=False).model
    real_sample = data.sample_batch
    ctrl_c = sampling_that_calls(lambda: os.kill(os.getpid(), signal.SIGINT), at_step=13)
    monkeypatch.setattr(data, "sample_batch", ctrl_c)
    with pytest.raises(training.TrainingInterrupted, match=r"step 14 .*--resume"):
        train(cfg, tc, tmp_path / "b", corpus=corpus, progress=False)
    monkeypatch.setattr(data, "sample_batch", real_sample)
    assert signal.getsignal(signal.SIGINT) is handler_before  # handler restored
    assert checkpoint.read_json(tmp_path / "b" / "training" / "state.json")["step"] == 14
    resumed = train(None, None, tmp_path / "b", resume=True, corpus=corpus, progress=False)
    for (name, a), (_, b) in zip(uninterrupted.named_parameters(), resumed.model.named_parameters()):
        assert torch.equal(a, b), name


def test_snapshots_keep_a_model_every_n_steps(corpus, tmp_path):
    run = tmp_path / "run"
    final = train(tiny_cfg(), short(steps=20, snapshot_every=10), run, corpus=corpus, progress=False).model
    snaps = sorted(p.name for p in (run / "snapshots").iterdir())
    assert snaps == ["step-000010", "step-000020"]
    at_20 = SparseHookedTransformer.from_pretrained(run / "snapshots" / "step-000020")
    at_10 = SparseHookedTransformer.from_pretrained(run / "snapshots" / "step-000010")
    assert torch.equal(at_20.W_in, final.W_in) and not torch.equal(at_10.W_in, final.W_in)


def test_validation_builds_no_autograd_graph(monkeypatch):
    model = SparseHookedTransformer(tiny_cfg())
    grad_modes = []
    real_forward = SparseHookedTransformer.forward

    def record(self, *args, **kwargs):
        grad_modes.append(torch.is_grad_enabled())
        return real_forward(self, *args, **kwargs)

    monkeypatch.setattr(SparseHookedTransformer, "forward", record)
    training.evaluate(model, [torch.randint(0, 2048, (2, 16))])
    assert grad_modes == [False]


def test_optimizer_state_round_trips_whatever_its_keys():
    model = SparseHookedTransformer(tiny_cfg())
    for optimizer in (torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
                      training.make_optimizer(model, TrainConfig())):
        model(torch.randint(0, 2048, (1, 8)), return_type="loss").backward()
        optimizer.step()
        tensors, scalars = training.optimizer_tensors(model, optimizer)
        fresh = type(optimizer)(model.parameters(), **{k: v for k, v in optimizer.defaults.items()
                                                       if k in ("lr", "momentum")})
        training.load_optimizer_state(model, fresh, tensors, scalars)
        for p in model.parameters():
            for key, value in optimizer.state[p].items():
                assert torch.equal(fresh.state[p][key], value), key


def test_fused_adamw_steps_like_the_per_parameter_loop(corpus):
    cfg, tc = tiny_cfg(weight_l0=1 / 8), short()
    models, losses = [], []
    for fused in (True, False):
        torch.manual_seed(0)
        model = SparseHookedTransformer(cfg)
        model.project_weights_(cfg.weight_l0)
        optimizer = training.make_optimizer(model, tc, fused=fused)
        assert training.is_fused(optimizer) is fused
        with training.deterministic_algorithms(True):
            losses.append([training.train_step(model, optimizer, data.sample_batch(
                corpus.train, tc.batch_size, tc.seq_len, step, seed=0), tc.lr, cfg.weight_l0, tc)
                for step in range(5)])
        models.append(model)
    assert losses[0] == pytest.approx(losses[1], abs=1e-5)
    for (name, a), (_, b) in zip(models[0].named_parameters(), models[1].named_parameters()):
        assert torch.allclose(a, b, atol=1e-5), name
        assert torch.equal(a != 0, b != 0), name  # the same weights kept by the projection


def test_a_run_resumes_with_the_adamw_it_was_saved_with(corpus, tmp_path):
    from sparse_lens.kernels import reference_kernels
    from sparse_lens.training.rundir import load_run

    cfg, tc = tiny_cfg(), short(steps=10)
    train(cfg, tc, tmp_path / "new", corpus=corpus, progress=False)
    with reference_kernels():  # the per-parameter loop, as every run before the fused AdamW
        train(cfg, tc, tmp_path / "old", corpus=corpus, progress=False)
    state_file = tmp_path / "old" / "training" / "state.json"
    state = checkpoint.read_json(state_file)
    assert state.pop("fused_adamw") is False
    state_file.write_text(json.dumps(state))  # as runs written before the record existed
    for run, fused in (("new", True), ("old", False)):
        _, optimizer, step, _ = load_run(tmp_path / run, cfg, tc, "cpu")
        assert (training.is_fused(optimizer), step) == (fused, 10)
