"""What the views read from a running circuit: node activations, attention patterns, logits.

Everything here runs with `Circuit.run` semantics: every node outside the circuit replaced by
its mean (`masked_nodes`), the circuit's logit calibration (if any) applied to the logits. The
reading hooks are added after the masking hooks, so they see the masked activations, and they
keep only what was asked for (a few channels, a few heads) instead of caching whole tensors.
"""

from __future__ import annotations

import torch
from jaxtyping import Float, Int

from sparse_lens.hooks import masked_nodes
from sparse_lens.hooks.nodes import HEAD_KINDS

PATTERN_HOOK = "blocks.{layer}.attn.hook_pattern"


@torch.no_grad()
def run_circuit(circuit, tokens: Int[torch.Tensor, "batch pos"],
                fwd_hooks=()) -> Float[torch.Tensor, "batch pos d_vocab"]:
    """The circuit's logits on `tokens`, with extra `fwd_hooks` (TransformerLens
    `(hook_name, fn)` pairs) running after the masks. The model is in eval mode meanwhile."""
    model = circuit.model
    was_training = model.training
    model.eval()
    try:
        with masked_nodes(model, circuit.registry, circuit.mask, circuit.means):
            logits = model.run_with_hooks(tokens.to(model.cfg.device), fwd_hooks=list(fwd_hooks))
    finally:
        model.train(was_training)
    if circuit.calibration is not None:
        logits = circuit.calibration.apply_logits(logits)
    return logits


def node_activations(
    circuit, tokens: Int[torch.Tensor, "batch pos"], node_ids,
) -> tuple[Float[torch.Tensor, "batch pos node"], Float[torch.Tensor, "batch pos d_vocab"]]:
    """The activations of the nodes `node_ids` (any nodes of the model, in the given order) at
    every position of `tokens` with the circuit running, and the circuit's logits. On the CPU."""
    out = torch.zeros(*tokens.shape, len(node_ids))

    def reader(cols: list[int], index: torch.Tensor):
        def read(activation: torch.Tensor, hook) -> None:
            out[..., cols] = activation.flatten(2)[..., index.to(activation.device)].float().cpu()
        return read

    hooks = [(h, reader(c, i)) for h, (c, i) in _columns_by_hook(circuit.registry, node_ids).items()]
    logits = run_circuit(circuit, tokens, hooks)
    return out, logits.float().cpu()


def final_activations(circuit, tokens: Int[torch.Tensor, "batch pos"],
                      last_pos: Int[torch.Tensor, " batch"], node_ids) -> Float[torch.Tensor, "batch node"]:
    """The activations of `node_ids` at position `last_pos[i]` of each row `i` only (cheap for
    many nodes), with the circuit running. On the CPU."""
    out = torch.zeros(tokens.shape[0], len(node_ids))
    rows = torch.arange(tokens.shape[0])

    def reader(cols: list[int], index: torch.Tensor):
        def read(activation: torch.Tensor, hook) -> None:
            d = activation.device
            at_last = activation[rows.to(d), last_pos.to(d)].flatten(1)  # [batch, site size]
            out[:, cols] = at_last[:, index.to(d)].float().cpu()
        return read

    run_circuit(circuit, tokens, [(h, reader(c, i)) for h, (c, i)
                                  in _columns_by_hook(circuit.registry, node_ids).items()])
    return out


def _columns_by_hook(registry, node_ids) -> dict[str, tuple[list[int], torch.Tensor]]:
    """`{hook_name: (output columns, flat index into the hook's trailing dims)}` for `node_ids`."""
    table = registry.describe(list(node_ids))
    columns: dict[str, tuple[list[int], list[int]]] = {}
    for column, row in enumerate(table.itertuples()):
        cols, flat = columns.setdefault(row.hook_name, ([], []))
        cols.append(column)
        flat.append(row.id - registry.site(row.hook_name).offset)
    return {h: (c, torch.tensor(f, dtype=torch.long)) for h, (c, f) in columns.items()}


def head_patterns(circuit, tokens: Int[torch.Tensor, "batch pos"], heads: list[tuple[int, int]],
                  ) -> tuple[Float[torch.Tensor, "batch head query_pos key_pos"],
                             Float[torch.Tensor, "batch pos d_vocab"]]:
    """Attention patterns of the `(layer, head)` pairs `heads` (in that order) with the circuit
    running, and the circuit's logits. On the CPU. With attention sinks a row sums to less than
    1: the rest is the sink's share."""
    batch, pos = tokens.shape
    out = torch.zeros(batch, len(heads), pos, pos)
    by_layer: dict[int, tuple[list[int], list[int]]] = {}
    for i, (layer, head) in enumerate(heads):
        slots, idx = by_layer.setdefault(layer, ([], []))
        slots.append(i)
        idx.append(head)

    def reader(slots: list[int], idx: list[int]):
        def read(pattern: torch.Tensor, hook) -> None:  # [batch, head_index, query_pos, key_pos]
            out[:, slots] = pattern[:, idx].float().cpu()
        return read

    hooks = [(PATTERN_HOOK.format(layer=layer), reader(s, i)) for layer, (s, i) in by_layer.items()]
    logits = run_circuit(circuit, tokens, hooks)
    return out, logits.float().cpu()


def kept_heads(circuit) -> dict[tuple[int, int], dict[str, int]]:
    """`{(layer, head): {"q": n, "k": n, "v": n}}` for every head with a kept q, k or v channel,
    in (layer, head) order."""
    nodes = circuit.registry.describe(circuit.node_ids)
    nodes = nodes[nodes.kind.isin(HEAD_KINDS)]
    counts = nodes.groupby(["layer", "head", "kind"]).size()
    heads: dict[tuple[int, int], dict[str, int]] = {}
    for (layer, head, kind), n in sorted(counts.items()):
        heads.setdefault((int(layer), int(head)), {k: 0 for k in HEAD_KINDS})[kind] = int(n)
    return heads


def token_strings(model, ids: Int[torch.Tensor, " pos"] | list[int]) -> list[str]:
    """One decoded string per token id (the token ids themselves when there is no tokenizer)."""
    ids = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
    if model.tokenizer is None:
        return [str(i) for i in ids]
    return [model.tokenizer.decode([i]) for i in ids]
