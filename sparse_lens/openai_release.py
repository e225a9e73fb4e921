"""Open the models of OpenAI's circuit_sparsity release (Gao et al. 2025) as `SparseHookedTransformer`s.

A released model is a folder with `beeg_config.json` (the fields of the release's `GPTConfig`) and
`final_model.pt` (a plain state dict). `load_release_model(folder)` builds a model with the same
outputs: every option of that config maps onto a `SparseHookedTransformerConfig` field, nothing
is approximated, and an option that cannot be honoured is refused with a `ReleaseFormatError`
naming it. The state dict is read with `torch.load(weights_only=True)`; nothing else is unpickled.

| release `GPTConfig`                | sparse_lens                                                     |
|------------------------------------|-----------------------------------------------------------------|
| n_layer, n_head, d_model, d_head, d_mlp (or n_mlp), block_size, vocab_size | n_layers, n_heads, d_model, d_head, d_mlp, n_ctx, d_vocab |
| rms_norm / ln_bias                 | normalization_type "RMS" (eps = float32 eps, as torch's RMSNorm) or "LN" (eps 1e-5; zero bias when ln_bias is false) |
| bias                               | zero b_Q/b_K/b_V/b_O/b_in/b_out when false                      |
| activation_type gelu / relu        | act_fn "gelu" (exact erf GELU) / "relu"                         |
| residual_activation_type relu      | residual_activation "relu"                                      |
| d_pos_emb (+ sinusoidal_cat_pos_emb) | d_pos_emb: concatenated positions with their own norms (the stored wpe is used as is) |
| tied_unembed                       | W_U = W_E^T (two parameters from then on)                       |
| final_logits_bias                  | unembed.b_U                                                     |
| enable_bigram_table                | use_bigram_table                                                |
| sink                               | use_attention_sinks (one sink logit per head)                   |
| afrac, afrac_loctypes              | act_topk_frac, act_topk_locations (same location names)        |

Fields that only matter for training or for which kernel runs (dropout, flash, grad_checkpointing,
debug_nans, enable_sparse_kernels, dropout_cat_pos_emb, learnable_bigram_table) are accepted and
have no effect on the outputs. The imported model has `weight_l0 = 1` (its weights keep their
exact zeros; nothing re-projects them unless you ask) and `min_nonzero_per_unit = 0`.

The released models use the `tinypython_2k` BPE, shipped as GPT-2-style `encoder.json` +
`vocab.bpe`; `release_tokenizer(folder)` builds a Hugging Face fast tokenizer from those files
(GPT-2's byte-level pre-tokenisation, `<|endoftext|>` as EOS when the vocabulary has it).
"""

from __future__ import annotations

import json
import tempfile
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import einops
import torch

from sparse_lens.checkpoint import CheckpointError, load_parameters
from sparse_lens.config import TOPK_LOCATIONS, SparseHookedTransformerConfig

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

# the model class is the caller's (`SparseHookedTransformer.from_circuit_sparsity` passes itself)
M = TypeVar("M", bound=torch.nn.Module)

CONFIG_FILE = "beeg_config.json"
WEIGHTS_FILE = "final_model.pt"
TOKENIZER_FILES = ("encoder.json", "vocab.bpe")

#: Every field of the release's `GPTConfig`, with its default there.
RELEASE_DEFAULTS: dict[str, Any] = dict(
    block_size=1024, vocab_size=50304, n_layer=12, n_head=12, d_head=None, d_model=768,
    dropout=0.0, bias=True, ln_bias=True, rms_norm=False, residual_activation_type="identity",
    activation_type="gelu", afrac=None, afrac_loctypes="attn_in,attn_out,mlp_in,mlp_out",
    debug_nans=False, tied_unembed=True, tokenizer_name="tinypython_2k", grad_checkpointing=True,
    d_mlp=None, enable_bigram_table=False, learnable_bigram_table=False, d_pos_emb=None,
    dropout_cat_pos_emb=False, sinusoidal_cat_pos_emb=False, enable_sparse_kernels=False,
    flash=True, sink=False,
)
#: Keys the release's own loader handles before building `GPTConfig`: `n_mlp` is an old name of
#: `d_mlp`, `bigram_table_rank` is dropped, `use_tied_aux_matrix` must be false.
RELEASE_LOADER_KEYS = ("n_mlp", "bigram_table_rank", "use_tied_aux_matrix")


class ReleaseFormatError(CheckpointError):
    """A release folder that is missing, corrupt, or uses an option sparse_lens cannot honour."""


# ---------------------------------------------------------------------------------- config
def read_release_config(folder: str | Path) -> dict[str, Any]:
    """`beeg_config.json` with the release's defaults filled in; unknown fields are an error."""
    path = Path(folder) / CONFIG_FILE
    if not path.is_file():
        raise ReleaseFormatError(f"missing {path}: not a circuit_sparsity model folder "
                                 f"(expected {CONFIG_FILE} and {WEIGHTS_FILE})")
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ReleaseFormatError(f"corrupt JSON in {path}: {err}") from err
    if not isinstance(raw, dict):
        raise ReleaseFormatError(f"corrupt JSON in {path}: expected an object")
    unknown = sorted(set(raw) - set(RELEASE_DEFAULTS) - set(RELEASE_LOADER_KEYS))
    if unknown:
        raise ReleaseFormatError(f"{path} has unknown config fields {unknown}; the release's "
                                 f"GPTConfig defines {sorted(RELEASE_DEFAULTS)}")
    if raw.get("use_tied_aux_matrix"):
        raise ReleaseFormatError(f"{path}: use_tied_aux_matrix=true is not supported (the "
                                 "release's own loader refuses it too)")
    if "n_mlp" in raw:
        if raw.get("d_mlp") not in (None, raw["n_mlp"]):
            raise ReleaseFormatError(f"{path}: n_mlp={raw['n_mlp']} and d_mlp={raw['d_mlp']} disagree")
        raw["d_mlp"] = raw["n_mlp"]
    rcfg = {**RELEASE_DEFAULTS, **{k: v for k, v in raw.items() if k in RELEASE_DEFAULTS}}
    if rcfg["d_head"] is None:
        rcfg["d_head"] = rcfg["d_model"] // rcfg["n_head"]
    if rcfg["d_mlp"] is None:
        rcfg["d_mlp"] = 4 * rcfg["d_model"]
    return rcfg


def config_from_release(rcfg: dict[str, Any], model_name: str = "circuit-sparsity",
                        dtype: torch.dtype = torch.float32) -> SparseHookedTransformerConfig:
    """The `SparseHookedTransformerConfig` computing what the release's `GPT(GPTConfig(**rcfg))`
    computes (see the module docstring's table)."""

    def refuse(field: str, why: str) -> None:
        raise ReleaseFormatError(f"release option {field}={rcfg[field]!r}: {why}")

    for field in ("n_layer", "n_head", "d_model", "d_head", "d_mlp", "block_size", "vocab_size"):
        if not isinstance(rcfg[field], int) or rcfg[field] < 1:
            refuse(field, "must be an integer >= 1")
    if rcfg["d_model"] % rcfg["n_head"]:
        refuse("n_head", f"must divide d_model={rcfg['d_model']} (the release asserts it)")
    if rcfg["activation_type"] not in ("gelu", "relu"):
        refuse("activation_type", "must be 'gelu' or 'relu'")
    if rcfg["residual_activation_type"] not in ("identity", "relu"):
        refuse("residual_activation_type", "must be 'identity' or 'relu'")
    locations: tuple[str, ...] = ()
    afrac = rcfg["afrac"]
    if afrac is not None:
        if not isinstance(afrac, (int, float)) or not 0 < afrac <= 1:
            refuse("afrac", "must be a fraction in (0, 1]")
        locations = tuple(loc for loc in str(rcfg["afrac_loctypes"]).split(",") if loc)
        unknown = [loc for loc in locations if loc not in TOPK_LOCATIONS]
        if unknown:
            refuse("afrac_loctypes", f"unknown location(s) {unknown}; known: {list(TOPK_LOCATIONS)}")
        d_read = rcfg["d_model"] + (rcfg["d_pos_emb"] or 0)
        dims = dict(attn_in=d_read, mlp_in=d_read, mlp_neuron=rcfg["d_mlp"],
                    **dict.fromkeys(("attn_q", "attn_k", "attn_v"), rcfg["n_head"] * rcfg["d_head"]))
        for loc in locations:
            dim = dims.get(loc, rcfg["d_model"])
            if int(afrac * dim) < 1:
                refuse("afrac", f"keeps int({afrac} * {dim}) = 0 channels at {loc}, which zeroes "
                                "it; sparse_lens's AbsTopK keeps at least one")
    if rcfg["d_pos_emb"] is not None and (not isinstance(rcfg["d_pos_emb"], int) or rcfg["d_pos_emb"] < 1):
        refuse("d_pos_emb", "must be null or an integer >= 1")
    rms = bool(rcfg["rms_norm"])
    try:
        return SparseHookedTransformerConfig(
            model_name=model_name,
            original_architecture="circuit_sparsity.GPT",
            n_layers=rcfg["n_layer"], d_model=rcfg["d_model"], n_heads=rcfg["n_head"],
            d_head=rcfg["d_head"], d_mlp=rcfg["d_mlp"], n_ctx=rcfg["block_size"],
            d_vocab=rcfg["vocab_size"], d_vocab_out=rcfg["vocab_size"],
            normalization_type="RMS" if rms else "LN",
            # torch's nn.RMSNorm(eps=None) uses the dtype's eps; the release's LayerNorm 1e-5
            eps=torch.finfo(torch.float32).eps if rms else 1e-5,
            act_fn=rcfg["activation_type"],
            residual_activation=rcfg["residual_activation_type"],
            d_pos_emb=rcfg["d_pos_emb"],
            use_attention_sinks=bool(rcfg["sink"]),
            use_bigram_table=bool(rcfg["enable_bigram_table"]),
            act_topk_frac=float(afrac) if afrac is not None else 0.25,
            act_topk_locations=locations,
            weight_l0=1.0, min_nonzero_per_unit=0,
            dtype=dtype, init_weights=False,
        )
    except ValueError as err:
        raise ReleaseFormatError(f"cannot express this release config: {err}") from err


# ----------------------------------------------------------------------------- state dict
def read_release_state_dict(folder: str | Path) -> dict[str, torch.Tensor]:
    """`final_model.pt` as a dict of tensors, via `torch.load(weights_only=True)` on the CPU."""
    path = Path(folder) / WEIGHTS_FILE
    if not path.is_file():
        raise ReleaseFormatError(f"missing weights file {path}")
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a malformed pickle can fail in the unpickler in any way
        raise ReleaseFormatError(f"corrupt or unsafe weights file {path} (read with "
                                 f"torch.load(weights_only=True)): {err}") from err
    if not isinstance(sd, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                           for k, v in sd.items()):
        raise ReleaseFormatError(f"{path} is not a state dict (a dict of name -> tensor)")
    return sd


def params_from_release(sd: dict[str, torch.Tensor], rcfg: dict[str, Any],
                        cfg: SparseHookedTransformerConfig) -> dict[str, torch.Tensor]:
    """Every parameter of the `SparseHookedTransformer` of `cfg`, by name, from the release
    state dict `sd` (float32 on the CPU). Missing or unexpected keys and wrong shapes raise."""
    r = _Reader(sd, rcfg)
    d_model = rcfg["d_model"]
    params: dict[str, torch.Tensor] = {}
    wte = r.take("transformer.wte.weight", (rcfg["vocab_size"], d_model))
    params["embed.W_E"] = wte
    params["pos_embed.W_pos"] = r.take("transformer.wpe.weight",
                                       (rcfg["block_size"], rcfg["d_pos_emb"] or d_model))
    for i in range(rcfg["n_layer"]):
        params.update(_block_params(r, i, cfg.d_read))
    params.update(r.norm("ln_final", "transformer.ln_f", d_model))
    params.update(_unembed_params(r, wte))
    unexpected = sorted(set(sd) - r.used - {"lm_head.weight"})
    if unexpected:
        raise ReleaseFormatError(f"the state dict has keys this config does not use: "
                                 f"{unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}")
    return {k: v.contiguous() for k, v in params.items()}


class _Reader:
    """The release's tensors by key, checked for shape and dtype; remembers the keys it read."""

    def __init__(self, sd: dict[str, torch.Tensor], rcfg: dict[str, Any]):
        self.sd, self.rcfg, self.used = sd, rcfg, set()

    def take(self, key: str, shape: tuple[int, ...]) -> torch.Tensor:
        if key not in self.sd:
            raise ReleaseFormatError(f"the state dict has no {key!r} (shape {shape}), which this "
                                     "config needs")
        t = self.sd[key]
        if tuple(t.shape) != shape:
            raise ReleaseFormatError(f"{key} has shape {tuple(t.shape)}, the config implies {shape}")
        if not t.is_floating_point():
            raise ReleaseFormatError(f"{key} has dtype {t.dtype}, expected floating point")
        self.used.add(key)
        return t.detach().to(torch.float32)

    def bias(self, key: str, shape: tuple[int, ...], present: bool) -> torch.Tensor:
        return self.take(key, shape) if present else torch.zeros(shape)

    def norm(self, ours: str, theirs: str, length: int) -> dict[str, torch.Tensor]:
        out = {f"{ours}.w": self.take(f"{theirs}.weight", (length,))}
        if not self.rcfg["rms_norm"]:
            out[f"{ours}.b"] = self.bias(f"{theirs}.bias", (length,), self.rcfg["ln_bias"])
        return out


def _block_params(r: _Reader, i: int, d_read: int) -> dict[str, torch.Tensor]:
    """Block `i`'s parameters: norms, attention (heads split out), sinks, MLP."""
    rcfg, sd = r.rcfg, r.sd
    n_head, d_head, d_model, d_mlp = rcfg["n_head"], rcfg["d_head"], rcfg["d_model"], rcfg["d_mlp"]
    theirs, ours = f"transformer.h.{i}", f"blocks.{i}"
    params = {**r.norm(f"{ours}.ln1", f"{theirs}.ln_1", d_model),
              **r.norm(f"{ours}.ln2", f"{theirs}.ln_2", d_model)}
    if rcfg["d_pos_emb"] is not None:
        params.update(r.norm(f"{ours}.ln_p1", f"{theirs}.ln_p1", rcfg["d_pos_emb"]))
        params.update(r.norm(f"{ours}.ln_p2", f"{theirs}.ln_p2", rcfg["d_pos_emb"]))
    # c_attn: [3 * n_head * d_head, d_read] rows = (q | k | v), each head-major
    c_attn = r.take(f"{theirs}.attn.c_attn.weight", (3 * n_head * d_head, d_read))
    c_attn_b = r.bias(f"{theirs}.attn.c_attn.bias", (3 * n_head * d_head,), rcfg["bias"])
    for name, w, b in zip("QKV", c_attn.chunk(3, dim=0), c_attn_b.chunk(3, dim=0)):
        params[f"{ours}.attn.W_{name}"] = einops.rearrange(
            w, "(head d_head) d_read -> head d_read d_head", head=n_head)
        params[f"{ours}.attn.b_{name}"] = einops.rearrange(b, "(head d_head) -> head d_head", head=n_head)
    c_proj = r.take(f"{theirs}.attn.c_proj.weight", (d_model, n_head * d_head))
    params[f"{ours}.attn.W_O"] = einops.rearrange(
        c_proj, "d_model (head d_head) -> head d_head d_model", head=n_head)
    params[f"{ours}.attn.b_O"] = r.bias(f"{theirs}.attn.c_proj.bias", (d_model,), rcfg["bias"])
    if rcfg["sink"]:
        key = f"{theirs}.attn.attn_imp.sink_logit"
        shape = (n_head,) if key in sd and sd[key].numel() == n_head else (1,)
        params[f"{ours}.attn.sinks"] = r.take(key, shape).expand(n_head).clone()
    params[f"{ours}.mlp.W_in"] = r.take(f"{theirs}.mlp.c_fc.weight", (d_mlp, d_read)).T
    params[f"{ours}.mlp.b_in"] = r.bias(f"{theirs}.mlp.c_fc.bias", (d_mlp,), rcfg["bias"])
    params[f"{ours}.mlp.W_out"] = r.take(f"{theirs}.mlp.c_proj.weight", (d_model, d_mlp)).T
    params[f"{ours}.mlp.b_out"] = r.bias(f"{theirs}.mlp.c_proj.bias", (d_model,), rcfg["bias"])
    mask_key = f"{theirs}.attn.bias"  # the causal-mask buffer of the non-flash attention
    if mask_key in sd and sd[mask_key].dim() == 4:
        mask = sd[mask_key]
        if not torch.equal(mask[0, 0].bool(), torch.ones_like(mask[0, 0], dtype=torch.bool).tril()):
            raise ReleaseFormatError(f"{mask_key} (the attention mask) is not causal")
        r.used.add(mask_key)
    return params


def _unembed_params(r: _Reader, wte: torch.Tensor) -> dict[str, torch.Tensor]:
    """The unembedding (tied to the embedding or its own), its bias, and the bigram table."""
    rcfg, sd, vocab = r.rcfg, r.sd, r.rcfg["vocab_size"]
    if rcfg["tied_unembed"]:
        unembed = sd.get("lm_head.weight", wte)
        r.used.add("lm_head.weight")
        if tuple(unembed.shape) != (vocab, rcfg["d_model"]) or not torch.equal(unembed.float(), wte):
            raise ReleaseFormatError("tied_unembed is true but lm_head.weight differs from "
                                     "transformer.wte.weight")
    else:
        unembed = r.take("lm_head.weight", (vocab, rcfg["d_model"]))
    # the release's loader fills a missing final_logits_bias with zeros
    params = {"unembed.W_U": unembed.T,
              "unembed.b_U": r.bias("final_logits_bias", (vocab,), "final_logits_bias" in sd)}
    if rcfg["enable_bigram_table"]:
        params["bigram"] = r.take("bigram_table", (vocab, vocab))
    return params


# ------------------------------------------------------------------------------ tokenizer
def release_tokenizer(folder: str | Path) -> PreTrainedTokenizerBase:
    """A Hugging Face fast tokenizer from a GPT-2-style BPE folder (`encoder.json`, `vocab.bpe`),
    such as the release's `tinypython_2k`: byte-level BPE with GPT-2's pre-tokenisation, no BOS,
    `<|endoftext|>` as EOS and padding when the vocabulary holds it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from sparse_lens.tokenizer import EOS_TOKEN, load_tokenizer, save_tokenizer

    folder = Path(folder)
    missing = [f for f in TOKENIZER_FILES if not (folder / f).is_file()]
    if missing:
        raise ReleaseFormatError(f"{folder} is not a GPT-2-style BPE folder: missing {missing}")
    try:
        vocab = json.loads((folder / "encoder.json").read_text())
        bpe = models.BPE.from_file(str(folder / "encoder.json"), str(folder / "vocab.bpe"))
    except Exception as err:  # tokenizers raises its own Exception type on bad files
        raise ReleaseFormatError(f"cannot read the BPE files in {folder}: {err}") from err
    tok = Tokenizer(bpe)
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    special = {"eos_token": EOS_TOKEN, "pad_token": EOS_TOKEN} if EOS_TOKEN in vocab else {}
    if special:
        tok.add_special_tokens([EOS_TOKEN])
    # an in-memory PreTrainedTokenizerFast breaks inside TransformerLens; a reloaded one does not
    with tempfile.TemporaryDirectory() as tmp:
        save_tokenizer(PreTrainedTokenizerFast(tokenizer_object=tok, **special), tmp)
        return load_tokenizer(tmp)


# -------------------------------------------------------------------------------- loading
def load_release_model(
    cls: type[M],
    folder: str | Path,
    tokenizer: str | Path | PreTrainedTokenizerBase | None = None,
    device: str | torch.device | None = None,
) -> M:
    """Build `cls` from a release model folder (see the module docstring). `tokenizer` is a
    GPT-2-style BPE folder (the release's `tinypython_2k`), a tokenizer object, or None (the
    model then works on token ids only, and a warning says so)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ReleaseFormatError(f"no circuit_sparsity model folder at {folder}")
    rcfg = read_release_config(folder)
    cfg = config_from_release(rcfg, model_name=folder.name)
    params = params_from_release(read_release_state_dict(folder), rcfg, cfg)
    if isinstance(tokenizer, (str, Path)):
        tokenizer = release_tokenizer(tokenizer)
    if tokenizer is None:
        warnings.warn(f"{folder.name}: no tokenizer given, so the model works on token ids only; "
                      f"pass tokenizer=<folder with {' and '.join(TOKENIZER_FILES)}> (the release's "
                      f"{rcfg['tokenizer_name']}) to use strings", stacklevel=3)
    elif len(tokenizer) > cfg.d_vocab:
        raise ReleaseFormatError(f"the tokenizer has {len(tokenizer)} tokens, more than the "
                                 f"model's vocab_size {cfg.d_vocab}")
    if device is not None:
        cfg.device = str(device)
    model = cls(cfg, tokenizer=tokenizer)
    load_parameters(model, params, source=folder / WEIGHTS_FILE)
    model.eval()
    return model


def weight_l0(model: torch.nn.Module) -> float:
    """Fraction of nonzero weights over the matrices the projection acts on (those of a
    `SparseHookedTransformer`'s `sparsified_matrices()`)."""
    sizes = [(m.weight.count_nonzero().item(), m.weight.numel()) for m in model.sparsified_matrices()]
    return sum(n for n, _ in sizes) / max(1, sum(t for _, t in sizes))


__all__ = ["ReleaseFormatError", "read_release_config", "config_from_release",
           "read_release_state_dict", "params_from_release", "release_tokenizer",
           "load_release_model", "weight_l0"]
