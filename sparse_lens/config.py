"""The model config: a `HookedTransformerConfig` with the weight- and activation-sparsity fields.

`SparseHookedTransformerConfig` passes untouched to every TransformerLens component, so all of
TransformerLens's own fields keep their meaning. What it adds:

| field                   | meaning                                                            | default |
|-------------------------|--------------------------------------------------------------------|---------|
| `weight_l0`             | fraction of nonzeros kept in every weight matrix, in (0, 1]; 1 = dense | 1.0 |
| `min_nonzero_per_unit`  | no neuron / attention channel / residual channel / token keeps fewer | 4    |
| `act_topk_frac`         | AbsTopK keeps `floor(frac * dim)` largest |x| per token, in (0, 1] | 0.25 |
| `act_topk_locations`    | where AbsTopK runs (names in `TOPK_LOCATIONS`); () = nowhere        | see below |
| `use_attention_sinks`   | (TransformerLens's own) one learned sink logit per head            | False   |
| `use_bigram_table`      | a dense d_vocab x d_vocab_out table whose row for the current token is added to the logits | False |
| `residual_activation`   | "identity", or "relu": a ReLU on the residual stream after each block adds its output | "identity" |
| `d_pos_emb`             | None: learned positions added to the residual. An int: positions of that width, not added but concatenated (each through its own norm, `ln_p1`/`ln_p2`) to what attention and the MLP read, which then have `d_read = d_model + d_pos_emb` channels | None |

`normalization_type` defaults to "RMS" (pre-norm RMSNorm), `act_fn` to "gelu", `initializer_range`
to 0.02 (output projections get 0.02 / sqrt(2 n_layers)), `default_prepend_bos` to False (the
shipped tokenizer has no BOS token) and `d_vocab` to 2048 (the shipped tokenizer's size).

Invalid values raise `ValueError` naming the field and its allowed range. Presets: `tiny` (tests),
`small` (the CPU default), `wide` (`small` 1.5x wider at L0 1/32), `paper` (the paper's size, for
GPUs): `SparseHookedTransformerConfig.preset("small", weight_l0=1/32)`.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any

import torch
from transformer_lens.config.hooked_transformer_config import HookedTransformerConfig

#: Every place AbsTopK can run, with the TransformerLens hook that sees the result.
#: The names are those of OpenAI's circuit_sparsity release. The one table of our hook names:
#: the node registry (`hooks.nodes.NODE_HOOKS`) and the bridges' edit derive theirs from it.
TOPK_LOCATIONS: dict[str, str] = {
    "attn_in": "blocks.{layer}.hook_attn_read",  # post-norm input of attention
    "attn_q": "blocks.{layer}.attn.hook_q",  # over all heads' channels together
    "attn_k": "blocks.{layer}.attn.hook_k",
    "attn_v": "blocks.{layer}.attn.hook_v",
    "attn_out": "blocks.{layer}.hook_attn_out",  # what attention writes to the residual
    "resid_post_attn": "blocks.{layer}.hook_resid_mid",
    "mlp_in": "blocks.{layer}.hook_mlp_read",  # post-norm input of the MLP
    "mlp_neuron": "blocks.{layer}.mlp.hook_post",
    "mlp_out": "blocks.{layer}.hook_mlp_out",
    "resid_post_mlp": "blocks.{layer}.hook_resid_post",
}

#: The paper's choice: every read, write and hidden activation of the blocks, not the residual.
DEFAULT_TOPK_LOCATIONS: tuple[str, ...] = (
    "attn_in",
    "attn_q",
    "attn_k",
    "attn_v",
    "attn_out",
    "mlp_in",
    "mlp_neuron",
    "mlp_out",
)

SUPPORTED_NORMS = ("RMS", "LN")
RESIDUAL_ACTIVATIONS = ("identity", "relu")

# Fields that are resolved at construction or not serialisable; never written to JSON.
_NOT_SERIALISED = {"device", "n_params"}


@dataclasses.dataclass(kw_only=True)
class SparseHookedTransformerConfig(HookedTransformerConfig):
    """A `HookedTransformerConfig` for weight-sparse transformers (see the module docstring)."""

    weight_l0: float = 1.0
    min_nonzero_per_unit: int = 4
    act_topk_frac: float = 0.25
    act_topk_locations: tuple[str, ...] = DEFAULT_TOPK_LOCATIONS
    use_bigram_table: bool = False
    residual_activation: str = "identity"
    d_pos_emb: int | None = None

    # TransformerLens fields whose defaults differ for this project.
    d_vocab: int = 2048
    act_fn: str = "gelu"
    normalization_type: str | None = "RMS"
    initializer_range: float = 0.02
    default_prepend_bos: bool = False
    tokenizer_prepends_bos: bool | None = False

    def __post_init__(self) -> None:
        self.act_topk_locations = tuple(self.act_topk_locations)
        if isinstance(self.dtype, str):
            self.dtype = _dtype_from_name(self.dtype)
        self._validate_before_defaults()
        super().__post_init__()
        self._validate_after_defaults()

    # ----------------------------------------------------------------- validation
    def _validate_before_defaults(self) -> None:
        for name in ("n_layers", "d_model", "d_head", "n_ctx", "d_vocab"):
            _require(isinstance(getattr(self, name), int) and getattr(self, name) >= 1, name,
                     "an integer >= 1", getattr(self, name))
        if self.n_heads == -1:
            _require(self.d_model % self.d_head == 0, "d_model",
                     f"a multiple of d_head={self.d_head} (n_heads is d_model / d_head)", self.d_model)
        else:
            _require(isinstance(self.n_heads, int) and self.n_heads >= 1, "n_heads",
                     "an integer >= 1 (or -1 for d_model / d_head)", self.n_heads)
        _require(self.residual_activation in RESIDUAL_ACTIVATIONS, "residual_activation",
                 f"one of {RESIDUAL_ACTIVATIONS}", self.residual_activation)
        if self.d_pos_emb is not None:
            _require(isinstance(self.d_pos_emb, int) and self.d_pos_emb >= 1, "d_pos_emb",
                     "None or an integer >= 1", self.d_pos_emb)
        if self.d_mlp is not None:
            _require(isinstance(self.d_mlp, int) and self.d_mlp >= 1, "d_mlp", "an integer >= 1",
                     self.d_mlp)
        _require_fraction("weight_l0", self.weight_l0)
        _require_fraction("act_topk_frac", self.act_topk_frac)
        _require(isinstance(self.min_nonzero_per_unit, int) and self.min_nonzero_per_unit >= 0,
                 "min_nonzero_per_unit", "an integer >= 0", self.min_nonzero_per_unit)
        unknown = [loc for loc in self.act_topk_locations if loc not in TOPK_LOCATIONS]
        _require(not unknown, "act_topk_locations", f"names from {sorted(TOPK_LOCATIONS)}", unknown)
        _require(self.normalization_type in SUPPORTED_NORMS, "normalization_type",
                 f"one of {SUPPORTED_NORMS}", self.normalization_type)
        _require(self.positional_embedding_type == "standard", "positional_embedding_type",
                 "'standard' (learned absolute positions)", self.positional_embedding_type)
        _require(not self.attn_only, "attn_only", "False (every block has an MLP)", self.attn_only)
        _require(not self.gated_mlp, "gated_mlp", "False", self.gated_mlp)
        _require(self.n_key_value_heads is None, "n_key_value_heads", "None (no grouped queries)",
                 self.n_key_value_heads)
        _require(self.initializer_range > 0, "initializer_range", "a std > 0",
                 self.initializer_range)

    def _validate_after_defaults(self) -> None:
        fan_ins = {
            "d_model (fan-in of W_U and of each token's embedding row)": self.d_model,
            "d_read (fan-in of W_Q/W_K/W_V and W_in)": self.d_read,
            "n_heads * d_head (fan-in of W_O)": self.n_heads * self.d_head,
            "d_mlp (fan-in of W_out)": self.d_mlp,
        }
        for what, fan_in in fan_ins.items():
            _require(self.min_nonzero_per_unit <= fan_in, "min_nonzero_per_unit",
                     f"at most {fan_in} = {what}", self.min_nonzero_per_unit)
        if self.act_topk_locations:
            smallest = min(self.n_heads * self.d_head, self.d_model, self.d_mlp)
            _require(math.floor(self.act_topk_frac * smallest) >= 1, "act_topk_frac",
                     f"large enough to keep >= 1 of {smallest} channels", self.act_topk_frac)

    # ------------------------------------------------------------------- helpers
    @property
    def d_read(self) -> int:
        """Channels attention and the MLP read: d_model, plus d_pos_emb when positions are
        concatenated."""
        return self.d_model + (self.d_pos_emb or 0)

    @property
    def is_weight_sparse(self) -> bool:
        return self.weight_l0 < 1.0

    def topk_at(self, location: str) -> bool:
        """Whether AbsTopK runs at `location` (a name from `TOPK_LOCATIONS`)."""
        return location in self.act_topk_locations

    def topk_k(self, dim: int) -> int:
        """How many of `dim` channels AbsTopK keeps per token."""
        return max(1, math.floor(self.act_topk_frac * dim))

    # -------------------------------------------------------------- serialisation
    def to_json_dict(self) -> dict[str, Any]:
        """A JSON-safe dict of every field (dtype as a string, no device)."""
        out: dict[str, Any] = {}
        for field in dataclasses.fields(self):
            if field.name in _NOT_SERIALISED:
                continue
            value = getattr(self, field.name)
            if isinstance(value, torch.dtype):
                value = str(value).removeprefix("torch.")
            elif isinstance(value, tuple):
                value = list(value)
            out[field.name] = value
        json.dumps(out)  # fail here, not half-way through writing a file
        return out

    @classmethod
    def from_json_dict(cls, data: dict[str, Any], **overrides: Any) -> SparseHookedTransformerConfig:
        """Inverse of `to_json_dict`; unknown keys are an error, not silently dropped."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"config has unknown fields {unknown}; is it from a newer sparse_lens?")
        kwargs = {k: v for k, v in data.items() if k not in _NOT_SERIALISED}
        kwargs.update(overrides)
        return cls(**kwargs)

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> SparseHookedTransformerConfig:
        """A named preset (`tiny`, `small`, `wide`, `paper`) with any field overridden."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; known presets: {sorted(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})

    def dense_counterpart(self) -> SparseHookedTransformerConfig:
        """The same architecture with weight sparsity off: the dense baseline's config."""
        return dataclasses.replace(self, weight_l0=1.0)


PRESETS: dict[str, dict[str, Any]] = {
    # Seconds on a CPU; the unit tests' model.
    "tiny": dict(n_layers=2, d_model=64, d_head=16, d_mlp=256, n_ctx=64, weight_l0=1 / 8,
                 use_attention_sinks=True, model_name="sparse-tiny"),
    # The CPU default: trains on the standard library in about ten minutes on 2 cores.
    "small": dict(n_layers=4, d_model=256, d_head=16, d_mlp=1024, n_ctx=128, weight_l0=1 / 16,
                  use_attention_sinks=True, model_name="sparse-small"),
    # `small` 1.5x wider at half the density (1.125x the nonzeros, 2.25x the dense matmul work):
    # the learning curves' second shape; 20,000 steps of it take about 6 hours on one CPU core.
    "wide": dict(n_layers=4, d_model=384, d_head=16, d_mlp=1536, n_ctx=128, weight_l0=1 / 32,
                 use_attention_sinks=True, model_name="sparse-wide"),
    # The paper's shape (8 layers, d_model 2048, d_head 16, n_ctx 256); about 1 nonzero in 1000.
    "paper": dict(n_layers=8, d_model=2048, d_head=16, d_mlp=8192, n_ctx=256, weight_l0=1 / 1000,
                  use_attention_sinks=True, use_bigram_table=True, model_name="sparse-paper"),
}


def preset_differences(config: dict[str, Any], name: str) -> list[str]:
    """The fields of `config` (a config.json's "config" dict) whose values differ from preset
    `name`'s; fields the preset does not have count as equal."""
    wanted = SparseHookedTransformerConfig.preset(name).to_json_dict()
    return [k for k, v in config.items() if wanted.get(k, v) != v]


def _require(ok: bool, field: str, allowed: str, got: Any) -> None:
    if not ok:
        raise ValueError(f"SparseHookedTransformerConfig.{field} must be {allowed}; got {got!r}")


def _require_fraction(field: str, value: Any) -> None:
    _require(isinstance(value, (int, float)) and 0.0 < value <= 1.0, field,
             "a fraction in (0, 1]", value)


def _dtype_from_name(name: str) -> torch.dtype:
    dtype = getattr(torch, name.removeprefix("torch."), None)
    _require(isinstance(dtype, torch.dtype), "dtype", "a torch dtype name like 'float32'", name)
    return dtype
