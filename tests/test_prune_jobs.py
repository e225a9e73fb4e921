"""`sparse-lens prune --jobs N`: tasks pruned in N processes give the serial run's circuits."""

import pandas as pd
import pytest
import torch

from conftest import save_tiny_model_with_means
from sparse_lens import cli
from sparse_lens.circuit import Circuit
from sparse_lens.model import SparseHookedTransformer
from sparse_lens.pipeline import prune_tasks
from sparse_lens.pruning import PruneConfig

TASKS = ["with_as", "for_while", "single_double_quote"]


@pytest.fixture
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # the serial run and each worker: the same float reductions
    yield
    torch.set_num_threads(before)


@pytest.mark.slow
def test_two_jobs_write_the_circuits_and_summary_of_the_serial_run(tokenizer, tmp_path, one_thread):
    model_dir = tmp_path / "tiny"
    save_tiny_model_with_means(tokenizer, model_dir)
    # (--task all on the tiny model: some tasks' prompts exceed its 64-token context)
    args = ["prune", "--model", str(model_dir), "--task", *TASKS, "--target-loss", "5", "--steps", "3",
            "--no-progress", "--no-verify"]
    for name, jobs in (("serial", "1"), ("parallel", "2")):
        assert cli.main([*args, "--out", str(tmp_path / name), "--jobs", jobs]) == 0
    serial = pd.read_csv(tmp_path / "serial" / "summary.csv").drop(columns="seconds")
    parallel = pd.read_csv(tmp_path / "parallel" / "summary.csv").drop(columns="seconds")
    pd.testing.assert_frame_equal(parallel, serial)
    assert list(serial.task) == TASKS and serial.solved.sum() >= 1  # pruned (a generous target)
    model = SparseHookedTransformer.from_pretrained(model_dir)
    for task in serial.task:
        a = Circuit.load(tmp_path / "serial" / task, model)
        b = Circuit.load(tmp_path / "parallel" / task, model)
        assert a.node_ids == b.node_ids and a.losses == b.losses
        assert (a.tau is None and b.tau is None) or torch.equal(a.tau, b.tau)


@pytest.mark.slow
def test_outcomes_come_back_in_task_order_and_bad_jobs_are_refused(tokenizer, tmp_path, one_thread):
    model_dir = tmp_path / "tiny"
    save_tiny_model_with_means(tokenizer, model_dir)
    config = PruneConfig(steps=2, target_loss=5, progress=False)
    seen = []
    table = prune_tasks(model_dir, TASKS, config, out=tmp_path / "out", verify=False, jobs=2,
                        on_done=lambda o: seen.append(o.task))
    assert list(table.task) == TASKS == seen
    assert pd.read_csv(tmp_path / "out" / "summary.csv").task.tolist() == TASKS
    assert all((tmp_path / "out" / task).is_dir() for task in TASKS)
    with pytest.raises(ValueError, match="jobs must be an integer >= 1"):
        prune_tasks(model_dir, TASKS, config, out=tmp_path / "out", jobs=0)
