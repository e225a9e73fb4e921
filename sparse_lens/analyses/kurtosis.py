"""Activation kurtosis of the residual stream, against weight L0 and width (the paper: weight-
sparse models have more heavy-tailed residual activations, and kurtosis rises as L0 falls or
width grows — a sign of a privileged basis, where a few channels carry each token's values).

For each model of the sweep (`common.sweep_specs`) and each residual site (`hook_resid_pre` of
layer 0, i.e. the embedding, then `hook_resid_post` of every layer, the last being the final
residual), the excess kurtosis of each token's residual vector across its channels,
E[(x - mean)^4] / var^2 - 3 over the d_model channels, averaged over validation tokens.
(A Gaussian vector gives 0; one large channel among d gives about d.)
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import torch
from jaxtyping import Float

from sparse_lens.analyses.common import (
    AnalysisResult, option, settings_dict, sweep_options, sweep_or_existing, write_outputs,
)

NAME = "kurtosis"


def excess_kurtosis(x: Float[torch.Tensor, "... d"]) -> Float[torch.Tensor, "..."]:
    """Excess kurtosis of each vector along the last axis (float64)."""
    x = x.double()
    centred = x - x.mean(-1, keepdim=True)
    var = centred.pow(2).mean(-1)
    return centred.pow(4).mean(-1) / var.pow(2).clamp_min(1e-300) - 3.0


@torch.no_grad()
def residual_kurtosis(model, batches: list[torch.Tensor]) -> dict[str, float]:
    """Mean per-token excess kurtosis at each residual site: {hook name: value}."""
    names = ["blocks.0.hook_resid_pre"] + [f"blocks.{i}.hook_resid_post" for i in range(model.cfg.n_layers)]
    sums = dict.fromkeys(names, 0.0)
    count = 0
    for batch in batches:
        _, cache = model.run_with_cache(batch.to(model.cfg.device), names_filter=lambda n: n in sums)
        for name in names:
            sums[name] += excess_kurtosis(cache[name]).sum().item()
        count += batch.numel()
    return {name: total / count for name, total in sums.items()}


def add_arguments(parser) -> None:
    sweep_options(parser)
    option(parser, "--n-batches", type=int, help="validation batches of 8 x 64 tokens (default 8)")


def run(out_dir: str | Path, models_dir: str | Path, quick: bool = False, widths=None, l0s=None,
        steps: int | None = None, n_batches: int | None = None, models=None,
        progress: bool = False) -> AnalysisResult:
    from sparse_lens import data

    trained = sweep_or_existing(models, quick, widths, l0s, steps, Path(models_dir), progress)
    tokenizer = trained[0].model.tokenizer
    corpus = data.load_corpus(None, tokenizer, max_files=20 if quick else None,
                              cache_dir=data.default_cache_dir())
    batches = data.validation_batches(corpus.val, 4 if quick else 8, 64, n_batches or (2 if quick else 8))
    rows = []
    for t in trained:
        for name, value in residual_kurtosis(t.model, batches).items():
            layer = -1 if name == "blocks.0.hook_resid_pre" else int(name.split(".")[1])
            rows.append(dict(model=t.spec.name, d_model=t.model.cfg.d_model,
                             weight_l0=t.model.cfg.weight_l0, val_loss=t.val_loss, site=name,
                             layer=layer, final=layer == t.model.cfg.n_layers - 1, kurtosis=value))
    table = pd.DataFrame(rows)
    final = table[table.final]
    trend = _trend(final)
    summary = (
        "Excess kurtosis of the residual stream (per token across channels, averaged over "
        f"{sum(b.numel() for b in batches)} validation tokens), final layer:\n\n"
        + "\n".join(f"- d_model {w}: " + ", ".join(f"L0 {r.weight_l0:.4g} -> {r.kurtosis:.2f}"
                                                   for r in g.sort_values("weight_l0", ascending=False).itertuples())
                    for w, g in final.groupby("d_model"))
        + f"\n\n{trend}"
    )
    return write_outputs(out_dir, NAME, table, _plot(table), summary, trained,
                         settings_dict(quick=quick, models=models, widths=sorted(final.d_model.unique().tolist()),
                                       l0s=sorted(final.weight_l0.unique().tolist()),
                                       n_tokens=sum(b.numel() for b in batches)))


def _trend(final: pd.DataFrame) -> str:
    """Does kurtosis rise as L0 falls (at each width) and as width grows (at each L0)?"""
    by_l0 = [g.sort_values("weight_l0", ascending=False)["kurtosis"].is_monotonic_increasing
             for _, g in final.groupby("d_model") if len(g) > 1]
    by_width = [g.sort_values("d_model")["kurtosis"].is_monotonic_increasing
                for _, g in final.groupby("weight_l0") if len(g) > 1]
    return (f"Kurtosis rises monotonically as L0 falls at {sum(by_l0)} of {len(by_l0)} widths, and "
            f"as width grows at {sum(by_width)} of {len(by_width)} L0s.")


def _plot(table: pd.DataFrame):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 4))
    left, right = fig.subplots(1, 2)
    final = table[table.final]
    for width, g in final.groupby("d_model"):
        g = g.sort_values("weight_l0")
        left.plot(g.weight_l0, g["kurtosis"], "o-", label=f"d_model {width}")
    left.set_xscale("log")
    left.invert_xaxis()
    left.set_xlabel("weight L0 (fraction of nonzero weights; sparser to the right)")
    left.set_ylabel("excess kurtosis, final residual")
    left.legend(fontsize=8)
    for name, g in table.groupby("model"):
        g = g.sort_values("layer")
        right.plot(g.layer + 1, g["kurtosis"], "o-", label=name.removeprefix("sweep-"), lw=0.8)
    right.set_xlabel("residual site (0 = embedding, L = after block L)")
    right.set_ylabel("excess kurtosis")
    right.legend(fontsize=6)
    fig.suptitle("Residual-stream activation kurtosis")
    return fig
