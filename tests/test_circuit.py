"""The hook engine, pruning and Circuit on a hand-built model whose circuit is known.

The model (1 layer, d_model 16, vocab 8, no AbsTopK, dense weights): the task is "the last token
is X -> answer A, Y -> answer B". By construction exactly three nodes solve it:
the MLP reads residual channel 3 (the embedding writes +1 for X, -1 for Y there), neuron 5 fires
on it (W_in[3, 5]), and writes channel 7 (W_out[5, 7]) which the unembedding turns into
logit(A) - logit(B). Everything else is small noise that does not touch that path.
"""

import types

import pytest
import torch

from sparse_lens.circuit import Circuit
from sparse_lens.config import SparseHookedTransformerConfig
from sparse_lens.hooks import NodeRegistry, compute_node_means, keep_mask_from_ids, masked_nodes
from sparse_lens.model import SparseHookedTransformer
from sparse_lens.pruning import PruneConfig, prune
from sparse_lens.tasks import TaskData

X, Y, A, B = 1, 2, 3, 4
FILLERS = (5, 6, 7)
READ, NEURON, WRITE = 3, 5, 7


def hand_built_model() -> SparseHookedTransformer:
    cfg = SparseHookedTransformerConfig(
        n_layers=1, d_model=16, d_head=8, n_heads=2, d_mlp=16, n_ctx=16, d_vocab=8,
        weight_l0=1.0, act_topk_locations=(), use_attention_sinks=False, device="cpu")
    torch.manual_seed(0)
    model = SparseHookedTransformer(cfg)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim >= 2:
                p.normal_(0, 0.02)
        model.embed.W_E[:, READ] = 0.0
        model.embed.W_E[X, READ], model.embed.W_E[Y, READ] = 1.0, -1.0
        model.blocks[0].mlp.W_in[READ, :] = 0.0
        model.blocks[0].mlp.W_in[:, NEURON] = 0.0
        model.blocks[0].mlp.W_in[READ, NEURON] = 1.0
        model.blocks[0].mlp.W_out[NEURON, :] = 0.0
        model.blocks[0].mlp.W_out[:, WRITE] = 0.0
        model.blocks[0].mlp.W_out[NEURON, WRITE] = 1.0
        model.blocks[0].mlp.b_out[WRITE] = -2.0
        model.unembed.W_U[WRITE, :] = 0.0
        model.unembed.W_U[WRITE, A], model.unembed.W_U[WRITE, B] = 0.5, -0.5
    return model


def hand_task(n=64, seed=0) -> TaskData:
    gen = torch.Generator().manual_seed(seed)
    fillers = torch.tensor(FILLERS)
    tokens = fillers[torch.randint(len(FILLERS), (n, 6), generator=gen)]
    last = torch.where(torch.arange(n) % 2 == 0, X, Y)
    tokens[:, -1] = last
    correct = torch.where(last == X, A, B)
    contrast = torch.where(last == X, B, A)
    return TaskData(name="x_or_y", description="X -> A, Y -> B", prompts=[str(r) for r in tokens.tolist()],
                    tokens=tokens, last_pos=torch.full((n,), 5), correct=correct, contrast=contrast,
                    correct_str=[str(c) for c in correct.tolist()],
                    contrast_str=[str(c) for c in contrast.tolist()])


@pytest.fixture(scope="module")
def model():
    return hand_built_model()


@pytest.fixture(scope="module")
def means(model):
    stream = torch.randint(1, 8, (4096,), generator=torch.Generator().manual_seed(1))
    return compute_node_means(model, NodeRegistry.for_model(model), stream, n_tokens=2048,
                              batch_size=8, seq_len=16)


def test_registry_numbers_nodes_by_site(model):
    reg = NodeRegistry.for_model(model)
    assert reg.n_nodes == 16 + 3 * 16 + 16 + 16 + 16 + 16  # read, q/k/v, write, read, neurons, write
    assert reg.ids_of("neuron", 0, NEURON) == reg.site("blocks.0.mlp.hook_post").offset + NEURON
    assert reg.ids_of("q", 0, (1, 2)) == reg.site("blocks.0.attn.hook_q").offset + 8 + 2
    row = reg.describe([reg.ids_of("q", 0, (1, 2))]).iloc[0]
    assert (row["kind"], row["layer"], row["head"], row["channel"]) == ("q", 0, 1, 2)
    with pytest.raises(ValueError, match="shape"):
        reg.split(torch.zeros(3))


def test_all_ones_mask_changes_nothing(model, means):
    tokens = hand_task().tokens
    reg = NodeRegistry.for_model(model)
    with masked_nodes(model, reg, torch.ones(reg.n_nodes), means):
        masked = model(tokens)
    torch.testing.assert_close(masked, model(tokens))


def test_ablating_every_node_gives_the_mean_activation_forward_pass(model, means):
    """With every node at its mean, the residual stream is embedding + the mean attention and
    MLP outputs, so the logits are computable by hand."""
    reg = NodeRegistry.for_model(model)
    tokens = hand_task().tokens
    with masked_nodes(model, reg, torch.zeros(reg.n_nodes), means):
        logits = model(tokens)
    parts = reg.split(means)
    resid = (model.embed(tokens) + model.pos_embed(tokens) + parts["blocks.0.hook_attn_out"]
             + parts["blocks.0.hook_mlp_out"])
    expected = model.unembed(model.ln_final(resid))
    torch.testing.assert_close(logits, expected)


def test_means_are_the_average_activation(model, means):
    stream = torch.randint(1, 8, (4096,), generator=torch.Generator().manual_seed(1))
    from sparse_lens.data import sample_batch

    batches = torch.cat([sample_batch(stream, 8, 16, step, 0) for step in range(16)])
    _, cache = model.run_with_cache(batches)
    reg = NodeRegistry.for_model(model)
    for name, mean in reg.split(means).items():
        torch.testing.assert_close(mean, cache[name].flatten(0, 1).mean(0), atol=1e-5, rtol=1e-4)


def test_hooks_are_removed_even_when_the_forward_pass_raises(model, means):
    reg = NodeRegistry.for_model(model)
    user_hook_calls = []
    model.blocks[0].hook_mlp_out.add_hook(lambda x, hook: user_hook_calls.append(1))
    try:
        with pytest.raises(RuntimeError, match="boom"):
            with masked_nodes(model, reg, torch.ones(reg.n_nodes), means):
                assert any(p.fwd_hooks for p in model.hook_dict.values())
                raise RuntimeError("boom")
        assert [len(model.hook_dict[s.hook_name].fwd_hooks) for s in reg.sites].count(0) == len(reg.sites) - 1
        assert len(model.blocks[0].hook_mlp_out.fwd_hooks) == 1  # the user's hook stays
    finally:
        model.reset_hooks()


def test_pruning_recovers_exactly_the_planted_circuit(model, means):
    data = hand_task()
    full = model(data.tokens)[torch.arange(len(data)), 5]
    assert ((full[:, A] > full[:, B]) == (data.correct == A)).all()  # the full model solves it
    circuit = prune(model, data, means=means, steps=150, batch_size=32, lr=0.02, progress=False)
    reg = circuit.registry
    planted = sorted([reg.ids_of("mlp_read", 0, READ), reg.ids_of("neuron", 0, NEURON),
                      reg.ids_of("mlp_write", 0, WRITE)])
    assert circuit.node_ids == planted
    assert circuit.solved and circuit.losses["circuit"] <= 0.15
    table = circuit.verify(n_random=4)
    by = table.set_index("condition")
    assert by.loc["circuit", "task_loss"] <= 0.15 and by.loc["circuit", "accuracy"] == 1.0
    assert by.loc["circuit ablated", "accuracy"] <= 0.5 + 1e-6
    assert by.filter(like="random", axis=0).task_loss.iloc[0] > 0.5


def test_edges_of_the_planted_circuit_counted_by_hand(model, means):
    reg = NodeRegistry.for_model(model)
    ids = [reg.ids_of("mlp_read", 0, READ), reg.ids_of("neuron", 0, NEURON),
           reg.ids_of("mlp_write", 0, WRITE)]
    circuit = Circuit(model, "x_or_y", ids, None, means, PruneConfig(), {}, data=hand_task())
    edges = circuit.edges
    counts = edges.kind.value_counts().to_dict()
    # W_in[3, 5], W_out[5, 7]; W_E[X, 3], W_E[Y, 3]; W_U[7, A], W_U[7, B]; one layer: no residual
    assert counts == {"weight": 2, "embed": 2, "unembed": 2}
    assert circuit.n_edges == 6
    weights = edges[edges.kind == "weight"].set_index("source").weight.to_dict()
    assert weights == {f"L0.mlp_read[{READ}]": 1.0, f"L0.neuron[{NEURON}]": 1.0}
    # adding the attention-write channel 3 adds a residual link attn_write[3] -> mlp_read[3]
    # and its incoming W_O edges from kept v channels (none kept) -> only the residual link
    more = Circuit(model, "x_or_y", ids + [reg.ids_of("attn_write", 0, READ)], None, means,
                   PruneConfig(), {}, data=hand_task())
    assert more.edges.kind.value_counts().get("residual") == 1


def test_circuit_runs_saves_and_refuses_another_model(model, means, tmp_path):
    reg = NodeRegistry.for_model(model)
    ids = [reg.ids_of("mlp_read", 0, READ), reg.ids_of("neuron", 0, NEURON),
           reg.ids_of("mlp_write", 0, WRITE)]
    circuit = Circuit(model, "x_or_y", ids, torch.zeros(reg.n_nodes), means, PruneConfig(),
                      {"circuit": 0.01}, data=hand_task())
    tokens = hand_task().tokens
    with masked_nodes(model, reg, keep_mask_from_ids(reg, ids), means):
        expected = model(tokens)
    torch.testing.assert_close(circuit.run(tokens), expected)
    assert not any(model.hook_dict[s.hook_name].fwd_hooks for s in reg.sites)
    circuit.save(tmp_path / "c")
    loaded = Circuit.load(tmp_path / "c", model, data=hand_task())
    assert loaded.node_ids == circuit.node_ids and loaded.losses == circuit.losses
    torch.testing.assert_close(loaded.run(tokens), expected)
    other = hand_built_model()
    with torch.no_grad():
        other.unembed.W_U[0, 0] += 1.0
    with pytest.raises(ValueError, match="different model"):
        Circuit.load(tmp_path / "c", other)
    (tmp_path / "c" / "circuit.json").write_text("{not json")
    with pytest.raises(ValueError, match="not a readable circuit"):
        Circuit.load(tmp_path / "c", model)
    assert "x_or_y" in repr(circuit)


def test_pruning_is_deterministic_for_a_seed(model, means):
    data = hand_task()
    runs = [prune(model, data, means=means, steps=30, batch_size=16, lr=0.02, seed=3,
                  progress=False) for _ in range(2)]
    assert runs[0].node_ids == runs[1].node_ids
    assert torch.equal(runs[0].tau, runs[1].tau)


def test_calibration_removes_a_logit_bias_on_one_candidate():
    from sparse_lens.pruning import fit_calibration, pair_accuracy, pair_loss

    data = hand_task()  # correct is A for even rows, B for odd rows
    diff = torch.full((len(data),), 2.0)
    logit_a = torch.where(data.correct == A, diff, torch.zeros_like(diff)) + 3.0  # A favoured by 3
    logit_b = torch.where(data.correct == B, diff, torch.zeros_like(diff))
    pairs = torch.stack([torch.where(data.correct == A, logit_a, logit_b),
                         torch.where(data.correct == A, logit_b, logit_a)], dim=1)
    assert pair_accuracy(pairs) == 0.5
    calibration = fit_calibration(pairs, data)
    fixed = calibration.apply_pairs(pairs, data)
    assert pair_accuracy(fixed) == 1.0 and pair_loss(fixed) < 0.05 < pair_loss(pairs)
    # right on both classes iff -5 scale < bias[A] - bias[B] < -scale (the +3 on A undone)
    assert -5 * calibration.scale < calibration.bias[A] - calibration.bias[B] < -calibration.scale


def test_a_calibration_applies_to_candidates_it_never_saw_with_no_bias():
    """Candidate tokens above every biased id (other prompts than those it was fitted on) get no
    bias instead of an index error; biased ones get theirs."""
    from sparse_lens.task_loss import Calibration

    calibration = Calibration(2.0, {3: 0.5, 5: -1.0})
    data = types.SimpleNamespace(correct=torch.tensor([3, 900]), contrast=torch.tensor([5, 901]))
    pairs = torch.tensor([[1.0, 2.0], [0.5, -0.5]])
    out = calibration.apply_pairs(pairs, data)
    torch.testing.assert_close(out, torch.tensor([[2.5, 3.0], [1.0, -1.0]]))


def test_a_circuit_is_verified_on_the_level_it_was_pruned_at(tokenizer, tmp_path):
    """verify() draws held-out prompts at the circuit's own level, not the default core level."""
    from conftest import save_tiny_model_with_means
    from sparse_lens.tasks import get_task

    model, means = save_tiny_model_with_means(tokenizer, tmp_path / "tiny")
    circuit = prune(model, "single_double_quote", means=means, steps=2, n_train=8, n_eval=8,
                    target_loss=5.0, level="hard", progress=False)
    held_out = circuit.task_data(n=8)
    hard = get_task("single_double_quote", tokenizer, n=8, split="test", level="hard")
    core = get_task("single_double_quote", tokenizer, n=8, split="test")
    assert held_out.prompts == hard.prompts != core.prompts


# ------------------------------------------------------------------ ids, the record, hooks
def planted(reg):
    return [reg.ids_of("mlp_read", 0, READ), reg.ids_of("neuron", 0, NEURON),
            reg.ids_of("mlp_write", 0, WRITE), reg.ids_of("attn_write", 0, READ)]


def test_edge_ids_round_trip_to_the_registry(model, means):
    from sparse_lens.edges import NO_ID
    from sparse_lens.hooks import NodeKind

    reg = NodeRegistry.for_model(model)
    edges = Circuit(model, "x_or_y", planted(reg), None, means, PruneConfig(), {}, data=hand_task()).edges
    for side in ("source", "target"):
        nodes = edges[edges[f"{side}_id"] != NO_ID]
        assert nodes[f"{side}_token"].eq(NO_ID).all()
        assert reg.labels(nodes[f"{side}_id"].tolist()) == nodes[side].tolist()
        assert [reg.id_of_label(label) for label in nodes[side]] == nodes[f"{side}_id"].tolist()
    embed, unembed = edges[edges.kind == "embed"], edges[edges.kind == "unembed"]
    assert sorted(embed.source_token) == [X, Y] and embed.source_id.eq(NO_ID).all()
    assert sorted(set(unembed.target_token)) == [A, B] and unembed.target_id.eq(NO_ID).all()
    kinds = reg.describe(edges[edges.kind == "residual"].target_id).kind.tolist()
    assert kinds == [NodeKind.MLP_READ] and kinds == ["mlp_read"]  # an enum that is a str


class PartialBytes:
    """A tokenizer whose X and Y decode to no whole character, as partial UTF-8 bytes do."""

    def decode(self, ids):
        return "\ufffd" if ids[0] in (X, Y) else str(ids[0])


def test_two_partial_byte_tokens_stay_two_tokens_in_the_edges_and_the_graph(model, means, monkeypatch):
    from sparse_lens.viz import circuit_graph

    monkeypatch.setattr(model, "tokenizer", PartialBytes())
    reg = NodeRegistry.for_model(model)
    circuit = Circuit(model, "x_or_y", planted(reg), None, means, PruneConfig(), {}, data=hand_task(),
                      edge_tokens=([X, Y], [A, B]))
    embed = circuit.edges[circuit.edges.kind == "embed"]
    assert sorted(embed.source_token) == [X, Y]
    assert embed.source.nunique() == 2  # the display labels show the ids: embed['\ufffd' #1]
    assert circuit_graph(circuit).body.count('data-kind="embed"') == 2


def test_circuit_is_a_record_loaded_by_keyword(model, means, tmp_path):
    import dataclasses

    from sparse_lens.task_loss import Calibration

    reg = NodeRegistry.for_model(model)
    circuit = Circuit(model=model, task="x_or_y", node_ids=[9, 3, 5], tau=torch.linspace(-1, 1, reg.n_nodes),
                      means=means, config=PruneConfig(ablation="zero", steps=7), losses={"circuit": 0.1},
                      calibration=Calibration(2.0, {A: 0.5, B: -0.5}), solved=True, bisection=[(3, 0.2)],
                      seconds=1.5, ablation_values=torch.zeros(reg.n_nodes), edge_tokens=([X], [A, B]))
    assert circuit.node_ids == [3, 5, 9]
    with pytest.raises(dataclasses.FrozenInstanceError):
        circuit.task = "other"
    loaded = Circuit.load(circuit.save(tmp_path / "c"), model, data=hand_task())
    for f in dataclasses.fields(Circuit):
        if f.name in ("model", "results", "data"):  # data: given to load, not saved
            continue
        a, b = getattr(circuit, f.name), getattr(loaded, f.name)
        if isinstance(a, torch.Tensor):
            torch.testing.assert_close(a, b)
        else:
            assert a == b, f.name
    assert loaded.verification is None
    table = loaded.verify(n=8, n_random=2)
    assert loaded.verification is table and loaded.results == {"verification": table}


def test_repr_of_a_pruned_circuit_generates_no_prompts(model, means, monkeypatch):
    import dataclasses

    import sparse_lens.circuit_eval

    circuit = prune(model, hand_task(), means=means, steps=5, progress=False)
    text = repr(circuit)

    def no_prompts(*args, **kwargs):
        raise AssertionError("repr generated task prompts")

    monkeypatch.setattr(sparse_lens.circuit_eval, "task_examples", no_prompts)
    fresh = dataclasses.replace(circuit)  # no cached edges: the saved edge tokens are used
    assert repr(fresh) == text and fresh.results == {}


def test_mask_hooks_leave_the_users_hooks_even_on_an_exception(model, means):
    reg = NodeRegistry.for_model(model)
    site = model.blocks[0].hook_mlp_out
    mine = lambda x, hook: x  # noqa: E731
    try:
        site.add_hook(mine)  # a permanent-style user hook, outside any context
        with model.hooks(fwd_hooks=[("blocks.0.hook_mlp_out", mine)]):  # and one in the user's context
            site.ctx["seen"] = 1  # what a user's hook keeps between calls
            with pytest.raises(RuntimeError, match="boom"):
                with masked_nodes(model, reg, torch.ones(reg.n_nodes), means):
                    assert len(site.fwd_hooks) == 3
                    raise RuntimeError("boom")
            assert len(site.fwd_hooks) == 2
            assert site.ctx == {"seen": 1}
            assert sum(len(model.hook_dict[s.hook_name].fwd_hooks) for s in reg.sites) == 2
        assert len(site.fwd_hooks) == 1
    finally:
        model.reset_hooks()


def test_final_logit_pairs_takes_the_mask_without_keeping_it(model, means):
    from sparse_lens.task_loss import final_logit_pairs

    reg = NodeRegistry.for_model(model)
    ones = torch.ones(reg.n_nodes)
    with masked_nodes(model, reg, ones, means) as masker:
        final_logit_pairs(model, hand_task(), masker, keep_mask_from_ids(reg, planted(reg)))
        assert torch.equal(masker.mask, ones)
