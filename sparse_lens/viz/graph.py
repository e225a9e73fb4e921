"""`circuit_graph`: the circuit drawn as an inline SVG graph (no JavaScript, no network).

Columns run in the order the residual stream meets them: the token embedding, then per layer
attention read -> q/k/v (grouped by head) -> attention write -> MLP read -> neurons -> MLP
write, then the logits; empty columns are dropped. Weighted edges (`weight`, `embed`,
`unembed`) are coloured by sign (blue positive, red negative) with width and opacity growing
with |weight|; residual links are dashed grey, q-k pairs dotted purple arcs. Hovering a node
shows its label, hook, tau and ablation mean; hovering an edge its weight.

Large circuits are capped: at most `max_nodes` model nodes (the most strongly connected: largest
sum of |weight| over their edges), `max_tokens` embedding and logit tokens each, and `max_edges`
edges (weighted edges by |weight|; residual links and q-k pairs at most a quarter of them).
The figure says so when it is capped.

Nodes are keyed by id, never by label: a model node by its node id, an embedding or logit token
by `(kind, token id)` folded into one integer (`_end_keys`), so two tokens that decode alike
stay two boxes.
"""

from __future__ import annotations

import html
from dataclasses import dataclass

import pandas as pd

from sparse_lens.hooks.nodes import HEAD_KINDS
from sparse_lens.viz.view import View, status_note

STAGE_OF_KIND = {"attn_read": 0, "q": 1, "k": 1, "v": 1, "attn_write": 2, "mlp_read": 3,
                 "neuron": 4, "mlp_write": 5}
STAGE_TITLES = ("attn read", "q / k / v", "attn write", "mlp read", "neurons", "mlp write")
KIND_FILL = {"embed": "#e2e8f0", "logit": "#e2e8f0", "attn_read": "#c6f6d5", "q": "#feebc8",
             "k": "#fbd38d", "v": "#fefcbf", "attn_write": "#bee3f8", "mlp_read": "#c6f6d5",
             "neuron": "#e9d8fd", "mlp_write": "#bee3f8"}
POSITIVE, NEGATIVE, RESIDUAL, QK = "#2b6cb0", "#c53030", "#8a8a8a", "#805ad5"
WEIGHTED_KINDS = ("weight", "embed", "unembed")

COL_W, BOX_W, BOX_H, ROW_H, HEAD_GAP = 150, 96, 14, 18, 8
MARGIN, TOP = 12, 64


@dataclass(frozen=True)
class GraphNode:
    """A drawn node: a model node, or an embedding / logit token (kind `embed` / `logit`)."""

    key: int  # a node id, or a token's key (`_end_keys`)
    label: str
    kind: str
    column: tuple[int, int]  # (layer or -1 for embed / n_layers for logits, stage)
    order: tuple  # position within its column
    short: str  # text in the box
    title: str  # hover text


def circuit_graph(circuit, max_nodes: int = 120, max_edges: int = 400, max_tokens: int = 20) -> View:
    """The circuit as an SVG graph (see the module docstring)."""
    if min(max_nodes, max_edges, max_tokens) < 1:
        raise ValueError("circuit_graph: max_nodes, max_edges and max_tokens must be >= 1")
    title = f"Circuit graph ({circuit.task})"
    if circuit.n_nodes == 0:
        return View(title, '<p class="sl-note">The circuit keeps no node: nothing to draw.</p>')
    edges = _end_keys(circuit.edges, circuit.registry.n_nodes, circuit.model.cfg.d_vocab)
    model_nodes, token_nodes = _candidate_nodes(circuit, edges)
    strength = _strength(edges)
    drawn_model = _strongest(list(model_nodes), strength, max_nodes)
    keep = set(drawn_model)
    drawn_tokens = []
    for kind in ("embed", "logit"):
        touching = _tokens_touching(edges, kind, keep)
        drawn_tokens += _strongest([t for t in token_nodes if token_nodes[t].kind == kind and t in touching],
                                   strength, max_tokens)
    n_tokens_total = len(token_nodes)
    keep |= set(drawn_tokens)
    drawn_edges = _select_edges(edges, keep, max_edges)
    nodes = [model_nodes[n] for n in drawn_model] + [token_nodes[t] for t in drawn_tokens]

    capped = []
    if len(drawn_model) < len(model_nodes):
        capped.append(f"{len(drawn_model)} of {len(model_nodes):,} nodes (the most strongly connected)")
    if len(drawn_tokens) < n_tokens_total:
        capped.append(f"{len(drawn_tokens)} of {n_tokens_total} embedding/logit tokens")
    if len(drawn_edges) < len(edges):
        n_touching_undrawn = int((~(edges.source_key.isin(keep) & edges.target_key.isin(keep))).sum())
        capped.append(f"{len(drawn_edges)} of {len(edges):,} edges"
                      + (f" ({n_touching_undrawn:,} touch undrawn nodes)" if n_touching_undrawn else ""))
    caption = (f"{len(drawn_model)} nodes, {len(drawn_tokens)} tokens, {len(drawn_edges)} edges drawn"
               + ("; capped: showing " + "; ".join(capped) if capped else ""))
    svg = render_svg(nodes, drawn_edges, caption, circuit.model.cfg.n_layers, bool(capped))
    parts = []
    if capped:
        parts.append(f'<p class="sl-note sl-warn">Capped: showing {html.escape("; ".join(capped))}.</p>')
    parts.append(status_note(circuit))
    parts += [f'<div class="sl-scroll">{svg}</div>', f'<p class="sl-note">{_legend()}</p>']
    return View(title, "\n".join(parts))


# ---------------------------------------------------------------------------- nodes
def _end_keys(edges: pd.DataFrame, n_nodes: int, d_vocab: int) -> pd.DataFrame:
    """`edges` with `source_key` and `target_key`: the node id, or for a token end
    `n_nodes + token` (embedding) / `n_nodes + d_vocab + token` (logit)."""
    source = edges.source_id.where(edges.source_id >= 0, n_nodes + edges.source_token)
    target = edges.target_id.where(edges.target_id >= 0, n_nodes + d_vocab + edges.target_token)
    return edges.assign(source_key=source.astype("int64"), target_key=target.astype("int64"))


def _candidate_nodes(circuit, edges: pd.DataFrame) -> tuple[dict[int, GraphNode], dict[int, GraphNode]]:
    """The circuit's nodes, and the embedding / logit tokens its edges name, by key."""
    n_layers = circuit.model.cfg.n_layers
    model_nodes = {}
    for row in circuit.nodes.itertuples():
        head_order = (row.head, HEAD_KINDS.index(row.kind)) if row.kind in HEAD_KINDS else (-1, 0)
        short = (f"h{row.head} {row.kind}{row.channel}" if row.kind in HEAD_KINDS
                 else f"{row.kind}[{row.channel}]")
        tau = f"tau {row.tau:+.3f}" if hasattr(row, "tau") else "tau (not saved)"
        model_nodes[row.id] = GraphNode(
            key=row.id, label=row.label, kind=str(row.kind), column=(row.layer, STAGE_OF_KIND[row.kind]),
            order=(*head_order, row.channel), short=short,
            title=f"{row.label}\nhook {row.hook_name}\n{tau}\nablation mean {row.mean:+.4f}")
    token_nodes = {}
    for kind, side, column in (("embed", "source", (-1, 0)), ("logit", "target", (n_layers, 0))):
        edge_kind = "embed" if kind == "embed" else "unembed"
        ends = edges.loc[edges.kind == edge_kind, [f"{side}_key", side, f"{side}_token"]].drop_duplicates()
        for key, label, token in ends.itertuples(index=False):
            text = label[len(kind) + 1:-1]  # the display label's text: embed['x'] -> 'x'
            token_nodes[key] = GraphNode(key=key, label=label, kind=kind, column=column,
                                         order=(label, token), short=text, title=f"{label} (token {token})")
    return model_nodes, token_nodes


def _strength(edges: pd.DataFrame) -> dict[int, float]:
    """Sum of |weight| over each node's weighted edges (0 for nodes with none)."""
    weighted = edges[edges.kind.isin(WEIGHTED_KINDS)]
    w = weighted.weight.abs()
    total = pd.concat([w.groupby(weighted.source_key).sum(), w.groupby(weighted.target_key).sum()])
    return total.groupby(level=0).sum().to_dict()


def _strongest(keys: list[int], strength: dict[int, float], cap: int) -> list[int]:
    if len(keys) <= cap:
        return keys
    ranked = sorted(keys, key=lambda n: -strength.get(n, 0.0))[:cap]
    chosen = set(ranked)
    return [n for n in keys if n in chosen]  # keep the original order


def _tokens_touching(edges: pd.DataFrame, kind: str, nodes: set[int]) -> set[int]:
    if kind == "embed":
        sel = edges[(edges.kind == "embed") & edges.target_key.isin(nodes)]
        return set(sel.source_key)
    sel = edges[(edges.kind == "unembed") & edges.source_key.isin(nodes)]
    return set(sel.target_key)


def _select_edges(edges: pd.DataFrame, nodes: set[int], max_edges: int) -> pd.DataFrame:
    inside = edges[edges.source_key.isin(nodes) & edges.target_key.isin(nodes)]
    structural = inside[~inside.kind.isin(WEIGHTED_KINDS)].head(max(1, max_edges // 4))
    weighted = inside[inside.kind.isin(WEIGHTED_KINDS)]
    weighted = weighted.loc[weighted.weight.abs().sort_values(ascending=False, kind="stable").index]
    return pd.concat([structural, weighted.head(max_edges - len(structural))])


# ---------------------------------------------------------------------------- drawing
def render_svg(nodes: list[GraphNode], edges: pd.DataFrame, caption: str, n_layers: int,
               capped: bool) -> str:
    """The SVG: column headers, head groups, edges under the node boxes, hover titles."""
    columns = sorted({n.column for n in nodes})
    x_of = {c: MARGIN + i * COL_W for i, c in enumerate(columns)}
    pos: dict[int, tuple[float, float]] = {}
    groups = []  # (x, y_top, y_bottom, head) of q/k/v head groups
    bottom = TOP
    for c in columns:
        y, last_head, start = TOP, None, None
        for node in sorted((n for n in nodes if n.column == c), key=lambda n: n.order):
            head = node.order[0] if node.kind in HEAD_KINDS else None
            if head != last_head and last_head is not None:
                groups.append((x_of[c], start, y - ROW_H + BOX_H, last_head))
                y += HEAD_GAP
            if head != last_head:
                start = y
            last_head = head
            pos[node.key] = (x_of[c], y)
            y += ROW_H
        if last_head is not None:
            groups.append((x_of[c], start, y - ROW_H + BOX_H, last_head))
        bottom = max(bottom, y)
    width = MARGIN * 2 + len(columns) * COL_W
    height = bottom + MARGIN
    e = html.escape
    out = [f'<svg class="sl-graph" width="{width}" height="{height}" '
           f'viewBox="0 0 {width} {height}" font-family="ui-monospace, monospace" font-size="9">',
           f'<text x="{MARGIN}" y="14" font-size="11" fill="{"#c53030" if capped else "#333"}">'
           f"{e(caption)}</text>"]
    for c in columns:
        top, sub = _column_title(c, n_layers)
        out.append(f'<text x="{x_of[c]}" y="36" font-size="11" font-weight="bold">{e(top)}</text>'
                   f'<text x="{x_of[c]}" y="50" font-size="10" fill="#555">{e(sub)}</text>')
    for x, y0, y1, head in groups:
        out.append(f'<rect x="{x - 4}" y="{y0 - 3}" width="{BOX_W + 8}" height="{y1 - y0 + 6}" rx="4" '
                   f'fill="#fffaf0" stroke="#f6ad55" stroke-width="0.6"><title>head {head}</title></rect>')
    out.append(_edges_svg(edges, pos))
    for node in nodes:
        x, y = pos[node.key]
        out.append(f'<g class="sl-node" data-kind="{e(node.kind)}"><title>{e(node.title)}</title>'
                   f'<rect x="{x}" y="{y}" width="{BOX_W}" height="{BOX_H}" rx="3" '
                   f'fill="{KIND_FILL[node.kind]}" stroke="#718096" stroke-width="0.5"/>'
                   f'<text x="{x + 4}" y="{y + 10}">{e(_truncate(node.short, 16))}</text></g>')
    out.append("</svg>")
    return "\n".join(out)


def _edges_svg(edges: pd.DataFrame, pos: dict[int, tuple[float, float]]) -> str:
    weighted = edges[edges.kind.isin(WEIGHTED_KINDS)]
    scale = float(weighted.weight.abs().max()) if len(weighted) else 1.0
    scale = scale if scale > 0 else 1.0
    e = html.escape
    out = ['<g class="sl-edges" fill="none">']
    for row in edges.itertuples():
        (x0, y0), (x1, y1) = pos[row.source_key], pos[row.target_key]
        weight = f" {row.weight:+.4f}" if row.kind in WEIGHTED_KINDS else ""
        title = f"<title>{e(row.source)} -> {e(row.target)}: {row.kind}{weight}</title>"
        y0, y1 = y0 + BOX_H / 2, y1 + BOX_H / 2
        if row.kind == "qk":  # same column: an arc on the right of the boxes
            xr = x0 + BOX_W
            out.append(f'<path d="M{xr},{y0} C{xr + 24},{y0} {xr + 24},{y1} {xr},{y1}" stroke="{QK}" '
                       f'stroke-width="0.8" stroke-dasharray="1 2">{title}</path>')
            continue
        xs, xt = x0 + BOX_W, x1
        mid = (xt - xs) / 2
        path = f"M{xs},{y0} C{xs + mid},{y0} {xt - mid},{y1} {xt},{y1}"
        if row.kind == "residual":
            out.append(f'<path d="{path}" stroke="{RESIDUAL}" stroke-width="0.8" '
                       f'stroke-dasharray="4 3" opacity="0.7">{title}</path>')
            continue
        strength = min(1.0, abs(row.weight) / scale)
        colour = POSITIVE if row.weight > 0 else NEGATIVE
        out.append(f'<path d="{path}" stroke="{colour}" stroke-width="{0.4 + 2.6 * strength:.2f}" '
                   f'opacity="{0.2 + 0.7 * strength:.2f}">{title}</path>')
    out.append("</g>")
    return "\n".join(out)


def _column_title(column: tuple[int, int], n_layers: int) -> tuple[str, str]:
    layer, stage = column
    if layer < 0:
        return "embed", "token embedding"
    if layer >= n_layers:
        return "logits", "unembedding"
    return f"layer {layer}", STAGE_TITLES[stage]


def _truncate(text: str, n: int) -> str:
    return text if len(text) <= n else text[:n - 1] + "\u2026"


def _legend() -> str:
    def swatch(colour, dash=""):
        return (f'<svg width="26" height="8"><line x1="0" y1="4" x2="26" y2="4" stroke="{colour}" '
                f'stroke-width="2" stroke-dasharray="{dash}"/></svg>')

    return (f"{swatch(POSITIVE)} positive weight {swatch(NEGATIVE)} negative weight (width and "
            f"opacity grow with |weight|) {swatch(RESIDUAL, '4 3')} residual link (same channel, "
            f"later read) {swatch(QK, '1 2')} q-k pair (same head and channel). Hover a node or an "
            "edge for its label, tau, ablation mean or weight.")
