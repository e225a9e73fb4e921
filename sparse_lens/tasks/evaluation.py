"""A model's task loss and accuracy at every level of every task, beside the trivial-task guard.

    from sparse_lens.tasks import evaluate_levels
    table = evaluate_levels(model)          # one row per (task, level)

Meant to run on every training snapshot (learning curves), so it only reads the model.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pandas as pd
import torch

from sparse_lens.tasks.base import list_tasks
from sparse_lens.tasks.corpus import CORPUS_TASKS, corpus_class_counts
from sparse_lens.tasks.dataset import TaskData
from sparse_lens.tasks.guard import TOO_EASY_ACCURACY, last_token_accuracy
from sparse_lens.tasks.loading import get_task
from sparse_lens.tasks.metrics import task_logit_diff

#: The levels `evaluate_levels` reports: two generated ones and real code.
ALL_LEVELS = ("core", "hard", "corpus")


def _load(name: str, level: str, tokenizer, n: int, seed: int, split: str,
          corpus: Sequence[str | Path] | None) -> TaskData:
    """`n` examples at `level`; for the corpus, at most as many as it holds balanced."""
    if level == "corpus":
        if tokenizer is None:
            from sparse_lens.tokenizer import load_tokenizer
            tokenizer = load_tokenizer()
        n = min(n, 2 * min(corpus_class_counts(name, tokenizer, split, corpus)))
        return get_task(name, tokenizer, n=n, seed=seed, split=split, source="corpus", corpus=corpus)
    return get_task(name, tokenizer, n=n, seed=seed, split=split, level=level)


def bigram_guard(name: str, level: str = "core", tokenizer=None, n_train: int = 512,
                 n_test: int = 256, seed: int = 0,
                 corpus: Sequence[str | Path] | None = None) -> float:
    """Test accuracy of the last-token predictor fitted on `n_train` train examples of the task
    at `level` ("core", "hard" or "corpus"), on `n_test` test examples."""
    train = _load(name, level, tokenizer, n_train, seed, "train", corpus)
    test = _load(name, level, tokenizer, n_test, seed, "test", corpus)
    return last_token_accuracy(train, test)


@torch.no_grad()
def _margins(model, data: TaskData, batch_size: int) -> torch.Tensor:
    """[n] logit(correct) - logit(contrast), batched by similar prompt lengths."""
    order = torch.argsort(data.last_pos, stable=True)
    out = torch.empty(len(data))
    for start in range(0, len(data), batch_size):
        rows = order[start:start + batch_size]
        part = data[rows].to(model.cfg.device)
        out[rows] = task_logit_diff(model(part.tokens), part).float().cpu()
    return out


def evaluate_levels(model, names: Sequence[str] | None = None,
                    levels: Sequence[str] = ALL_LEVELS, n: int = 128, seed: int = 0,
                    split: str = "test", batch_size: int = 64, bigram: bool = True,
                    corpus: Sequence[str | Path] | None = None) -> pd.DataFrame:
    """Full-model task loss (mean binary CE, nats) and accuracy on `n` examples of each task
    in `names` (default all) at each of `levels` ("core", "hard", "corpus"; the corpus level
    only for `CORPUS_TASKS`, from `corpus`, default the stdlib validation files, and with at
    most as many examples as that corpus holds balanced: column `n`).

    Columns: task, level, n, loss, accuracy, solved (loss <= 0.15), and with `bigram` the
    last-token predictor's accuracy (fitted on 512 train examples, tested on `n`) and
    `too_easy` (core tasks over `TOO_EASY_ACCURACY`). The model is put in eval mode and back."""
    unknown = set(levels) - set(ALL_LEVELS)
    if unknown:
        raise ValueError(f"levels must be among {ALL_LEVELS}; got {sorted(unknown)}")
    names = list_tasks() if names is None else list(names)
    was_training = model.training
    model.eval()
    rows = []
    try:
        for name in names:
            for level in levels:
                if level == "corpus" and name not in CORPUS_TASKS:
                    continue
                data = _load(name, level, model.tokenizer, n, seed, split, corpus)
                margin = _margins(model, data, batch_size)
                loss = torch.nn.functional.softplus(-margin).mean().item()
                row = dict(task=name, level=level, n=len(data), loss=loss,
                           accuracy=(margin > 0).float().mean().item(), solved=loss <= 0.15)
                if bigram:
                    train = _load(name, level, model.tokenizer, 512, seed, "train", corpus)
                    row["bigram_accuracy"] = last_token_accuracy(train, data)
                    row["too_easy"] = level == "core" and row["bigram_accuracy"] > TOO_EASY_ACCURACY
                rows.append(row)
    finally:
        model.train(was_training)
    return pd.DataFrame(rows)
