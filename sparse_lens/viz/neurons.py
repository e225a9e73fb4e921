"""`neuron_view`: what the circuit's neurons and channels respond to.

For each shown node (MLP neurons, q/k/v channels and residual read/write channels alike), with
the circuit running (every other node mean-ablated):
- a table of its role in the task: its mean activation at the prompt's final token for each of
  the task's two classes (a node that separates them carries the answer), beside its ablation
  value (the mean it takes when pruned) and the corpus tokens where it is largest;
- its activation on every token of a few task prompts (circuitsvis `TextNeuronActivations`);
- the corpus snippets where it is largest in magnitude (circuitsvis `TopkSamples`), from windows
  of the held-out corpus stream the caller passes (`corpus_tokens`; without one the view says it
  has no snippets: it never loads a corpus itself).
"""

from __future__ import annotations

import html
import warnings

import torch
from jaxtyping import Float, Int

from sparse_lens.data import validation_batches
from sparse_lens.viz.activations import final_activations, node_activations, token_strings
from sparse_lens.viz.circuitsvis_inline import text_neuron_activations, topk_samples
from sparse_lens.viz.view import View, status_note


def neuron_view(circuit, corpus_tokens: Int[torch.Tensor, " n"] | None = None, n_prompts: int = 4,
                max_nodes: int = 32, n_rank_prompts: int = 32, n_windows: int = 64,
                window_len: int = 32, n_snippets: int = 5, split: str = "test") -> View:
    """The roles of up to `max_nodes` of the circuit's nodes (see the module docstring).

    When the circuit has more nodes, the ones shown are those that best separate the task's
    classes at the final token of `n_rank_prompts` task prompts (`node_scores`; for a task
    without classes, those furthest from their ablation value), and the view says how many were
    left out. `corpus_tokens`: a 1-D token stream for the snippets, e.g.
    `data.load_corpus(None, model.tokenizer, max_files=200).val` (None: no snippets, and the view
    says so)."""
    if min(n_prompts, max_nodes, n_rank_prompts, n_windows, window_len, n_snippets) < 1:
        raise ValueError("neuron_view: counts and lengths must be >= 1")
    title = f"Neurons and channels of the circuit ({circuit.task})"
    if circuit.n_nodes == 0:
        return View(title, '<p class="sl-note">The circuit keeps no node.</p>')
    model = circuit.model
    data = circuit.task_data(split=split, n=max(n_prompts, n_rank_prompts))
    finals = final_activations(circuit, data.tokens, data.last_pos, circuit.node_ids)  # [batch, node]
    means = circuit.means[circuit.node_ids].float()
    score, by = node_scores(finals, means, data)
    keep = torch.argsort(score, descending=True, stable=True)[:max_nodes].sort().values
    shown = [circuit.node_ids[i] for i in keep.tolist()]
    table = circuit.registry.describe(shown)
    labels = circuit.registry.labels(shown)
    snippets = (None if corpus_tokens is None else
                corpus_snippets(circuit, corpus_tokens, shown, n_windows, window_len, n_snippets))

    prompt_data = data[:n_prompts]
    acts, _ = node_activations(circuit, prompt_data.tokens, shown)  # [batch, pos, node]
    prompt_tokens, prompt_acts = [], []
    for i in range(len(prompt_data)):
        n = int(prompt_data.last_pos[i]) + 1
        prompt_tokens.append(token_strings(model, prompt_data.tokens[i, :n]))
        prompt_acts.append(acts[i, :n, None, :].double().round(decimals=4))  # [pos, 1, node]

    parts = [
        _explanation(circuit, len(shown), by),
        role_table(labels, table.kind.tolist(), means[keep], finals[:, keep], data, snippets, model),
        "<h4>On task prompts</h4>",
        text_neuron_activations(prompt_tokens, prompt_acts, first_dimension_name="Circuit",
                                second_dimension_name="Node", first_dimension_labels=[circuit.task],
                                second_dimension_labels=labels),
        _snippets_html(snippets, n_snippets, model, circuit.task, labels),
    ]
    return View(title, "\n".join(parts), uses_circuitsvis=True)


def _snippets_html(snippets: dict | None, n_snippets: int, model, task: str, labels: list[str]) -> str:
    """The corpus snippets' heading and circuitsvis mount, or a note that no corpus was given."""
    if snippets is None:
        return ('<h4>Top corpus snippets</h4><p class="sl-note">No corpus snippets: no corpus was '
                "given to this view (<code>corpus_tokens=</code>).</p>")
    samples = snippets["samples"]
    return "\n".join([
        f"<h4>Top corpus snippets (largest |activation|, up to {n_snippets} per node)</h4>",
        topk_samples([[[token_strings(model, s) for s, _ in node] for node in samples]],
                     [[[a.double().round(decimals=4).tolist() for _, a in node] for node in samples]],
                     zeroth_dimension_name="Circuit", first_dimension_name="Node",
                     zeroth_dimension_labels=[task], first_dimension_labels=labels)])


@torch.no_grad()
def corpus_snippets(circuit, stream: Int[torch.Tensor, " n"], node_ids: list[int], n_windows: int,
                    window_len: int, n_snippets: int, before: int = 20, after: int = 3) -> dict:
    """For each node of `node_ids`, the `n_snippets` windows of `stream` (`n_windows` evenly
    spaced windows of `window_len` tokens) where its |activation| peaks, highest first, each
    cut to `before` tokens before the peak and `after` after it.

    Returns `{"samples": [node][snippet] -> (token ids [len], activations [len]),
    "peaks": [node][snippet] -> (token id at the peak, activation there)}`."""
    window_len = min(window_len, circuit.model.cfg.n_ctx, stream.numel())
    n_windows = max(1, min(n_windows, stream.numel() // window_len))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # overlapping windows are fine for snippets
        windows = validation_batches(stream, n_windows, window_len, 1)[0]  # [window, pos]
    acts, _ = node_activations(circuit, windows, node_ids)  # [window, pos, node]
    peak_value, peak_pos = acts.abs().max(dim=1)  # [window, node]
    samples, peaks = [], []
    for node in range(len(node_ids)):
        order = torch.argsort(peak_value[:, node], descending=True, stable=True)[:n_snippets]
        node_samples, node_peaks = [], []
        for w in order.tolist():
            p = int(peak_pos[w, node])
            start, end = max(0, p - before), min(window_len, p + after + 1)
            node_samples.append((windows[w, start:end], acts[w, start:end, node]))
            node_peaks.append((int(windows[w, p]), float(acts[w, p, node])))
        samples.append(node_samples)
        peaks.append(node_peaks)
    return {"samples": samples, "peaks": peaks}


def role_table(labels: list[str], kinds: list[str], means: Float[torch.Tensor, " node"],
               finals: Float[torch.Tensor, "batch node"], data, snippets: dict | None, model) -> str:
    """One row per node: kind, ablation value, mean final-token activation per task class, and
    the corpus tokens where it peaks (empty without `snippets`). Every token string is escaped."""
    groups = _classes(data)
    head = "".join(f"<th>final token, answer {html.escape(name)}<br>(n={int(rows.sum())})</th>"
                   for name, rows in groups)
    lines = [f'<table class="sl-table"><tr><th>node</th><th>kind</th><th>ablation value</th>{head}'
             "<th>corpus peaks (token: activation)</th></tr>"]
    for j, label in enumerate(labels):
        by_class = "".join(f"<td>{finals[rows, j].mean():+.3f}</td>" for _, rows in groups)
        peaks = "" if snippets is None else ", ".join(
            f"{token_strings(model, [t])[0]!r}: {a:+.2f}" for t, a in snippets["peaks"][j][:3])
        lines.append(f'<tr><td class="sl-text">{html.escape(label)}</td><td class="sl-text">{kinds[j]}</td>'
                     f"<td>{float(means[j]):+.3f}</td>{by_class}"
                     f'<td class="sl-text">{html.escape(peaks)}</td></tr>')
    lines.append("</table>")
    return "\n".join(lines)


def _classes(data) -> list[tuple[str, torch.Tensor]]:
    """The task's classes as (name, boolean row mask): by label when known, else by answer."""
    correct = [repr(s) for s in data.correct_str]
    if data.labels is not None:
        keys = data.labels.cpu().tolist()
    else:
        keys = correct
    groups = []
    for key in sorted(set(keys), key=str)[:4]:
        rows = torch.tensor([k == key for k in keys])
        answers = sorted({c for c, r in zip(correct, rows.tolist()) if r})
        groups.append((answers[0] if len(answers) == 1 else f"class {key}", rows))
    return groups


def node_scores(finals: Float[torch.Tensor, "batch node"], means: Float[torch.Tensor, " node"],
                data) -> tuple[Float[torch.Tensor, " node"], str]:
    """How much each node says about the task at the final token, and how that was judged. With
    two or more classes (`_classes`): the spread of its class means over its standard deviation
    across prompts (a node that tells the answers apart comes first); else, or for a node that
    does not vary, its mean distance from its ablation value."""
    distance = (finals - means).abs().mean(0)
    classes = _classes(data)
    if len(classes) < 2:
        return distance, "those furthest from their ablation value at the task's final token"
    class_means = torch.stack([finals[rows].mean(0) for _, rows in classes])  # [class, node]
    std = finals.std(0)
    spread = (class_means.max(0).values - class_means.min(0).values) / std.clamp_min(1e-6)
    # separation first; among nodes that separate equally (e.g. not at all), the distance
    score = torch.where(std > 1e-6, spread, torch.zeros_like(spread)) + 1e-3 * distance / (1 + distance)
    return score, ("those whose final-token activation best separates the task's answers (spread "
                   "of class means over the standard deviation)")


def _explanation(circuit, n_shown: int, by: str) -> str:
    capped = "" if n_shown == circuit.n_nodes else (
        f' <span class="sl-warn">Showing {n_shown} of the circuit\'s {circuit.n_nodes:,} nodes '
        f"(capped): {by}.</span>")
    return ('<p class="sl-note">Activations of the circuit\'s nodes with every node outside the '
            "circuit mean-ablated. The table gives each node's mean at the prompt's final token "
            "per class (a node whose means differ carries the answer); below, its activation on "
            "each token of task prompts and the corpus snippets where it is largest in magnitude."
            + capped + "</p>" + status_note(circuit))
