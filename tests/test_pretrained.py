"""The shipped checkpoint: its compact format round-trips exactly, it loads as made, and the demo
starts from it (or retrains) as the README says."""

import json

import pytest
import torch

from sparse_lens import checkpoint, data, demo, pretrained, shipped
from sparse_lens.config import PRESETS, SparseHookedTransformerConfig
from sparse_lens.model import SparseHookedTransformer
from sparse_lens.training import TRAINING_DIR, TrainConfig, train


def bits(t):
    return t.contiguous().view(torch.int32)


def test_packing_round_trips_bit_for_bit(tmp_path):
    gen = torch.Generator().manual_seed(0)
    sparse = torch.randn(64, 48, generator=gen)
    sparse[torch.rand(64, 48, generator=gen) > 0.06] = 0.0
    sparse[0, 0], sparse[0, 1], sparse[1, 0] = -0.0, float("nan"), float("-inf")
    tensors = {
        "blocks.0.attn.W_Q": sparse.reshape(4, 16, 3, 16),  # a 4-D layout, mostly zeros
        "blocks.0.ln1.w": torch.randn(48, generator=gen),  # dense: stored as it is
        "all_zero": torch.zeros(5, 7),
        "empty": torch.zeros(0, 3),
    }
    pretrained.save_packed(tensors, tmp_path / "w.safetensors")
    back = pretrained.load_packed(tmp_path / "w.safetensors")
    assert set(back) == set(tensors)
    for name, t in tensors.items():
        assert back[name].shape == t.shape and torch.equal(bits(back[name]), bits(t)), name
    assert pretrained.weights_digest(back) == pretrained.weights_digest(tensors)
    # stored compactly: the sparse matrix as 1 bit an entry plus its nonzeros
    packed, meta = pretrained.pack_tensors(tensors)
    layout = json.loads(meta[pretrained.LAYOUT_KEY])
    assert layout["blocks.0.attn.W_Q"]["kind"] == "mask+values" and layout["blocks.0.ln1.w"]["kind"] == "dense"
    assert packed["blocks.0.attn.W_Q.mask"].numel() == 64 * 48 // 8


@pytest.fixture(scope="module")
def shipped_tiny(tmp_path_factory):
    """A finished 2-step tiny run (default settings otherwise, on a small corpus) packed into a
    private pretrained root as `tiny`; returns (root, the run's model)."""
    base = tmp_path_factory.mktemp("shipped")
    corpus = data.load_corpus(None, max_files=20, cache_dir=base / "cache")
    run = train(SparseHookedTransformerConfig.preset("tiny"), TrainConfig(steps=2, eval_batches=1),
                base / "run", corpus=corpus, progress=False)
    root = base / "pretrained_data"
    pretrained.pack(base / "run", "tiny", command="sparse-lens train --preset tiny --steps 2", root=root)
    return root, run.model


@pytest.mark.slow
def test_a_packed_run_loads_exactly_with_its_provenance(shipped_tiny, tmp_path):
    root, model = shipped_tiny
    assert not any(p.name == TRAINING_DIR for p in (root / "tiny").iterdir())  # no optimizer state
    loaded = pretrained.load("tiny", root=root)
    for (name, a), (_, b) in zip(model.named_parameters(), loaded.named_parameters()):
        assert torch.equal(bits(a.detach()), bits(b.detach())), name
    made = pretrained.provenance("tiny", root=root)
    assert made["command"] == "sparse-lens train --preset tiny --steps 2"
    assert made["steps"] == 2 and made["seed"] == 0 and made["preset"] == "tiny"
    assert len(made["git_commit"]) >= 40 or made["git_commit"] == "unknown"
    # a run trained at an earlier commit than the tree it now lies in records that one
    run_dir = root.parent / "run"
    again_root = tmp_path / "again"
    pretrained.pack(run_dir, "tiny", command=made["command"], root=again_root, git_commit="a" * 40)
    assert pretrained.provenance("tiny", root=again_root)["git_commit"] == "a" * 40
    with pytest.raises(ValueError, match="40 hex digits"):
        pretrained.pack(run_dir, "tiny", command=made["command"], root=again_root, git_commit="HEAD")
    # a run shipped as a preset must be that preset, its name aside
    pretrained.pack(run_dir, "tiny", command=made["command"], root=again_root, preset="tiny")
    with pytest.raises(ValueError, match="not the .small. preset: it differs in d_model, n_layers"):
        pretrained.pack(run_dir, "tiny", command=made["command"], root=again_root, preset="small")
    assert "sparse-lens train --preset tiny --steps 2" in pretrained.describe("tiny", root=root)
    # materialised: an ordinary model directory, with the provenance beside it
    out = pretrained.materialise("tiny", tmp_path / "m", root=root)
    again = SparseHookedTransformer.from_pretrained(out)
    assert torch.equal(again.W_E, model.W_E) and pretrained.shipped_provenance_of(out) == made
    # a damaged weights file is refused, not loaded
    damaged = tmp_path / "damaged"
    import shutil

    shutil.copytree(root / "tiny", damaged / "tiny")
    record = json.loads((damaged / "tiny" / pretrained.PROVENANCE_FILE).read_text())
    record["weights_sha256"] = "0" * 64
    (damaged / "tiny" / pretrained.PROVENANCE_FILE).write_text(json.dumps(record))
    with pytest.raises(checkpoint.CheckpointError, match="does not unpack"):
        pretrained.load("tiny", root=damaged)


@pytest.mark.slow
def test_unfinished_runs_are_not_shipped(tmp_path):
    corpus = data.load_corpus(None, max_files=20, cache_dir=tmp_path / "cache")
    train(SparseHookedTransformerConfig.preset("tiny"), TrainConfig(steps=4, checkpoint_every=1),
          tmp_path / "run", corpus=corpus, progress=False)
    state = json.loads((tmp_path / "run" / TRAINING_DIR / "state.json").read_text())
    state["step"] = 3
    (tmp_path / "run" / TRAINING_DIR / "state.json").write_text(json.dumps(state))
    with pytest.raises(ValueError, match="unfinished"):
        pretrained.pack(tmp_path / "run", "x", command="c", root=tmp_path / "root")


def test_the_shipped_small_checkpoint_is_the_default_small_model():
    """What the demo starts from: the `small` preset, trained by `sparse-lens train` with the
    settings the demo would use, its steps those the checkpoint records (if a default changes,
    retrain and re-ship it; see README)."""
    assert "small" in pretrained.available()
    made = pretrained.provenance("small")
    steps = demo.default_steps("small", None)
    assert made["command"].startswith("sparse-lens train") and made["steps"] == steps
    assert demo.shipped_mismatch("small", steps) is None
    assert demo.shipped_mismatch("small", TrainConfig().steps) is not None  # --steps 1400 retrains
    model = pretrained.load("small")  # checks the weights against the recorded SHA-256
    table = model.weight_sparsity()
    assert table.nonzeros.sum() / table.numel.sum() < 0.07
    assert made["val_loss"] < made["unigram_val_loss"] - 1.0
    size = sum(f.stat().st_size for f in pretrained.path("small").iterdir())
    assert size < 4e6, size


@pytest.mark.parametrize("name", sorted(set(pretrained.available()) & set(PRESETS)))
def test_every_shipped_preset_checkpoint_is_what_its_demo_would_train(name):
    """`sparse-lens demo --preset NAME` starts from the shipped `NAME`: it is that preset,
    trained with the demo's settings and the steps it records, at the preset's density."""
    steps = demo.default_steps(name, None)
    assert demo.shipped_mismatch(name, steps) is None
    model = pretrained.load(name)  # checks the weights against the recorded SHA-256
    assert model.cfg.model_name == f"sparse-{name}"
    table = model.weight_sparsity()
    assert table.nonzeros.sum() / table.numel.sum() < 1.15 * model.cfg.weight_l0


def test_the_previous_wide_checkpoint_stays_shipped_for_the_results_commands():
    """`results/` was measured on the 20,000-step `wide` checkpoint, shipped now as `wide-20k`
    (its commands reproduce with `--sparse-model wide-20k`): the same weights as then."""
    made = pretrained.provenance("wide-20k")
    assert made["preset"] == "wide" and made["steps"] == 20000
    assert made["weights_sha256"] == "e5c04aac8fd3e73b1d9f822d76d25f1f0182020e634e6b033350552089e09596"
    model = pretrained.load("wide-20k")  # checks the weights against the recorded SHA-256
    assert model.cfg.d_model == 384 and model.cfg.weight_l0 == 1 / 32
    assert pretrained.provenance("wide")["steps"] > made["steps"]


def test_the_demo_chooses_its_model(shipped_tiny, tmp_path, monkeypatch):
    root, _ = shipped_tiny
    monkeypatch.setattr(shipped, "PRETRAINED_DIR", root)
    empty = tmp_path / "empty"
    assert demo.model_source(empty, "tiny", steps=2) == "shipped"
    assert demo.model_source(empty, "tiny", steps=None) == "train"  # the default steps are not 2
    assert "train.steps" in demo.shipped_mismatch("tiny", None)
    assert demo.model_source(empty, "tiny", steps=2, retrain=True) == "train"
    assert demo.model_source(empty, "small", steps=2) == "train"  # nothing shipped under root
    model_only = tmp_path / "model_only"
    SparseHookedTransformer(SparseHookedTransformerConfig.preset("tiny")).save_pretrained(model_only)
    assert demo.model_source(model_only, "tiny", steps=2) == "reuse"
    assert demo.model_source(model_only, "tiny", steps=2, retrain=True) == "train"
    (model_only / TRAINING_DIR).mkdir()
    assert demo.model_source(model_only, "tiny", steps=2) == "train"  # a training run: resume/reuse


@pytest.mark.slow
def test_demo_starts_from_the_shipped_checkpoint_then_reuses_it_and_retrains_on_request(
        shipped_tiny, tmp_path, monkeypatch, capsys):
    root, model = shipped_tiny
    monkeypatch.setattr(shipped, "PRETRAINED_DIR", root)
    # the validation-loss check reads the default corpus: a small one here
    real_load = data.load_corpus
    monkeypatch.setattr(data, "load_corpus", lambda *a, **k: real_load(
        None, model.tokenizer, max_files=20, cache_dir=tmp_path / "cache"))
    out = tmp_path / "run"
    got = demo.get_model(out, "tiny", steps=2, progress=False)
    said = capsys.readouterr().out
    assert "checkpoint shipped in the package" in said and "made by `sparse-lens train --preset tiny" in said
    assert "--retrain" in said and "validation loss here" in said
    assert torch.equal(got.W_E, model.W_E) and not (out / TRAINING_DIR).exists()

    demo.get_model(out, "tiny", steps=2, progress=False)
    said = capsys.readouterr().out
    assert "reusing the model in" in said and "made by" in said

    retrained = demo.get_model(out, "tiny", steps=2, progress=False, retrain=True)
    said = capsys.readouterr().out
    assert "training tiny for 2 steps" in said and "--retrain" in said
    assert (out / TRAINING_DIR / "state.json").is_file()
    assert pretrained.shipped_provenance_of(out) is None  # the shipped copy was replaced
    assert isinstance(retrained, SparseHookedTransformer)
