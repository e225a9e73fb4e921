"""Bridge sites, the encoder and decoder at each, and `Bridges`: all of them for one model pair.

A *site* is a residual-stream position both models share: after the embedding and after every
attention and MLP block, 2 n_layers + 1 in all, named by the TransformerLens hook that sees it:

    site 0        blocks.0.hook_resid_pre     (after the embedding)
    site 2l + 1   blocks.{l}.hook_resid_mid   (after block l's attention)
    site 2l + 2   blocks.{l}.hook_resid_post  (after block l's MLP)

At each site an encoder maps the dense residual into the sparse one, `AbsTopK(x W_enc + b_enc)`,
and a decoder maps back, `x W_dec + b_dec`. Both are dense linear maps (the weights of the
bridges are not sparsified; only the sparse model's are).

`Bridges` is an `nn.Module` (`encoders[i]`, `decoders[i]`) that knows the shapes of the pair it
was built for: `check_pair(dense, sparse)` raises a `BridgeMismatchError` naming what does not
line up (layer counts, vocabularies, tokenizers, residual widths, or, for saved bridges, the
dense model's weights). Saved as `bridges.json` (config, sites, the dense model's fingerprint)
and `bridges.safetensors`; nothing is unpickled on load.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from jaxtyping import Float

from sparse_lens import checkpoint
from sparse_lens.components import abs_topk
from sparse_lens.fingerprint import model_fingerprint

FORMAT = "sparse_lens.Bridges"
FORMAT_VERSION = 1
CONFIG_FILE = "bridges.json"
WEIGHTS_FILE = "bridges.safetensors"


class BridgeMismatchError(ValueError):
    """The dense and sparse models (or saved bridges) do not line up."""


@dataclass(frozen=True)
class BridgeSite:
    """One residual site: its index (0 .. 2 n_layers), hook name, layer and stage.

    `stage` is "pre" (only site 0), "mid" (after attention) or "post" (after the MLP).
    `start_layer` is the first block that runs after the site when a pass starts there."""

    index: int
    hook_name: str
    layer: int
    stage: str

    @property
    def start_layer(self) -> int:
        return self.layer + 1 if self.stage == "post" else self.layer

    @property
    def label(self) -> str:
        """`embed`, `L0.attn`, `L0.mlp`, ...: what the residual has just been through."""
        return "embed" if self.stage == "pre" else f"L{self.layer}.{'attn' if self.stage == 'mid' else 'mlp'}"


def bridge_sites(n_layers: int) -> tuple[BridgeSite, ...]:
    """The 2 n_layers + 1 sites of a model with `n_layers` blocks, in forward order."""
    if not (isinstance(n_layers, int) and n_layers >= 1):
        raise ValueError(f"n_layers must be an integer >= 1; got {n_layers!r}")
    sites = [BridgeSite(0, "blocks.0.hook_resid_pre", 0, "pre")]
    for layer in range(n_layers):
        sites.append(BridgeSite(2 * layer + 1, f"blocks.{layer}.hook_resid_mid", layer, "mid"))
        sites.append(BridgeSite(2 * layer + 2, f"blocks.{layer}.hook_resid_post", layer, "post"))
    return tuple(sites)


class BridgeEncoder(nn.Module):
    """Dense residual -> sparse residual: `AbsTopK_k(x @ W_enc + b_enc)` (`k=None`: no top-k)."""

    def __init__(self, d_dense: int, d_sparse: int, k: int | None):
        super().__init__()
        self.W_enc = nn.Parameter(torch.empty(d_dense, d_sparse))
        self.b_enc = nn.Parameter(torch.zeros(d_sparse))
        self.k = k
        nn.init.normal_(self.W_enc, 0.0, 1.0 / math.sqrt(d_dense))

    def forward(self, x: Float[torch.Tensor, "... d_dense"]) -> Float[torch.Tensor, "... d_sparse"]:
        out = x @ self.W_enc + self.b_enc
        return out if self.k is None else abs_topk(out, self.k)


class BridgeDecoder(nn.Module):
    """Sparse residual -> dense residual: `x @ W_dec + b_dec`."""

    def __init__(self, d_sparse: int, d_dense: int):
        super().__init__()
        self.W_dec = nn.Parameter(torch.empty(d_sparse, d_dense))
        self.b_dec = nn.Parameter(torch.zeros(d_dense))
        nn.init.normal_(self.W_dec, 0.0, 1.0 / math.sqrt(d_sparse))

    def forward(self, x: Float[torch.Tensor, "... d_sparse"]) -> Float[torch.Tensor, "... d_dense"]:
        return x @ self.W_dec + self.b_dec

    def map_change(self, delta: Float[torch.Tensor, "... d_sparse"]) -> Float[torch.Tensor, "... d_dense"]:
        """What a change `delta` of the sparse residual becomes in the dense one (the bias
        cancels): `decode(s + delta) - decode(s) = delta @ W_dec`."""
        return delta @ self.W_dec


class Bridges(nn.Module):
    """An encoder and a decoder at each of the 2 n_layers + 1 residual sites of a model pair.

    Build with `Bridges.for_pair(dense, sparse)` (checks the pair) or `Bridges(n_layers,
    d_dense, d_sparse, ...)`; `identity(...)` gives exact identity maps (for models of one width).

    Attributes: `sites` (tuple of `BridgeSite`), `encoders`, `decoders` (`nn.ModuleList`s indexed
    by site), `d_dense`, `d_sparse`, `n_layers`, `d_vocab`, `encoder_topk_frac`,
    `dense_fingerprint` (set by training: the dense weights these bridges belong to), `meta`
    (free-form JSON-safe notes saved with them, e.g. the dense model's path)."""

    def __init__(self, n_layers: int, d_dense: int, d_sparse: int, d_vocab: int,
                 encoder_topk_frac: float | None = 0.25):
        super().__init__()
        for name, value in (("d_dense", d_dense), ("d_sparse", d_sparse), ("d_vocab", d_vocab)):
            if not (isinstance(value, int) and value >= 1):
                raise ValueError(f"Bridges.{name} must be an integer >= 1; got {value!r}")
        if encoder_topk_frac is not None and not 0.0 < encoder_topk_frac <= 1.0:
            raise ValueError(f"Bridges.encoder_topk_frac must be None or in (0, 1]; "
                             f"got {encoder_topk_frac!r}")
        self.sites = bridge_sites(n_layers)
        self.n_layers, self.d_dense, self.d_sparse, self.d_vocab = n_layers, d_dense, d_sparse, d_vocab
        self.encoder_topk_frac = encoder_topk_frac
        k = None if encoder_topk_frac is None else max(1, math.floor(encoder_topk_frac * d_sparse))
        self.encoders = nn.ModuleList([BridgeEncoder(d_dense, d_sparse, k) for _ in self.sites])
        self.decoders = nn.ModuleList([BridgeDecoder(d_sparse, d_dense) for _ in self.sites])
        self.dense_fingerprint: str | None = None
        self.meta: dict[str, Any] = {}

    # ----------------------------------------------------------------- construction
    @classmethod
    def for_pair(cls, dense: nn.Module, sparse: nn.Module, encoder_topk_frac: float | None = 0.25,
                 seed: int | None = None) -> Bridges:
        """Fresh bridges for `dense` (any TransformerLens `HookedTransformer`) and `sparse`, after
        `check_models(dense, sparse)`. `seed`: seeds the initialisation (else the global RNG)."""
        check_models(dense, sparse)
        with torch.random.fork_rng(enabled=seed is not None):  # a seed: the global RNG untouched
            if seed is not None:
                torch.manual_seed(seed)
            bridges = cls(dense.cfg.n_layers, dense.cfg.d_model, sparse.cfg.d_model,
                          sparse.cfg.d_vocab, encoder_topk_frac)
        return bridges.to(sparse.cfg.device)

    @classmethod
    def identity(cls, n_layers: int, d_model: int, d_vocab: int) -> Bridges:
        """Bridges whose every encoder and decoder is the identity (and no top-k): with two
        identical models, every hybrid pass reproduces the model's own logits exactly."""
        with torch.random.fork_rng():  # the random init is overwritten: leave the global RNG alone
            bridges = cls(n_layers, d_model, d_model, d_vocab, encoder_topk_frac=None)
        with torch.no_grad():
            for module in (*bridges.encoders, *bridges.decoders):
                weight = module.W_enc if isinstance(module, BridgeEncoder) else module.W_dec
                weight.copy_(torch.eye(d_model))
        return bridges

    # ------------------------------------------------------------------------ use
    def site(self, site: int | str | BridgeSite) -> BridgeSite:
        """The site with this index, hook name or label (`"L1.mlp"`)."""
        if isinstance(site, BridgeSite):
            site = site.index
        for s in self.sites:
            if site in (s.index, s.hook_name, s.label):
                return s
        raise KeyError(f"no bridge site {site!r}; sites are 0..{len(self.sites) - 1}: "
                       f"{[s.hook_name for s in self.sites]}")

    def encode(self, site: int | str | BridgeSite,
               x: Float[torch.Tensor, "*batch d_dense"]) -> Float[torch.Tensor, "*batch d_sparse"]:
        _check_width(x, self.d_dense, "dense residual")
        return self.encoders[self.site(site).index](x)

    def decode(self, site: int | str | BridgeSite,
               x: Float[torch.Tensor, "*batch d_sparse"]) -> Float[torch.Tensor, "*batch d_dense"]:
        _check_width(x, self.d_sparse, "sparse residual")
        return self.decoders[self.site(site).index](x)

    def check_pair(self, dense: nn.Module, sparse: nn.Module, check_fingerprint: bool = True) -> None:
        """Raise `BridgeMismatchError` unless these bridges fit `dense` and `sparse`: the models
        line up (`check_models`), the residual widths are the bridges', and (when the bridges
        record one and `check_fingerprint`) `dense` has the weights they were trained against."""
        check_models(dense, sparse)
        for what, model, width in (("dense", dense, self.d_dense), ("sparse", sparse, self.d_sparse)):
            if model.cfg.d_model != width:
                raise BridgeMismatchError(f"the {what} model has d_model={model.cfg.d_model}; these "
                                          f"bridges map a {what} residual of width {width}")
        if dense.cfg.n_layers != self.n_layers or sparse.cfg.d_vocab != self.d_vocab:
            raise BridgeMismatchError(
                f"these bridges are for {self.n_layers} layers and vocabulary {self.d_vocab}; the "
                f"models have {dense.cfg.n_layers} layers and vocabulary {sparse.cfg.d_vocab}")
        if check_fingerprint and self.dense_fingerprint is not None:
            found = model_fingerprint(dense)
            if found != self.dense_fingerprint:
                raise BridgeMismatchError(
                    f"these bridges were trained against other dense weights (fingerprint "
                    f"{self.dense_fingerprint[:12]}, this model's {found[:12]}); pass "
                    "check_fingerprint=False to use them anyway")

    # ------------------------------------------------------------------ save / load
    def config_dict(self) -> dict[str, Any]:
        return dict(n_layers=self.n_layers, d_dense=self.d_dense, d_sparse=self.d_sparse,
                    d_vocab=self.d_vocab, encoder_topk_frac=self.encoder_topk_frac)

    def save(self, path: str | Path) -> Path:
        """Write `bridges.json` and `bridges.safetensors` into the directory `path`."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        doc = dict(format=FORMAT, format_version=FORMAT_VERSION, config=self.config_dict(),
                   sites=[s.hook_name for s in self.sites], dense_fingerprint=self.dense_fingerprint,
                   meta=self.meta)
        (path / CONFIG_FILE).write_text(json.dumps(doc, indent=1))
        checkpoint.save_tensors(self.state_dict(), path / WEIGHTS_FILE)
        return path

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device | None = None) -> Bridges:
        """Read bridges written by `save`. Raises `checkpoint.CheckpointError` (a ValueError)
        for a missing, corrupt or mismatched file."""
        path = Path(path)
        doc = checkpoint.read_json(path / CONFIG_FILE)
        if doc.get("format") != FORMAT or not isinstance(doc.get("config"), dict):
            raise checkpoint.CheckpointError(f"{path / CONFIG_FILE} is not a sparse_lens bridges file "
                                             f"(format {doc.get('format')!r}, expected {FORMAT!r})")
        if doc.get("format_version", 0) > FORMAT_VERSION:
            raise checkpoint.CheckpointError(f"{path} was written by a newer sparse_lens "
                                             f"(format_version {doc['format_version']})")
        try:
            with torch.random.fork_rng():  # the random init is overwritten by the saved weights
                bridges = cls(**doc["config"])
        except (TypeError, ValueError) as err:
            raise checkpoint.CheckpointError(
                f"invalid bridges config in {path / CONFIG_FILE}: {err}") from err
        if doc.get("sites") != [s.hook_name for s in bridges.sites]:
            raise checkpoint.CheckpointError(f"{path / CONFIG_FILE}: its sites {doc.get('sites')} are not "
                                             f"those of a {bridges.n_layers}-layer model")
        checkpoint.load_parameters(bridges, checkpoint.load_tensors(path / WEIGHTS_FILE),
                                   source=path / WEIGHTS_FILE)
        bridges.dense_fingerprint = doc.get("dense_fingerprint")
        bridges.meta = dict(doc.get("meta") or {})
        return bridges.to(device) if device is not None else bridges

    def extra_repr(self) -> str:
        topk = "no top-k" if self.encoder_topk_frac is None else f"AbsTopK {self.encoder_topk_frac}"
        return (f"{len(self.sites)} sites, dense d_model {self.d_dense} <-> sparse d_model "
                f"{self.d_sparse}, encoder {topk}")


# ------------------------------------------------------------------------ checks
def check_models(dense: nn.Module, sparse: nn.Module) -> None:
    """Raise `BridgeMismatchError` unless the two models can be bridged: the same number of
    layers, the same vocabulary (sizes in and out, and the same tokenizer vocabulary when both
    have one), and every bridge site hook present in both."""
    d, s = dense.cfg, sparse.cfg
    if d.n_layers != s.n_layers:
        raise BridgeMismatchError(
            f"the dense model has {d.n_layers} layers and the sparse one {s.n_layers}: bridges "
            "join the residual sites of models with the same number of layers")
    for field in ("d_vocab", "d_vocab_out"):
        if getattr(d, field) != getattr(s, field):
            raise BridgeMismatchError(
                f"the models' vocabularies differ ({field}: dense {getattr(d, field)}, sparse "
                f"{getattr(s, field)}): hybrid passes compare their output distributions token by token")
    dt, st = getattr(dense, "tokenizer", None), getattr(sparse, "tokenizer", None)
    if dt is not None and st is not None and dt.get_vocab() != st.get_vocab():
        raise BridgeMismatchError("the models' tokenizers have different vocabularies: the same "
                                  "token ids would mean different text")
    for what, model in (("dense", dense), ("sparse", sparse)):
        missing = [site.hook_name for site in bridge_sites(model.cfg.n_layers)
                   if site.hook_name not in model.hook_dict]
        if missing:
            raise BridgeMismatchError(f"the {what} model has no hook {missing[0]} (a residual site "
                                      "after attention needs a model with attention and MLP blocks)")


def _check_width(x: torch.Tensor, width: int, what: str) -> None:
    if x.shape[-1] != width:
        raise BridgeMismatchError(f"the {what} has width {x.shape[-1]}; these bridges expect {width}")
