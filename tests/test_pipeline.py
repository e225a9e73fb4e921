"""`sparse_lens.pipeline.prune_tasks`: prune, save, verify and summarise a set of tasks."""

import pandas as pd
import pytest

from conftest import save_tiny_model_with_means
from sparse_lens.circuit import Circuit
from sparse_lens.pipeline import SUMMARY_FILE, prune_tasks
from sparse_lens.pruning import PruneConfig

CHEAP = dict(steps=2, n_train=16, n_eval=8, batch_size=8, progress=False)


@pytest.fixture(scope="module")
def tiny(tokenizer, tmp_path_factory):
    path = tmp_path_factory.mktemp("model") / "tiny"
    model, means = save_tiny_model_with_means(tokenizer, path)
    return path, model, means


def test_rows_circuits_and_verification_of_each_task(tiny, tmp_path):
    path, model, means = tiny
    seen = []
    table = prune_tasks(model, ["with_as", "for_while"], PruneConfig(target_loss=5, **CHEAP),
                        model_dir=path, out=tmp_path, means=means, verify_n=16, on_done=seen.append)
    assert list(table.task) == ["with_as", "for_while"] == [o.task for o in seen]
    assert list(table.columns[:8]) == ["task", "solved", "nodes", "edges", "target_loss",
                                       "full_model_loss", "circuit_loss", "seconds"]
    for outcome, row in zip(seen, table.itertuples()):
        verification = outcome.circuit.verification.set_index("condition").task_loss
        assert row.held_out_loss == verification["circuit"]
        assert row.ablated_loss == verification["circuit ablated"]
        assert row.random_loss == verification.iloc[-1]
        assert row.nodes == outcome.circuit.n_nodes
        assert row.optimised_mask_loss == outcome.circuit.losses["optimised_mask"]  # a collapse shows
        assert outcome.report.startswith(repr(outcome.circuit)) and "circuit ablated" in outcome.report
        assert Circuit.load(tmp_path / row.task, model).n_nodes == row.nodes
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / SUMMARY_FILE), table)


def test_a_task_the_full_model_misses_is_neither_searched_nor_verified(tiny, tmp_path):
    path, model, means = tiny
    table = prune_tasks(path, ["for_while"], PruneConfig(**CHEAP), out=tmp_path)  # target 0.15
    assert not table.solved.iloc[0] and pd.isna(table.nodes.iloc[0]) and pd.isna(table.optimised_mask_loss.iloc[0])
    assert "ablated_loss" not in table.columns
    assert (tmp_path / "for_while" / "circuit.json").is_file()


def test_without_out_nothing_is_written_and_parallel_needs_a_directory(tiny, tmp_path, monkeypatch):
    path, model, means = tiny
    monkeypatch.chdir(tmp_path)
    table = prune_tasks(model, ["with_as"], PruneConfig(target_loss=5, **CHEAP), means=means, verify=False)
    assert len(table) == 1 and list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError, match="needs the model directory"):
        prune_tasks(model, ["with_as", "for_while"], PruneConfig(**CHEAP), means=means, jobs=2)


def test_reuse_reads_back_a_circuit_of_the_same_weights_and_settings_only(tiny, tmp_path, monkeypatch):
    """`reuse=True`: a circuit saved for these weights and an equal PruneConfig (progress aside) is
    read back, not pruned again; other settings or other weights are pruned afresh."""
    import torch

    from sparse_lens import pruning

    path, model, means = tiny
    config = PruneConfig(target_loss=5, **CHEAP)
    first = prune_tasks(model, ["with_as"], config, out=tmp_path, means=means, verify=False)
    calls = []
    real_prune = pruning.prune
    monkeypatch.setattr(pruning, "prune", lambda *a, **k: calls.append(a[1]) or real_prune(*a, **k))
    again = prune_tasks(model, ["with_as"], PruneConfig(target_loss=5, **{**CHEAP, "progress": True}),
                        out=tmp_path, means=means, verify=False, reuse=True)
    assert calls == []
    pd.testing.assert_frame_equal(again, first)
    prune_tasks(model, ["with_as"], PruneConfig(target_loss=5, **{**CHEAP, "seed": 1}),
                out=tmp_path, means=means, verify=False, reuse=True)
    assert calls == ["with_as"]  # another seed: pruned again (and saved over the old one)
    other = type(model)(model.cfg, tokenizer=model.tokenizer)
    with torch.no_grad():
        other.load_state_dict(model.state_dict())
        other.unembed.W_U.mul_(2.0)
    prune_tasks(other, ["with_as"], PruneConfig(target_loss=5, **{**CHEAP, "seed": 1}),
                out=tmp_path, means=means, verify=False, reuse=True)
    assert calls == ["with_as", "with_as"]  # other weights: pruned again
