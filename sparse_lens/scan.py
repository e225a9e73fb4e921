"""Finding the smallest circuit among candidates, many candidates per forward pass: the exact
scan over the prefixes of the tau order (`smallest_passing_prefix`, step 3 of
`sparse_lens.search`) and the one-node-at-a-time refinement (`drop_redundant`, step 4).

A candidate circuit is a 0/1 mask over the nodes; `_mask_losses` evaluates k of them on the same
examples in one pass (each on its own copy of the rows, with its own row mask). Both searches
drop a candidate as soon as its summed loss exceeds the target's share, reading the examples in
batches that grow from 8, hardest first.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from jaxtyping import Float

from sparse_lens.hooks import NodeRegistry
from sparse_lens.task_loss import by_length, final_logit_pairs, pair_loss

#: `(ns, rows) -> [len(ns), len(rows)]` per-example task losses of the circuits keeping n nodes
#: (`rows`: a slice or 1-D index tensor of evaluation examples)
ExampleLosses = Callable[[list[int], slice | torch.Tensor], torch.Tensor]


def smallest_passing_prefix(example_losses: ExampleLosses, n_max: int, n_examples: int,
                            target: float, start: int = 0, batch_size: int = 32,
                            max_chunk: int = 16, first_batch: int = 8) -> int | None:
    """The smallest `n` in [start, n_max] whose circuit meets `target`: mean per-example loss
    over the `n_examples` evaluation examples <= target. Exact whatever the shape of the
    loss-vs-n curve (a bisection assumes it falls monotonically; on a real curve it can stop
    at a later crossing): every `n` is tried in order, in chunks of up to `max_chunk`
    candidates evaluated together.

    `example_losses(ns, rows)` returns [len(ns), len(rows)] per-example losses of the circuits
    keeping the first `n` nodes, for each n in `ns`, on the evaluation examples `rows` (a 1-D
    index tensor). Losses are >= 0, so a candidate is dropped as soon as its running sum exceeds
    `target * n_examples`. Examples come in batches that grow from `first_batch` to `batch_size`
    (8, 8, 16, 32, 32, ...), hardest first: at first in the order `example_losses` was built with
    (`hardest_first`), then, after each chunk, by their losses under the largest prefix of the
    chunk that read them, since neighbouring prefixes fail on the same examples. A failing circuit
    is then usually dropped within its first 6-30 examples (measured on the quote and for_while
    tasks, where the starting order alone needed 65-96 on for_while), so it costs one or two
    small batches. The order changes the cost, never the answer. Returns None if no n passes."""
    bound = target * n_examples
    chunk = 4
    order = torch.arange(n_examples)
    while start <= n_max:
        ns = list(range(start, min(start + chunk, n_max + 1)))
        sums = torch.zeros(len(ns), dtype=torch.float64)
        alive = list(range(len(ns)))
        evidence = torch.full((n_examples,), -1.0, dtype=torch.float64)  # loss under the chunk's largest reader
        for rows in growing_slices(n_examples, first_batch, batch_size):
            if not alive:
                break
            losses = example_losses([ns[i] for i in alive], order[rows]).detach().double().cpu()
            sums[alive] += losses.sum(dim=1)
            evidence[order[rows]] = losses[-1]
            alive = [i for i in alive if sums[i] <= bound]
        if alive:
            return ns[alive[0]]
        # read examples by descending loss first; unread ones keep their order, after them
        order = order[torch.argsort(evidence[order], descending=True, stable=True)]
        start += len(ns)
        chunk = min(2 * chunk, max_chunk)
    return None


def growing_slices(n: int, first: int, largest: int) -> list[slice]:
    """Consecutive slices covering `range(n)`: `first` long, then `first` again, then doubling
    up to `largest` (8, 8, 16, 32, 32, ... for 8 and 32)."""
    out, start, size = [], 0, min(first, largest)
    while start < n:
        out.append(slice(start, min(start + size, n)))
        start += size
        if len(out) > 1:
            size = min(2 * size, largest)
    return out


def _mask_losses(model, masker, data, rows: torch.Tensor):
    """`(masks, which) -> [len(masks), len(which)]` per-example task losses of the circuits
    `masks` ([k, n_nodes], 1 = kept), all evaluated in one forward pass (each candidate on its
    own copy of the examples, with its own row mask), on the examples `rows[which]`."""

    def losses(masks: Float[torch.Tensor, "k n_nodes"],
               which: slice | torch.Tensor) -> Float[torch.Tensor, "candidates examples"]:
        part = data[rows[which]]
        k, e = len(masks), len(part)
        masker.set_row_masks(masks.repeat_interleave(e, dim=0))
        tokens = part.tokens.repeat(k, 1)
        with torch.no_grad():
            logits = model(tokens)
        rows_k = torch.arange(k * e, device=logits.device)
        last = logits[rows_k, part.last_pos.to(logits.device).repeat(k)]
        diff = last[rows_k, part.correct.to(logits.device).repeat(k)] - \
            last[rows_k, part.contrast.to(logits.device).repeat(k)]
        return F.softplus(-diff).view(k, e)

    return losses


def _prefix_losses(model, masker, data, order, registry: NodeRegistry,
                   rows: torch.Tensor | None = None) -> ExampleLosses:
    """`example_losses` for `smallest_passing_prefix`: the circuits keeping the first n nodes of
    `order`, all evaluated in one forward pass (`_mask_losses`), examples taken in the order
    `rows` (default: shortest first)."""
    rows = by_length(data) if rows is None else rows
    rank = torch.empty(registry.n_nodes, dtype=torch.long)
    rank[order] = torch.arange(registry.n_nodes)
    rank = rank.to(model.cfg.device)
    losses = _mask_losses(model, masker, data, rows)

    def example_losses(ns: list[int], which: slice | torch.Tensor) -> Float[torch.Tensor, "candidates examples"]:
        kept = torch.tensor(ns, device=rank.device)[:, None]
        return losses((rank[None, :] < kept).float(), which)

    return example_losses


def first_passing(losses, masks: Float[torch.Tensor, "k n_nodes"], n_examples: int, target: float,
                  first_batch: int = 8, batch_size: int = 32) -> int | None:
    """The index of the first of `masks` whose circuit meets `target` (mean per-example loss
    over the `n_examples` evaluation examples), or None. `losses(masks, rows)` as
    `_mask_losses` returns. Like `smallest_passing_prefix`, examples come in growing batches and
    a candidate is dropped once its running sum exceeds `target * n_examples`."""
    bound = target * n_examples
    sums = torch.zeros(len(masks), dtype=torch.float64)
    alive = list(range(len(masks)))
    for rows in growing_slices(n_examples, first_batch, batch_size):
        if not alive:
            return None
        sums[alive] += losses(masks[alive], rows).detach().double().cpu().sum(dim=1)
        alive = [i for i in alive if sums[i] <= bound]
    return alive[0] if alive else None


def drop_redundant(model, masker, data, kept: torch.Tensor, registry: NodeRegistry, target: float,
                   chunk: int = 8) -> torch.Tensor:
    """Step 4: from the circuit `kept` (node ids, highest tau first) that meets `target` on
    `data`, drop nodes one at a time, lowest tau first, whenever the circuit without that node
    still meets it; in passes until a pass drops none, so that no single node of the result can
    leave. Candidates are tried `chunk` at a time in one forward pass (`first_passing`), the
    examples hardest first under the current circuit. Returns the kept ids, highest tau first.
    The examples decide, so the result can fit them more closely than a prefix does: check it
    out of sample (`Circuit.verify`)."""
    device = model.cfg.device
    given, kept = kept, [int(i) for i in kept]

    def mask_of(ids) -> torch.Tensor:
        mask = torch.zeros(registry.n_nodes, device=device)
        mask[torch.tensor(ids, dtype=torch.long, device=device)] = 1.0
        return mask

    everything = torch.arange(len(data))
    dropped = True
    while dropped and kept:
        dropped = False
        current = _mask_losses(model, masker, data, everything)(mask_of(kept)[None], slice(None))[0]
        rows = torch.argsort(current.detach().cpu(), descending=True, stable=True)
        losses = _mask_losses(model, masker, data, rows)
        candidates, start = kept[::-1], 0
        while start < len(candidates):
            tried = candidates[start:start + chunk]
            masks = mask_of(kept).repeat(len(tried), 1)
            masks[torch.arange(len(tried)), torch.tensor(tried, device=device)] = 0.0
            hit = first_passing(losses, masks, len(data), target)
            if hit is None:
                start += len(tried)
                continue
            kept.remove(tried[hit])
            dropped = True
            start += hit + 1
    final = mask_of(kept)
    masker.mask = final  # back to one mask for every row
    if pair_loss(final_logit_pairs(model, data, masker, final)) > target:
        return given  # passed in the scan's summation order only: a float tie, keep the prefix
    return torch.tensor(kept, dtype=torch.long)


def hardest_first(example_losses: ExampleLosses, n_examples: int, n_max: int, target: float,
                  probes: int = 6) -> torch.Tensor:
    """An order of the evaluation examples that lets `smallest_passing_prefix` reject failing
    circuits after few examples: by descending loss under the largest failing prefix that a
    short bisection of [0, n_max] finds (`probes` evaluations). Any order gives the same
    answer (losses are >= 0, the scan only stops early); this one makes it cheap, since the
    circuits just short of the answer fail on the examples this one fails on."""
    everything = slice(0, n_examples)
    lo, hi, failing = 0, n_max, None
    for _ in range(probes):
        if hi - lo <= 1:
            break
        mid = (lo + hi) // 2
        losses = example_losses([mid], everything)[0]
        if losses.mean().item() <= target:
            hi = mid
        else:
            lo, failing = mid, losses
    if failing is None:
        failing = example_losses([lo], everything)[0]
    return torch.argsort(failing.detach().cpu(), descending=True, stable=True)
