"""The benchmarks still run against the package (they are not part of the timed suite, so a
refactor that moves what they patch would otherwise go unnoticed until someone measures)."""

import importlib.util
from pathlib import Path

import pytest

from conftest import save_tiny_model_with_means

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def load(name: str):
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow  # a real 100-step prune of the tiny model
def test_bench_pruning_times_both_phases_of_a_real_prune(tokenizer, tmp_path, capsys):
    save_tiny_model_with_means(tokenizer, tmp_path)
    load("bench_pruning").main(["--model", str(tmp_path), "--tasks", "single_double_quote:2.0",
                                "--threads", "1", "--no-long"])
    out = capsys.readouterr().out
    line = next(row for row in out.splitlines() if "steps:" in row)
    assert "nodes" in line and "optimise" in line and "search" in line and "total" in line
