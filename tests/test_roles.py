"""Roles of a circuit's nodes (marker detector, type classifier, answer) and the head that carries
the marker: planted activations get exactly their roles; on a running circuit the scores and
the head's attention are those of the masked model."""

import dataclasses

import pytest
import torch

from sparse_lens.circuit import Circuit
from sparse_lens.config import SparseHookedTransformerConfig
from sparse_lens.hooks import NodeRegistry, compute_node_means, masked_nodes
from sparse_lens.model import SparseHookedTransformer
from sparse_lens.pruning import PruneConfig
from sparse_lens.tasks import TaskData
from sparse_lens.viz.report import report_html
from sparse_lens.viz.activations import node_activations
from sparse_lens.viz.roles import (CARRY_BAR, CLASS_BAR, DETECT_BAR, assign_roles, marker_positions, marker_roles,
                                   role_scores, roles_view)

QUOTES = {"'": "'", '"': '"'}


def planted(batch: int = 8, pos: int = 10):
    """Activations of four nodes on `batch` prompts of `pos` tokens, the marker at position 3 and
    the final token at 8 (9 is padding): node 0 fires +2 on every marker, node 1 is +1/-1 at the
    marker by class, node 2 is +1/-1 at the final token by class, node 3 is the same noise
    everywhere in both classes."""
    labels = torch.arange(batch) % 2
    sign = labels * 2.0 - 1  # class 1: +1, class 0: -1
    acts = torch.zeros(batch, pos, 4)
    acts[:, 3, 0] = 2.0
    acts[:, 3, 1] = sign
    acts[:, 8, 2] = sign
    acts[:, :, 3] = torch.randn(pos, generator=torch.Generator().manual_seed(0))
    last = torch.full((batch,), 8)
    valid = torch.arange(pos)[None, :] <= last[:, None]
    return acts, valid, torch.full((batch,), 3), last, labels


def test_planted_nodes_get_exactly_their_roles():
    scores = role_scores(*planted())
    assert assign_roles(scores) == ["detector", "classifier", "answer", "other"]
    assert scores["detector"][0] >= DETECT_BAR and abs(scores["classifier"][0]) < 1e-6
    # a node with one value per class: class-mean difference 2 over its std sqrt(8/7)
    torch.testing.assert_close(scores["classifier"][1], torch.tensor(2 / (8 / 7) ** 0.5))
    torch.testing.assert_close(scores["answer"][2], torch.tensor(2 / (8 / 7) ** 0.5))
    assert scores["classifier"][1] >= CLASS_BAR and abs(scores["detector"][1]) < 1e-6
    # noise that is the same in both classes and at every prompt's marker is not a role
    assert abs(scores["classifier"][3]) < 1e-6 and abs(scores["answer"][3]) < 1e-6


def test_a_flat_node_scores_zero_not_nan():
    acts, valid, marker, last, labels = planted()
    acts[..., 1] = 5.0
    scores = role_scores(acts, valid, marker, last, labels)
    assert all(float(s[1]) == 0.0 for s in scores.values())


# ------------------------------------------------------------------------ on a running circuit
PROMPTS = ["x = 'a b c", 'y = "d e', "print('f", 'z("g h i', "w = 'k", 'v = "m n']


@pytest.fixture(scope="module")
def circuit(tokenizer):
    torch.manual_seed(0)
    model = SparseHookedTransformer(SparseHookedTransformerConfig.preset("tiny"), tokenizer=tokenizer)
    registry = NodeRegistry.for_model(model)
    stream = torch.randint(1, 2048, (4096,), generator=torch.Generator().manual_seed(0))
    means = compute_node_means(model, registry, stream, n_tokens=1024)
    answers = [p.split("=")[-1].strip()[0] if "=" in p else p[p.index("(") + 1] for p in PROMPTS]
    data = TaskData.from_prompts("single_double_quote", PROMPTS, answers, [QUOTES['"' if a == "'" else "'"] for a in answers],
                                 tokenizer, labels=[int(a == '"') for a in answers])
    r = registry
    every_read = [r.ids_of("attn_read", layer, c) for layer in (0, 1) for c in range(model.cfg.d_model)]
    ids = every_read + [r.ids_of("q", 0, (1, 2)), r.ids_of("k", 0, (1, 2)),
           r.ids_of("v", 0, (1, 5)), r.ids_of("v", 1, (2, 0)), r.ids_of("attn_write", 0, 7),
           r.ids_of("neuron", 1, 11)]
    return Circuit(model, "single_double_quote", ids, None, means, PruneConfig(), {"circuit": 0.7}, solved=True,
                   data=data)


def test_the_marker_is_the_opening_quote(circuit):
    data = circuit.task_data()
    markers = [QUOTES[s] for s in data.correct_str]
    pos = marker_positions(data.tokens, data.last_pos, markers, circuit.model)
    decoded = circuit.model.tokenizer
    for i in range(len(data)):
        assert markers[i] in decoded.decode([int(data.tokens[i, pos[i]])])
        later = data.tokens[i, pos[i] + 1: data.last_pos[i] + 1].tolist()
        assert not any(markers[i] in decoded.decode([t]) for t in later)


def test_roles_are_measured_on_the_running_circuit(circuit):
    roles = marker_roles(circuit, markers=QUOTES)
    data = circuit.task_data()
    assert roles.n_prompts == len(data) and len(roles.nodes) == circuit.n_nodes
    pos = marker_positions(data.tokens, data.last_pos, [QUOTES[s] for s in data.correct_str], circuit.model)
    valid = torch.arange(data.tokens.shape[1])[None, :] <= data.last_pos[:, None]
    acts, _ = node_activations(circuit, data.tokens, circuit.node_ids)
    expected = role_scores(acts, valid, pos, data.last_pos, data.labels)
    for name, values in expected.items():
        torch.testing.assert_close(torch.tensor(roles.nodes[name].to_numpy()), values)
    # heads: the kept ones, with the masked model's attention from the final token to the marker
    # and the class contrast of its output there on its kept value channel
    heads = list(zip(roles.heads.layer, roles.heads["head"]))
    assert sorted(heads) == [(0, 1), (1, 2)]
    names = [f"blocks.{layer}.attn.{hook}" for layer in (0, 1) for hook in ("hook_pattern", "hook_z")]
    with masked_nodes(circuit.model, circuit.registry, circuit.mask, circuit.means):
        _, cache = circuit.model.run_with_cache(data.tokens, names_filter=names)
    rows = torch.arange(len(data))
    v_channel = {(0, 1): 5, (1, 2): 0}
    for (layer, head), row in zip(heads, roles.heads.itertuples()):
        pattern = cache[f"blocks.{layer}.attn.hook_pattern"][rows, head, data.last_pos, pos]
        assert row.attention_to_marker == pytest.approx(float(pattern.mean()), abs=1e-6)
        z = cache[f"blocks.{layer}.attn.hook_z"][rows, data.last_pos, head, v_channel[(layer, head)]]
        labels = data.labels.bool()
        assert z.std() > 1e-3  # the kept value channel reads kept channels: it varies
        assert row.output_contrast == pytest.approx(float((z[labels].mean() - z[~labels].mean()) / z.std()),
                                                    abs=1e-5)
        assert row.carries == (row.attention_to_marker >= CARRY_BAR and abs(row.output_contrast) >= CLASS_BAR)
    assert roles.carriers == [h for h, c in zip(heads, roles.heads.carries) if c]
    assert "Heads carrying the type" in roles.summary()


def test_the_quote_task_gets_a_roles_view_in_the_report(circuit):
    assert roles_view(circuit).body == roles_view(circuit, markers=QUOTES).body  # the task's own
    html = report_html(circuit.model, [circuit], n_prompts=2, verify_n=4)
    assert "<h3>Roles of the circuit nodes (single_double_quote)</h3>" in html
    assert "detect the marker" in html and "Kept heads" in html


def test_clear_errors(circuit):
    with pytest.raises(ValueError, match="no marker known"):
        marker_roles(dataclasses.replace(circuit, task="x_or_y"))
    assert "Roles not measured: marker_roles: no marker known" in roles_view(
        dataclasses.replace(circuit, task="x_or_y")).body
    with pytest.raises(ValueError, match="not all in"):
        marker_roles(circuit, markers={"'": "'"})
