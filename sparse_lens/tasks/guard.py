"""The trivial-task guard: how far a predictor that sees only a prompt's last token gets.

The predictor is a bigram table fitted on a task's train split: for each last token, how often
each answer was right after it. On a test example it picks whichever of the two candidates the
table saw more often after that last token (falling back to the answers' overall counts when the
table has neither after it); a tie scores 1/2, a fair coin. A task this predictor solves tests
the last token, not the behaviour it names: a core task it solves above `TOO_EASY_ACCURACY` is
too easy (`TaskSpec.too_easy` says why).
"""

from __future__ import annotations

from collections import Counter, defaultdict

import torch

from sparse_lens.tasks.dataset import TaskData

#: A core task whose last-token predictor exceeds this test accuracy is too easy.
TOO_EASY_ACCURACY = 0.65


def last_tokens(data: TaskData) -> list[int]:
    """The id of each prompt's last token."""
    rows = torch.arange(len(data))
    return data.tokens.cpu()[rows, data.last_pos.cpu()].tolist()


def last_token_accuracy(train: TaskData, test: TaskData) -> float:
    """Test accuracy of the last-token table fitted on `train` (see the module docstring)."""
    if not len(train) or not len(test):
        raise ValueError("last_token_accuracy needs nonempty train and test data")
    table: dict[int, Counter] = defaultdict(Counter)
    overall: Counter = Counter()
    for token, answer in zip(last_tokens(train), train.correct.tolist()):
        table[token][answer] += 1
        overall[answer] += 1
    score = 0.0
    for token, correct, contrast in zip(last_tokens(test), test.correct.tolist(), test.contrast.tolist()):
        counts = table.get(token, Counter())
        if counts[correct] == counts[contrast] == 0:
            counts = overall
        score += 1.0 if counts[correct] > counts[contrast] else 0.5 if counts[correct] == counts[contrast] else 0.0
    return score / len(test)
