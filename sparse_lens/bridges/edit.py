"""Carrying an edit across: change a node of the sparse model, see what the dense model does.

    edit = node_shift(registry, "L1.mlp_write[12]", shift)          # one node, last positions
    carried = carry_edit(dense, sparse, bridges, tokens, [edit.hook(data.last_pos)])
    effect = task_edit_effect(dense, sparse, bridges, data, edit)    # per prompt, and a summary

`carry_edit` runs the sparse model twice, without and with the edit hooks, and records its
residual at a bridge site after the edited node (by default the first one: after the node's
attention or MLP block). The change `delta_s = s_edited - s_clean` goes through the decoder's
linear map (`delta_d = delta_s @ W_dec`; the bias cancels) and a TransformerLens hook adds
`delta_d` to the dense model's residual at the same site. Only the change is carried: the dense
model keeps its own residual and computes everything after the site itself.

`class_separation` finds the nodes that tell a binary task's two classes apart (for
`single_double_quote`: which quote opened the string) at each prompt's final token; the edit that
`task_edit_effect` plants by default shifts such a node by the difference of its class means,
from the prompt's own class towards the other one, so the expected effect is a move of the
dense model towards the *contrast* token.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import pandas as pd
import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor

from sparse_lens.bridges.hybrid import HookFn, run_capturing
from sparse_lens.bridges.modules import BridgeSite, Bridges
from sparse_lens.config import TOPK_LOCATIONS
from sparse_lens.hooks import NodeRegistry
from sparse_lens.hooks.nodes import node_label

#: TransformerLens submodules of a block, by the block whose output first sees a change there
_ATTN_MODULES, _MLP_MODULES = ("attn", "ln1"), ("mlp", "ln2")


def _block_of(rest: str) -> str | None:
    """"attn" or "mlp": the part of a block that hook `blocks.L.<rest>` belongs to (our named
    hooks by `config.TOPK_LOCATIONS`: attention's locations are `attn_*`; the residual after
    attention, as the MLP's input, counts with the MLP), else by TransformerLens submodule."""
    for location, template in TOPK_LOCATIONS.items():
        if template.format(layer=0).removeprefix("blocks.0.") == rest:
            return "attn" if location.startswith("attn_") else "mlp"
    module = rest.split(".")[0]
    return "attn" if module in _ATTN_MODULES else "mlp" if module in _MLP_MODULES else None


@dataclass
class CarriedEdit:
    """Logits of both models without and with the edit, and the residual changes at `site`."""

    site: BridgeSite
    sparse_clean: Float[Tensor, "batch pos d_vocab"]
    sparse_edited: Float[Tensor, "batch pos d_vocab"]
    dense_clean: Float[Tensor, "batch pos d_vocab"]
    dense_edited: Float[Tensor, "batch pos d_vocab"]
    delta_sparse: Float[Tensor, "batch pos d_sparse"]
    delta_dense: Float[Tensor, "batch pos d_dense"]


def site_after(bridges: Bridges, hook_name: str) -> BridgeSite:
    """The first bridge site that sees a change made at `hook_name`: after the attention block
    for attention's hooks (`blocks.l.attn.hook_v`, `hook_attn_out`, ...), after the MLP block
    for the MLP's; site 0 for the embeddings."""
    if hook_name in ("hook_embed", "hook_pos_embed"):
        return bridges.sites[0]
    match = re.fullmatch(r"blocks\.(\d+)\.(.+)", hook_name)
    if match:
        layer, rest = int(match.group(1)), match.group(2)
        if rest == "hook_resid_pre":
            return bridges.sites[2 * layer]
        block = _block_of(rest)
        if block is not None:
            return bridges.sites[2 * layer + (1 if block == "attn" else 2)]
    raise ValueError(f"cannot tell which bridge site follows {hook_name!r}; pass site= explicitly")


@torch.no_grad()
def carry_edit(
    dense,
    sparse,
    bridges: Bridges,
    tokens: Int[Tensor, "batch pos"],
    sparse_hooks: Sequence[tuple[str, HookFn]],
    site: int | str | BridgeSite | None = None,
    dense_delta: Float[Tensor, "batch pos d_dense"] | None = None,
) -> CarriedEdit:
    """Apply `sparse_hooks` (TransformerLens `(hook_name, fn)` pairs: the edit) to the sparse
    model, carry the change of its residual at `site` (default: the first site after the last
    edited hook) into the dense model through the decoder, and return both models' logits
    without and with it. `dense_delta`: add this to the dense residual instead of the decoded
    change (for controls, e.g. a random direction of the same size). All hooks are removed when
    the call ends, by an exception too."""
    if not sparse_hooks:
        raise ValueError("carry_edit needs at least one edit hook for the sparse model")
    bridges.check_pair(dense, sparse, check_fingerprint=False)
    site = bridges.site(site) if site is not None else max(
        (site_after(bridges, name) for name, _ in sparse_hooks), key=lambda s: s.index)
    tokens = tokens.to(sparse.cfg.device)
    sparse_clean, clean = run_capturing(sparse, tokens, [site.hook_name])
    with sparse.hooks(fwd_hooks=list(sparse_hooks)):  # the edit runs before the recording hook
        sparse_edited, edited = run_capturing(sparse, tokens, [site.hook_name])
    delta_s = edited[site.hook_name] - clean[site.hook_name]
    delta_d = bridges.decoders[site.index].map_change(delta_s) if dense_delta is None else dense_delta
    dense_clean = dense(tokens)
    with dense.hooks(fwd_hooks=[(site.hook_name, lambda act, hook: act + delta_d.to(act.dtype))]):
        dense_edited = dense(tokens)
    return CarriedEdit(site, sparse_clean, sparse_edited, dense_clean, dense_edited, delta_s, delta_d)


# ------------------------------------------------------------------------------- nodes
@dataclass(frozen=True)
class NodeShift:
    """Add `shift[b]` to one node of the sparse model at each prompt's final position."""

    node_id: int
    label: str
    hook_name: str
    index: tuple[int, ...]
    shift: Float[Tensor, " batch"]

    def hook(self, last_pos: Int[Tensor, " batch"]) -> tuple[str, HookFn]:
        """The TransformerLens hook that plants the shift (prompt `b` at `last_pos[b]`)."""
        def plant(activation: Tensor, hook) -> Tensor:
            rows = torch.arange(activation.shape[0], device=activation.device)
            out = activation.clone()
            out[(rows, last_pos.to(activation.device), *self.index)] += self.shift.to(activation)
            return out

        return self.hook_name, plant


def node_id(registry: NodeRegistry, node: int | str) -> int:
    """A node's id from its id, or from a label a user typed (`"L1.mlp_write[12]"`,
    `"L0.q[h3.2]"`, or the id as text: `NodeRegistry.id_of_label` reads it)."""
    if isinstance(node, str) and node.strip().isdigit():
        node = int(node)
    if isinstance(node, int):
        if not 0 <= node < registry.n_nodes:
            raise ValueError(f"node id {node} out of range [0, {registry.n_nodes})")
        return node
    return registry.id_of_label(node)


def node_shift(registry: NodeRegistry, node: int | str, shift: Float[Tensor, " batch"] | float,
               batch: int | None = None) -> NodeShift:
    """A `NodeShift` of `node` (id or label) by `shift` (one value, or one per prompt)."""
    nid = node_id(registry, node)
    row = next(registry.describe([nid]).itertuples())
    site = registry.site(row.hook_name)
    index = tuple(int(i) for i in torch.unravel_index(torch.tensor(nid - site.offset), site.shape))
    shift = torch.as_tensor(shift, dtype=torch.float32)
    if shift.ndim == 0:
        shift = shift.expand(batch or 1)
    return NodeShift(nid, node_label(row), row.hook_name, index, shift)


@torch.no_grad()
def class_separation(model, data, registry: NodeRegistry | None = None) -> pd.DataFrame:
    """For every node, its mean at the final prompt token over each class of `data` (a TaskData
    with labels 0/1), the pooled standard deviation and `separation = (mean_1 - mean_0) / std`
    (0 for a constant node). Sorted by |separation|, largest first."""
    if data.labels is None or set(data.labels.tolist()) != {0, 1}:
        raise ValueError("class_separation needs task data with both labels 0 and 1")
    registry = registry or NodeRegistry.for_model(model)
    names = [s.hook_name for s in registry.sites]
    _, acts = run_capturing(model, data.tokens.to(model.cfg.device), names)
    rows = torch.arange(len(data))
    last = data.last_pos.to(model.cfg.device)
    flat = torch.cat([acts[s.hook_name][rows, last].flatten(1).float().cpu() for s in registry.sites], dim=1)
    labels = data.labels.cpu()
    x0, x1 = flat[labels == 0], flat[labels == 1]
    mean_0, mean_1 = x0.mean(0), x1.mean(0)
    var = ((x0 - mean_0).pow(2).sum(0) + (x1 - mean_1).pow(2).sum(0)) / max(len(flat) - 2, 1)
    std = var.sqrt()
    separation = torch.where(std > 1e-8, (mean_1 - mean_0) / std.clamp_min(1e-8), torch.zeros_like(std))
    table = registry.table().copy()
    table["label"] = [node_label(r) for r in table.itertuples()]
    table["mean_0"], table["mean_1"], table["std"] = mean_0.numpy(), mean_1.numpy(), std.numpy()
    table["separation"] = separation.numpy()
    order = separation.abs().argsort(descending=True, stable=True).numpy()
    return table.iloc[order].reset_index(drop=True)


def class_flip_shift(row, labels: Int[Tensor, " batch"], strength: float = 1.0) -> Float[Tensor, " batch"]:
    """Per prompt, `strength * (mean of the other class - mean of its own class)` for the node
    `row` of `class_separation`: moves the node from the prompt's class towards the other."""
    diff = float(row.mean_1 - row.mean_0)
    return strength * torch.where(labels.cpu() == 0, diff, -diff).float()


@torch.no_grad()
def rank_by_sparse_effect(sparse, data, candidates: pd.DataFrame, strength: float = 1.0,
                          batch_size: int = 64) -> pd.DataFrame:
    """`candidates` (rows of `class_separation`) with `sparse_effect`: the mean change of the
    sparse model's log-odds `log P(a) - log P(b)` at the final position when the node gets its
    `class_flip_shift`, signed so that a move towards the other class's answer is positive
    (down on class-0 prompts, up on class-1). Sorted by it, largest first. Run it on other
    prompts than the ones an edit is then measured on: it chooses the node."""
    registry = NodeRegistry.for_model(sparse)
    a, b = _answer_tokens(data)
    sign = torch.where(data.labels.cpu() == 0, -1.0, 1.0)
    starts = range(0, len(data), batch_size)
    parts = [data[start:start + batch_size].to(sparse.cfg.device) for start in starts]
    clean = [sparse(part.tokens) for part in parts]  # the same for every candidate
    effects = []
    for row in candidates.itertuples():
        shift = node_shift(registry, int(row.id), class_flip_shift(row, data.labels, strength))
        total = 0.0
        for start, part, part_clean in zip(starts, parts, clean):
            piece = NodeShift(shift.node_id, shift.label, shift.hook_name, shift.index,
                              shift.shift[start:start + batch_size])
            with sparse.hooks(fwd_hooks=[piece.hook(part.last_pos)]):
                edited = sparse(part.tokens)
            change = _pair_columns("s", part_clean, edited, part.last_pos, a, b)["s_d_logodds"]
            total += float((torch.from_numpy(change) * sign[start:start + batch_size]).sum())
        effects.append(total / len(data))
    ranked = candidates.assign(sparse_effect=effects)
    return ranked.sort_values("sparse_effect", ascending=False, kind="stable").reset_index(drop=True)


def choose_edit_node(sparse, task: str, probe, separation: pd.DataFrame, node: int | str = "auto",
                     target_loss: float | None = 0.7, n_candidates: int = 16, prune_steps: int = 100,
                     strength: float = 1.0, model_dir=None, progress: bool = True):
    """The node a bridge edit shifts, and notes on how it was chosen: `(row of separation,
    notes)`. `node`: an id or label (that node), or "auto": among the nodes of the circuit for
    `task` pruned to `target_loss` (None, or no circuit: all nodes), the `n_candidates` that best
    separate the classes (`separation`, from `class_separation` on `probe`), the one whose edit
    moves the sparse model most on `probe` (`rank_by_sparse_effect`)."""
    if node != "auto":
        nid = node_id(NodeRegistry.for_model(sparse), node)
        return separation[separation.id == nid].iloc[0], []
    from sparse_lens.hooks import node_means_for
    from sparse_lens.pruning import PruneConfig, prune

    candidates, notes = separation, []
    if target_loss is not None:
        means = node_means_for(sparse, model_dir)
        circuit = prune(sparse, task, PruneConfig(target_loss=target_loss, steps=prune_steps,
                                                  progress=progress), means=means)
        notes.append(repr(circuit))
        if circuit.full_model_misses_target or not circuit.node_ids:
            why = "misses even the loose target" if circuit.node_ids else "needs no node for"
            notes.append(f"the sparse model {why} {target_loss}: the node is chosen among all nodes")
        else:
            candidates = separation[separation.id.isin(circuit.node_ids)]
    candidates = rank_by_sparse_effect(sparse, probe, candidates.head(n_candidates), strength)
    notes.append(f"chosen among the {len(candidates)} best-separating nodes as the one whose edit "
                 f"moves the sparse model most towards the other answer on the {len(probe)} train "
                 f"prompts (mean signed log-odds change {candidates.sparse_effect.iloc[0]:+.4f})")
    return candidates.iloc[0], notes


# ------------------------------------------------------------------------------- on a task
@torch.no_grad()
def task_edit_effect(dense, sparse, bridges: Bridges, data, edit: NodeShift,
                     site: int | str | BridgeSite | None = None, control_seed: int = 0,
                     batch_size: int = 64) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Plant `edit` in the sparse model on every prompt of `data` (a TaskData), carry it into
    the dense model, and measure both models' probabilities of the task's two answer tokens at
    the final position. Token `a` is the correct answer of class-0 prompts (for
    `single_double_quote`, `'`) and `b` the other (`"`).

    Returns (per-prompt table, summary). The per-prompt table has, for each of `sparse`,
    `dense` and `control` (the dense model given a random residual change of the same norm as
    the carried one, at the same positions): `p_a`, `p_b` clean and edited and the change of
    the log-odds `log p_a - log p_b`. The summary has one row per class and one for all: means
    of those changes, and the fraction of prompts whose preferred answer (of the two) flips."""
    if data.labels is None:
        raise ValueError("task_edit_effect needs task data with labels")
    a, b = _answer_tokens(data)
    gen = torch.Generator().manual_seed(control_seed)
    parts = []
    for start in range(0, len(data), batch_size):
        part = data[start:start + batch_size].to(sparse.cfg.device)
        shift = NodeShift(edit.node_id, edit.label, edit.hook_name, edit.index,
                          edit.shift[start:start + batch_size])
        carried = carry_edit(dense, sparse, bridges, part.tokens, [shift.hook(part.last_pos)], site)
        noise = torch.randn(carried.delta_dense.shape, generator=gen).to(carried.delta_dense)
        norms = carried.delta_dense.norm(dim=-1, keepdim=True)
        control = noise / noise.norm(dim=-1, keepdim=True).clamp_min(1e-12) * norms
        control_logits = carry_edit(dense, sparse, bridges, part.tokens, [shift.hook(part.last_pos)],
                                    carried.site, dense_delta=control).dense_edited
        frame = dict(label=part.labels.cpu().numpy(), prompt=[p[-48:] for p in part.prompts])
        for name, clean, edited in (("sparse", carried.sparse_clean, carried.sparse_edited),
                                    ("dense", carried.dense_clean, carried.dense_edited),
                                    ("control", carried.dense_clean, control_logits)):
            frame.update(_pair_columns(name, clean, edited, part.last_pos, a, b))
        last = part.last_pos.to(norms.device)
        frame["delta_dense_norm"] = norms.squeeze(-1)[torch.arange(len(part)), last].cpu().numpy()
        parts.append(pd.DataFrame(frame))
    table = pd.concat(parts, ignore_index=True)
    return table, summarise_edit(table)


def summarise_edit(table: pd.DataFrame) -> pd.DataFrame:
    """One row per class (0, 1) and one for all prompts: means of the per-prompt changes."""
    groups = [(f"class {c}", table[table.label == c]) for c in sorted(table.label.unique())]
    rows = []
    for name, g in [*groups, ("all", table)]:
        row = dict(prompts=name, n=len(g))
        for model in ("sparse", "dense", "control"):
            row[f"{model}_d_logodds"] = g[f"{model}_d_logodds"].mean()
            row[f"{model}_d_p_a"] = (g[f"{model}_p_a_edit"] - g[f"{model}_p_a"]).mean()
            row[f"{model}_d_p_b"] = (g[f"{model}_p_b_edit"] - g[f"{model}_p_b"]).mean()
            before = g[f"{model}_p_a"] > g[f"{model}_p_b"]
            flipped = before != (g[f"{model}_p_a_edit"] > g[f"{model}_p_b_edit"])
            row[f"{model}_flipped"] = flipped.mean()
        rows.append(row)
    return pd.DataFrame(rows)


def _answer_tokens(data) -> tuple[int, int]:
    zero = (data.labels == 0).nonzero().flatten()
    if not len(zero):
        raise ValueError("the task data has no class-0 prompt to name its answer tokens")
    return int(data.correct[zero[0]]), int(data.contrast[zero[0]])


def _pair_columns(name: str, clean: Tensor, edited: Tensor, last_pos: Tensor, a: int, b: int) -> dict:
    rows = torch.arange(clean.shape[0], device=clean.device)
    last_pos = last_pos.to(clean.device)
    p_clean = F.softmax(clean[rows, last_pos].float(), dim=-1)
    p_edit = F.softmax(edited[rows, last_pos].float(), dim=-1)
    odds = lambda p: (p[:, a].log() - p[:, b].log())  # noqa: E731
    return {f"{name}_p_a": p_clean[:, a].cpu().numpy(), f"{name}_p_b": p_clean[:, b].cpu().numpy(),
            f"{name}_p_a_edit": p_edit[:, a].cpu().numpy(), f"{name}_p_b_edit": p_edit[:, b].cpu().numpy(),
            f"{name}_d_logodds": (odds(p_edit) - odds(p_clean)).cpu().numpy()}
