"""Ablation modes and faithfulness checks on two hand-built models whose mechanism is known.

Both start from the `tiny` preset (2 layers, d_model 64; vocabulary cut to 16, AbsTopK off),
with sparse random weights (N(0, 0.02), projected to the preset's L0 1/8) and a planted layer-0
MLP path. The task: the last token is X -> answer A, Y -> answer B; prompts are filler tokens
ending in X or Y. Token embeddings write: +-1 on channel READ and on channel S (X: +, Y: -); the
gate channel C (-2 for every token a task prompt uses, +3 for the corpus-only tokens 8..15);
positions write 6 on channel Z (it keeps the RMS norm nearly constant, so the planted numbers
survive normalisation).

`true`: the task's mechanism is READ -> neurons N+ (fires on X), N- (fires on Y) -> WRITE -> the
  logits of A and B. That 4-node circuit is faithful: every check passes.
`spurious`: the same model plus neurons M+ and M- that read S and write channel W2 (also
  unembedded to A vs B) behind a gate: their input is `S + 4 C + b`, with `b` set so that they
  are alive at C's *corpus mean* and dead at C = 0 and at C's value on task prompts. In the real
  model they never fire on a task prompt. But mean-ablating C switches them on, so
  {S, M+, M-, W2} alone solves the task under mean ablation. It is not how the model works: the
  checks must flag it (partial restoration, interchange, the other ablation modes).
`shared`: as `spurious`, but N+ and N- write W2 too (WRITE is unused): ablating {S, M+, M-, W2}
  now also cuts the real path, so `verify` is wholly fooled (the circuit alone keeps the loss,
  ablating it destroys it, random sets fail). W2 does carry the decision in the real model, so
  interchange rightly passes; partial restoration and the other ablation modes flag it.
"""

import dataclasses
import math

import pytest
import torch

from sparse_lens.ablation import ABLATION_MODES, Ablation, ablated_nodes, derangement, task_means
from sparse_lens.circuit import Circuit
from sparse_lens.config import SparseHookedTransformerConfig
from sparse_lens.faithfulness import (
    FaithfulnessConfig, interchange_pairs, shuffled_answers, summary,
)
from sparse_lens.hooks import NodeRegistry, compute_node_means, keep_mask_from_ids, masked_nodes
from sparse_lens.model import SparseHookedTransformer
from sparse_lens.pruning import PruneConfig, final_logit_pairs, pair_loss, prune
from sparse_lens.tasks import TaskData

X, Y, A, B = 1, 2, 3, 4
FILLERS = (5, 6, 7)
READ, S, C, Z, WRITE, W2 = 3, 10, 20, 30, 7, 40
N_PLUS, N_MINUS, M_PLUS, M_MINUS = 5, 6, 100, 101
VOCAB = 16


def build_model(kind: str) -> SparseHookedTransformer:
    """`kind`: "true", "spurious" or "shared" (see the module docstring)."""
    spurious = kind in ("spurious", "shared")
    cfg = SparseHookedTransformerConfig.preset("tiny", d_vocab=VOCAB, act_topk_locations=(),
                                               device="cpu")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = SparseHookedTransformer(cfg)
    model.project_weights_()
    mlp = model.blocks[0].mlp
    with torch.no_grad():
        planted_channels = [READ, S, C, Z, WRITE, W2]
        model.embed.W_E[:, planted_channels] = 0.0
        model.pos_embed.W_pos[:, planted_channels] = 0.0
        model.embed.W_E[X, [READ, S]], model.embed.W_E[Y, [READ, S]] = 1.0, -1.0
        model.embed.W_E[:8, C], model.embed.W_E[8:, C] = -2.0, 3.0
        model.pos_embed.W_pos[:, Z] = 6.0
        for block in model.blocks:  # nothing else writes the planted channels
            block.attn.W_O[..., planted_channels] = 0.0
            block.mlp.W_out[:, planted_channels] = 0.0
        neurons = [N_PLUS, N_MINUS, M_PLUS, M_MINUS]
        mlp.W_in[planted_channels, :] = 0.0
        mlp.W_in[:, neurons] = 0.0
        mlp.W_out[neurons, :] = 0.0
        mlp.W_in[READ, N_PLUS], mlp.W_in[READ, N_MINUS] = 4.0, -4.0
        out = W2 if kind == "shared" else WRITE
        mlp.W_out[N_PLUS, out], mlp.W_out[N_MINUS, out] = 1.0, -1.0
        if spurious:
            mlp.W_in[S, M_PLUS], mlp.W_in[S, M_MINUS] = 1.0, -1.0
            mlp.W_in[C, M_PLUS], mlp.W_in[C, M_MINUS] = 4.0, 4.0
            mlp.W_out[M_PLUS, W2], mlp.W_out[M_MINUS, W2] = 2.0, -2.0
        model.unembed.W_U[[WRITE, W2], :] = 0.0
        model.unembed.W_U[[WRITE, W2], A], model.unembed.W_U[[WRITE, W2], B] = 0.5, -0.5
    if spurious:  # the gate opens at C's corpus mean (+1.5 there), shut at 0 and below
        c_mean = float(corpus_means(model)[registry_of(model).ids_of("mlp_read", 0, C)])
        with torch.no_grad():
            mlp.b_in[[M_PLUS, M_MINUS]] = 1.5 - 4.0 * c_mean
    return model.eval()


def registry_of(model) -> NodeRegistry:
    return NodeRegistry.for_model(model)


def corpus_stream() -> torch.Tensor:
    return torch.randint(1, VOCAB, (8192,), generator=torch.Generator().manual_seed(1))


def corpus_means(model) -> torch.Tensor:
    return compute_node_means(model, registry_of(model), corpus_stream(), n_tokens=4096,
                              batch_size=16, seq_len=16)


def hand_task(n=64, seed=0) -> TaskData:
    gen = torch.Generator().manual_seed(seed)
    fillers = torch.tensor(FILLERS)
    tokens = fillers[torch.randint(len(FILLERS), (n, 6), generator=gen)]
    labels = torch.arange(n) % 2
    tokens[:, -1] = torch.where(labels == 0, X, Y)
    correct, contrast = torch.where(labels == 0, A, B), torch.where(labels == 0, B, A)
    return TaskData(name="x_or_y", description="X -> A, Y -> B",
                    prompts=[str(r) for r in tokens.tolist()], tokens=tokens,
                    last_pos=torch.full((n,), 5), correct=correct, contrast=contrast,
                    correct_str=[str(c) for c in correct.tolist()],
                    contrast_str=[str(c) for c in contrast.tolist()], labels=labels)


def planted(model, kind: str) -> list[int]:
    reg = registry_of(model)
    if kind == "true":
        return sorted([reg.ids_of("mlp_read", 0, READ), reg.ids_of("neuron", 0, N_PLUS),
                       reg.ids_of("neuron", 0, N_MINUS), reg.ids_of("mlp_write", 0, WRITE)])
    return sorted([reg.ids_of("mlp_read", 0, S), reg.ids_of("neuron", 0, M_PLUS),
                   reg.ids_of("neuron", 0, M_MINUS), reg.ids_of("mlp_write", 0, W2)])


FAST = dict(n=64, draws=12, control_steps=60, control_mean_tokens=2048)
PRUNE = dict(steps=150, batch_size=32, lr=0.02, target_loss=0.15, progress=False)


@pytest.fixture(scope="module")
def true_model():
    model = build_model("true")
    return model, corpus_means(model)


@pytest.fixture(scope="module")
def spurious_model():
    model = build_model("spurious")
    return model, corpus_means(model)


@pytest.fixture(scope="module")
def shared_model():
    model = build_model("shared")
    return model, corpus_means(model)


def circuit_of(model, means, ids, mode="mean") -> Circuit:
    config = PruneConfig(ablation=mode, **PRUNE)
    values = None
    if mode != "mean":
        values = Ablation.build(mode, model, means, hand_task()).values
    circuit = Circuit(model, "x_or_y", ids, None, means, config, {}, data=hand_task(), ablation_values=values)
    full = pair_loss(final_logit_pairs(model, hand_task()))
    with ablated_nodes(model, circuit.registry, circuit.mask, circuit.ablation) as masker:
        losses = dict(full_model=full, circuit=pair_loss(final_logit_pairs(model, hand_task(), masker)))
    return dataclasses.replace(circuit, losses=losses, solved=losses["circuit"] <= config.target_loss)


# ---------------------------------------------------------------------- ablation modes
def test_each_constant_mode_replaces_pruned_nodes_by_its_values(true_model):
    model, means = true_model
    reg, data = registry_of(model), hand_task()
    mask = keep_mask_from_ids(reg, planted(model, "true"))
    tm = task_means(model, reg, data)
    for mode, values in (("mean", means), ("zero", torch.zeros_like(means)), ("task_mean", tm)):
        ablation = Ablation.build(mode, model, means, data)
        torch.testing.assert_close(ablation.values, values)
        with ablated_nodes(model, reg, mask, ablation) as masker:
            got = masker.logits(model, data)
        with masked_nodes(model, reg, mask, values):
            expected = model(data.tokens)
        torch.testing.assert_close(got, expected)
    assert not any(model.hook_dict[s.hook_name].fwd_hooks for s in reg.sites)


def test_task_means_average_real_positions_only(true_model):
    model, _ = true_model
    reg = registry_of(model)
    data = hand_task(8)
    short = TaskData(**{**data.__dict__, "last_pos": torch.full((8,), 2)})  # 3 real tokens each
    _, cache = model.run_with_cache(data.tokens[:, :3])
    site = reg.site("blocks.0.mlp.hook_post")
    expected = cache[site.hook_name].flatten(0, 1).mean(0)
    torch.testing.assert_close(task_means(model, reg, short)[site.offset:site.offset + site.size],
                               expected, atol=1e-5, rtol=1e-4)


def test_resample_takes_another_prompts_clean_activation_at_the_same_position(true_model):
    """Ablate only the neuron N+: under resampling it must carry the donor prompt's value, so
    the logits equal a run with that activation patched in by hand."""
    model, means = true_model
    reg, data = registry_of(model), hand_task(6)
    node = reg.ids_of("neuron", 0, N_PLUS)
    mask = torch.ones(reg.n_nodes)
    mask[node] = 0.0
    ablation = Ablation.build("resample", model, means, data, seed=3)
    donors = derangement(len(data), 3)
    assert (donors != torch.arange(len(data))).all() and sorted(donors.tolist()) == list(range(6))
    with ablated_nodes(model, reg, mask, ablation) as masker:
        got = masker.logits(model, data)
        with pytest.raises(RuntimeError, match="masker.logits"):
            model(data.tokens)
    _, cache = model.run_with_cache(data.tokens)
    donor_post = cache["blocks.0.mlp.hook_post"][donors]

    def patch(activation, hook):
        activation[..., N_PLUS] = donor_post[..., N_PLUS]
        return activation

    expected = model.run_with_hooks(data.tokens, fwd_hooks=[("blocks.0.mlp.hook_post", patch)])
    torch.testing.assert_close(got, expected)
    # the donor's value really differs (X and Y prompts alternate): the test can fail
    assert not torch.allclose(donor_post[..., N_PLUS], cache["blocks.0.mlp.hook_post"][..., N_PLUS])


def test_resample_falls_back_to_task_means_past_a_shorter_donors_end(true_model):
    model, means = true_model
    reg = registry_of(model)
    data = hand_task(2)
    data = TaskData(**{**data.__dict__, "last_pos": torch.tensor([5, 2])})  # row 1 is 3 tokens
    ablation = Ablation.build("resample", model, means, data)
    parts = reg.split(ablation.values)
    site = "blocks.0.mlp.hook_post"
    seen = []  # the donors' clean pass, then the ablated pass
    with ablated_nodes(model, reg, torch.zeros(reg.n_nodes), ablation) as masker:
        point = model.hook_dict[site]
        point.add_hook(lambda a, hook: seen.append(a.detach().clone()))
        handle = point.fwd_hooks[-1]
        try:
            masker.logits(model, data)
        finally:
            handle.hook.remove()
            point.fwd_hooks.remove(handle)
    donor_pass, ablated = seen
    # row 0's donor is row 1 (3 tokens): positions 0..2 take its activations, 3..5 the task mean
    torch.testing.assert_close(ablated[0, :3], donor_pass[0, :3])  # donors run as data[[1, 0]]
    torch.testing.assert_close(ablated[0, 3:], parts[site].expand(3, -1))
    assert not torch.allclose(ablated[0, :3], parts[site].expand(3, -1))


def test_ablation_hooks_come_off_even_when_a_pass_raises(true_model):
    model, means = true_model
    reg, data = registry_of(model), hand_task(4)
    ablation = Ablation.build("resample", model, means, data)
    with pytest.raises(RuntimeError, match="boom"):
        with ablated_nodes(model, reg, torch.zeros(reg.n_nodes), ablation) as masker:
            masker.logits(model, data)
            raise RuntimeError("boom")
    assert not any(model.hook_dict[s.hook_name].fwd_hooks for s in reg.sites)
    with ablated_nodes(model, reg, torch.zeros(reg.n_nodes), ablation) as masker:
        with pytest.raises(Exception):
            masker.logits(model, data[:2], donors=data[:2].to("meta"))  # the donor pass fails
        assert masker._recording is None and masker._replacement is None
        masker.logits(model, data)  # and the masker still works
    assert not any(model.hook_dict[s.hook_name].fwd_hooks for s in reg.sites)


@pytest.mark.slow
def test_prune_under_each_mode_records_it_and_the_circuit_reloads_with_it(true_model, tmp_path):
    model, means = true_model
    with pytest.raises(ValueError, match="ablation"):
        PruneConfig(ablation="median")
    for mode in ("zero", "resample"):
        circuit = prune(model, hand_task(), means=means, ablation=mode, **PRUNE)
        assert circuit.ablation_mode == mode and circuit.solved
        assert set(planted(model, "true")) <= set(circuit.node_ids)
        circuit.save(tmp_path / mode)
        loaded = Circuit.load(tmp_path / mode, model, data=hand_task())
        assert loaded.ablation_mode == mode
        torch.testing.assert_close(loaded.ablation.values, circuit.ablation.values.cpu())
        by = loaded.verify(n_random=2).set_index("condition")
        assert by.loc["circuit", "task_loss"] <= 0.15
        assert f"found with {mode} ablation" in repr(loaded)


# ---------------------------------------------------------------------- the checks
@pytest.mark.slow
def test_the_true_mechanism_passes_every_check(true_model):
    model, means = true_model
    circuit = prune(model, hand_task(), means=means, **PRUNE)
    assert circuit.node_ids == planted(model, "true")
    table = circuit.faithfulness(FaithfulnessConfig(**FAST), corpus_tokens=corpus_stream())
    assert table is circuit.faithfulness_table
    assert list(table.check) == ["nonsense control (nodes)", "random-model control (nodes)",
                                 "partial restoration (median loss)", "interchange (follow rate)",
                                 *[f"ablation: {m}" for m in ABLATION_MODES]]
    assert table.passed.all(), table.to_string()
    by = table.set_index("check")
    assert by.loc["interchange (follow rate)", "value"] == 1.0
    assert max(table.attrs["restoration_losses"]) < 0.15
    assert summary(table) == "8 of 8 checks pass"
    assert not any(model.hook_dict[s.hook_name].fwd_hooks for s in circuit.registry.sites)


def test_mean_ablation_fools_verify_on_the_spurious_circuit(shared_model):
    model, means = shared_model
    full = final_logit_pairs(model, hand_task())
    assert pair_loss(full) < 0.05  # the full model solves it through N+/N-
    circuit = circuit_of(model, means, planted(model, "spurious"))
    assert circuit.solved
    by = circuit.verify(n_random=3).set_index("condition")
    assert by.loc["circuit", "task_loss"] <= 0.15
    assert by.loc["circuit ablated", "task_loss"] > 0.5
    assert by.filter(like="random", axis=0).task_loss.iloc[0] > 0.5
    # in the real model M+/M- never fire on a task prompt
    _, cache = model.run_with_cache(hand_task().tokens)
    assert cache["blocks.0.mlp.hook_post"][..., [M_PLUS, M_MINUS]].abs().max() < 1e-3


@pytest.mark.slow
def test_the_checks_flag_the_spurious_circuit(spurious_model):
    model, means = spurious_model
    circuit = circuit_of(model, means, planted(model, "spurious"))
    table = circuit.faithfulness(FaithfulnessConfig(**FAST), corpus_tokens=corpus_stream())
    by = table.set_index("check")
    flagged = set(table.check[~table.passed.astype(bool)])
    assert {"partial restoration (median loss)", "interchange (follow rate)", "ablation: zero",
            "ablation: task_mean", "ablation: resample"} <= flagged, table.to_string()
    assert by.loc["ablation: mean", "passed"]  # the mode that fooled verify
    assert by.loc["interchange (follow rate)", "value"] < 0.2
    assert by.loc["interchange (follow rate)", "reference"] == 1.0
    assert all(v.startswith("FLAG") for v in by.loc[sorted(flagged), "verdict"])
    assert "flagged: " in summary(table)


def test_the_checks_flag_the_spurious_circuit_that_fools_verify(shared_model):
    model, means = shared_model
    circuit = circuit_of(model, means, planted(model, "spurious"))
    table = circuit.faithfulness(FaithfulnessConfig(**FAST, controls=False))
    flagged = set(table.check[~table.passed.astype(bool)])
    assert flagged == {"partial restoration (median loss)", "ablation: zero", "ablation: task_mean",
                       "ablation: resample"}, table.to_string()
    assert sum(loss > 0.5 for loss in table.attrs["restoration_losses"]) >= 3


def test_restoration_catches_ablated_nodes_that_cancel(spurious_model):
    """The real path plus the gate C, in the spurious model: interchange and every ablation mode
    pass, as they should. But it leaves M+ and M- mean-ablated, at large corpus means that
    cancel in W2 (it writes 2 M+ - 2 M-). Restoring one of them without the other (with W2)
    breaks the cancellation: the issue's "two ablated nodes cancel", which only partial
    restoration sees."""
    model, means = spurious_model
    reg = registry_of(model)
    ids = planted(model, "true") + [reg.ids_of("mlp_read", 0, C)]
    circuit = circuit_of(model, means, ids)
    assert circuit.solved
    m_means = means[[reg.ids_of("neuron", 0, M_PLUS), reg.ids_of("neuron", 0, M_MINUS)]]
    assert m_means.min() > 3.0 and torch.isclose(m_means[0], m_means[1], rtol=0.05)
    table = circuit.faithfulness(FaithfulnessConfig(**FAST, controls=False))
    flagged = set(table.check[~table.passed.astype(bool)])
    assert flagged == {"partial restoration (median loss)"}, table.to_string()
    assert table.set_index("check").loc["interchange (follow rate)", "value"] == 1.0


def test_nonsense_answers_are_a_permutation_and_interchange_pairs_match_length():
    data = hand_task(16)
    nonsense = shuffled_answers(data, seed=0)
    assert sorted(nonsense.correct.tolist()) == sorted(data.correct.tolist())
    assert not torch.equal(nonsense.correct, data.correct)
    assert (nonsense.correct != nonsense.contrast).all()
    data = TaskData(**{**data.__dict__, "last_pos": torch.tensor([5] * 14 + [3, 4])})
    base, source = interchange_pairs(data)
    assert base.tolist() == list(range(14))  # the two odd-length prompts have no partner
    assert (data.labels[base] != data.labels[source]).all()
    assert (data.last_pos[base] == data.last_pos[source]).all()


def test_bad_settings_and_a_missing_circuit_give_clear_errors(true_model):
    model, means = true_model
    with pytest.raises(ValueError, match="restore_fraction"):
        FaithfulnessConfig(restore_fraction=1.0)
    with pytest.raises(ValueError, match="unknown ablation mode"):
        Ablation.build("median", model, means)
    with pytest.raises(ValueError, match="task's prompts"):
        Ablation.build("task_mean", model, means)
    missed = circuit_of(model, means, planted(model, "true"))
    missed.losses["full_model"] = math.log(2)
    with pytest.raises(ValueError, match="no circuit to check"):
        missed.faithfulness(FaithfulnessConfig(**FAST))


def test_the_report_shows_the_table_or_says_how_to_get_it(true_model):
    from sparse_lens.viz.tables import faithfulness_html

    model, means = true_model
    circuit = circuit_of(model, means, planted(model, "true"))
    assert "sparse-lens faithfulness --model DIR --task x_or_y" in faithfulness_html(circuit)
    circuit.faithfulness(FaithfulnessConfig(**FAST, controls=False))
    shown = faithfulness_html(circuit)
    assert "Every check that ran passes" in shown and "interchange (follow rate)" in shown
    circuit.faithfulness_table.loc[0, "passed"] = False
    assert "Flagged by: partial restoration" in faithfulness_html(circuit)
