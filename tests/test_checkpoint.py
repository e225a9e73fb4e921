"""Model directories: exact round trip, no unpickling, and clear errors for bad files."""

import json
import pickle

import pytest
import torch
from safetensors.torch import load_file, save_file

from sparse_lens.checkpoint import CheckpointError
from sparse_lens.config import SparseHookedTransformerConfig
from sparse_lens.model import SparseHookedTransformer


@pytest.fixture
def saved(tmp_path, tokenizer):
    torch.manual_seed(0)
    cfg = SparseHookedTransformerConfig.preset("tiny", device="cpu", use_bigram_table=True)
    model = SparseHookedTransformer(cfg, tokenizer=tokenizer)
    with torch.no_grad():
        model.bigram.normal_()
    model.project_weights_()
    path = model.save_pretrained(tmp_path / "model")
    return model, path


def test_round_trip_is_exact_and_unpickles_nothing(saved, monkeypatch):
    model, path = saved

    def refuse(*args, **kwargs):
        raise AssertionError("loading must not unpickle")

    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    again = SparseHookedTransformer.from_pretrained(path)
    for (name, a), (_, b) in zip(model.named_parameters(), again.named_parameters()):
        assert torch.equal(a, b), name
    text = "with open(path) as f:\n    data = f.read()"
    assert torch.equal(model.to_tokens(text), again.to_tokens(text))
    assert torch.equal(model(text), again(text))
    assert model.weight_sparsity().equals(again.weight_sparsity())
    assert again.cfg.to_json_dict() == model.cfg.to_json_dict()


def test_corrupt_weights_are_a_clear_error(saved):
    _, path = saved
    (path / "model.safetensors").write_bytes(b"\x00garbage, not safetensors")
    with pytest.raises(CheckpointError, match="corrupt weights file"):
        SparseHookedTransformer.from_pretrained(path)


def test_truncated_config_is_a_clear_error(saved):
    _, path = saved
    text = (path / "config.json").read_text()
    (path / "config.json").write_text(text[: len(text) // 2])
    with pytest.raises(CheckpointError, match="corrupt JSON"):
        SparseHookedTransformer.from_pretrained(path)


def test_missing_tensor_is_a_clear_error(saved):
    _, path = saved
    tensors = load_file(str(path / "model.safetensors"))
    del tensors["blocks.1.mlp.W_out"]
    save_file(tensors, str(path / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"missing \['blocks.1.mlp.W_out'\]"):
        SparseHookedTransformer.from_pretrained(path)


def test_weights_of_another_shape_are_a_clear_error(saved):
    _, path = saved
    header = json.loads((path / "config.json").read_text())
    header["config"]["d_mlp"] = 128
    (path / "config.json").write_text(json.dumps(header))
    with pytest.raises(CheckpointError, match=r"W_in has shape \(64, 256\), the model expects \(64, 128\)"):
        SparseHookedTransformer.from_pretrained(path)


def test_unknown_or_invalid_config_fields_are_clear_errors(saved):
    _, path = saved
    header = json.loads((path / "config.json").read_text())
    header["config"]["mystery"] = 1
    (path / "config.json").write_text(json.dumps(header))
    with pytest.raises(CheckpointError, match="unknown fields.*mystery"):
        SparseHookedTransformer.from_pretrained(path)
    del header["config"]["mystery"]
    header["config"]["weight_l0"] = 3
    (path / "config.json").write_text(json.dumps(header))
    with pytest.raises(CheckpointError, match="weight_l0 must be a fraction"):
        SparseHookedTransformer.from_pretrained(path)


def test_not_a_model_directory(tmp_path):
    with pytest.raises(CheckpointError, match="no model directory"):
        SparseHookedTransformer.from_pretrained(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="missing .*config.json"):
        SparseHookedTransformer.from_pretrained(tmp_path / "empty")


def test_saving_over_a_directory_replaces_it_and_a_half_swap_is_recovered(saved):
    model, path = saved
    with torch.no_grad():
        model.unembed.b_U.fill_(0.5)
    model.save_pretrained(path)
    assert not path.with_name("model.tmp").exists() and not path.with_name("model.old").exists()
    # a crash between the two renames leaves only <path>.old: loading finds it
    path.rename(path.with_name("model.old"))
    again = SparseHookedTransformer.from_pretrained(path)
    assert torch.equal(again.unembed.b_U, model.unembed.b_U)
