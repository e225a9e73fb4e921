"""The node registry: every prunable node of a `SparseHookedTransformer`, tied to its hook.

A *node* is one scalar activation per token at a TransformerLens hook: a residual channel where a
block reads or writes, one q/k/v channel of one head, one MLP neuron. Per layer `L`:

==============  ===============================  ===================  =================
kind            hook                             node shape per token  meaning
==============  ===============================  ===================  =================
`attn_read`     `blocks.L.hook_attn_read`        [d_read]             channel attention reads
`q`, `k`, `v`   `blocks.L.attn.hook_{q,k,v}`     [n_heads, d_head]    one head's channel
`attn_write`    `blocks.L.hook_attn_out`         [d_model]            channel attention writes
`mlp_read`      `blocks.L.hook_mlp_read`         [d_read]             channel the MLP reads
`neuron`        `blocks.L.mlp.hook_post`         [d_mlp]              MLP neuron
`mlp_write`     `blocks.L.hook_mlp_out`          [d_model]            channel the MLP writes
==============  ===============================  ===================  =================

`d_read` is d_model, plus d_pos_emb for models that concatenate positions to the reads (read
channels d_model.. are then position channels, fed by no residual write).

All nodes are numbered 0..n_nodes-1 in that order (layer-major, then kind, then the flattened
index of the hook's trailing dimensions), so a mask or a mean over nodes is one flat vector.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from enum import StrEnum

import pandas as pd
import torch
from jaxtyping import Float

from sparse_lens.config import TOPK_LOCATIONS


class NodeKind(StrEnum):
    """A kind of node, in node-numbering order within a layer. A `str`: compares equal to its
    name (`NodeKind.Q == "q"`) and is saved as it."""

    ATTN_READ = "attn_read"
    Q = "q"
    K = "k"
    V = "v"
    ATTN_WRITE = "attn_write"
    MLP_READ = "mlp_read"
    NEURON = "neuron"
    MLP_WRITE = "mlp_write"


#: node kind -> its `config.TOPK_LOCATIONS` entry (the one table of hook names)
NODE_LOCATIONS: dict[NodeKind, str] = {
    NodeKind.ATTN_READ: "attn_in", NodeKind.Q: "attn_q", NodeKind.K: "attn_k",
    NodeKind.V: "attn_v", NodeKind.ATTN_WRITE: "attn_out", NodeKind.MLP_READ: "mlp_in",
    NodeKind.NEURON: "mlp_neuron", NodeKind.MLP_WRITE: "mlp_out",
}
#: node kind -> hook name template (derived from `config.TOPK_LOCATIONS`)
NODE_HOOKS: dict[NodeKind, str] = {kind: TOPK_LOCATIONS[loc] for kind, loc in NODE_LOCATIONS.items()}
NODE_KINDS: tuple[NodeKind, ...] = tuple(NodeKind)
HEAD_KINDS = (NodeKind.Q, NodeKind.K, NodeKind.V)
_LABEL = re.compile(r"L(\d+)\.(\w+)\[(?:h(\d+)\.)?(\d+)\]")


def node_label(row) -> str:
    """The display label of a `NodeRegistry.table()` row: `L1.q[h3.2]`, `L0.neuron[57]`,
    `L2.attn_write[12]`. For display only: code identifies nodes by id."""
    idx = f"h{row.head}.{row.channel}" if row.head >= 0 else f"{row.channel}"
    return f"L{row.layer}.{row.kind}[{idx}]"


@dataclass(frozen=True)
class NodeSite:
    """One hook's block of nodes: global ids `offset .. offset + size - 1`."""

    kind: NodeKind
    layer: int
    hook_name: str
    shape: tuple[int, ...]  # the hook's trailing dims (after batch, pos)
    offset: int

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def ids(self) -> range:
        return range(self.offset, self.offset + self.size)


class NodeRegistry:
    """The nodes of one model architecture. Build with `NodeRegistry.for_model(model)`.

    `sites` (in node order), `n_nodes`, `site(hook_name)`, `split(vector)` (a flat per-node
    vector as one tensor per hook, shaped like one token's activations there), `table()` (one
    row per node) and `describe(ids)`."""

    def __init__(self, n_layers: int, d_model: int, n_heads: int, d_head: int, d_mlp: int,
                 d_read: int | None = None):
        d_read = d_model if d_read is None else d_read  # > d_model: positions concatenated
        shapes = {"attn_read": (d_read,), "q": (n_heads, d_head), "k": (n_heads, d_head),
                  "v": (n_heads, d_head), "attn_write": (d_model,), "mlp_read": (d_read,),
                  "neuron": (d_mlp,), "mlp_write": (d_model,)}
        self.dims = dict(n_layers=n_layers, d_model=d_model, n_heads=n_heads, d_head=d_head,
                         d_mlp=d_mlp, d_read=d_read)
        sites, offset = [], 0
        for layer in range(n_layers):
            for kind, template in NODE_HOOKS.items():  # kind: a NodeKind
                site = NodeSite(kind, layer, template.format(layer=layer), shapes[kind], offset)
                sites.append(site)
                offset += site.size
        self.sites: tuple[NodeSite, ...] = tuple(sites)
        self.n_nodes: int = offset
        self._by_hook = {s.hook_name: s for s in self.sites}
        self._table: pd.DataFrame | None = None

    @classmethod
    def for_model(cls, model) -> NodeRegistry:
        """The registry of a `SparseHookedTransformer` (or any model with the same hooks)."""
        c = model.cfg
        if c.d_mlp is None or getattr(c, "attn_only", False):
            raise ValueError("the node registry needs a model with MLP blocks (d_mlp set)")
        return cls(c.n_layers, c.d_model, c.n_heads, c.d_head, c.d_mlp,
                   getattr(c, "d_read", c.d_model))

    def site(self, hook_name: str) -> NodeSite:
        try:
            return self._by_hook[hook_name]
        except KeyError:
            raise KeyError(f"{hook_name!r} is not a node site; sites are e.g. "
                           f"{[s.hook_name for s in self.sites[:len(NODE_KINDS)]]}") from None

    def sites_of(self, kind: str, layer: int | None = None) -> list[NodeSite]:
        if kind not in NODE_HOOKS:
            raise ValueError(f"unknown node kind {kind!r}; kinds are {list(NODE_KINDS)}")
        return [s for s in self.sites if s.kind == kind and (layer is None or s.layer == layer)]

    def split(self, vector: Float[torch.Tensor, " n_nodes"]) -> dict[str, torch.Tensor]:
        """A flat per-node vector as `{hook_name: tensor of the site's shape}` (views)."""
        if vector.shape != (self.n_nodes,):
            raise ValueError(f"expected a vector of shape ({self.n_nodes},) (one entry per node), "
                             f"got {tuple(vector.shape)}")
        return {s.hook_name: vector[s.offset:s.offset + s.size].view(s.shape) for s in self.sites}

    def id_of_label(self, label: str) -> int:
        """The id of the node a user typed by its display label (`"L1.mlp_write[12]"`,
        `"L0.q[h3.2]"`): the one place a label is read back."""
        match = _LABEL.fullmatch(label.strip())
        if not match:
            raise ValueError(f"cannot read node label {label!r}; write e.g. 'L1.mlp_write[12]' or 'L0.q[h3.2]'")
        layer, kind, head, channel = match.groups()
        index = (int(head), int(channel)) if head is not None else int(channel)
        return self.ids_of(kind, int(layer), index)

    def labels(self, ids) -> list[str]:
        """The display labels of node `ids`, in order."""
        return [node_label(r) for r in self.describe(ids).itertuples()]

    def ids_of(self, kind: str, layer: int, index: int | tuple[int, ...]) -> int:
        """The global id of one node, e.g. `ids_of("neuron", 0, 5)` or `ids_of("q", 1, (3, 2))`
        (head 3, channel 2)."""
        (site,) = self.sites_of(kind, layer)
        idx = (index,) if isinstance(index, int) else tuple(index)
        if len(idx) != len(site.shape) or not all(0 <= i < n for i, n in zip(idx, site.shape)):
            raise ValueError(f"index {index!r} out of range for {kind} nodes of shape {site.shape}")
        flat = 0
        for i, n in zip(idx, site.shape):
            flat = flat * n + i
        return site.offset + flat

    def table(self) -> pd.DataFrame:
        """One row per node: id, kind, layer, head (-1 when none), channel (residual channel, neuron or
        the head's channel), hook_name."""
        if self._table is None:
            parts = []
            for s in self.sites:
                flat = torch.arange(s.size)
                if s.kind in HEAD_KINDS:
                    head, index = flat // s.shape[1], flat % s.shape[1]
                else:
                    head, index = torch.full_like(flat, -1), flat
                parts.append(pd.DataFrame(dict(
                    id=flat.numpy() + s.offset, kind=s.kind, layer=s.layer,
                    head=head.numpy(), channel=index.numpy(), hook_name=s.hook_name)))
            self._table = pd.concat(parts, ignore_index=True)
        return self._table

    def describe(self, ids) -> pd.DataFrame:
        """The `table()` rows of the given node ids, in the given order."""
        return self.table().iloc[list(ids)].reset_index(drop=True)

    def __repr__(self) -> str:
        return f"NodeRegistry({self.n_nodes} nodes, {len(self.sites)} sites, {self.dims})"
