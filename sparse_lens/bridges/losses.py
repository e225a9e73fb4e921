"""The bridged objective: what a sparse model and its bridges minimise against a frozen dense model.

Six terms, each weighted 1 by default (`bridge_losses` returns them apart; `total_loss` sums):

| term          | what                                                                            |
|---------------|---------------------------------------------------------------------------------|
| `ce`          | the sparse model's own next-token cross-entropy                                 |
| `kl`          | KL(dense || sparse) of the two models' outputs                                  |
| `enc_nmse`    | encoder NMSE: `encode(dense residual)` vs the sparse residual (target detached) |
| `dec_nmse`    | decoder NMSE: `decode(sparse residual)` vs the dense residual                    |
| `hybrid_d2s`  | KL(dense || dense up to site i, encoded, finished in the sparse model)          |
| `hybrid_s2d`  | KL(dense || sparse up to site i, decoded, finished in the dense model)          |

Choices (the method digest leaves them open):
- NMSE = sum of squared errors / sum of squared deviations of the target from its mean over the
  batch's tokens (the denominator detached). The NMSE and hybrid terms are *means over sites*,
  so every term is on the scale of one site whatever n_layers is, and a step that samples a
  subset of sites for the hybrid passes (`hybrid_sites`) estimates the same quantity.
- Both hybrid KLs take the dense model's output as the reference: the bridges' job is to make
  the sparse model stand in for the dense one. Gradients of `hybrid_s2d` flow through the frozen
  dense model into the decoder and into the sparse model below the site; those of `dec_nmse`
  reach the sparse model too (its residual should be decodable). Only the encoder's target is
  detached, as the digest says.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from jaxtyping import Float, Int
from torch import Tensor

from sparse_lens.bridges.hybrid import (  # nmse: public here too (`sparse_lens.bridges.nmse`)
    forward_kwargs, mean_kl, nmse, run_capturing, run_from_site,
)
from sparse_lens.bridges.modules import Bridges

LOSS_TERMS: tuple[str, ...] = ("ce", "kl", "enc_nmse", "dec_nmse", "hybrid_d2s", "hybrid_s2d")


def bridge_losses(
    dense,
    sparse,
    bridges: Bridges,
    tokens: Int[Tensor, "batch pos"],
    hybrid_sites: Sequence[int] | None = None,
) -> dict[str, Float[Tensor, ""]]:
    """The six terms of the module docstring on one batch, as scalar tensors (the sparse model's
    and the bridges' parameters in their graph). `hybrid_sites`: the site indices whose hybrid
    passes run (default all). The dense model runs without gradients for its own pass; freeze
    its parameters (`requires_grad_(False)`) so the s->d passes leave them alone."""
    sites = bridges.sites
    names = [s.hook_name for s in sites]
    with torch.no_grad():
        dense_logits, dense_acts = run_capturing(dense, tokens, names)
    sparse_logits, sparse_acts = run_capturing(sparse, tokens, names)

    terms = dict(
        ce=sparse.loss_fn(sparse_logits, tokens),
        kl=mean_kl(dense_logits, sparse_logits),
        enc_nmse=_site_mean([nmse(bridges.encode(s, dense_acts[s.hook_name]),
                                  sparse_acts[s.hook_name].detach()) for s in sites]),
        dec_nmse=_site_mean([nmse(bridges.decode(s, sparse_acts[s.hook_name]),
                                  dense_acts[s.hook_name]) for s in sites]),
    )
    chosen = [sites[i] for i in (range(len(sites)) if hybrid_sites is None else hybrid_sites)]
    if not chosen:
        raise ValueError("hybrid_sites is empty: at least one site's hybrid passes must run")
    dense_kwargs, sparse_kwargs = forward_kwargs(dense, tokens), forward_kwargs(sparse, tokens)
    d2s, s2d = [], []
    for site in chosen:
        block_input = sites[2 * site.layer].hook_name  # a block's input is the site before it
        d2s_logits = run_from_site(sparse, site, bridges.encode(site, dense_acts[site.hook_name]), tokens,
                                   layer_input=sparse_acts[block_input], kwargs=sparse_kwargs)
        d2s.append(mean_kl(dense_logits, d2s_logits))
        s2d_logits = run_from_site(dense, site, bridges.decode(site, sparse_acts[site.hook_name]), tokens,
                                   layer_input=dense_acts[block_input], kwargs=dense_kwargs)
        s2d.append(mean_kl(dense_logits, s2d_logits))
    terms["hybrid_d2s"] = _site_mean(d2s)
    terms["hybrid_s2d"] = _site_mean(s2d)
    return terms


def total_loss(terms: dict[str, Tensor], weights: dict[str, float] | None = None) -> Tensor:
    """`sum(weights[t] * terms[t])` (weights default to 1; a missing weight is 1)."""
    weights = weights or {}
    unknown = sorted(set(weights) - set(LOSS_TERMS))
    if unknown:
        raise ValueError(f"unknown loss terms {unknown}; terms are {list(LOSS_TERMS)}")
    return sum(weights.get(name, 1.0) * value for name, value in terms.items())


def _site_mean(values: list[Tensor]) -> Tensor:
    return torch.stack(values).mean()
