"""`write_report`: one self-contained HTML file with every view of a model's circuits.

The page inlines the circuitsvis bundle once (in `<head>`) and embeds each view's fragment, so it
opens offline from that single file: no script, stylesheet or font comes from a network.
One `<section class="sl-circuit">` per circuit: the task's description, then the circuit graph,
the tables (summary, verification, faithfulness when it was run, nodes, edges), the attention
heads, the neurons/channels and, for a task with a marker token (the quote task, `roles.TASK_MARKERS`),
the measured roles: which nodes detect the marker, which classify its type, which head carries it.
"""

from __future__ import annotations

import html
import re
from collections.abc import Mapping
from pathlib import Path

import torch
from jaxtyping import Int

from sparse_lens.viz.attention import attention_view
from sparse_lens.viz.circuitsvis_inline import bundle_script
from sparse_lens.viz.graph import circuit_graph
from sparse_lens.viz.neurons import neuron_view
from sparse_lens.viz.roles import TASK_MARKERS, roles_view
from sparse_lens.viz.tables import tables_view
from sparse_lens.viz.view import page


def write_report(model, circuits, path: str | Path, title: str = "sparse_lens circuits",
                 n_prompts: int = 4, corpus_tokens: Int[torch.Tensor, " n"] | None = None,
                 verify_n: int = 128) -> Path:
    """Write the report of `circuits` (a sequence of `Circuit`, or a mapping name -> `Circuit`)
    of `model` to `path` and return the path. `n_prompts` task prompts per view; corpus snippets
    from `corpus_tokens`, a 1-D token stream such as `data.load_corpus(None, model.tokenizer,
    max_files=200).val` (None: the neuron views have no snippets and say so; nothing is loaded);
    circuits not yet verified are verified on `verify_n` prompts."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(report_html(model, circuits, title, n_prompts, corpus_tokens, verify_n),
                    encoding="utf-8")
    return path


def report_html(model, circuits, title: str = "sparse_lens circuits", n_prompts: int = 4,
                corpus_tokens: Int[torch.Tensor, " n"] | None = None, verify_n: int = 128) -> str:
    """The report as one HTML document (see `write_report`)."""
    circuits = list(circuits.values()) if isinstance(circuits, Mapping) else list(circuits)
    if not circuits:
        raise ValueError("write_report needs at least one circuit")
    for c in circuits:
        if c.model is not model:
            raise ValueError(f"the circuit for {c.task!r} belongs to another model object; load it "
                             "onto this model with Circuit.load(path, model)")
    ids = [f"circuit-{i}-{re.sub(r'[^A-Za-z0-9_-]', '-', c.task)}" for i, c in enumerate(circuits)]
    sections = [circuit_section(c, section_id, corpus_tokens, n_prompts, verify_n)
                for c, section_id in zip(circuits, ids)]
    body = "\n".join([f"<h1>{html.escape(title)}</h1>", _model_summary(model),
                      _contents(circuits, ids), *sections])
    return page(title, body, head=bundle_script())


def circuit_section(circuit, section_id: str, corpus_tokens: Int[torch.Tensor, " n"] | None, n_prompts: int = 4,
                    verify_n: int = 128) -> str:
    """One circuit's `<section>`: its task and description, then every view (without the
    circuitsvis bundle, which the page loads once). When the full model misses the target there
    is no circuit: the section says so, with the full model's task loss, and has no views
    (they would draw the whole model)."""
    if circuit.full_model_misses_target:
        views = []
        no_circuit = (f'<pre class="sl-pre">{html.escape(repr(circuit))}</pre>\n'
                   '<p class="sl-note sl-warn">No circuit, so no graph, table, attention or neuron '
                   "view (they would show the whole model). A looser target (<code>--target-loss"
                   "</code>) that the full model reaches gives a circuit to look at.</p>\n")
    else:
        views = [circuit_graph(circuit), tables_view(circuit, verify_n=verify_n),
                 attention_view(circuit, n_prompts=n_prompts),
                 neuron_view(circuit, corpus_tokens=corpus_tokens, n_prompts=n_prompts)]
        if circuit.task in TASK_MARKERS and circuit.n_nodes:
            views.append(roles_view(circuit))
        no_circuit = ""
    status = "solved" if circuit.solved else "not solved"
    return (f'<section class="sl-circuit" id="{section_id}" data-task="{html.escape(circuit.task)}">\n'
            f"<h2>{html.escape(circuit.task)} <small>({status})</small></h2>\n"
            f'<p class="sl-note">{html.escape(task_description(circuit))}</p>\n' + no_circuit
            + "\n".join(v.html(standalone=False) for v in views) + "\n</section>")


def task_description(circuit) -> str:
    """The one-line description of the circuit's task (a hand-made task's own, if any)."""
    if circuit.data is not None:
        return circuit.data.description or f"hand-made task {circuit.task!r}"
    from sparse_lens.tasks import get_spec

    return get_spec(circuit.task).description


def _model_summary(model) -> str:
    c = model.cfg
    sparsity = model.weight_sparsity()
    achieved = sparsity.nonzeros.sum() / max(sparsity.numel.sum(), 1)
    return (f'<p class="sl-note">Model {html.escape(str(c.model_name))}: {c.n_layers} layers, '
            f"d_model {c.d_model}, {c.n_heads} heads of {c.d_head}, d_mlp {c.d_mlp}; weight L0 "
            f"{achieved:.4f} achieved (target {c.weight_l0:.4g}). Every view runs the circuit with "
            "all other nodes replaced by their mean over the pretraining corpus.</p>")


def _contents(circuits, ids) -> str:
    rows = []
    for c, section_id in zip(circuits, ids):
        loss, full = c.losses.get("circuit"), c.losses.get("full_model")
        target = getattr(c.config, "target_loss", None)
        if c.full_model_misses_target:  # no circuit was searched for: no counts to show
            solved, nodes, edges = "no (the full model misses the target)", "&ndash;", "&ndash;"
        else:
            solved, nodes, edges = "yes" if c.solved else "no", f"{c.n_nodes:,}", f"{c.n_edges:,}"
        rows.append(f'<tr><td class="sl-text"><a href="#{section_id}">{html.escape(c.task)}</a></td>'
                    f"<td>{solved}</td><td>{nodes}</td><td>{edges}</td><td>{_fmt(target)}</td>"
                    f"<td>{_fmt(full)}</td><td>{_fmt(None if c.full_model_misses_target else loss)}</td></tr>")
    return ('<table class="sl-table"><tr><th>task</th><th>solved</th><th>nodes</th><th>edges</th>'
            "<th>target task loss</th><th>full model task loss</th><th>circuit task loss</th></tr>\n"
            + "\n".join(rows) + "\n</table>")


def _fmt(loss: float | None) -> str:
    return "" if loss is None else f"{loss:.4g}"
