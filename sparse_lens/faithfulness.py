"""Can this circuit be trusted? Checks beyond "the circuit alone keeps the loss, ablating it
destroys it" (`Circuit.verify`), one table row each, with its number and a plain verdict.

=======================  ========================================================================
check                    what it measures; when it passes
=======================  ========================================================================
nonsense control         the same search (same config and ablation mode) on the same prompts with
                         their answers shuffled across prompts, optimised and bisected on those
                         prompts: the smallest circuit under the target. Passes when none is found,
                         or it has more than `control_ratio` times the circuit's nodes. A search
                         that fits nonsense with as few nodes says little about the real circuit.
random-model control     the same search on the task, on a freshly initialised model of the same
                         config and weight sparsity. Passes on the same rule.
partial restoration      put back the true activations of a random `restore_fraction` of the
                         pruned nodes (`draws` draws) and measure the task loss. A faithful circuit
                         keeps its loss whichever nodes come back; one that relies on ablations
                         that cancel (or on a node's ablated value) does not. Passes when at most
                         `max_broken` of the draws exceed the *keep threshold*: the larger of the
                         target and the circuit's own loss, plus `tolerance`.
interchange              pairs of held-out prompts of opposite class and equal token length: run
                         the full model on one with the circuit's nodes patched from the other.
                         Value: how often the answer follows the patched prompt's class;
                         reference: how often the full model answers the other prompt right.
                         Passes at `interchange_ratio` of the reference or more.
ablation: MODE           the circuit's task loss with everything else ablated in each mode of
                         `sparse_lens.ablation`. Passes under the keep threshold.
=======================  ========================================================================

The controls run two more searches (seconds on the unit tests' models, minutes on `small`);
`controls=False` skips them. Losses are the task loss (mean binary CE over the two candidates,
nats; chance is ln 2 = 0.693), uncalibrated, on held-out (test split) prompts except the nonsense
control's, which is fitted and scored on its own prompts as the search would be.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import pandas as pd
import torch
from jaxtyping import Int

from sparse_lens.ablation import ABLATION_MODES, Ablation, ablated_nodes
from sparse_lens.hooks import keep_mask_from_ids
from sparse_lens.search import PruneConfig, prune_task_data, search_nodes
from sparse_lens.task_loss import answer_pairs, final_logit_pairs, pair_loss

COLUMNS = ("check", "value", "reference", "passed", "verdict", "detail")


@dataclass(kw_only=True)
class FaithfulnessConfig:
    """How to check. Defaults keep the run short on a CPU; raise `n` and `draws` for tighter
    numbers."""

    n: int = 128  # held-out prompts for restoration, interchange and the ablation modes
    draws: int = 16  # partial-restoration draws
    restore_fraction: float = 0.5  # share of the pruned nodes each draw puts back
    tolerance: float = 0.05  # nats above max(target, circuit loss) that still count as kept
    max_broken: float = 0.1  # share of restoration draws allowed over the keep threshold
    interchange_ratio: float = 0.9  # patched follow rate / the full model's, at least
    control_ratio: float = 2.0  # a control circuit must be more than this times larger
    controls: bool = True  # run the nonsense and random-model searches
    control_steps: int | None = None  # their optimisation steps (default: the circuit's)
    control_mean_tokens: int = 1 << 14  # corpus tokens for the random model's node means
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("n", "draws", "control_mean_tokens"):
            if not (isinstance(getattr(self, name), int) and getattr(self, name) >= 1):
                raise ValueError(f"FaithfulnessConfig.{name} must be an integer >= 1; got {getattr(self, name)!r}")
        if not 0.0 < self.restore_fraction < 1.0:
            raise ValueError(f"FaithfulnessConfig.restore_fraction must be in (0, 1); got {self.restore_fraction!r}")
        if not (self.tolerance >= 0 and 0 <= self.max_broken < 1 and self.interchange_ratio > 0
                and self.control_ratio >= 1):
            raise ValueError("FaithfulnessConfig: tolerance >= 0, max_broken in [0, 1), "
                             "interchange_ratio > 0 and control_ratio >= 1 are required")


def faithfulness(circuit, config: FaithfulnessConfig | None = None, corpus_tokens=None,
                 **overrides) -> pd.DataFrame:
    """The faithfulness table of `circuit` (see the module docstring): columns check, value,
    reference, passed, verdict, detail. The restoration draws' losses are in
    `table.attrs["restoration_losses"]`. `corpus_tokens`: the token stream the random model's
    node means come from (default: the standard-library corpus; only for `mean` ablation)."""
    config = dataclasses.replace(config or FaithfulnessConfig(), **overrides)
    if circuit.full_model_misses_target:
        raise ValueError(f"the full model misses the target on {circuit.task!r}: there is no "
                         "circuit to check")
    model = circuit.model
    was_training = model.training
    model.eval()
    try:
        test = circuit.task_data(split="test", n=config.n, seed=config.seed)
        modes = mode_losses(circuit, test, config)
        keep = max(_target(circuit), modes[circuit.ablation_mode]) + config.tolerance
        rows = []
        if config.controls:
            rows += [nonsense_row(circuit, config), random_model_row(circuit, config, corpus_tokens)]
        losses = restoration_losses(circuit, test, config)
        rows += [restoration_row(losses, keep, config), interchange_row(circuit, test, config)]
        rows += [mode_row(circuit, mode, loss, keep) for mode, loss in modes.items()]
    finally:
        model.train(was_training)
    table = pd.DataFrame(rows, columns=list(COLUMNS))
    table.attrs["restoration_losses"] = losses
    return table


def _target(circuit) -> float:
    return getattr(circuit.config, "target_loss", PruneConfig().target_loss)


def _row(check, value, reference, passed, verdict, detail="") -> dict:
    return dict(check=check, value=value, reference=reference, passed=passed, verdict=verdict,
                detail=detail)


# ---------------------------------------------------------------------- controls
def shuffled_answers(data, seed: int = 0):
    """`data` with its (correct, contrast) pairs permuted across prompts: nonsense answers with
    the same tokens and balance."""
    perm = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))
    return dataclasses.replace(
        data, name=f"{data.name}_shuffled", description=f"{data.name} with shuffled answers",
        correct=data.correct[perm.to(data.correct.device)],
        contrast=data.contrast[perm.to(data.contrast.device)],
        correct_str=[data.correct_str[i] for i in perm.tolist()],
        contrast_str=[data.contrast_str[i] for i in perm.tolist()], labels=None)


def control_search(model, task, circuit, config: FaithfulnessConfig, means) -> tuple[int | None, float]:
    """The circuit's search, forced to run, on `model` and `task` (a name or a TaskData):
    (nodes of the smallest circuit under the target or None, the best loss it evaluated)."""
    prune_config = circuit.config if isinstance(circuit.config, PruneConfig) else PruneConfig()
    steps = config.control_steps or prune_config.steps
    search = dataclasses.replace(prune_config, force_search=True, progress=False, steps=steps,
                                 seed=prune_config.seed + config.seed)
    _, train, evaluate, _ = prune_task_data(model, task, search)
    found = search_nodes(model, train, evaluate, means, search)
    best = min([loss for _, loss in found.curve] + [found.losses["circuit"]])
    reached = found.losses["circuit"] <= prune_config.target_loss
    return (len(found.node_ids) if reached else None), best


def _control_row(check: str, circuit, nodes: int | None, best: float, config, what: str) -> dict:
    real = circuit.n_nodes
    if nodes is None:
        return _row(check, math.nan, real, True,
                    f"pass: the search finds no circuit under the target for {what}",
                    f"best task loss reached {best:.4f} (target {_target(circuit)})")
    passed = nodes > config.control_ratio * real
    verdict = (f"pass: {what} needs {nodes / max(real, 1):.1f}x the nodes" if passed else
               f"FLAG: the same search fits {what} with {nodes} nodes (the circuit: {real}); "
               "the circuit's small size says little")
    return _row(check, nodes, real, passed, verdict, f"best task loss {best:.4f}")


def nonsense_row(circuit, config: FaithfulnessConfig) -> dict:
    prune_config = circuit.config if isinstance(circuit.config, PruneConfig) else PruneConfig()
    data = circuit.data if circuit.data is not None else circuit.task_data(
        split="train", n=prune_config.n_eval, seed=prune_config.seed + 1)
    nonsense = shuffled_answers(data.to(circuit.model.cfg.device), seed=config.seed)
    nodes, best = control_search(circuit.model, nonsense, circuit, config, circuit.means)
    return _control_row("nonsense control (nodes)", circuit, nodes, best, config,
                        "shuffled answers")


def fresh_model(model, seed: int = 0):
    """A newly initialised model of `model`'s config (its weight sparsity applied), without
    touching the global random state."""
    from sparse_lens.model import SparseHookedTransformer

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        fresh = SparseHookedTransformer(model.cfg, tokenizer=model.tokenizer)
        if model.cfg.is_weight_sparse:
            fresh.project_weights_()
    return fresh.eval()


def random_model_row(circuit, config: FaithfulnessConfig, corpus_tokens=None) -> dict:
    from sparse_lens.hooks import NodeRegistry, compute_node_means

    model = fresh_model(circuit.model, seed=1000 + config.seed)
    if circuit.ablation_mode == "mean":
        if corpus_tokens is None:
            from sparse_lens.data import default_cache_dir, load_corpus

            corpus_tokens = load_corpus(None, model.tokenizer, cache_dir=default_cache_dir()).train
        means = compute_node_means(model, NodeRegistry.for_model(model), corpus_tokens,
                                   n_tokens=config.control_mean_tokens)
    else:  # zero, task_mean and resample do not read the corpus means
        means = torch.zeros_like(circuit.means)
    task = circuit.data if circuit.data is not None else circuit.task
    nodes, best = control_search(model, task, circuit, config, means)
    return _control_row("random-model control (nodes)", circuit, nodes, best, config,
                        "the task on a freshly initialised model")


# ---------------------------------------------------------------------- restoration
def restoration_losses(circuit, data, config: FaithfulnessConfig) -> list[float]:
    """Task loss of the circuit plus a random `restore_fraction` of its pruned nodes (their
    true activations back), one per draw, in the circuit's ablation mode."""
    reg, model = circuit.registry, circuit.model
    pruned = torch.tensor(sorted(set(range(reg.n_nodes)) - set(circuit.node_ids)), dtype=torch.long)
    k = round(config.restore_fraction * len(pruned))
    gen = torch.Generator().manual_seed(config.seed)
    losses = []
    with ablated_nodes(model, reg, torch.ones(reg.n_nodes), circuit.ablation) as masker:
        for _ in range(config.draws):
            back = pruned[torch.randperm(len(pruned), generator=gen)[:k]]
            mask = keep_mask_from_ids(reg, circuit.node_ids + back.tolist(), device=model.cfg.device)
            losses.append(pair_loss(final_logit_pairs(model, data, masker, mask)))
    return losses


def restoration_row(losses: list[float], keep: float, config: FaithfulnessConfig) -> dict:
    t = torch.tensor(losses)
    broken = int((t > keep).sum())
    passed = broken <= config.max_broken * len(losses)
    q = torch.quantile(t, torch.tensor([0.0, 0.1, 0.5, 0.9, 1.0])).tolist()
    verdict = (f"pass: {broken} of {len(losses)} draws above {keep:.4f}" if passed else
               f"FLAG: {broken} of {len(losses)} draws lose the task (loss above {keep:.4f}): the "
               "circuit relies on how the rest is ablated")
    detail = (f"{config.restore_fraction:.0%} of the pruned nodes restored; loss min {q[0]:.4f}, "
              f"p10 {q[1]:.4f}, median {q[2]:.4f}, p90 {q[3]:.4f}, max {q[4]:.4f}")
    return _row("partial restoration (median loss)", q[2], keep, passed, verdict, detail)


# ---------------------------------------------------------------------- interchange
def interchange_pairs(data, seed: int = 0) -> tuple[Int[torch.Tensor, " n_pairs"], Int[torch.Tensor, " n_pairs"]]:
    """(base, source) prompt indices: each prompt with a randomly chosen prompt of the other
    class and the same token length; prompts without one are left out. The class is `labels`,
    or the correct token when there are no labels."""
    classes = (data.labels if data.labels is not None else data.correct).tolist()
    lengths = data.last_pos.tolist()
    gen = torch.Generator().manual_seed(seed)
    base, source = [], []
    for i, (c, n) in enumerate(zip(classes, lengths)):
        others = [j for j, (cj, nj) in enumerate(zip(classes, lengths)) if nj == n and cj != c]
        if others:
            base.append(i)
            source.append(others[int(torch.randint(len(others), (), generator=gen))])
    return torch.tensor(base, dtype=torch.long), torch.tensor(source, dtype=torch.long)


@torch.no_grad()
def interchange_rates(circuit, data, seed: int = 0, batch_size: int = 32) -> dict:
    """Over the `interchange_pairs`: `patched`, the share of base prompts whose answer follows
    the source prompt's class (its correct token over its contrast) when the circuit's nodes are
    patched from the source; `full`, the share of sources the full model answers right;
    `unpatched`, the share of bases that already prefer the source's answer; `pairs`."""
    base_idx, source_idx = interchange_pairs(data, seed)
    if len(base_idx) == 0:
        return dict(patched=math.nan, full=math.nan, unpatched=math.nan, pairs=0)
    reg, model = circuit.registry, circuit.model
    follows = {"patched": [], "full": [], "unpatched": []}
    with ablated_nodes(model, reg, 1 - circuit.mask, circuit.ablation) as masker:
        for start in range(0, len(base_idx), batch_size):
            base = data[base_idx[start:start + batch_size]]
            source = data[source_idx[start:start + batch_size]]
            # equal lengths: the source's last position and candidates apply to the base's run
            runs = dict(patched=masker.logits(model, base, donors=source))
            with masker.using(torch.ones(reg.n_nodes, device=model.cfg.device)):
                runs.update(full=model(source.tokens), unpatched=model(base.tokens))
            for key, logits in runs.items():
                pairs = answer_pairs(logits, source)
                follows[key].append(pairs[:, 0] > pairs[:, 1])
    rates = {k: torch.cat(v).float().mean().item() for k, v in follows.items()}
    return dict(rates, pairs=len(base_idx))


def interchange_row(circuit, data, config: FaithfulnessConfig) -> dict:
    r = interchange_rates(circuit, data, seed=config.seed)
    if r["pairs"] == 0:
        return _row("interchange (follow rate)", math.nan, math.nan, None,
                    "not run: no two prompts of opposite class have the same length")
    passed = r["patched"] >= config.interchange_ratio * r["full"]
    verdict = (f"pass: the answer follows the patched prompt {r['patched']:.0%} of the time "
               f"(full model {r['full']:.0%})" if passed else
               f"FLAG: patching the circuit moves the answer {r['patched']:.0%} of the time, the "
               f"full model follows its input {r['full']:.0%}: the circuit does not carry the decision")
    detail = f"{r['pairs']} pairs; unpatched already {r['unpatched']:.0%}"
    return _row("interchange (follow rate)", r["patched"], r["full"], passed, verdict, detail)


# ---------------------------------------------------------------------- ablation modes
def mode_losses(circuit, data, config: FaithfulnessConfig) -> dict[str, float]:
    """The circuit's task loss on `data` with everything else ablated in each mode (task
    means over the training prompts the search used)."""
    train = None
    out = {}
    reg, model = circuit.registry, circuit.model
    for mode in ABLATION_MODES:
        if mode == circuit.ablation_mode:
            ablation = circuit.ablation
        else:
            if mode in ("task_mean", "resample") and train is None:
                n_train = getattr(circuit.config, "n_train", 512)
                train = circuit.task_data(split="train", n=n_train, seed=getattr(circuit.config, "seed", 0))
            ablation = Ablation.build(mode, model, circuit.means, train, seed=config.seed)
        with ablated_nodes(model, reg, circuit.mask, ablation) as masker:
            out[mode] = pair_loss(final_logit_pairs(model, data, masker))
    return out


def mode_row(circuit, mode: str, loss: float, keep: float) -> dict:
    found = " (found with it)" if mode == circuit.ablation_mode else ""
    passed = loss <= keep
    verdict = (f"pass: keeps the task{found}" if passed else
               f"FLAG: the circuit loses the task under {mode} ablation{found}")
    return _row(f"ablation: {mode}", loss, keep, passed, verdict,
                "task loss of the circuit alone; reference: the keep threshold")


def summary(table: pd.DataFrame) -> str:
    """One line: how many checks pass, and which flag the circuit."""
    ran = table[table.passed.notna()]
    flagged = ran[~ran.passed.astype(bool)].check.tolist()
    return (f"{int(ran.passed.astype(bool).sum())} of {len(ran)} checks pass"
            + (f"; flagged: {', '.join(flagged)}" if flagged else ""))
