"""The analyses (`sparse_lens.analyses`, `sparse-lens analyze`): every one in `--quick` mode, with
the content of its outputs checked, and the pieces each result rests on checked on known inputs.

The quick models are barely trained, so the quick runs prune at a loose target (2.0 nats) that
their full models meet: that exercises the whole path (optimisation, bisection, edges, ratios).
"""

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch

from sparse_lens import analyses
from sparse_lens.analyses.circuit_size import compare_sizes, dense_spec
from sparse_lens.analyses.common import (AnalysisResult, existing_model, geometric_mean, result_settings,
                                         table_markdown)
from sparse_lens.analyses.dilution import crossing, diluted_prompts, fit_inverse_length
from sparse_lens.analyses.frontier import pareto_front
from sparse_lens.analyses.kurtosis import excess_kurtosis

LOOSE = 2.0
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def outputs(tmp_path_factory):
    """All four analyses in quick mode, sharing one models directory (as the CLI does); their
    output folders."""
    out = tmp_path_factory.mktemp("results")
    models = tmp_path_factory.mktemp("models")
    results = {
        "kurtosis": analyses.run("kurtosis", out, models, quick=True),
        "circuit-size": analyses.run("circuit-size", out, models, quick=True, target_loss=LOOSE),
        "frontier": analyses.run("frontier", out, models, quick=True, target_loss=LOOSE),
        "dilution": analyses.run("dilution", out, models, quick=True, target_loss=LOOSE),
    }
    for result in results.values():  # the summary object: what the files hold
        check_result(result)
    return {name: result.folder for name, result in results.items()}, models


def check_result(result: AnalysisResult) -> None:
    folder = result.folder
    assert folder.name == result.name and all(p.is_file() and p.parent == folder for p in result.paths)
    pd.testing.assert_frame_equal(pd.read_csv(folder / f"{result.name}.csv"), result.table,
                                  check_dtype=False)
    assert result.summary in (folder / "summary.md").read_text()


def read(folder):
    name = folder.name
    table = pd.read_csv(folder / f"{name}.csv")
    meta = json.loads((folder / "meta.json").read_text())
    png = (folder / f"{name}.png").read_bytes()
    assert png.startswith(PNG_MAGIC) and len(png) > 5000  # a real plot, not an empty file
    summary = (folder / "summary.md").read_text()
    assert meta["command"] and meta["versions"]["torch"] == torch.__version__
    assert meta["versions"]["transformer_lens"].startswith("3.")
    for m in meta["models"]:
        assert m["model_config"]["d_model"] >= 1 and m["train_config"]["seed"] == 0
        assert math.isfinite(m["val_loss"])
    return table, meta, summary


@pytest.mark.slow
def test_circuit_size_reports_both_losses_edges_and_their_geometric_mean_ratio(outputs):
    table, meta, summary = read(outputs[0]["circuit-size"])
    assert list(table.columns) == [
        "task", "edges_dense", "edges_sparse", "nodes_dense", "nodes_sparse", "solved_dense",
        "solved_sparse", "full_model_loss_dense", "full_model_loss_sparse",
        "edge_ratio_dense_over_sparse"]
    assert set(table.task) == {"single_double_quote", "bracket_counting"}
    both = table.solved_dense & table.solved_sparse
    assert both.all()  # every quick model meets the loose target
    ratios = table.edge_ratio_dense_over_sparse
    for r, d, s in zip(ratios, table.edges_dense, table.edges_sparse):
        assert r == d / s if s > 0 else math.isnan(r)  # no sparse edges: no ratio
    got = meta["settings"]["geometric_mean_ratio"]
    if ratios.notna().any():  # a geometric mean lies between the smallest and largest ratio
        assert ratios.min() - 1e-9 <= got <= ratios.max() + 1e-9 and f"**{got:.2f}x**" in summary
    else:
        assert (got is None or math.isnan(got)) and "undefined" in summary
    sparse, dense = meta["models"]
    assert sparse["model_config"]["weight_l0"] < 1 and dense["model_config"]["weight_l0"] == 1
    assert f"{sparse['val_loss']:.4f}" in summary and f"{dense['val_loss']:.4f}" in summary
    # the dense model stopped at its first evaluation at or below the sparse model's loss
    assert dense["train_config"]["stop_at_val_loss"] == pytest.approx(sparse["val_loss"], abs=1e-4)
    assert dense["val_loss"] <= dense["train_config"]["stop_at_val_loss"] or \
        meta["settings"]["dense_steps"] == dense["train_config"]["steps"]


@pytest.mark.slow
def test_kurtosis_has_every_site_of_every_model_and_says_the_trend(outputs):
    table, meta, summary = read(outputs[0]["kurtosis"])
    assert list(table.columns) == ["model", "d_model", "weight_l0", "val_loss", "site", "layer",
                                   "final", "kurtosis"]
    assert len(table) == 4 * 3  # 2 widths x 2 L0s, embedding + 2 layers
    assert np.isfinite(table["kurtosis"]).all() and (table["kurtosis"] >= -3).all()
    assert set(table.d_model) == {32, 64} and set(table.weight_l0) == {1.0, 0.25}
    assert table.final.sum() == 4
    assert "Kurtosis rises monotonically as L0 falls at" in summary


@pytest.mark.slow
def test_frontier_marks_the_models_no_other_beats(outputs):
    table, meta, summary = read(outputs[0]["frontier"])
    assert list(table.columns) == ["model", "d_model", "weight_l0", "val_loss", "tasks_solved",
                                   "tasks", "mean_edges", "mean_nodes", "on_frontier"]
    assert len(table) == 4 and np.isfinite(table.val_loss).all()
    solved = table[table.tasks_solved > 0]
    assert len(solved) and np.isfinite(solved.mean_edges).all()
    # nothing beats the lowest loss (the fewest edges among ties), nor the fewest edges (the
    # lowest loss among ties): both points are on the frontier
    lowest = solved[solved.val_loss == solved.val_loss.min()].mean_edges.idxmin()
    smallest = solved[solved.mean_edges == solved.mean_edges.min()].val_loss.idxmin()
    assert table.on_frontier[lowest] and table.on_frontier[smallest]
    assert not table.on_frontier[table.tasks_solved == 0].any()  # no circuit: no point
    per_task = pd.read_csv(outputs[0]["frontier"] / "frontier_per_task.csv")
    assert len(per_task) == 4 * len(meta["settings"]["tasks"])


@pytest.mark.slow
def test_dilution_lengthens_the_prompts_and_reports_flip_lengths(outputs):
    table, meta, summary = read(outputs[0]["dilution"])
    assert list(table.columns) == ["extra_items", "mean_tokens", "full_logit_diff", "full_accuracy",
                                   "circuit_logit_diff", "circuit_accuracy", "circuit_fit"]
    assert table.extra_items.tolist() == list(range(len(table)))
    assert table.mean_tokens.is_monotonic_increasing and table.mean_tokens.diff().dropna().gt(1).all()
    assert np.isfinite(table[["full_logit_diff", "circuit_logit_diff", "circuit_fit"]]).all().all()
    flip, diff = meta["settings"]["full_flip_tokens"], table.full_logit_diff.tolist()
    changes = [i for i in range(1, len(diff)) if diff[i - 1] > 0 >= diff[i]]
    if diff[0] > 0 and changes:  # the flip lies between the lengths where the sign first changes
        i = changes[0]
        assert table.mean_tokens[i - 1] <= flip <= table.mean_tokens[i]
    else:
        assert flip is None or math.isnan(flip)


@pytest.mark.slow
def test_dilution_stops_lengthening_where_the_context_ends(outputs, tmp_path):
    folder = analyses.run("dilution", tmp_path, outputs[1], quick=True, target_loss=LOOSE, n_prompts=4,
                          max_extra=500).folder
    table, meta, summary = read(folder)
    n_ctx = meta["models"][0]["model_config"]["n_ctx"]
    assert 0 < meta["settings"]["max_extra"] < 500 and len(table) == meta["settings"]["max_extra"] + 1
    assert table.mean_tokens.max() < n_ctx
    assert f"up to {meta['settings']['max_extra']} more items" in summary


@pytest.mark.slow
def test_the_cli_runs_an_analysis_and_rejects_unknown_ones(outputs, tmp_path, capsys):
    from sparse_lens.cli import main

    assert main(["analyze", "kurtosis", "--quick", "--out", str(tmp_path / "r"),
                 "--models-dir", str(outputs[1]), "--no-progress"]) == 0
    assert "Excess kurtosis" in capsys.readouterr().out
    assert (tmp_path / "r" / "kurtosis" / "kurtosis.csv").is_file()
    with pytest.raises(SystemExit):
        main(["analyze", "nonsense"])
    with pytest.raises(ValueError, match="unknown analysis"):
        analyses.run("nonsense", tmp_path)
    assert main(["analyze", "frontier", "--quick", "--tasks", "no_such_task", "--out",
                 str(tmp_path / "r")]) == 2


def test_each_analysis_declares_its_options_and_all_gives_each_its_own(monkeypatch, tmp_path, capsys):
    from sparse_lens.cli import build_parser, main

    assert analyses.option_names("dilution") == {"target_loss", "preset", "model", "n_prompts", "max_extra",
                                                   "k_fit"}
    assert analyses.option_names("kurtosis") == {"widths", "l0s", "steps", "n_batches", "models"}
    args = build_parser().parse_args(["analyze", "dilution", "--n-prompts", "4", "--quick"])
    assert (args.n_prompts, args.quick) == (4, True) and not hasattr(args, "target_loss")
    with pytest.raises(SystemExit):  # kurtosis prunes nothing
        build_parser().parse_args(["analyze", "kurtosis", "--target-loss", "1"])
    assert "unrecognized arguments: --target-loss" in capsys.readouterr().err
    calls = {}

    def fake_run(name, out_dir, models_dir, quick=False, **options):
        calls[name] = options
        return AnalysisResult(name, pd.DataFrame(), f"{name} done", tmp_path / name, ())

    monkeypatch.setattr(analyses, "run", fake_run)
    assert main(["analyze", "all", "--target-loss", "2", "--widths", "32", "--no-progress"]) == 0
    assert calls == {"circuit-size": dict(progress=False, target_loss=2.0),
                     "kurtosis": dict(progress=False, widths=[32]),
                     "frontier": dict(progress=False, target_loss=2.0, widths=[32]),
                     "dilution": dict(progress=False, target_loss=2.0)}  # no --runs: no learning curves
    assert "dilution done" in capsys.readouterr().out


def test_kurtosis_takes_models_trained_elsewhere_with_their_last_validation_loss(outputs, tmp_path):
    """`--models RUN_DIR ...`: the given training runs instead of the sweep, each with the
    validation loss of its last evaluation; nothing is trained."""
    _, models = outputs
    runs = sorted(p for p in models.iterdir() if p.name.startswith("sweep-"))[:2]
    before = sorted(p.name for p in models.iterdir())
    result = analyses.run("kurtosis", tmp_path, tmp_path / "unused", quick=True, models=[str(r) for r in runs])
    assert sorted(result.table.model.unique()) == [r.name for r in runs]
    for run in runs:
        state = json.loads((run / "training" / "state.json").read_text())
        last = [h["val_loss"] for h in state["history"] if h.get("val_loss") is not None][-1]
        assert (result.table[result.table.model == run.name].val_loss == last).all()
    meta = json.loads((result.folder / "meta.json").read_text())
    assert meta["settings"]["models"] == [str(r) for r in runs]
    assert sorted(p.name for p in models.iterdir()) == before and not (tmp_path / "unused").exists()


# ------------------------------------------------------------------- the pieces, on known inputs
def test_excess_kurtosis_of_known_vectors():
    gaussian = torch.randn(2000, 512, generator=torch.Generator().manual_seed(0))
    assert excess_kurtosis(gaussian).mean().item() == pytest.approx(0.0, abs=0.05)
    d = 64
    spike = torch.zeros(d)
    spike[3] = 5.0
    # one nonzero among d: kurtosis = (d^2 - 3d + 3) / (d - 1), minus 3
    assert excess_kurtosis(spike).item() == pytest.approx((d * d - 3 * d + 3) / (d - 1) - 3)
    assert excess_kurtosis(torch.tensor([1.0, -1.0] * 8)).item() == pytest.approx(-2.0)


def test_pareto_front_on_hand_points():
    loss = pd.Series([3.0, 2.5, 2.0, 2.6, 2.0, float("nan")])
    size = pd.Series([10.0, 20.0, 50.0, 30.0, 60.0, 1.0])
    assert pareto_front(loss, size).tolist() == [True, True, True, False, False, False]


def test_inverse_length_fit_and_crossing_recover_a_known_flip():
    lengths = np.array([20.0, 24.0, 28.0, 32.0])
    a, b = -1.0, 60.0  # zero at L = 60
    a_fit, b_fit, zero = fit_inverse_length(lengths, a + b / lengths)
    assert (a_fit, b_fit, zero) == pytest.approx((a, b, 60.0))
    grid = np.arange(20.0, 100.0, 4.0)
    assert crossing(grid, a + b / grid) == pytest.approx(60.0, abs=0.5)
    assert math.isnan(crossing([1, 2, 3], [-1.0, -2.0, -3.0]))  # wrong from the start
    assert math.isnan(crossing([1, 2, 3], [3.0, 2.0, 1.0]))  # never flips
    assert math.isnan(fit_inverse_length(lengths, 1.0 + 0 * lengths)[2])


def test_diluted_prompts_append_items_to_the_open_list():
    base = ["x = [[1, 2], [3", "print([['a'"]
    for k in (0, 1, 5):
        out = diluted_prompts(base, k)
        assert all(o.startswith(b) and o[len(b):].count(", ") == k for o, b in zip(out, base))
        assert all(o.count("[") == b.count("[") for o, b in zip(out, base))


def test_edge_ratios_and_their_geometric_mean_on_a_hand_table():
    long = pd.DataFrame(dict(
        kind=["sparse", "dense"] * 3, task=["a", "a", "b", "b", "c", "c"],
        edges=[10, 40, 20, 180, 5, 1000], nodes=[1, 2, 3, 4, 5, 6],
        solved=[True, True, True, True, True, False], full_model_loss=[0.1] * 6))
    wide, both, ratio = compare_sizes(long, ["a", "b", "c"])
    assert both.tolist() == [True, True, False]  # c: the dense model misses it
    # a: 40 / 10 = 4; b: 180 / 20 = 9; c: not solved by both
    assert wide.edge_ratio_dense_over_sparse[:2].tolist() == [4.0, 9.0]
    assert math.isnan(wide.edge_ratio_dense_over_sparse[2])
    assert ratio == pytest.approx(6.0)  # sqrt(4 * 9) = sqrt(36) = 6


def test_crossing_on_hand_numbers():
    # from 3 at length 10 to -1 at length 20: zero at 10 + 10 * 3 / (3 - (-1)) = 17.5
    assert crossing([10, 20, 30], [3.0, -1.0, -2.0]) == pytest.approx(17.5)
    # the first change of sign counts: 2 -> 0 between 4 and 8 is at 8 (0 counts as flipped)
    assert crossing([4, 8, 12, 16], [2.0, 0.0, 1.0, -1.0]) == pytest.approx(8.0)


def test_geometric_mean_and_markdown_table():
    assert geometric_mean([2.0, 8.0]) == pytest.approx(4.0)  # sqrt(16)
    assert geometric_mean([1.0, 3.0, 9.0]) == pytest.approx(3.0)  # 27 ** (1 / 3)
    assert math.isnan(geometric_mean([])) and math.isnan(geometric_mean([1.0, 0.0]))
    md = table_markdown(pd.DataFrame(dict(a=[1, 2], b=[0.5, float("nan")])))
    assert md.splitlines() == ["| a | b |", "|---|---|", "| 1 | 0.5 |", "| 2 |  |"]
    # edge counts in a column with NaNs (floats) keep every digit
    md = table_markdown(pd.DataFrame(dict(edges=[27248.0, float("nan"), 1182.0], loss=[0.61443, 12345.6, 2.0])))
    assert md.splitlines()[2:] == ["| 27,248 | 0.6144 |", "|  | 1.235e+04 |", "| 1182 | 2 |"]


@pytest.mark.slow
def test_learning_curves_evaluate_every_snapshot(tmp_path):
    """A tiny run with two snapshots: one row per (snapshot, task, level), tokens as steps x 4 x 32,
    the loss of the last snapshot's core quote task the same as evaluating that model directly."""
    from sparse_lens.model import SparseHookedTransformer
    from sparse_lens.tasks import evaluate_levels

    folder = analyses.run("learning-curves", tmp_path / "out", tmp_path / "models", quick=True).folder
    table = pd.read_csv(folder / "learning_curves.csv")
    assert sorted(set(table.step)) == [10, 20]
    assert set(table.tokens) == {10 * 4 * 32, 20 * 4 * 32}
    assert set(table.level) == {"core", "hard", "corpus"}
    snapshot = SparseHookedTransformer.from_pretrained(
        tmp_path / "models" / "tiny-snapshots" / "snapshots" / "step-000020")
    direct = evaluate_levels(snapshot, ["single_double_quote"], levels=("core",), n=16, bigram=False)
    row = table[(table.step == 20) & (table.task == "single_double_quote") & (table.level == "core")]
    assert row.loss.iloc[0] == pytest.approx(direct.loss.iloc[0], abs=1e-6)
    assert (folder / "learning_curves.png").stat().st_size > 0
    per = pd.read_csv(folder / "per_snapshot.csv")
    assert per.solved.le(per.tasks).all()


def test_learning_curves_reuse_saved_snapshot_evaluations_and_carry_earlier_runs(tmp_path, monkeypatch):
    """A second run reads each snapshot's saved evaluation (nothing is evaluated again) unless the
    settings differ; `previous` keeps an earlier table's rows of runs that are not given."""
    from sparse_lens import tasks as task_module

    first = analyses.run("learning-curves", tmp_path / "out", tmp_path / "models", quick=True)
    run_dir = tmp_path / "models" / "tiny-snapshots"
    calls = []
    real = task_module.evaluate_levels
    monkeypatch.setattr(task_module, "evaluate_levels", lambda *a, **k: calls.append(k["n"]) or real(*a, **k))
    again = analyses.run("learning-curves", tmp_path / "again", tmp_path / "models", runs=[run_dir],
                         tasks=list(analyses.module("learning-curves").QUICK_TASKS), n=16)
    assert calls == []
    pd.testing.assert_frame_equal(again.table, first.table)
    other_n = analyses.run("learning-curves", tmp_path / "n8", tmp_path / "models", runs=[run_dir],
                           tasks=["single_double_quote"], n=8)
    assert calls == [8, 8]  # two snapshots, new settings
    earlier = first.table.assign(run="gone-run")
    earlier.to_csv(tmp_path / "earlier.csv", index=False)
    merged = analyses.run("learning-curves", tmp_path / "merged", tmp_path / "models", runs=[run_dir],
                          tasks=["single_double_quote"], n=8, previous=tmp_path / "earlier.csv")
    assert set(merged.table.run) == {"gone-run", "tiny-snapshots"}
    assert len(merged.table) == len(earlier) + len(other_n.table)
    assert "`gone-run`" in merged.summary


@pytest.mark.slow
def test_circuit_curves_prune_every_snapshot_and_reuse_the_saved_circuits(tmp_path, monkeypatch):
    """A tiny run with two snapshots: one row per (snapshot, task), each row the circuit saved
    beside its snapshot, with the validation loss the run evaluated there; a second run with the
    same settings reads the circuits back and prunes nothing."""
    from sparse_lens import pruning
    from sparse_lens.circuit import Circuit
    from sparse_lens.model import SparseHookedTransformer

    first = analyses.run("circuit-curves", tmp_path / "out", tmp_path / "models", quick=True, target_loss=2.0)
    table = first.table
    assert list(table.step) == [10, 20] and set(table.task) == {"single_double_quote"}
    assert list(table.tokens) == [10 * 4 * 32, 20 * 4 * 32]
    run = tmp_path / "models" / "tiny-snapshots"
    state = json.loads((run / "training" / "state.json").read_text())
    evaluated = {h["step"]: h["val_loss"] for h in state["history"] if h.get("val_loss") is not None}
    assert list(table.val_loss) == [evaluated[10], evaluated[20]]
    assert table.solved.astype(bool).all()  # the tiny model's task loss is under 2 nats
    for row in table.itertuples():
        snapshot = run / "snapshots" / f"step-{row.step:06d}"
        circuit = Circuit.load(snapshot / "circuits" / "target2" / row.task,
                               SparseHookedTransformer.from_pretrained(snapshot))
        assert circuit.n_nodes == row.nodes
    assert (first.folder / "circuit_curves.png").stat().st_size > 0
    assert "solved at 2 of 2 snapshots" in first.summary

    monkeypatch.setattr(pruning, "prune", lambda *a, **k: pytest.fail("pruned again"))
    again = analyses.run("circuit-curves", tmp_path / "again", tmp_path / "models", quick=True, target_loss=2.0)
    pd.testing.assert_frame_equal(again.table, table)
    only_20 = analyses.run("circuit-curves", tmp_path / "every", tmp_path / "models", quick=True,
                           target_loss=2.0, every=20)
    pd.testing.assert_frame_equal(only_20.table, table[table.step == 20].reset_index(drop=True))
    with pytest.raises(ValueError, match="no snapshot at a multiple of 7"):
        analyses.run("circuit-curves", tmp_path / "none", tmp_path / "models", quick=True, every=7)
    # `previous`: an earlier table's rows of other runs are kept, those of a run given again replaced
    earlier = pd.concat([table.assign(run="gone-run"), table.assign(nodes=-1)], ignore_index=True)
    earlier.to_csv(tmp_path / "earlier.csv", index=False)
    merged = analyses.run("circuit-curves", tmp_path / "merged", tmp_path / "models", quick=True,
                          target_loss=2.0, previous=tmp_path / "earlier.csv")
    assert list(merged.table.run) == ["gone-run"] * len(table) + ["tiny-snapshots"] * len(table)
    assert (merged.table.nodes[merged.table.run == "tiny-snapshots"] == table.nodes.values).all()
    assert "`gone-run` single_double_quote: solved at 2 of 2" in merged.summary
    table.drop(columns="nodes").to_csv(tmp_path / "other.csv", index=False)
    with pytest.raises(ValueError, match="no \\['nodes'\\] columns"):
        analyses.run("circuit-curves", tmp_path / "bad", tmp_path / "models", quick=True,
                     target_loss=2.0, previous=tmp_path / "other.csv")


def test_the_shipped_model_as_the_sparse_side_gets_a_dense_baseline_with_its_settings(tmp_path):
    """`--sparse-model small`: the shipped checkpoint, written as a model directory once, with the
    validation loss and training settings of its provenance; the dense baseline shares the
    settings that shape the weights (its step count) and stops at that loss."""
    from sparse_lens import pretrained

    record = pretrained.provenance("small")
    sparse = existing_model("small", tmp_path)
    assert sparse.path == tmp_path / "small-shipped" and sparse.val_loss == record["val_loss"]
    assert result_settings(sparse) == {"steps": record["train_config"]["steps"]}
    assert existing_model(sparse.path, tmp_path).val_loss == sparse.val_loss  # the directory itself
    dense = dense_spec(sparse)
    model_cfg, train_cfg = dense.configs(quick=False)
    assert model_cfg.weight_l0 == 1.0 and train_cfg.steps == record["train_config"]["steps"]
    assert train_cfg.stop_at_val_loss == float(f"{record['val_loss']:.4f}") and train_cfg.eval_every == 25
    assert dense.name == f"small-dense-to-{record['val_loss']:.4f}"
    with pytest.raises(FileNotFoundError, match="shipped checkpoint"):
        existing_model(tmp_path / "nowhere", tmp_path)


@pytest.mark.slow
def test_a_run_snapshot_serves_as_a_model_with_the_loss_evaluated_at_its_step(tmp_path):
    """`<run>/snapshots/step-N` is a model trained elsewhere (the dense side of circuit-size,
    `--dense-model`): the validation loss the run evaluated at step N, the history up to N;
    a step without an evaluation is an error, not another step's loss."""
    analyses.run("learning-curves", tmp_path / "out", tmp_path / "models", quick=True)
    run = tmp_path / "models" / "tiny-snapshots"
    state = json.loads((run / "training" / "state.json").read_text())
    at_10 = [h["val_loss"] for h in state["history"] if h["step"] == 10 and h.get("val_loss") is not None]
    snapshot = existing_model(run / "snapshots" / "step-000010", tmp_path)
    assert [snapshot.val_loss] == at_10 and snapshot.history[-1]["step"] == 10
    assert snapshot.spec.name == "tiny-snapshots-step-000010"  # named after its run
    result = analyses.run("circuit-size", tmp_path / "out", tmp_path / "unused", quick=True,
                          target_loss=LOOSE, sparse_model=str(run),
                          dense_model=str(run / "snapshots" / "step-000010"))
    meta = json.loads((result.folder / "meta.json").read_text())
    assert meta["settings"]["dense_model"] == str(run / "snapshots" / "step-000010")
    assert meta["models"][1]["val_loss"] == at_10[0] and "taken from" in result.summary
    assert not (tmp_path / "unused").exists()  # nothing trained
    fake = run / "snapshots" / "step-000011"
    fake.mkdir()
    with pytest.raises(ValueError, match="no validation loss at step 11"):
        existing_model(fake, tmp_path)
