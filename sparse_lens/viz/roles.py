"""`marker_roles`: which of a circuit's nodes detect a marker token, which classify its type, and
which attention head carries it to the answer, measured from activations (the paper's quote
circuit: a quote detector and a quote-type classifier feeding one head).

For a task whose answer is decided by an earlier *marker* token (the quote task: close a string
with the quote that opened it; the marker is the opening quote), with the circuit running (every
other node mean-ablated), on held-out task prompts:

- **detector** score of a node: its mean activation at the marker minus its mean at the prompt's
  other positions, over its standard deviation across all positions. A node that fires on the
  marker, whatever its type, scores high.
- **classifier** score: its mean at the marker for one class minus the other class's, over its
  standard deviation at the marker (a node taking one value per class scores 2).
- **answer** score: the same class contrast at the prompt's final token (the node holds the answer
  where it is predicted).

A node is a *classifier* when |classifier| >= `CLASS_BAR`, else a *detector* when |detector| >=
`DETECT_BAR`, else *answer* when |answer| >= `CLASS_BAR`; anything else is *other*. A kept head
*carries* the marker's type to the answer when, from the final token, it attends to the marker
(mean attention over prompts at least `CARRY_BAR`) and its output there separates the classes
(the class contrast of its output `z` at the final token, on its kept value channels, at least
`CLASS_BAR` in absolute value). Several heads can carry it; they are listed by attention.
"""

from __future__ import annotations

import html
from dataclasses import dataclass

import pandas as pd
import torch
from jaxtyping import Bool, Float, Int

from sparse_lens.viz.activations import (PATTERN_HOOK, kept_heads, node_activations, run_circuit,
                                         token_strings)
from sparse_lens.viz.tables import html_table
from sparse_lens.viz.view import View, status_note

DETECT_BAR = 2.0
CLASS_BAR = 1.0
CARRY_BAR = 0.2

#: For each task with a marker: the marker (a substring of a prompt token) of each answer string.
TASK_MARKERS: dict[str, dict[str, str]] = {
    "single_double_quote": {"'": "'", '"': '"'},
    "bracket_brace": {"]": "[", "}": "{"},
}


@dataclass(frozen=True, eq=False)
class MarkerRoles:
    """What `marker_roles` measured: one row per circuit node (`nodes`: label, kind, layer,
    detector, classifier, answer scores, role) and per kept head (`heads`: layer, head, kept
    q/k/v channels, mean attention from the final token to the marker, the class contrast of its
    output at the final token, carries), the number of prompts and the marker of each answer."""

    task: str
    nodes: pd.DataFrame
    heads: pd.DataFrame
    n_prompts: int
    markers: dict[str, str]

    def of_role(self, role: str) -> list[str]:
        """The labels of the nodes with `role`, strongest first."""
        rows = self.nodes[self.nodes.role == role]
        key = role if role in ("detector", "classifier", "answer") else "classifier"
        return rows.reindex(rows[key].abs().sort_values(ascending=False).index).label.tolist()

    @property
    def carriers(self) -> list[tuple[int, int]]:
        """The `(layer, head)`s that carry the marker's type to the answer, most attention first."""
        rows = self.heads[self.heads.carries]
        return [(int(layer), int(head)) for layer, head in zip(rows.layer, rows["head"])]

    def summary(self, top: int = 5) -> str:
        """One sentence per role, naming up to `top` nodes each."""
        def names(role: str) -> str:
            labels = self.of_role(role)
            more = f" and {len(labels) - top} more" if len(labels) > top else ""
            return (", ".join(labels[:top]) + more) if labels else "none"

        carriers = self.heads[self.heads.carries]
        heads = ", ".join(f"L{r.layer}H{r.head} (attention {r.attention_to_marker:.2f} from the final "
                          f"token to the marker, output contrast {r.output_contrast:+.2f})"
                          for r in carriers.itertuples()) or "none found"
        return (f"On {self.n_prompts} held-out prompts of {self.task} (markers "
                f"{', '.join(sorted(set(self.markers.values())))}): "
                f"detect the marker: {names('detector')}. Classify its type: {names('classifier')}. "
                f"Hold the answer at the final token: {names('answer')}. Heads carrying the type to "
                f"the answer: {heads}.")


def marker_positions(tokens: Int[torch.Tensor, "batch pos"], last_pos: Int[torch.Tensor, " batch"],
                     markers: list[str], model) -> Int[torch.Tensor, " batch"]:
    """Per prompt, the last position before its final token whose token contains the row's
    marker string (`markers[i]`); -1 where there is none."""
    out = torch.full((tokens.shape[0],), -1, dtype=torch.long)
    for i in range(tokens.shape[0]):
        strings = token_strings(model, tokens[i, : int(last_pos[i])])
        hits = [p for p, s in enumerate(strings) if markers[i] in s]
        out[i] = hits[-1] if hits else -1
    return out


def role_scores(acts: Float[torch.Tensor, "batch pos node"], valid: Bool[torch.Tensor, "batch pos"],
                marker_pos: Int[torch.Tensor, " batch"], last_pos: Int[torch.Tensor, " batch"],
                labels: Int[torch.Tensor, " batch"]) -> dict[str, Float[torch.Tensor, " node"]]:
    """The detector, classifier and answer scores of every node (module docstring), from its
    activations at every position (`valid`: the positions inside each prompt) of prompts that
    each have a marker. `labels`: each prompt's class, 0 or 1."""
    rows = torch.arange(acts.shape[0])
    at_marker = acts[rows, marker_pos]  # [batch, node]
    at_final = acts[rows, last_pos]
    is_marker = torch.zeros_like(valid)
    is_marker[rows, marker_pos] = True
    others = acts[valid & ~is_marker]  # [n other positions, node]
    everywhere = acts[valid]
    detector = (at_marker.mean(0) - others.mean(0)) / _std(everywhere)
    return dict(detector=detector, classifier=_contrast(at_marker, labels),
                answer=_contrast(at_final, labels))


def _contrast(x: Float[torch.Tensor, "batch node"], labels: Int[torch.Tensor, " batch"]) -> Float[torch.Tensor, " node"]:
    """Class 1's mean minus class 0's, over the standard deviation of `x` (0 where it is flat)."""
    one, zero = labels == 1, labels == 0
    return (x[one].mean(0) - x[zero].mean(0)) / _std(x)


def _std(x: Float[torch.Tensor, "n node"]) -> Float[torch.Tensor, " node"]:
    """The standard deviation of each column, infinite where it is (almost) flat, so that a flat
    node scores 0."""
    std = x.std(0)
    return torch.where(std > 1e-6, std, torch.full_like(std, float("inf")))


def assign_roles(scores: dict[str, Float[torch.Tensor, " node"]]) -> list[str]:
    """Each node's role from its scores (module docstring)."""
    roles = []
    for d, c, a in zip(scores["detector"].tolist(), scores["classifier"].tolist(), scores["answer"].tolist()):
        roles.append("classifier" if abs(c) >= CLASS_BAR else "detector" if abs(d) >= DETECT_BAR
                     else "answer" if abs(a) >= CLASS_BAR else "other")
    return roles


def marker_roles(circuit, n_prompts: int = 64, markers: dict[str, str] | None = None,
                 split: str = "test") -> MarkerRoles:
    """Measure the roles of the circuit's nodes and kept heads (module docstring) on `n_prompts`
    held-out prompts of its task. `markers`: the marker of each answer string (default
    `TASK_MARKERS[circuit.task]`); prompts without their marker are left out."""
    markers = markers if markers is not None else TASK_MARKERS.get(circuit.task)
    if not markers:
        raise ValueError(f"marker_roles: no marker known for task {circuit.task!r}; pass markers="
                         f"{{answer: marker}} (known: {sorted(TASK_MARKERS)})")
    data = circuit.task_data(split=split, n=n_prompts)
    if data.labels is None:
        raise ValueError(f"marker_roles: task {circuit.task!r} has no class labels")
    wanted = [markers.get(s.strip(), markers.get(s)) for s in data.correct_str]
    if None in wanted:
        raise ValueError(f"marker_roles: answers {sorted(set(data.correct_str))} are not all in {markers}")
    marker_pos = marker_positions(data.tokens.cpu(), data.last_pos.cpu(), wanted, circuit.model)
    keep = marker_pos >= 0
    if int(keep.sum()) < 4 or len(set(data.labels.cpu()[keep].tolist())) < 2:
        raise ValueError(f"marker_roles: too few prompts of {circuit.task!r} hold their marker "
                         f"({int(keep.sum())} of {len(data)})")
    tokens, last_pos = data.tokens.cpu()[keep], data.last_pos.cpu()[keep]
    marker_pos, labels = marker_pos[keep], data.labels.cpu()[keep]
    valid = torch.arange(tokens.shape[1])[None, :] <= last_pos[:, None]

    acts, _ = node_activations(circuit, tokens, circuit.node_ids)
    scores = role_scores(acts, valid, marker_pos, last_pos, labels)
    nodes = circuit.registry.describe(circuit.node_ids)[["kind", "layer"]].reset_index(drop=True)
    nodes.insert(0, "label", circuit.registry.labels(circuit.node_ids))
    for name, values in scores.items():
        nodes[name] = values.numpy()
    nodes["role"] = assign_roles(scores)
    return MarkerRoles(circuit.task, nodes, _head_table(circuit, tokens, last_pos, marker_pos, labels),
                       len(tokens), dict(markers))


def _head_table(circuit, tokens, last_pos, marker_pos, labels) -> pd.DataFrame:
    """One row per kept head: its kept q/k/v channels, its mean attention from the final token to
    the marker, the class contrast of its output at the final token (the largest in absolute
    value over its kept value channels; 0 without one) and whether it carries the marker
    (module docstring)."""
    heads = kept_heads(circuit)
    columns = ["layer", "head", "q", "k", "v", "attention_to_marker", "output_contrast", "carries"]
    if not heads:
        return pd.DataFrame(columns=columns)
    rows = torch.arange(tokens.shape[0])
    layers = sorted({layer for layer, _ in heads})
    to_marker, z_final = {}, {}

    def reader(layer: int):
        def read_pattern(pattern: torch.Tensor, hook) -> None:  # [batch, head, query, key]
            to_marker[layer] = pattern[rows, :, last_pos, marker_pos].float().mean(0).cpu()  # [head]

        def read_z(z: torch.Tensor, hook) -> None:  # [batch, pos, head, d_head]
            z_final[layer] = z[rows, last_pos].float().cpu()  # [batch, head, d_head]
        return [(PATTERN_HOOK.format(layer=layer), read_pattern), (f"blocks.{layer}.attn.hook_z", read_z)]

    run_circuit(circuit, tokens, [h for layer in layers for h in reader(layer)])
    kept_v = circuit.registry.describe(circuit.node_ids)
    kept_v = kept_v[kept_v.kind == "v"]
    records = []
    for (layer, head), counts in heads.items():
        channels = kept_v[(kept_v.layer == layer) & (kept_v["head"] == head)].channel.tolist()
        contrast = _contrast(z_final[layer][:, head, channels], labels) if channels else torch.zeros(1)
        strongest = float(contrast[contrast.abs().argmax()])
        records.append(dict(layer=layer, head=head, **{str(k): n for k, n in counts.items()},
                            attention_to_marker=float(to_marker[layer][head]), output_contrast=strongest))
    table = pd.DataFrame(records)
    table["carries"] = (table.attention_to_marker >= CARRY_BAR) & (table.output_contrast.abs() >= CLASS_BAR)
    return table.sort_values("attention_to_marker", ascending=False)[columns].reset_index(drop=True)


def roles_view(circuit, n_prompts: int = 64, markers: dict[str, str] | None = None,
               max_rows: int = 24) -> View:
    """The measured roles (`marker_roles`) as a view: the summary sentence, the kept heads and the
    nodes with a role (up to `max_rows` of each, strongest first). Where the roles cannot be
    measured (no marker known, prompts without labels or markers) the view says why."""
    title = f"Roles of the circuit nodes ({circuit.task})"
    try:
        roles = marker_roles(circuit, n_prompts, markers)
    except ValueError as err:  # e.g. hand-made prompts without labels or markers: say so, not fail
        return View(title, f'<p class="sl-note sl-warn">Roles not measured: {html.escape(str(err))}</p>')
    named = roles.nodes[roles.nodes.role != "other"].copy()
    named["strength"] = named[["detector", "classifier", "answer"]].abs().max(axis=1)
    named = named.sort_values(["role", "strength"], ascending=[True, False]).drop(columns="strength")
    body = "\n".join([
        f'<p class="sl-note">{html.escape(roles.summary())}</p>',
        f'<p class="sl-note">Scores measured with the circuit running (module '
        f"<code>sparse_lens.viz.roles</code>): detector = (mean at the marker - mean elsewhere) / "
        f"std; classifier and answer = (class mean difference) / std, at the marker and at the "
        f"final token; a head's output contrast is the class contrast of its output at the final "
        f"token on its kept value channels. Bars: detector {DETECT_BAR}, classifier and output "
        f"contrast {CLASS_BAR}, a carrying head's attention to the marker {CARRY_BAR}.</p>" + status_note(circuit),
        "<h4>Kept heads</h4>", html_table(roles.heads.head(max_rows)),
        f"<h4>Nodes with a role ({len(named)} of {len(roles.nodes)})</h4>",
        html_table(named.head(max_rows)),
    ])
    return View(title, body)

