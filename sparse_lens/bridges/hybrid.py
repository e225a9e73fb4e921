"""Hybrid forward passes: run one model up to a residual site, cross the bridge, finish in the other.

    out = dense_to_sparse(dense, sparse, bridges, tokens, "blocks.1.hook_resid_mid")
    out.logits, out.kl_to_dense, out.kl_to_sparse
    table = hybrid_kl_table(dense, sparse, bridges, batches)     # one row per site

How a pass is run, with TransformerLens's own machinery:
- the source model runs with a hook that records the residual at the site, stopping after the
  site's block (`stop_at_layer`);
- the target model starts at the first block after the site (`start_at_layer`) from the bridged
  residual. For a site after attention ("mid"), the target model starts at that block from its
  *own* block input, and a hook on `blocks.{l}.hook_resid_mid` replaces the residual there by
  the bridged one; the block's attention output is computed and discarded.
Every hook is added with `model.hooks(...)`, which removes it when the pass ends, by an
exception too; hooks the caller added stay. With identical models and identity bridges every
hybrid pass equals the model's own forward pass bit for bit (tested).

KL is measured per token and averaged over all positions: `KL(P_ref || P_hybrid)` in nats,
where the reference is the dense model's own output (`kl_to_dense`) or the sparse model's
(`kl_to_sparse`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import pandas as pd
import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor

from sparse_lens.bridges.modules import BridgeSite, Bridges

HookFn = Callable[[Tensor, object], Tensor | None]


@dataclass
class HybridOutput:
    """A hybrid pass's logits and their KL (nats/token, mean) to each model's own output."""

    logits: Float[Tensor, "batch pos d_vocab"]
    kl_to_dense: float
    kl_to_sparse: float


# ---------------------------------------------------------------------- the primitives
def run_capturing(
    model, tokens: Int[Tensor, "batch pos"], names: Sequence[str], stop_at_layer: int | None = None,
) -> tuple[Float[Tensor, "batch pos d_vocab"] | None, dict[str, Float[Tensor, "batch pos d_model"]]]:
    """Run `model` on `tokens`, recording the activations at the hooks `names` (not detached:
    gradients flow through them when enabled). Returns the logits (None with `stop_at_layer`)
    and `{name: activation}`."""
    acts: dict[str, Tensor] = {}

    def record(activation: Tensor, hook) -> None:
        acts[hook.name] = activation

    with model.hooks(fwd_hooks=[(name, record) for name in names]):
        out = model(tokens, stop_at_layer=stop_at_layer)
    missing = [n for n in names if n not in acts]
    if missing:
        raise RuntimeError(f"the hooks {missing} did not fire")
    return (None if stop_at_layer is not None else out), acts


def forward_kwargs(model, tokens: Int[Tensor, "batch pos"]) -> dict:
    """What a pass started at a later layer needs besides the residual: the tokens (for a bigram
    table's logits) and, for models whose blocks take positions apart from the residual
    (TransformerLens "shortformer", or `d_pos_emb`), those position embeddings."""
    kwargs: dict = dict(tokens=tokens)
    if (getattr(model.cfg, "positional_embedding_type", "standard") == "shortformer"
            or getattr(model.cfg, "d_pos_emb", None) is not None):
        _, _, pos_embed, attention_mask = model.input_to_embed(tokens)
        kwargs.update(shortformer_pos_embed=pos_embed, attention_mask=attention_mask)
    return kwargs


def run_from_site(
    model,
    site: BridgeSite,
    residual: Float[Tensor, "batch pos d_model"],
    tokens: Int[Tensor, "batch pos"],
    layer_input: Float[Tensor, "batch pos d_model"] | None = None,
    kwargs: dict | None = None,
    fwd_hooks: Sequence[tuple[str, HookFn]] = (),
) -> Float[Tensor, "batch pos d_vocab"]:
    """`model`'s logits when its residual at `site` is `residual` (everything after the site
    is computed by `model`). For a "mid" site the block's input is needed too: `layer_input`
    (the model's own residual at the block's start; computed if not given). `kwargs`: from
    `forward_kwargs(model, tokens)` (computed if not given). `fwd_hooks`: more hooks for this
    pass (removed afterwards, like the site's own)."""
    kwargs = forward_kwargs(model, tokens) if kwargs is None else kwargs
    hooks = list(fwd_hooks)
    start = residual
    if site.stage == "mid":
        if layer_input is None:
            name = f"blocks.{site.layer}.hook_resid_pre"
            with torch.no_grad():
                layer_input = run_capturing(model, tokens, [name], stop_at_layer=site.layer + 1)[1][name]
        start = layer_input.detach()
        hooks.insert(0, (site.hook_name, lambda _act, hook: residual))
    with model.hooks(fwd_hooks=hooks):
        return model(start, start_at_layer=site.start_layer, **kwargs)


def mean_kl(
    reference_logits: Float[Tensor, "batch pos d_vocab"], logits: Float[Tensor, "batch pos d_vocab"],
) -> Float[Tensor, ""]:
    """KL(P_reference || P) in nats, per token, averaged over batch and positions."""
    ref = F.log_softmax(reference_logits.float(), dim=-1).flatten(0, -2)
    log_q = F.log_softmax(logits.float(), dim=-1).flatten(0, -2)
    return F.kl_div(log_q, ref, log_target=True, reduction="batchmean")


def nmse(pred: Float[Tensor, "... d"], target: Float[Tensor, "... d"]) -> Float[Tensor, ""]:
    """Normalised MSE: `sum((pred - target)^2) / sum((target - mean(target))^2)`, the mean taken
    over every token (all axes but the last), the denominator detached. 1.0 is the error of
    predicting the mean residual; 0 is exact."""
    if pred.shape != target.shape:
        raise ValueError(f"nmse: prediction {tuple(pred.shape)} and target {tuple(target.shape)} differ")
    flat = target.flatten(0, -2)
    scale = (flat - flat.mean(dim=0, keepdim=True)).pow(2).sum().detach().clamp_min(1e-12)
    return (pred - target).pow(2).sum() / scale


# ---------------------------------------------------------------------- hybrid passes
def dense_to_sparse(dense, sparse, bridges: Bridges, tokens: Int[Tensor, "batch pos"],
                    site: int | str | BridgeSite) -> HybridOutput:
    """Run `dense` up to `site`, encode its residual, finish in `sparse`."""
    return _hybrid(dense, sparse, bridges, tokens, site, "dense_to_sparse")


def sparse_to_dense(dense, sparse, bridges: Bridges, tokens: Int[Tensor, "batch pos"],
                    site: int | str | BridgeSite) -> HybridOutput:
    """Run `sparse` up to `site`, decode its residual, finish in `dense`."""
    return _hybrid(dense, sparse, bridges, tokens, site, "sparse_to_dense")


@torch.no_grad()
def _hybrid(dense, sparse, bridges, tokens, site, direction: str) -> HybridOutput:
    bridges.check_pair(dense, sparse, check_fingerprint=False)
    site = bridges.site(site)
    tokens = _as_tokens(tokens, dense, sparse)
    dense_logits, sparse_logits = dense(tokens), sparse(tokens)
    logits = _hybrid_logits(dense, sparse, bridges, tokens, site, direction)
    return HybridOutput(logits, mean_kl(dense_logits, logits).item(), mean_kl(sparse_logits, logits).item())


def _hybrid_logits(dense, sparse, bridges, tokens, site: BridgeSite, direction: str,
                   acts: dict | None = None) -> Tensor:
    """The hybrid pass's logits. `acts`: the models' residuals at every site, if already known
    (`{"dense": {...}, "sparse": {...}}`, as `run_capturing` records them)."""
    source, target = (dense, sparse) if direction == "dense_to_sparse" else (sparse, dense)
    bridge = bridges.encode if direction == "dense_to_sparse" else bridges.decode
    if acts is None:
        src = run_capturing(source, tokens, [site.hook_name], stop_at_layer=site.layer + 1)[1]
        layer_input = None
    else:
        src = acts["dense" if source is dense else "sparse"]
        # a block's input is the residual at the site before it (site 2l)
        layer_input = acts["dense" if target is dense else "sparse"][bridges.sites[2 * site.layer].hook_name]
    return run_from_site(target, site, bridge(site, src[site.hook_name]), tokens, layer_input)


@torch.no_grad()
def hybrid_kl_table(dense, sparse, bridges: Bridges,
                    batches: Iterable[Int[Tensor, "batch pos"]]) -> pd.DataFrame:
    """One row per site: its index, hook name and label; the KL (nats/token) of the hybrid pass
    each way to the dense and to the sparse model's own output; and the bridges' normalised MSE
    there (encoder vs the sparse residual, decoder vs the dense residual). Averaged over
    `batches` (token tensors). The table's `attrs["kl_dense_sparse"]` holds KL(dense || sparse)
    of the two models themselves, the scale to read the rest against."""
    bridges.check_pair(dense, sparse, check_fingerprint=False)
    names = [s.hook_name for s in bridges.sites]
    sums: dict[tuple[int, str], float] = {}
    base, n = 0.0, 0
    for tokens in batches:
        tokens = _as_tokens(tokens, dense, sparse)
        dense_logits, dense_acts = run_capturing(dense, tokens, names)
        sparse_logits, sparse_acts = run_capturing(sparse, tokens, names)
        acts = {"dense": dense_acts, "sparse": sparse_acts}
        base += mean_kl(dense_logits, sparse_logits).item()
        for site in bridges.sites:
            name = site.hook_name
            values = {
                "enc_nmse": nmse(bridges.encode(site, dense_acts[name]), sparse_acts[name]),
                "dec_nmse": nmse(bridges.decode(site, sparse_acts[name]), dense_acts[name]),
            }
            for direction in ("dense_to_sparse", "sparse_to_dense"):
                logits = _hybrid_logits(dense, sparse, bridges, tokens, site, direction, acts)
                values[f"{direction}_kl_to_dense"] = mean_kl(dense_logits, logits)
                values[f"{direction}_kl_to_sparse"] = mean_kl(sparse_logits, logits)
            for key, value in values.items():
                sums[site.index, key] = sums.get((site.index, key), 0.0) + float(value)
        n += 1
    if n == 0:
        raise ValueError("hybrid_kl_table needs at least one batch")
    keys = ["dense_to_sparse_kl_to_dense", "dense_to_sparse_kl_to_sparse",
            "sparse_to_dense_kl_to_dense", "sparse_to_dense_kl_to_sparse", "enc_nmse", "dec_nmse"]
    rows = [dict(site=s.index, hook_name=s.hook_name, label=s.label,
                 **{k: sums[s.index, k] / n for k in keys}) for s in bridges.sites]
    table = pd.DataFrame(rows)
    table.attrs["kl_dense_sparse"] = base / n
    return table


def _as_tokens(tokens, dense, sparse) -> Tensor:
    if not isinstance(tokens, Tensor) or tokens.ndim != 2:
        raise ValueError(f"tokens must be a [batch, pos] tensor of token ids; got "
                         f"{getattr(tokens, 'shape', type(tokens).__name__)}")
    n_ctx = min(dense.cfg.n_ctx, sparse.cfg.n_ctx)
    if tokens.shape[1] > n_ctx:
        raise ValueError(f"{tokens.shape[1]} positions exceed the models' context ({n_ctx})")
    return tokens.to(sparse.cfg.device)
