"""Bridged training through the shared loop: it resumes bitwise like a plain run (after a kill,
after Ctrl-C), refuses to resume with other settings, and leaves the global RNG alone."""

import os
import signal

import pytest
import torch

from test_bridges import MICRO
from test_training import sampling_that_calls

from sparse_lens import bridges as B
from sparse_lens import data, training
from sparse_lens.bridges import saving
from sparse_lens.config import SparseHookedTransformerConfig
from sparse_lens.training import TrainConfig, train



@pytest.fixture(scope="module")
def corpus(tokenizer, tmp_path_factory):
    return data.load_corpus(None, tokenizer, max_files=30, cache_dir=tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="module")
def dense(corpus, tmp_path_factory):
    cfg = SparseHookedTransformerConfig(**{**MICRO, "weight_l0": 1.0, "model_name": "micro-dense"})
    tc = TrainConfig(steps=4, batch_size=4, seq_len=32, eval_every=4, eval_batches=1, checkpoint_every=4)
    model = train(cfg, tc, tmp_path_factory.mktemp("dense") / "d", corpus=corpus, progress=False).model
    return model.eval()


def config(**overrides) -> B.BridgeTrainConfig:
    tc = TrainConfig(**{**dict(steps=8, batch_size=4, seq_len=32, lr=1e-2, eval_every=3,
                               eval_batches=1, checkpoint_every=3), **overrides})
    return B.BridgeTrainConfig(train=tc, hybrid_sites=2, eval_hybrid_batches=1)



def assert_same_weights(a: B.BridgeTrainResult, b: B.BridgeTrainResult) -> None:
    for module_a, module_b in ((a.sparse, b.sparse), (a.bridges, b.bridges)):
        for (name, x), (_, y) in zip(module_a.named_parameters(), module_b.named_parameters()):
            assert torch.equal(x, y), name


def kill(step):
    def raise_():
        raise KeyboardInterrupt("killed")
    return sampling_that_calls(raise_, step)


@pytest.mark.slow
def test_a_killed_bridged_run_resumes_bitwise(dense, corpus, tmp_path, monkeypatch):
    sparse_cfg = SparseHookedTransformerConfig(**MICRO)
    whole = B.train_bridged(dense, sparse_cfg, config(), tmp_path / "a", corpus=corpus, progress=False)
    monkeypatch.setattr(data, "sample_batch", kill(5))
    with pytest.raises(KeyboardInterrupt):
        B.train_bridged(dense, sparse_cfg, config(), tmp_path / "b", corpus=corpus, progress=False)
    monkeypatch.undo()
    assert saving.training_state(tmp_path / "b")["step"] == 3  # the checkpoint before the kill
    resumed = B.train_bridged(dense, sparse_cfg, config(), tmp_path / "b", corpus=corpus,
                              progress=False, resume=True)
    assert_same_weights(whole, resumed)
    assert resumed.history == whole.history  # a record per step, evaluations included
    assert B.training_state(tmp_path / "b")["step"] == 8
    sparse, bridges = B.load_bridged(tmp_path / "b")
    assert torch.equal(sparse.W_E, whole.sparse.W_E)
    assert torch.equal(next(bridges.parameters()), next(whole.bridges.parameters()))


@pytest.mark.slow
def test_ctrl_c_checkpoints_a_bridged_run_and_auto_resume_continues_bitwise(dense, corpus, tmp_path,
                                                                           monkeypatch):
    handler_before = signal.getsignal(signal.SIGINT)  # SIG_IGN when run in the background
    sparse_cfg = SparseHookedTransformerConfig(**MICRO)
    whole = B.train_bridged(dense, sparse_cfg, config(), tmp_path / "a", corpus=corpus, progress=False)
    ctrl_c = sampling_that_calls(lambda: os.kill(os.getpid(), signal.SIGINT), at_step=4)
    monkeypatch.setattr(data, "sample_batch", ctrl_c)
    with pytest.raises(training.TrainingInterrupted, match=r"step 5 .*resume=True"):
        B.train_bridged(dense, sparse_cfg, config(), tmp_path / "b", corpus=corpus, progress=False)
    monkeypatch.undo()
    assert signal.getsignal(signal.SIGINT) is handler_before
    assert saving.training_state(tmp_path / "b")["step"] == 5
    # the saved configs are used; the sparse model is the checkpoint's
    resumed = B.train_bridged(dense, None, None, tmp_path / "b", corpus=corpus, progress=False,
                              resume="auto")
    assert_same_weights(whole, resumed)


def test_resuming_a_bridged_run_with_other_settings_or_nothing_to_resume_is_refused(dense, corpus, tmp_path):
    sparse_cfg = SparseHookedTransformerConfig(**MICRO)
    B.train_bridged(dense, sparse_cfg, config(steps=3), tmp_path / "r", corpus=corpus, progress=False)
    with pytest.raises(ValueError, match="train.lr: saved 0.01, given 0.001"):
        B.train_bridged(dense, sparse_cfg, config(steps=3, lr=1e-3), tmp_path / "r", corpus=corpus,
                        progress=False, resume=True)
    with pytest.raises(ValueError, match="nothing to resume"):
        B.train_bridged(dense, sparse_cfg, config(), tmp_path / "empty", corpus=corpus,
                        progress=False, resume=True)
    weights = (tmp_path / "r" / "model.safetensors").read_bytes()
    with pytest.raises(ValueError, match="already holds a model"):  # a new run does not replace it
        B.train_bridged(dense, sparse_cfg, config(steps=2), tmp_path / "r", corpus=corpus, progress=False)
    assert (tmp_path / "r" / "model.safetensors").read_bytes() == weights
    B.train_bridged(dense, sparse_cfg, config(steps=2), tmp_path / "r", corpus=corpus, progress=False,
                    overwrite=True)
    assert (tmp_path / "r" / "model.safetensors").read_bytes() != weights


def test_training_leaves_the_global_rng_state_alone(dense, corpus, tmp_path):
    torch.manual_seed(1234)
    before = torch.get_rng_state()
    plain = train(SparseHookedTransformerConfig(**MICRO), TrainConfig(
        steps=2, batch_size=4, seq_len=32, eval_every=2, eval_batches=1, checkpoint_every=2),
        tmp_path / "plain", corpus=corpus, progress=False)
    assert torch.equal(torch.get_rng_state(), before)
    B.train_bridged(dense, SparseHookedTransformerConfig(**MICRO), config(steps=2), tmp_path / "b",
                    corpus=corpus, progress=False)
    assert torch.equal(torch.get_rng_state(), before)
    # and the fresh model is the one the seed alone gives, whatever the global RNG held
    torch.manual_seed(0)
    from sparse_lens.model import SparseHookedTransformer
    reference = SparseHookedTransformer(SparseHookedTransformerConfig(**MICRO))
    assert torch.equal(training.seeded_model(SparseHookedTransformerConfig(**MICRO), 0, None).W_E,
                       reference.W_E)
    assert plain.steps == 2


def test_a_bridged_run_refuses_the_cuda_graph_step(dense, corpus, tmp_path):
    with pytest.raises(ValueError, match="cuda_graph is for plain runs"):
        B.train_bridged(dense, SparseHookedTransformerConfig(**MICRO), config(cuda_graph=True),
                        tmp_path / "g", corpus=corpus, progress=False)
