"""`tables_view`: the circuit's summary, verification, nodes and edges as HTML tables."""

from __future__ import annotations

import html
import math
import numbers

import pandas as pd

from sparse_lens.viz.view import View


def tables_view(circuit, max_nodes: int = 500, max_edges: int = 500, verify_n: int = 128,
                n_random: int = 3) -> View:
    """The circuit's summary (`repr`), its verification table (`circuit.verification`, computed
    with `verify(n=verify_n, n_random=n_random)` if missing), its nodes (at most `max_nodes`, in
    node order) and its edges (at most `max_edges`: weighted edges by decreasing |weight|, then
    residual links and q-k pairs). Capped tables say what they left out."""
    if max_nodes < 1 or max_edges < 1:
        raise ValueError(f"max_nodes and max_edges must be >= 1; got {max_nodes}, {max_edges}")
    verification = circuit.verification
    if verification is None:
        verification = circuit.verify(n=verify_n, n_random=n_random)
    nodes = circuit.nodes
    node_columns = [c for c in ("label", "kind", "layer", "head", "channel", "tau", "mean", "hook_name")
                    if c in nodes.columns]
    edges = sorted_edges(circuit.edges)
    counts = circuit.edges.kind.value_counts()
    parts = [
        f'<pre class="sl-pre">{html.escape(repr(circuit))}</pre>',
        "<h4>Verification</h4>",
        '<p class="sl-note">Task loss (mean binary cross-entropy over the two candidate tokens, '
        "nats) and accuracy on held-out prompts: the full model, the circuit alone (everything "
        "else mean-ablated), the model with the circuit's nodes ablated, and random node sets of "
        "the circuit's size.</p>",
        html_table(verification),
        faithfulness_html(circuit),
        f"<h4>Nodes ({circuit.n_nodes:,})</h4>",
        _cap_note(len(nodes), max_nodes, "nodes", "in node order"),
        html_table(nodes[node_columns].head(max_nodes)),
        f"<h4>Edges ({len(edges):,}: "
        + ", ".join(f"{html.escape(str(k))} {n:,}" for k, n in counts.items()) + ")</h4>",
        _cap_note(len(edges), max_edges, "edges",
                  "the largest |weight| first, then residual links and q-k pairs"),
        html_table(edges[["kind", "source", "target", "weight"]].head(max_edges)),  # display columns
    ]
    return View(f"Tables of the circuit ({circuit.task})", "\n".join(parts))


def faithfulness_html(circuit) -> str:
    """The circuit's faithfulness table (`circuit.faithfulness_table`, from `faithfulness()` or
    `sparse-lens faithfulness`) with how to read it; a note saying how to get it when missing."""
    table = getattr(circuit, "faithfulness_table", None)
    head = "<h4>Faithfulness</h4>"
    if table is None:
        return (head + '<p class="sl-note">Not run for this circuit: <code>circuit.faithfulness()'
                "</code> or <code>sparse-lens faithfulness --model DIR --task "
                f"{html.escape(circuit.task)}</code> adds the checks here.</p>")
    flagged = table[table.passed.notna() & (table.passed.astype(str) == "False")].check.tolist()
    verdict = (f"Flagged by: {', '.join(map(str, flagged))}." if flagged
               else "Every check that ran passes.")
    return (head + '<p class="sl-note">Can the circuit be trusted beyond mean ablation? Controls '
            "(the same search on shuffled answers and on a freshly initialised model: a circuit "
            "as small there makes the size meaningless), partial restoration (half the pruned "
            "nodes back: a faithful circuit keeps its loss), interchange (the circuit's nodes "
            "patched from a prompt of the other class: the answer should follow), and the "
            f"circuit's loss under each ablation mode. {html.escape(verdict)}</p>"
            + html_table(table))


def sorted_edges(edges: pd.DataFrame) -> pd.DataFrame:
    """Weighted edges by decreasing |weight|, then the unweighted ones (residual, qk)."""
    order = edges.weight.abs().fillna(-1.0).sort_values(ascending=False, kind="stable").index
    return edges.loc[order].reset_index(drop=True)


def html_table(frame: pd.DataFrame, digits: int = 4) -> str:
    """`frame` as an HTML table; every header and cell escaped, numbers right-aligned."""
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in frame.columns)
    rows = []
    for values in frame.itertuples(index=False):
        cells = []
        for v in values:
            if isinstance(v, bool):
                cells.append(f"<td>{v}</td>")
            elif isinstance(v, numbers.Integral):
                cells.append(f"<td>{int(v)}</td>")
            elif isinstance(v, numbers.Real):
                cells.append("<td></td>" if math.isnan(v) else f"<td>{float(v):.{digits}g}</td>")
            else:
                cells.append(f'<td class="sl-text">{html.escape(str(v))}</td>')
        rows.append("<tr>" + "".join(cells) + "</tr>")
    return f'<table class="sl-table"><tr>{head}</tr>\n' + "\n".join(rows) + "\n</table>"


def _cap_note(total: int, cap: int, what: str, order: str) -> str:
    if total <= cap:
        return ""
    return (f'<p class="sl-note sl-warn">Showing {cap:,} of {total:,} {what} (capped; {order}).</p>')
