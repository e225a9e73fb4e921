"""Context dilution on `bracket_counting` (the paper's adversarial example for the depth circuit).

The paper's bracket-counting circuit detects `[` tokens and lets one attention head *average*
that detector over the context; the average is read as "still inside an inner list". So the
depth signal is roughly (number of `[`) / (tokens attended), and lengthening the context without
adding brackets dilutes it until the model answers `]` where `]]` is right.

Here: take test prompts that end inside an unfinished inner list (answer `]]`), append k more
items to that list (`, 7`, `, 12`, ...) for k = 0, 1, 2, ..., and record the mean logit
difference logit(`]]`) - logit(`]`) of the full model and of the circuit at each length.

The circuit's prediction of the flip: if the signal is an average over the context, the circuit's
logit difference is about a + b / L at prompt length L. Fit a and b on the shortest prompts
(the lengths the task itself uses, k <= k_fit) and solve a + b / L = 0 for the predicted flip
length; compare it with the length where the full model's (and the circuit's) mean logit
difference actually crosses zero (linear interpolation between the measured lengths).
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pandas as pd

from sparse_lens.analyses.common import (
    AnalysisResult, ModelSpec, circuits_dir, existing_model, option, prune_tasks, settings_dict,
    target_loss_option, train_model, write_outputs,
)

NAME = "dilution"
TASK = "bracket_counting"


def diluted_prompts(base_prompts: list[str], k: int, seed: int = 0) -> list[str]:
    """Each prompt with `k` more integer items appended to the list it ends in."""
    rng = random.Random(seed)
    return [p + "".join(f", {rng.randint(0, 99)}" for _ in range(k)) for p in base_prompts]


def crossing(lengths, values) -> float:
    """The first length where `values` goes from > 0 to <= 0, linearly interpolated (NaN if it
    never does, or is <= 0 from the start)."""
    lengths, values = np.asarray(lengths, float), np.asarray(values, float)
    if not len(values) or values[0] <= 0:
        return float("nan")
    for i in range(1, len(values)):
        if values[i] <= 0:
            l0, l1, v0, v1 = lengths[i - 1], lengths[i], values[i - 1], values[i]
            return float(l0 + (l1 - l0) * v0 / (v0 - v1))
    return float("nan")


def fit_inverse_length(lengths, values) -> tuple[float, float, float]:
    """Least-squares fit values ~ a + b / length; returns (a, b, predicted zero length -b/a,
    NaN when the fit never crosses zero at a positive length beyond the data)."""
    x = 1.0 / np.asarray(lengths, float)
    a_mat = np.stack([np.ones_like(x), x], axis=1)
    (a, b), *_ = np.linalg.lstsq(a_mat, np.asarray(values, float), rcond=None)
    zero = -b / a if a < 0 < b else float("nan")
    return float(a), float(b), float(zero)


def add_arguments(parser) -> None:
    target_loss_option(parser)
    option(parser, "--preset", help="model preset (default small)")
    option(parser, "--model", help="use this model instead of training the preset: a packed model "
           "directory, a training run, a run's snapshot (<run>/snapshots/step-N) or a shipped "
           "checkpoint's name (wide, small)")
    option(parser, "--n-prompts", type=int, help="test prompts ending inside an inner list (default 64)")
    option(parser, "--max-extra", type=int, help="most items appended to each prompt (default 40)")
    option(parser, "--k-fit", type=int, help="the fit a + b/L uses the lengths with <= this many "
           "items appended (default 3)")


def run(out_dir: str | Path, models_dir: str | Path, quick: bool = False, target_loss: float = 0.15,
        preset: str = "small", n_prompts: int | None = None, max_extra: int | None = None,
        k_fit: int = 3, model: str | Path | None = None, progress: bool = False) -> AnalysisResult:
    from sparse_lens.circuit import Circuit
    from sparse_lens.tasks.generation import generate_examples

    trained = (existing_model(model, Path(models_dir)) if model is not None
               else train_model(ModelSpec(preset, preset), Path(models_dir), quick, progress))
    model = trained.model
    pruned = prune_tasks(trained, [TASK], target_loss, quick, progress).iloc[0]
    circuit = Circuit.load(circuits_dir(trained, target_loss) / TASK, model)
    n_prompts = n_prompts or (8 if quick else 64)
    max_extra = max_extra if max_extra is not None else (6 if quick else 40)
    examples = [e for e in generate_examples(TASK, n=4 * n_prompts, seed=0, split="test",
                                             tokenizer=model.tokenizer) if e.correct == "]]"]
    base = [e.prompt for e in examples[:n_prompts]]
    table = measure(model, circuit, base, max_extra)
    max_extra = int(table.extra_items.max())
    fit = table[table.extra_items <= k_fit]
    a, b, predicted = fit_inverse_length(fit.mean_tokens, fit.circuit_logit_diff)
    table["circuit_fit"] = a + b / table.mean_tokens
    full_flip = crossing(table.mean_tokens, table.full_logit_diff)
    circuit_flip = crossing(table.mean_tokens, table.circuit_logit_diff)
    status = ("solved" if bool(pruned.solved) else
              "NOT solved (the circuit is the best the bisection found, or every node when the "
              "full model misses the target)")
    summary = (
        f"Model `{trained.spec.name}` (validation loss {trained.val_loss:.4f}); `{TASK}` circuit at "
        f"target {target_loss}: {status}, {circuit.n_nodes} nodes. {len(base)} test prompts ending "
        f"inside an inner list (answer `]]`), each lengthened by up to {max_extra} more items (the "
        f"most for which every prompt fits the {model.cfg.n_ctx}-token context, or the requested "
        f"maximum).\n\n"
        f"- Full model: mean logit(]]) - logit(]) {table.full_logit_diff.iloc[0]:.3f} at "
        f"{table.mean_tokens.iloc[0]:.1f} tokens; it flips to `]` at "
        + _flip_text(full_flip, table.full_logit_diff, table.full_accuracy) + ".\n"
        f"- Circuit: flips at " + _flip_text(circuit_flip, table.circuit_logit_diff, table.circuit_accuracy)
        + f"; its fit a + b/L on the {len(fit)} shortest lengths (a = {a:.3f}, b = {b:.2f}) predicts "
        + (f"**{predicted:.1f} tokens**." if predicted == predicted else "no flip (the fit does not cross zero).")
    )
    return write_outputs(out_dir, NAME, table, _plot(table, full_flip, predicted), summary, [trained],
                         settings_dict(quick=quick, target_loss=target_loss, n_prompts=len(base),
                                       max_extra=max_extra, k_fit=k_fit, fit_a=a, fit_b=b,
                                       predicted_flip_tokens=predicted, full_flip_tokens=full_flip,
                                       circuit_flip_tokens=circuit_flip))


def measure(model, circuit, base: list[str], max_extra: int) -> pd.DataFrame:
    """Mean logit difference and accuracy of the full model and the circuit on `base` lengthened
    by k = 0, 1, ..., `max_extra` items; stops before the first k at which a prompt no longer
    fits the context (its answer included). One row per k."""
    import torch

    from sparse_lens.tasks import TaskData, task_logit_diff

    rows = []
    limit = model.cfg.n_ctx - 1  # the prompt and the answer must fit the context
    for k in range(max_extra + 1):
        prompts = diluted_prompts(base, k, seed=k)
        if max(len(model.tokenizer.encode(p)) for p in prompts) > limit:
            break  # k - 1: the longest lengthening whose every prompt fits
        data = TaskData.from_prompts(TASK, prompts, ["]]"] * len(prompts), ["]"] * len(prompts),
                                     model.tokenizer, max_prompt_tokens=limit)
        data = data.to(model.cfg.device)
        with torch.no_grad():
            full = task_logit_diff(model(data.tokens), data)
            circ = task_logit_diff(circuit.run(data.tokens), data)
        rows.append(dict(extra_items=k, mean_tokens=float(data.last_pos.float().mean() + 1),
                         full_logit_diff=full.mean().item(), full_accuracy=(full > 0).float().mean().item(),
                         circuit_logit_diff=circ.mean().item(),
                         circuit_accuracy=(circ > 0).float().mean().item()))
    return pd.DataFrame(rows)


def _flip_text(flip: float, values: pd.Series, accuracy: pd.Series) -> str:
    if flip == flip:
        return f"**{flip:.1f} tokens**"
    if values.iloc[0] <= 0:
        return (f"no length: it prefers `]` already at the shortest length (accuracy "
                f"{accuracy.iloc[0]:.2f} on these `]]` prompts), so there is no depth signal to dilute")
    return "no measured length"


def _plot(table: pd.DataFrame, full_flip: float, predicted: float):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    ax.plot(table.mean_tokens, table.full_logit_diff, "o-", label="full model")
    ax.plot(table.mean_tokens, table.circuit_logit_diff, "s-", label="circuit")
    ax.plot(table.mean_tokens, table.circuit_fit, "--", color="C1", lw=0.8, label="circuit fit a + b/L")
    ax.axhline(0, color="k", lw=0.6)
    if full_flip == full_flip:
        ax.axvline(full_flip, color="C0", ls=":", lw=0.8, label=f"full model flips ({full_flip:.0f})")
    if predicted == predicted:
        ax.axvline(predicted, color="C1", ls=":", lw=0.8, label=f"predicted flip ({predicted:.0f})")
    ax.set_xlabel("prompt length (tokens)")
    ax.set_ylabel("mean logit(]]) - logit(])")
    ax.set_title("bracket_counting: context dilution")
    ax.legend(fontsize=7)
    return fig
