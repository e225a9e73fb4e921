"""SparseHookedTransformerConfig: presets, validation (every field names itself), JSON."""

import json

import pytest
import torch

from sparse_lens.config import PRESETS, TOPK_LOCATIONS, SparseHookedTransformerConfig


def tiny(**overrides):
    return SparseHookedTransformerConfig.preset("tiny", **overrides)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_build_and_round_trip_through_json(name):
    cfg = SparseHookedTransformerConfig.preset(name, device="cpu")
    data = json.loads(json.dumps(cfg.to_json_dict()))
    assert "device" not in data and data["dtype"] == "float32"
    again = SparseHookedTransformerConfig.from_json_dict(data, device="cpu")
    assert again.to_json_dict() == cfg.to_json_dict()
    assert again.dtype == torch.float32 and again.act_topk_locations == cfg.act_topk_locations


def test_paper_preset_has_the_papers_shape():
    cfg = SparseHookedTransformerConfig.preset("paper", device="cpu")
    assert (cfg.n_layers, cfg.d_model, cfg.d_head, cfg.n_ctx) == (8, 2048, 16, 256)
    assert cfg.n_heads == 128


@pytest.mark.parametrize(
    "overrides, field",
    [
        (dict(weight_l0=0.0), "weight_l0"),
        (dict(weight_l0=1.5), "weight_l0"),
        (dict(weight_l0=-0.1), "weight_l0"),
        (dict(act_topk_frac=0.0), "act_topk_frac"),
        (dict(act_topk_frac=2.0), "act_topk_frac"),
        (dict(act_topk_frac=0.001), "act_topk_frac"),  # keeps no channel at all
        (dict(min_nonzero_per_unit=-1), "min_nonzero_per_unit"),
        (dict(min_nonzero_per_unit=65), "min_nonzero_per_unit"),  # > d_model = 64
        (dict(d_mlp=8, min_nonzero_per_unit=9), "min_nonzero_per_unit"),  # > d_mlp
        (dict(act_topk_locations=("attn_in", "nowhere")), "act_topk_locations"),
        (dict(d_model=60), "d_model"),  # not a multiple of d_head = 16
        (dict(d_model=0), "d_model"),
        (dict(n_layers=0), "n_layers"),
        (dict(n_ctx=0), "n_ctx"),
        (dict(d_mlp=0), "d_mlp"),
        (dict(n_heads=0), "n_heads"),
        (dict(normalization_type="LNPre"), "normalization_type"),
        (dict(positional_embedding_type="rotary"), "positional_embedding_type"),
        (dict(n_key_value_heads=2), "n_key_value_heads"),
        (dict(initializer_range=0.0), "initializer_range"),
        (dict(dtype="float33"), "dtype"),
    ],
)
def test_invalid_fields_raise_value_error_naming_the_field(overrides, field):
    with pytest.raises(ValueError, match=rf"SparseHookedTransformerConfig\.{field} must be"):
        tiny(**overrides)


def test_unknown_json_field_and_unknown_preset_are_errors():
    data = tiny().to_json_dict()
    data["weight_l1"] = 0.5
    with pytest.raises(ValueError, match="unknown fields.*weight_l1"):
        SparseHookedTransformerConfig.from_json_dict(data)
    with pytest.raises(ValueError, match="known presets"):
        SparseHookedTransformerConfig.preset("huge")


def test_every_topk_location_is_accepted_and_dense_counterpart_is_dense():
    cfg = tiny(act_topk_locations=tuple(TOPK_LOCATIONS))
    assert cfg.is_weight_sparse and not cfg.dense_counterpart().is_weight_sparse
    assert cfg.dense_counterpart().act_topk_locations == cfg.act_topk_locations
    assert cfg.topk_k(64) == 16
