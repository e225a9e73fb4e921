"""The edges of a circuit, from the model's weights (see `sparse_lens.circuit` for the kinds).

One row per edge: `kind`, `source`, `target` (display labels only), `weight` (NaN for residual
and qk), and the ids code uses: `source_id`, `target_id` (node ids of the registry; -1 at a
token end) and `source_token`, `target_token` (the token id at an `embed` edge's source and an
`unembed` edge's target; -1 elsewhere).

The embedding and unembedding edges are those of the task's tokens: `edge_tokens` derives
them, deterministically, from the task and the pruning config (128 train prompts, seed 0).
"""

from __future__ import annotations

import pandas as pd
import torch

from sparse_lens.hooks import NodeRegistry, keep_mask_from_ids
from sparse_lens.hooks.nodes import NodeKind, NodeSite

EDGE_KINDS = ("weight", "embed", "unembed", "residual", "qk")
COUNTED_EDGE_KINDS = ("weight", "embed", "unembed")
COLUMNS = ("kind", "source", "target", "weight", "source_id", "target_id", "source_token",
           "target_token")
NO_ID = -1  # the id column of an end that is not a node, or the token column of one that is


def edge_tokens(model, task: str, config=None, data=None) -> tuple[list[int], list[int]]:
    """`(prompt tokens, candidate tokens)` whose embedding and unembedding edges a circuit for
    `task` shows: every token of 128 train prompts (seed 0) at `config`'s level and source, and
    their correct and contrast answers (of `data`, a hand-made TaskData, if given)."""
    from sparse_lens.circuit_eval import task_examples

    examples = task_examples(model, task, config, data, split="train", n=128, seed=0)
    prompt = sorted(set(examples.tokens.flatten().tolist()))
    candidates = sorted(set(examples.correct.tolist()) | set(examples.contrast.tolist()))
    return prompt, candidates


def token_label(tokenizer, token: int, prefix: str) -> str:
    """`embed['x']` / `logit['x']`; a token that decodes to no whole character (a partial
    UTF-8 byte) also shows its id, `embed['\\ufffd' #200]`."""
    if tokenizer is None:
        return f"{prefix}[{token}]"
    text = tokenizer.decode([token])
    return f"{prefix}[{text!r} #{token}]" if "\ufffd" in text else f"{prefix}[{text!r}]"


def _frame(kind, source_id, target_id, weight, labels, source_token=None, target_token=None,
           token_names=None) -> pd.DataFrame:
    """Edges of one kind from id arrays (`NO_ID` where an end is a token)."""
    n = len(source_id) if source_id is not None else len(target_id)

    def ids(a):
        return torch.as_tensor(a, dtype=torch.long).numpy() if a is not None else torch.full((n,), NO_ID).numpy()
    src, dst = ids(source_id), ids(target_id)
    s_tok, t_tok = ids(source_token), ids(target_token)
    source = [token_names(t, "embed") for t in s_tok.tolist()] if source_token is not None else labels(src.tolist())
    target = [token_names(t, "logit") for t in t_tok.tolist()] if target_token is not None else labels(dst.tolist())
    return pd.DataFrame(dict(kind=kind, source=source, target=target, weight=weight,
                             source_id=src, target_id=dst, source_token=s_tok, target_token=t_tok))


def circuit_edges(model, registry: NodeRegistry, node_ids, task_tokens, candidate_tokens) -> pd.DataFrame:
    """All edges of the circuit `node_ids` (see the module docstring)."""
    kept = {name: m.bool() for name, m in registry.split(keep_mask_from_ids(registry, node_ids)).items()}
    labels = registry.labels
    frames = []

    def weight_edges(weight, src: NodeSite, dst: NodeSite) -> None:
        """`weight` laid out as [*src_shape, *dst_shape]."""
        src_flat, dst_flat = kept[src.hook_name].flatten(), kept[dst.hook_name].flatten()
        w = weight.detach().cpu().reshape(src_flat.numel(), dst_flat.numel())
        s, d = ((w != 0) & src_flat[:, None] & dst_flat[None, :]).nonzero(as_tuple=True)
        if len(s):
            frames.append(_frame("weight", s + src.offset, d + dst.offset, w[s, d].numpy(), labels))

    for layer, block in enumerate(model.blocks):
        site = {s.kind: s for s in registry.sites if s.layer == layer}
        for kind, W in ((NodeKind.Q, block.attn.W_Q), (NodeKind.K, block.attn.W_K), (NodeKind.V, block.attn.W_V)):
            weight_edges(W.permute(1, 0, 2), site[NodeKind.ATTN_READ], site[kind])  # [d_model, h, d_head]
        weight_edges(block.attn.W_O, site[NodeKind.V], site[NodeKind.ATTN_WRITE])  # [h, d_head, d_model]
        weight_edges(block.mlp.W_in, site[NodeKind.MLP_READ], site[NodeKind.NEURON])  # [d_model, d_mlp]
        weight_edges(block.mlp.W_out, site[NodeKind.NEURON], site[NodeKind.MLP_WRITE])  # [d_mlp, d_model]
        q, k = kept[site[NodeKind.Q].hook_name], kept[site[NodeKind.K].hook_name]
        heads, chans = (q & k).nonzero(as_tuple=True)
        if len(heads):
            frames.append(_frame("qk", site[NodeKind.Q].offset + heads * q.shape[1] + chans,
                                 site[NodeKind.K].offset + heads * k.shape[1] + chans, float("nan"), labels))
    frames += _residual_edges(registry, kept)
    frames += _vocab_edges(model, registry, kept, task_tokens, candidate_tokens)
    if not frames:
        return pd.DataFrame({c: pd.Series(dtype=float if c == "weight" else str if c in
                                          ("kind", "source", "target") else "int64") for c in COLUMNS})
    return pd.concat(frames, ignore_index=True)


def _residual_edges(registry: NodeRegistry, kept: dict) -> list[pd.DataFrame]:
    """A kept write channel to every later kept read of the same channel."""
    reads = [s for s in registry.sites if s.kind in (NodeKind.ATTN_READ, NodeKind.MLP_READ)]
    writes = [s for s in registry.sites if s.kind in (NodeKind.ATTN_WRITE, NodeKind.MLP_WRITE)]
    frames = []
    for w in writes:
        for r in reads:
            if r.offset > w.offset:  # node ids follow the order the residual stream meets them
                d_model = kept[w.hook_name].numel()  # reads past d_model are positions
                (chans,) = (kept[w.hook_name] & kept[r.hook_name][:d_model]).nonzero(as_tuple=True)
                if len(chans):
                    frames.append(_frame("residual", w.offset + chans, r.offset + chans, float("nan"),
                                         registry.labels))
    return frames


def _vocab_edges(model, registry: NodeRegistry, kept: dict, task_tokens, candidate_tokens) -> list[pd.DataFrame]:
    """Token embedding -> kept read channel (of `task_tokens`), kept write channel -> logit (of
    `candidate_tokens`)."""
    tokenizer = model.tokenizer
    names = lambda t, prefix: token_label(tokenizer, t, prefix)  # noqa: E731
    reads = [s for s in registry.sites if s.kind in (NodeKind.ATTN_READ, NodeKind.MLP_READ)]
    writes = [s for s in registry.sites if s.kind in (NodeKind.ATTN_WRITE, NodeKind.MLP_WRITE)]
    frames = []
    for kind, weight, sites, tokens in (("embed", model.embed.W_E, reads, task_tokens),
                                        ("unembed", model.unembed.W_U.T, writes, candidate_tokens)):
        weight = weight.detach().cpu()  # [d_vocab, d_model]
        tokens = torch.as_tensor(list(tokens), dtype=torch.long)
        for site in sites:
            (chans,) = kept[site.hook_name][:weight.shape[1]].nonzero(as_tuple=True)  # residual
            sub = weight[tokens][:, chans]
            ti, ci = (sub != 0).nonzero(as_tuple=True)
            if not len(ti):
                continue
            node, token = site.offset + chans[ci], tokens[ti]
            if kind == "embed":
                frames.append(_frame(kind, None, node, sub[ti, ci].numpy(), registry.labels,
                                     source_token=token, token_names=names))
            else:
                frames.append(_frame(kind, node, None, sub[ti, ci].numpy(), registry.labels,
                                     target_token=token, token_names=names))
    return frames
