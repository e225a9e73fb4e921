"""The circuit search (Gao et al. 2025, section 2.2), on the hooks of `sparse_lens.hooks`:
1. one learnable logit `tau` per node (init `init_tau`, clamped to [-1, 1]); the forward pass
   uses the Heaviside step `tau > 0` as the node's mask, the backward pass the sigmoid's
   derivative (a straight-through surrogate);
2. minimise `task_loss + k_coef * (number of nodes kept)` with AdamW on the taus, gradient
   clipping, for `steps` batches of the task's training examples. At our fast learning rate
   (10x the paper's 3e-3, for 100 steps instead of its 2,000) the taus of the nodes the task
   barely needs all cross zero within a few steps; on some tasks that collapse drops a chain of
   nodes the task needs, which no single node's gradient can bring back (the `wide` model's
   `indent_for`: 62 nodes kept at task loss 0.74). So when the optimised mask (`tau > 0`) misses
   the target on the evaluation examples, the optimisation starts again at a third of the
   learning rate, up to `restarts` times. That does not always help: Adam moves every node the
   penalty alone pushes by the same step, so from one shared initial value they all cross zero in
   the same step at any learning rate (on a mid-anneal `wide` snapshot, all three attempts
   collapsed on two tasks). So if the last restart's mask misses the target too, one more
   optimisation runs at `lr` from taus drawn from `init_tau + restart_init_spread * U(0, 1)`
   (seeded): the nodes then cross zero one after another over about `restart_init_spread / lr`
   steps, and as nodes drop, the task gradient holds up the ones the task comes to depend on.
   If every attempt misses, the search goes on with the taus of the one whose mask came closest;
3. order nodes by tau, and find the smallest number kept whose circuit has task loss at most
   `target_loss` on fixed evaluation examples: exactly, by trying every prefix of the tau order
   in turn (many at once, dropping each as soon as its loss is known to exceed the target;
   `scan.smallest_passing_prefix`), because the loss-vs-prefix curve is not monotone. If the
   closest attempt's mask still misses the target (the collapse outlived every restart), the order
   past its kept nodes is one the optimisation did not learn (thousands of taus tied at the
   clamp), the answer can be thousands of nodes, and trying every prefix up to it ran for over
   13 minutes on one task (the 40,000-step `wide` run's `indent_for`). Then the exact scan stops
   at `EXACT_NODES_AFTER_COLLAPSE` nodes and a bisection sizes the circuit past that, with a
   warning: such a circuit is an upper bound, not the smallest. `Circuit.losses["optimised_mask"]`
   (that attempt's mask's task loss) shows when that happened;
4. optionally (`refine=True`, not the paper's) drop the found circuit's nodes one at a time,
   lowest tau first, while it still meets the target on the evaluation examples, in passes
   until no single node can leave (`scan.drop_redundant`): the tau order is a ranking learned
   under a per-node penalty, and its smallest passing prefix still holds nodes the others make
   redundant;
5. optionally fit a scale and per-candidate-token bias on the final logits with LBFGS
   (`calibrate=True`).

`search_nodes` runs it and returns a `SearchResult`; `pruning.prune` wraps that in a `Circuit`,
and the faithfulness controls run it on nonsense tasks and fresh models.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from dataclasses import dataclass

import torch
from jaxtyping import Float
from tqdm.auto import tqdm

from sparse_lens import tasks
from sparse_lens.ablation import Ablation, ablated_nodes, check_mode
from sparse_lens.hooks import NodeRegistry
from sparse_lens.scan import (  # noqa: F401  (ExampleLosses, growing_slices, first_passing: re-exported)
    ExampleLosses, _prefix_losses, drop_redundant, first_passing, growing_slices, hardest_first,
    smallest_passing_prefix,
)
from sparse_lens.sparse_kernels import sparse_matmuls
from sparse_lens.task_loss import (
    Calibration, by_length, calibrated_loss, final_logit_pairs, fit_calibration, pair_loss,
)

#: After a collapse no restart recovered (module docstring, step 3), the exact scan tries prefixes
#: up to this many nodes, and a bisection sizes the circuit past that.
EXACT_NODES_AFTER_COLLAPSE = 512


@dataclass(kw_only=True)
class PruneConfig:
    """How to prune. Defaults suit the `small` preset on a 2-core CPU."""

    target_loss: float = 0.15  # mean binary CE over the two candidates, nats
    k_coef: float = 1e-3  # penalty per kept node (1e-4 left circuits 1.8-8.5x larger; 3e-3: the demo's, README)
    steps: int = 100
    batch_size: int = 32
    lr: float = 3e-2
    init_tau: float = 0.1
    grad_clip: float = 1.0
    restarts: int = 2  # re-optimise at lr / 3 when the optimised mask misses the target (step 2)
    restart_steps_scale: int = 1  # each restart runs this many times the previous attempt's steps
    # if the last restart misses too: one more attempt from taus init_tau + spread * U(0, 1) (step 2);
    # 0 = none
    restart_init_spread: float = 0.9
    n_train: int = 512  # task examples to optimise on
    n_eval: int = 128  # fixed examples the bisection evaluates (train split, another seed)
    calibrate: bool = False
    refine: bool = False  # then drop nodes one at a time while the target holds (search step 4)
    level: str = "core"  # task level of a named task ("core" or "hard"; `tasks.get_task`)
    source: str = "generated"  # or "corpus": real instances (`tasks.CORPUS_TASKS` only)
    seed: int = 0
    mean_tokens: int = 1 << 16  # tokens the node means average over (if not cached)
    ablation: str = "mean"  # what pruned nodes take: mean, zero, task_mean, resample
    force_search: bool = False  # search even when the full model misses the target (controls)
    progress: bool = True
    # CSR matmuls for the frozen weights (`sparse_kernels.sparse_matmuls`): True, False, or
    # "auto" = only where measured faster (achieved density <= sparse_kernels.AUTO_MAX_DENSITY)
    sparse_kernels: bool | str = "auto"

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "n_train", "n_eval", "mean_tokens"):
            if not (isinstance(getattr(self, name), int) and getattr(self, name) >= 1):
                raise ValueError(f"PruneConfig.{name} must be an integer >= 1; got {getattr(self, name)!r}")
        if not (isinstance(self.restarts, int) and self.restarts >= 0):
            raise ValueError(f"PruneConfig.restarts must be an integer >= 0; got {self.restarts!r}")
        if not (isinstance(self.restart_steps_scale, int) and self.restart_steps_scale >= 1):
            raise ValueError(f"PruneConfig.restart_steps_scale must be an integer >= 1; "
                             f"got {self.restart_steps_scale!r}")
        if not (self.target_loss > 0 and math.isfinite(self.target_loss)):
            # inf would make every circuit "solve" the task, down to no node at all
            raise ValueError(f"PruneConfig.target_loss must be finite and > 0; got {self.target_loss!r}")
        if not (self.k_coef >= 0 and self.lr > 0 and self.grad_clip > 0):
            raise ValueError("PruneConfig.k_coef must be >= 0, lr and grad_clip > 0")
        if self.level not in tasks.LEVELS or self.source not in tasks.SOURCES:
            raise ValueError(f"PruneConfig.level must be one of {tasks.LEVELS} and source one of "
                             f"{tasks.SOURCES}; got {self.level!r}, {self.source!r}")
        if self.sparse_kernels not in (True, False, "auto"):
            raise ValueError(f"PruneConfig.sparse_kernels must be True, False or 'auto'; got {self.sparse_kernels!r}")
        if not -1.0 <= self.init_tau <= 1.0:
            raise ValueError(f"PruneConfig.init_tau must be in [-1, 1]; got {self.init_tau!r}")
        if not 0.0 <= self.restart_init_spread <= 2.0:  # the taus are clamped to [-1, 1]
            raise ValueError(f"PruneConfig.restart_init_spread must be in [0, 2]; "
                             f"got {self.restart_init_spread!r}")
        try:
            check_mode(self.ablation)
        except ValueError as err:
            raise ValueError(f"PruneConfig.ablation: {err}") from None


def heaviside_ste(tau: Float[torch.Tensor, " n"]) -> Float[torch.Tensor, " n"]:
    """`(tau > 0)` in the forward pass; gradient of `sigmoid(tau)` in the backward pass."""
    soft = torch.sigmoid(tau)
    return (tau > 0).to(tau.dtype) + soft - soft.detach()



def prune_task_data(model, task, config: PruneConfig):
    """`(name, train, eval, custom)` for a search on `task`: a task name (its train split at
    `config.level` from `config.source`, `n_train` examples to optimise on and `n_eval` others
    to size the circuit on) or a hand-made `TaskData` (used for both; also returned as
    `custom`)."""
    device, n_ctx = model.cfg.device, model.cfg.n_ctx
    if not isinstance(task, str):  # a hand-made TaskData: optimise and bisect on it
        custom = task.check_fits(n_ctx).to(device)
        return task.name, custom, custom, custom
    kind = dict(level=config.level, source=config.source, n_ctx=n_ctx)
    train = tasks.get_task(task, model.tokenizer, n=config.n_train, seed=config.seed, **kind).to(device)
    evaluate = tasks.get_task(task, model.tokenizer, n=config.n_eval, seed=config.seed + 1, **kind).to(device)
    return task, train, evaluate, None


@dataclass(frozen=True)
class SearchResult:
    """What `search_nodes` found: the kept node ids (sorted), the learned taus (None when the
    full model misses the target and nothing was searched), the evaluated `(n, loss)` points,
    the losses (`full_model`, `circuit`), the calibration, and the ablation it used."""

    node_ids: list[int]
    tau: torch.Tensor | None
    curve: list[tuple[int, float]]
    losses: dict[str, float]
    calibration: Calibration | None
    solved: bool
    ablation: Ablation


def search_nodes(model, train_data, eval_data, means, config: PruneConfig) -> SearchResult:
    """Steps 1-4 on `model` (see the module docstring). If the full model misses the target on
    `eval_data`, nothing is optimised: every node is kept and `solved` is False. With
    `force_search` (the faithfulness controls) the search runs anyway, and the bisection looks
    for the smallest circuit within the optimised mask's own nodes."""
    registry = NodeRegistry.for_model(model)
    was_training = model.training
    model.eval()
    try:
        ablation = Ablation.build(config.ablation, model, means, train_data, seed=config.seed)
        with sparse_matmuls(model, config.sparse_kernels), \
                ablated_nodes(model, registry, torch.ones(registry.n_nodes), ablation) as masker:
            full_pairs = final_logit_pairs(model, eval_data, masker)
            full_misses = pair_loss(full_pairs) > config.target_loss
            if full_misses and not config.force_search:
                # the full model does not solve the task: report it, do not force a circuit
                tau, kept, curve = None, torch.arange(registry.n_nodes), []
            else:
                tau, kept, curve, optimised_loss = _optimise_and_size(
                    model, masker, train_data, eval_data, registry, config, full_misses)
            mask = torch.zeros(registry.n_nodes)
            mask[kept] = 1.0
            pairs = final_logit_pairs(model, eval_data, masker, mask.to(model.cfg.device))
    finally:
        model.train(was_training)
    calibration = fit_calibration(pairs, eval_data) if config.calibrate else None
    losses = dict(full_model=pair_loss(full_pairs), circuit=calibrated_loss(pairs, eval_data, calibration))
    if tau is not None:
        losses["optimised_mask"] = optimised_loss
    solved = losses["full_model"] <= config.target_loss and losses["circuit"] <= config.target_loss
    return SearchResult(sorted(kept.tolist()), tau, curve, losses, calibration, solved, ablation)


def _optimise_and_size(model, masker, train_data, eval_data, registry, config, full_misses):
    """Steps 2 and 3: `(tau, kept node ids in tau order, curve, the optimised mask's task loss
    on the evaluation examples)`."""
    tau = _optimise_taus(model, masker, train_data, registry, config)
    optimised_loss = _hard_mask_loss(model, masker, eval_data, tau)
    for lr, steps, spread in [] if full_misses else restart_schedule(config):  # the controls never restart
        if optimised_loss <= config.target_loss:
            break
        retried = _optimise_taus(model, masker, train_data, registry,
                                 dataclasses.replace(config, lr=lr, steps=steps), spread=spread)
        retried_loss = _hard_mask_loss(model, masker, eval_data, retried)
        if retried_loss <= optimised_loss:  # if every attempt misses, size on the closest one's taus
            tau, optimised_loss = retried, retried_loss
    order = torch.argsort(tau.detach().cpu(), descending=True, stable=True)
    if full_misses or config.ablation == "resample":
        # the controls' search within the optimised nodes; resampling needs the masker's own
        # batches, which the exact search's stacked rows are not
        limit = int((tau > 0).sum()) if full_misses else None
        n_kept, curve = _bisect(model, masker, eval_data, order, registry, config, limit)
    else:
        collapsed = optimised_loss > config.target_loss
        n_kept, curve = _search(model, masker, eval_data, order, registry, config,
                                exact_up_to=EXACT_NODES_AFTER_COLLAPSE if collapsed else None)
        if collapsed and n_kept > EXACT_NODES_AFTER_COLLAPSE:
            spread_note = " and one from spread taus" if config.restart_init_spread else ""
            warnings.warn(
                f"pruning {eval_data.name}: the optimised mask ({int((tau > 0).sum())} nodes) still misses "
                f"the target after {config.restarts} restarts{spread_note} (task loss {optimised_loss:.3f} > "
                f"{config.target_loss}); no prefix of its tau order up to {EXACT_NODES_AFTER_COLLAPSE} "
                f"nodes passes, and a bisection sized the circuit at {n_kept} nodes: an upper bound, "
                f"not the smallest. More restarts, restart_steps_scale > 1, another seed or a lower "
                f"k_coef may avoid the collapse.", stacklevel=4)  # at the caller of `pruning.prune`
    kept = order[:n_kept]
    if config.refine and not full_misses and config.ablation != "resample" and n_kept < registry.n_nodes:
        kept = drop_redundant(model, masker, eval_data, kept, registry, config.target_loss)
    return tau, kept, curve, optimised_loss


def restart_schedule(config: PruneConfig) -> list[tuple[float, int, float]]:
    """`(lr, steps, spread)` of each attempt after the first, in the order they run while the
    mask misses the target (module docstring, step 2): `restarts` at a third of the previous
    learning rate, each with `restart_steps_scale` times the previous steps; then, unless
    `restart_init_spread` is 0, one at `lr` from taus spread by it, with the last one's steps."""
    attempts = [(config.lr / 3 ** k, config.steps * config.restart_steps_scale ** k, 0.0)
                for k in range(1, 1 + config.restarts)]
    if config.restart_init_spread:
        last_steps = attempts[-1][1] if attempts else config.steps
        attempts.append((config.lr, last_steps, config.restart_init_spread))
    return attempts


def _hard_mask_loss(model, masker, data, tau) -> float:
    """Task loss on `data` of the mask `tau > 0`."""
    return pair_loss(final_logit_pairs(model, data, masker, (tau > 0).float().to(model.cfg.device)))


def initial_taus(registry: NodeRegistry, config: PruneConfig,
                 spread: float = 0.0) -> Float[torch.Tensor, " n"]:
    """[n_nodes] the taus an optimisation starts from: `init_tau + spread * U(0, 1)`, clamped to
    [-1, 1], drawn from `config.seed` (spread 0: every tau at `init_tau`, the paper's)."""
    tau = torch.full((registry.n_nodes,), float(config.init_tau))
    if spread:
        tau += spread * torch.rand(registry.n_nodes, generator=torch.Generator().manual_seed(config.seed))
    return tau.clamp_(-1.0, 1.0)


def _optimise_taus(model, masker, data, registry: NodeRegistry, config: PruneConfig,
                   spread: float = 0.0) -> torch.Tensor:
    """Step 2: learn one mask logit per node, from `initial_taus(registry, config, spread)`."""
    device = model.cfg.device
    gen = torch.Generator().manual_seed(config.seed)
    tau = initial_taus(registry, config, spread).to(device).requires_grad_(True)
    opt = torch.optim.AdamW([tau], lr=config.lr, weight_decay=0.0)
    requires = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    bar = tqdm(range(config.steps), disable=not config.progress, desc=f"prune {data.name}")
    # each batch is a random window of the length-sorted examples: little padding
    order = by_length(data)
    n_windows = max(len(data) - config.batch_size, 0) + 1
    try:
        for _ in bar:
            start = int(torch.randint(n_windows, (), generator=gen))
            batch = data[order[start:start + config.batch_size]]
            mask = heaviside_ste(tau)
            masker.mask = mask
            task_loss = tasks.task_loss(masker.logits(model, batch), batch)
            loss = task_loss + config.k_coef * mask.sum()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_([tau], config.grad_clip)
            opt.step()
            with torch.no_grad():
                tau.clamp_(-1.0, 1.0)
            bar.set_postfix(task=f"{task_loss.item():.3f}", kept=int((tau > 0).sum()))
    finally:
        for p, r in zip(model.parameters(), requires):
            p.requires_grad_(r)
    return tau.detach().cpu()


def _search(model, masker, data, order, registry: NodeRegistry, config: PruneConfig,
            exact_up_to: int | None = None):
    """Step 3: the smallest `n` such that keeping the `n` highest-tau nodes gives task loss
    <= target on `data` (exactly: `smallest_passing_prefix`; with `calibrate`, a bisection that
    assumes the calibrated loss falls as nodes are added). With `exact_up_to`, prefixes are
    tried exactly up to that many nodes, and if none passes a bisection finds an `n` past it.
    Returns `n` and the evaluated `(n, loss)` points. If even all nodes miss the target,
    returns all nodes."""
    if config.calibrate:
        return _bisect(model, masker, data, order, registry, config)
    device = model.cfg.device
    curve: dict[int, float] = {}

    def loss_at(n: int) -> float:
        mask = torch.zeros(registry.n_nodes, device=device)
        mask[order[:n].to(device)] = 1.0
        curve[n] = pair_loss(final_logit_pairs(model, data, masker, mask))
        return curve[n]

    n_all = registry.n_nodes
    if loss_at(n_all) > config.target_loss:
        return n_all, sorted(curve.items())
    n_max = n_all if exact_up_to is None else min(exact_up_to, n_all)
    shortest = by_length(data)
    probe = _prefix_losses(model, masker, data, order, registry, shortest)
    rows = shortest[hardest_first(probe, len(data), n_max, config.target_loss)]
    example_losses = _prefix_losses(model, masker, data, order, registry, rows)
    n = smallest_passing_prefix(example_losses, n_max, len(data), config.target_loss)
    # the scan sums in another order than `pair_loss`: confirm, moving on past float ties
    while n is not None and n < n_all and loss_at(n) > config.target_loss:
        n = smallest_passing_prefix(example_losses, n_max, len(data), config.target_loss, start=n + 1)
    if n is None and n_max < n_all:  # nothing passes up to n_max: bisect (n_max, n_all]
        n, points = _bisect(model, masker, data, order, registry, config, lo=n_max)
        curve.update(points)
    return (n_all if n is None else n), sorted(curve.items())


def _bisect(model, masker, data, order, registry: NodeRegistry, config: PruneConfig,
            limit: int | None = None, lo: int = 0):
    """Step 3: the smallest `n` in (`lo`, `limit`] (default: all nodes; `n` = 0 too when `lo` is
    0) such that keeping the `n` highest-tau nodes gives task loss <= target (assuming the loss
    falls as nodes are added up to `limit`). Returns `n` and the evaluated `(n, loss)` points.
    If even `limit` nodes miss the target, returns all nodes."""
    device = model.cfg.device
    calibrate = config.calibrate
    curve: dict[int, float] = {}

    def loss_at(n: int) -> float:
        if n not in curve:
            mask = torch.zeros(registry.n_nodes, device=device)
            mask[order[:n].to(device)] = 1.0
            pairs = final_logit_pairs(model, data, masker, mask)
            cal = fit_calibration(pairs, data) if calibrate else None
            curve[n] = calibrated_loss(pairs, data, cal)
        return curve[n]

    hi = registry.n_nodes if limit is None else limit  # invariant: loss_at(hi) <= target
    if loss_at(hi) > config.target_loss:
        return registry.n_nodes, sorted(curve.items())
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if loss_at(mid) <= config.target_loss:
            hi = mid
        else:
            lo = mid
    if hi == 1 and loss_at(0) <= config.target_loss:
        hi = 0
    return hi, sorted(curve.items())