"""The circuit-size search: the smallest prefix of the tau order that meets the target, exactly."""

import warnings

import pytest
import torch
import torch.nn.functional as F
from test_circuit import hand_task, means, model  # noqa: F401  (the hand-built model whose circuit is known, as fixtures)

from sparse_lens.hooks import NodeRegistry, masked_nodes
from sparse_lens.pruning import (
    PruneConfig, _prefix_losses, _search, final_logit_pairs, pair_loss, prune, smallest_passing_prefix,
)
from sparse_lens.search import growing_slices

N_EXAMPLES = 10


def curve_losses(curve: dict[int, float]):
    """`example_losses` for a made-up curve: every example of prefix n has loss curve[n]; counts
    how many (prefix, example) losses were asked for."""
    return curve_losses_over(curve, N_EXAMPLES)


def curve_losses_over(curve: dict[int, float], n_examples: int):
    """`curve_losses` for `n_examples` examples."""
    asked = []

    def example_losses(ns, rows):
        width = len(rows) if isinstance(rows, torch.Tensor) else len(range(n_examples)[rows])
        asked.append(len(ns) * width)
        return torch.tensor([[curve[n]] * width for n in ns])

    return example_losses, asked


def bisect(curve: dict[int, float], n_max: int, target: float) -> int:
    """The bisection the search replaced (assumes the loss falls as n grows)."""
    lo, hi = 0, n_max
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if curve[mid] <= target else (mid, hi)
    return hi


def test_finds_the_smallest_passing_prefix_where_a_bisection_overshoots():
    """Passes at 3, fails from 4 to 9 (adding a node can hurt), passes from 10: the bisection
    lands on the later crossing, 10; the smallest circuit has 3 nodes."""
    curve = {n: 0.1 if n == 3 or n >= 10 else 0.9 for n in range(17)}
    assert bisect(curve, 16, 0.15) == 10
    losses, _ = curve_losses(curve)
    assert smallest_passing_prefix(losses, 16, N_EXAMPLES, 0.15, batch_size=4) == 3


def test_exact_at_the_boundary_and_none_when_nothing_passes():
    losses, _ = curve_losses({n: 0.125 if n >= 5 else 0.12501 for n in range(9)})  # 0.125 is exact in binary
    assert smallest_passing_prefix(losses, 8, N_EXAMPLES, 0.125) == 5
    losses, _ = curve_losses({n: 0.2 for n in range(9)})
    assert smallest_passing_prefix(losses, 8, N_EXAMPLES, 0.15) is None
    losses, _ = curve_losses({n: 0.0 for n in range(9)})
    assert smallest_passing_prefix(losses, 8, N_EXAMPLES, 0.15, start=2) == 2


def test_clearly_failing_prefixes_cost_one_batch():
    """Prefixes with loss 0.7 are dropped after the first batch of 4 of the 10 examples."""
    curve = {n: 0.0 if n == 40 else 0.7 for n in range(41)}
    losses, asked = curve_losses(curve)
    assert smallest_passing_prefix(losses, 40, N_EXAMPLES, 0.15, batch_size=4, first_batch=4) == 40
    full_cost = 41 * N_EXAMPLES
    assert sum(asked) < 0.5 * full_cost


def test_example_batches_grow_from_small_and_cover_every_example_once():
    assert growing_slices(100, 8, 32) == [slice(0, 8), slice(8, 16), slice(16, 32), slice(32, 64),
                                           slice(64, 96), slice(96, 100)]
    assert growing_slices(5, 8, 32) == [slice(0, 5)] and growing_slices(0, 8, 32) == []
    # a prefix that a few examples already reject costs the first small batch, not a full one
    curve = {n: 3.0 if n < 20 else 0.0 for n in range(21)}  # 8 x 3.0 > 0.15 x 128
    losses, asked = curve_losses_over(curve, 128)
    assert smallest_passing_prefix(losses, 20, 128, 0.15) == 20
    assert sum(asked) == 20 * 8 + 128  # 20 rejected after 8 examples each; the answer reads all


def test_row_masks_give_each_candidate_its_own_circuit(model, means):
    """The batched evaluation (one row mask per candidate) equals evaluating each prefix alone."""
    registry, data = NodeRegistry.for_model(model), hand_task(n=12)
    order = torch.randperm(registry.n_nodes, generator=torch.Generator().manual_seed(0))
    ns = [0, 3, 40, registry.n_nodes // 2, registry.n_nodes]
    with torch.no_grad(), masked_nodes(model, registry, torch.ones(registry.n_nodes), means) as masker:
        batched = _prefix_losses(model, masker, data, order, registry)(ns, slice(0, len(data)))
        for row, n in enumerate(ns):
            mask = torch.zeros(registry.n_nodes)
            mask[order[:n]] = 1.0
            pairs = final_logit_pairs(model, data, masker, mask)
            alone = F.softplus(pairs[:, 1] - pairs[:, 0])
            by_length = torch.argsort(data.last_pos, stable=True)
            assert torch.allclose(batched[row], alone[by_length], atol=1e-5)


def test_search_returns_a_prefix_no_smaller_one_beats(model, means):
    """On the hand-built model with a shuffled order (the planted nodes spread out), every
    prefix shorter than the answer misses the target and the answer meets it."""
    registry, data = NodeRegistry.for_model(model), hand_task(n=16)
    order = torch.randperm(registry.n_nodes, generator=torch.Generator().manual_seed(2))
    config = PruneConfig(target_loss=0.3, progress=False)
    with masked_nodes(model, registry, torch.ones(registry.n_nodes), means) as masker:
        n, _ = _search(model, masker, data, order, registry, config)
        losses = []
        for m in range(n + 1):
            mask = torch.zeros(registry.n_nodes)
            mask[order[:m]] = 1.0
            losses.append(pair_loss(final_logit_pairs(model, data, masker, mask)))
    assert 0 < n < registry.n_nodes
    assert losses[n] <= 0.3 and all(loss > 0.3 for loss in losses[:n])


def test_prune_rejects_an_unknown_level_or_source():
    with pytest.raises(ValueError, match="level"):
        PruneConfig(level="easy")
    with pytest.raises(ValueError, match="source"):
        PruneConfig(source="github")


def test_prune_still_finds_the_planted_circuit(model, means):
    circuit = prune(model, hand_task(), means=means, steps=150, batch_size=32, lr=0.02, progress=False)
    assert len(circuit.node_ids) == 3 and circuit.solved


def test_hardest_first_rows_give_the_same_answer_for_less_work():
    """Circuits short of the answer fail on a few hard examples only (loss 4 there, 0 elsewhere):
    in the default order they survive until those examples come up (in the first chunk; then the
    scan puts them first itself); hardest first, they are dropped after one batch from the start.
    The answer is the same in both orders."""
    from sparse_lens.search import hardest_first

    n_examples, n_max, answer = 64, 40, 31
    hard = torch.tensor([50, 55, 60, 63])  # the last rows, as shortest-first might put them

    def losses_for(rows_order, asked):
        def example_losses(ns, which):
            rows = rows_order[which]
            asked.append(len(ns) * len(rows))
            per_example = torch.zeros(len(ns), n_examples)
            for i, n in enumerate(ns):
                if n < answer:
                    per_example[i, hard] = 4.0
            return per_example[:, rows]
        return example_losses

    default_asked, hard_asked = [], []
    default = losses_for(torch.arange(n_examples), default_asked)
    rows = hardest_first(default, n_examples, n_max, target=0.15)
    assert set(rows[:4].tolist()) == set(hard.tolist())
    default_asked.clear()  # (the probes)
    first = smallest_passing_prefix(default, n_max, n_examples, 0.15, batch_size=8)
    second = smallest_passing_prefix(losses_for(rows, hard_asked), n_max, n_examples, 0.15, batch_size=8)
    assert first == second == answer
    # measured: 888 against 1,112 (2,624 before the scan reordered examples between chunks)
    assert sum(hard_asked) < sum(default_asked)


def table_losses(table: torch.Tensor, asked: list):
    """`example_losses` reading a [n, example] table of per-example losses; counts what is read."""
    def example_losses(ns, rows):
        asked.append(len(ns) * len(table[0, rows]))
        return table[ns][:, rows]
    return example_losses


@pytest.mark.parametrize("seed", range(6))
def test_the_scan_equals_brute_force_on_random_losses(seed):
    """Whatever the losses (here random, with failing prefixes that fail on random example
    subsets), the answer is the first n whose mean loss is within the target."""
    gen = torch.Generator().manual_seed(seed)
    n_max, n_examples, target = 60, 48, 0.15
    table = torch.rand(n_max + 1, n_examples, generator=gen) * 0.1
    bad = torch.rand(n_max + 1, n_examples, generator=gen) < 0.3
    table[bad] += torch.rand(int(bad.sum()), generator=gen) * 2
    passing = (table.double().mean(1) <= target).nonzero().flatten().tolist()
    got = smallest_passing_prefix(table_losses(table, []), n_max, n_examples, target)
    assert got == (passing[0] if passing else None)


def test_a_bad_starting_order_corrects_itself_after_one_chunk():
    """Prefixes short of the answer fail on the last 6 of 96 examples only (as on for_while,
    where the probe's order put them late): the first chunk reads everything, then the examples
    it found hard come first and every later prefix is dropped after the first batch of 8."""
    n_examples, answer = 96, 50
    table = torch.zeros(answer + 1, n_examples)
    table[:answer, -6:] = 4.0
    asked = []
    assert smallest_passing_prefix(table_losses(table, asked), answer, n_examples, 0.15) == answer
    first_chunk = 4 * n_examples
    assert sum(asked) <= first_chunk + (answer - 4) * 8 + n_examples


def test_a_collapsed_mask_is_optimised_again_more_slowly_then_from_spread_taus(model, means, monkeypatch):
    """When the optimised mask (tau > 0) misses the target on the evaluation examples (the
    collapse of `search`'s step 2), the optimisation restarts at a third of the learning rate,
    up to `restarts` times; if the last restart misses too, once more at the first learning rate
    from spread taus (`restart_init_spread`; 0: not at all). The search sizes the circuit on the
    taus of the attempt that met the target."""
    import sparse_lens.search as search
    from sparse_lens.search import restart_schedule

    registry = NodeRegistry.for_model(model)
    planted = prune(model, hand_task(), means=means, steps=150, batch_size=32, lr=0.02, progress=False)
    collapsed = torch.full((registry.n_nodes,), -1.0)  # every node off: chance loss
    good = torch.full((registry.n_nodes,), -1.0)
    good[planted.node_ids] = 1.0
    calls, good_from = [], [3]

    def optimise(model, masker, data, registry, config, spread=0.0):
        calls.append((config.lr, config.steps, spread))
        return collapsed if len(calls) < good_from[0] else good

    monkeypatch.setattr(search, "_optimise_taus", optimise)
    circuit = prune(model, hand_task(), means=means, lr=0.03, progress=False)
    assert calls == [(0.03, 100, 0.0), (0.01, 100, 0.0), (pytest.approx(0.01 / 3), 100, 0.0)]
    assert circuit.node_ids == planted.node_ids and circuit.solved
    calls.clear()
    good_from[0] = 4  # the restarts collapse too: the spread attempt, at the first lr, recovers
    circuit = prune(model, hand_task(), means=means, lr=0.03, steps=20, restart_steps_scale=3, progress=False)
    assert [c[1:] for c in calls] == [(20, 0.0), (60, 0.0), (180, 0.0), (180, 0.9)]
    assert calls[-1][0] == 0.03 and circuit.node_ids == planted.node_ids and circuit.solved
    calls.clear()
    prune(model, hand_task(), means=means, lr=0.03, restarts=0, restart_init_spread=0.5, progress=False)
    assert calls == [(0.03, 100, 0.0), (0.03, 100, 0.5)]
    calls.clear()
    prune(model, hand_task(), means=means, lr=0.03, restarts=1, restart_init_spread=0.0, progress=False)
    assert calls == [(0.03, 100, 0.0), (0.01, 100, 0.0)]  # no third attempt
    with pytest.raises(ValueError, match="restarts"):
        PruneConfig(restarts=-1)
    with pytest.raises(ValueError, match="restart_steps_scale"):
        PruneConfig(restart_steps_scale=0)
    for spread in (-0.5, 2.5):
        with pytest.raises(ValueError, match="restart_init_spread"):
            PruneConfig(restart_init_spread=spread)
    schedule = restart_schedule(PruneConfig(lr=0.03, steps=10, restart_steps_scale=2))
    assert schedule == [(0.01, 20, 0.0), (pytest.approx(0.01 / 3), 40, 0.0), (0.03, 40, 0.9)]
    assert restart_schedule(PruneConfig(restarts=0, restart_init_spread=0.0)) == []


def test_when_every_attempt_misses_the_search_sizes_on_the_closest_one(model, means, monkeypatch):
    """If no attempt's mask meets the target, the circuit is sized on the taus of the attempt
    whose mask came closest (here the first restart's), not on the last one's."""
    import sparse_lens.search as search

    registry = NodeRegistry.for_model(model)
    planted = prune(model, hand_task(), means=means, steps=150, batch_size=32, lr=0.02, progress=False)
    attempts = [torch.full((registry.n_nodes,), -1.0) for _ in range(4)]
    attempts[1][planted.node_ids] = 1.0  # the closest: its taus order the planted nodes first
    mask_losses = [0.9, 0.5, 0.7, 0.6]  # what each attempt's mask scores on the evaluation examples
    returned = list(attempts)
    monkeypatch.setattr(search, "_optimise_taus", lambda *args, **kwargs: returned.pop(0))
    monkeypatch.setattr(search, "_hard_mask_loss", lambda *args: mask_losses[3 - len(returned)])
    circuit = prune(model, hand_task(), means=means, progress=False)
    assert not returned and torch.equal(circuit.tau, attempts[1])
    assert circuit.losses["optimised_mask"] == 0.5
    assert circuit.node_ids == planted.node_ids and circuit.solved


def test_spread_taus_are_seeded_and_lie_above_init_tau(model):
    """`initial_taus`: every tau at `init_tau` without a spread (the paper's start); with one,
    init_tau + spread * U(0, 1), clamped to [-1, 1]: the same draw for the same seed, another for
    another seed."""
    from sparse_lens.search import initial_taus

    registry = NodeRegistry.for_model(model)
    config = PruneConfig(init_tau=0.1, seed=3)
    assert torch.equal(initial_taus(registry, config), torch.full((registry.n_nodes,), 0.1))
    spread = initial_taus(registry, config, 0.5)
    assert spread.shape == (registry.n_nodes,) and torch.equal(spread, initial_taus(registry, config, 0.5))
    assert 0.1 <= float(spread.min()) and float(spread.max()) <= 0.6 and float(spread.std()) > 0.1
    assert not torch.equal(spread, initial_taus(registry, PruneConfig(init_tau=0.1, seed=4), 0.5))
    clamped = initial_taus(registry, PruneConfig(init_tau=0.9), 2.0)
    assert float(clamped.max()) == 1.0 and float(clamped.min()) >= 0.9


def test_refine_leaves_a_circuit_no_single_node_can_leave(model, means):
    """From a prefix of a shuffled order (the planted nodes spread out, many idle nodes kept),
    `drop_redundant` keeps the planted nodes, still meets the target, and dropping any one of
    its nodes misses it; `refine=True` does the same inside `prune`."""
    from sparse_lens.search import drop_redundant

    registry, data = NodeRegistry.for_model(model), hand_task(n=16)
    order = torch.randperm(registry.n_nodes, generator=torch.Generator().manual_seed(2))
    config = PruneConfig(target_loss=0.3, progress=False)
    planted = prune(model, hand_task(), means=means, steps=150, batch_size=32, lr=0.02, progress=False)
    with masked_nodes(model, registry, torch.ones(registry.n_nodes), means) as masker:
        n, _ = _search(model, masker, data, order, registry, config)
        kept = drop_redundant(model, masker, data, order[:n], registry, 0.3, chunk=4)

        def loss(ids):
            mask = torch.zeros(registry.n_nodes)
            mask[ids] = 1.0
            return pair_loss(final_logit_pairs(model, data, masker, mask))

        assert len(kept) < n and set(planted.node_ids) <= set(kept.tolist())
        assert set(kept.tolist()) <= set(order[:n].tolist()) and loss(kept) <= 0.3
        for i in range(len(kept)):
            assert loss(torch.cat([kept[:i], kept[i + 1:]])) > 0.3
    refined = prune(model, hand_task(), means=means, steps=150, batch_size=32, lr=0.02, refine=True,
                    progress=False)
    assert refined.node_ids == planted.node_ids and refined.solved  # nothing redundant to drop there


def test_a_collapse_no_restart_recovers_is_scanned_exactly_up_to_a_bound_then_bisected(model, means, monkeypatch):
    """When every attempt's mask misses the target (a collapse the restarts did not recover), the
    exact scan tries prefixes up to `EXACT_NODES_AFTER_COLLAPSE` nodes and a bisection sizes the
    circuit past that, with a warning. Here the planted nodes sit at positions 5.. of a collapsed
    tau order (every tau < 0): the bisection finds the same circuit the exact scan does, and
    `losses["optimised_mask"]` records the collapsed mask's loss."""
    import sparse_lens.search as search

    registry = NodeRegistry.for_model(model)
    planted = prune(model, hand_task(), means=means, steps=150, batch_size=32, lr=0.02, progress=False)
    assert planted.losses["optimised_mask"] <= planted.config.target_loss
    others = [i for i in range(registry.n_nodes) if i not in planted.node_ids]
    order = others[:5] + planted.node_ids + others[5:]
    collapsed = torch.empty(registry.n_nodes)
    collapsed[order] = -torch.linspace(0.1, 1.0, registry.n_nodes)  # descending along `order`
    monkeypatch.setattr(search, "_optimise_taus", lambda *args, **kwargs: collapsed)
    answer = 5 + len(planted.node_ids)

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the bound is above the answer: exact, no warning
        exact = prune(model, hand_task(), means=means, progress=False)
    assert exact.n_nodes == answer and exact.solved
    assert exact.losses["optimised_mask"] > exact.config.target_loss  # nothing kept: chance

    monkeypatch.setattr(search, "EXACT_NODES_AFTER_COLLAPSE", 3)
    with pytest.warns(UserWarning, match="upper bound, not the smallest"):
        bisected = prune(model, hand_task(), means=means, progress=False)
    assert bisected.node_ids == exact.node_ids and bisected.solved
    assert all(n > 3 for n, _ in bisected.bisection)  # the bisection looked past the scan's bound only
