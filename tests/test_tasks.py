"""Tests of sparse_lens.tasks: the 20 binary next-token tasks, TaskData and the task metrics."""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch

from sparse_lens.tasks import (
    TaskData, generate_examples, get_spec, get_task, list_tasks, task_accuracy, task_logit_diff,
    task_loss,
)
from sparse_lens.tasks.base import MAX_PROMPT_TOKENS_LIMIT

N = 64
PAPER_TASKS = [
    "single_double_quote", "bracket_counting", "set_or_string", "set_or_string_fixedvarname",
    "with_as", "with_open", "for_while", "else_elif", "if_ternary", "if_equals", "fstring_brace",
    "bracket_brace", "var_swap", "var_if", "indent_for", "while_return_true", "lambda_func",
    "enumerate_range", "final_kwarg", "class_init",
]


def encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def compiles(source: str) -> bool:
    """Whether `source` compiles as a module (independent of the package's own check)."""
    try:
        compile(source, "<test>", "exec", dont_inherit=True)
    except SyntaxError:
        return False
    return True


@pytest.fixture(scope="module")
def train_data(tokenizer):
    """get_task(name, n=N, seed=0, split="train"), computed once per task."""
    cache: dict[str, TaskData] = {}

    def get(name: str) -> TaskData:
        if name not in cache:
            cache[name] = get_task(name, tokenizer, n=N, seed=0, split="train")
        return cache[name]

    return get


# ---------------------------------------------------------------------------- registry and API
def test_list_tasks_gives_the_papers_twenty_in_order():
    assert list_tasks() == PAPER_TASKS


def test_unknown_task_error_lists_the_known_names(tokenizer):
    with pytest.raises(ValueError, match="unknown task 'nope'") as info:
        get_task("nope", tokenizer)
    for name in PAPER_TASKS:
        assert name in str(info.value)


@pytest.mark.parametrize("n", [0, -3, 2.5, True, "8"])
def test_bad_n_is_rejected(tokenizer, n):
    with pytest.raises(ValueError, match="n must be a positive integer"):
        get_task("with_as", tokenizer, n=n)


def test_bad_split_is_rejected(tokenizer):
    with pytest.raises(ValueError, match="split must be one of"):
        get_task("with_as", tokenizer, split="validation")


def test_smaller_n_is_a_prefix_and_odd_n_is_nearly_balanced(tokenizer, train_data):
    small = get_task("for_while", tokenizer, n=7)
    assert small.prompts == train_data("for_while").prompts[:7]
    assert sorted(Counter(small.labels.tolist()).values()) == [3, 4]


def test_default_tokenizer_is_the_shipped_one(tokenizer, train_data):
    data = get_task("var_swap", n=N)
    assert torch.equal(data.tokens, train_data("var_swap").tokens)


# ---------------------------------------------------------------------------- every task
@pytest.mark.parametrize("name", PAPER_TASKS)
def test_same_seed_gives_the_same_examples(tokenizer, train_data, name):
    again = get_task(name, tokenizer, n=N, seed=0, split="train")
    assert again.prompts == train_data(name).prompts
    assert torch.equal(again.tokens, train_data(name).tokens)
    other_seed = get_task(name, tokenizer, n=N, seed=1, split="train")
    assert other_seed.prompts != train_data(name).prompts


@pytest.mark.parametrize("name", PAPER_TASKS)
def test_train_and_test_prompts_are_disjoint_and_unique(tokenizer, train_data, name):
    test = get_task(name, tokenizer, n=N, seed=0, split="test")
    train = train_data(name)
    assert len(set(train.prompts)) == len(set(test.prompts)) == N
    assert not set(train.prompts) & set(test.prompts)


@pytest.mark.parametrize("name", PAPER_TASKS)
def test_classes_are_balanced(train_data, name):
    """Half the examples are of each class; no token is the right answer much more often than
    half the time; when a task has one fixed pair of answers, each class always gives the same
    one and the classes swap them."""
    data = train_data(name)
    assert Counter(data.labels.tolist()) == {0: N // 2, 1: N // 2}
    most_common_correct = Counter(data.correct.tolist()).most_common(1)[0][1]
    assert most_common_correct <= N / 2 + 2 * math.sqrt(N)
    if len(set(data.correct_str) | set(data.contrast_str)) == 2:
        by_class = {label: {c for c, l in zip(data.correct_str, data.labels.tolist()) if l == label}
                    for label in (0, 1)}
        assert len(by_class[0]) == len(by_class[1]) == 1 and by_class[0] != by_class[1]


@pytest.mark.parametrize("name", PAPER_TASKS)
def test_candidates_are_single_tokens_in_context(tokenizer, train_data, name):
    data = train_data(name)
    for row, prompt in enumerate(data.prompts):
        prompt_ids = encode(tokenizer, prompt)
        assert data.tokens[row, :data.last_pos[row] + 1].tolist() == prompt_ids
        for text, token in ((data.correct_str[row], data.correct[row]),
                            (data.contrast_str[row], data.contrast[row])):
            assert encode(tokenizer, text) == [int(token)]
            assert encode(tokenizer, prompt + text) == prompt_ids + [int(token)]
        assert data.correct_str[row] != data.contrast_str[row]


@pytest.mark.parametrize("name", PAPER_TASKS)
def test_correct_continuation_is_valid_python(tokenizer, train_data, name):
    """prompt + correct + suffix compiles; where the example says the contrast is impossible,
    prompt + contrast + suffix does not."""
    examples = generate_examples(name, n=N, seed=0, split="train", tokenizer=tokenizer)
    assert [e.prompt for e in examples] == train_data(name).prompts
    for example in examples:
        assert compiles(example.prompt + example.correct + example.suffix), example
        if example.contrast_invalid:
            assert not compiles(example.prompt + example.contrast + example.suffix), example


def test_some_tasks_check_that_the_contrast_is_invalid(tokenizer):
    checked = [name for name in PAPER_TASKS
               if any(e.contrast_invalid for e in generate_examples(name, n=8, tokenizer=tokenizer))]
    assert len(checked) >= len(PAPER_TASKS) // 2


@pytest.mark.parametrize("name", PAPER_TASKS)
def test_prompts_fit_the_budget_and_padding_is_to_the_longest(train_data, name):
    data, spec = train_data(name), get_spec(name)
    assert spec.max_prompt_tokens <= MAX_PROMPT_TOKENS_LIMIT
    assert int(data.last_pos.max()) + 1 <= spec.max_prompt_tokens
    assert data.tokens.shape == (N, int(data.last_pos.max()) + 1)
    beyond = torch.arange(data.tokens.shape[1]) > data.last_pos[:, None]
    assert (data.tokens[beyond] == 0).all()
    assert data.description and "\n" not in data.description and data.name == name


# ---------------------------------------------------------------------------- TaskData and metrics
@pytest.fixture
def quote_data(tokenizer) -> TaskData:
    """Three hand-made prompts of different lengths (so two of them are padded)."""
    prompts = ["x = 'a", 'print("hello world, this is a longer prompt', "y = 'b"]
    return TaskData.from_prompts("quotes", prompts, ["'", '"', "'"], ['"', "'", '"'], tokenizer)


def logits_with_margins(data: TaskData, margins: list[float], d_vocab: int = 2048) -> torch.Tensor:
    """Random logits, except that at each final position l_correct - l_contrast = margin; every
    padded position strongly favours the contrast token (it must never be read)."""
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(len(data), data.tokens.shape[1], d_vocab, generator=gen)
    for row, margin in enumerate(margins):
        last = int(data.last_pos[row])
        logits[row, last + 1:, data.contrast[row]] = 100.0
        logits[row, last, data.contrast[row]] = logits[row, last, data.correct[row]] - margin
    return logits


def test_logit_diff_reads_the_final_position_not_the_padding(quote_data):
    margins = [2.0, -1.0, 0.5]
    diff = task_logit_diff(logits_with_margins(quote_data, margins), quote_data)
    assert torch.allclose(diff, torch.tensor(margins), atol=1e-5)
    assert quote_data.last_pos.tolist() != [quote_data.tokens.shape[1] - 1] * 3  # some padding


def test_task_loss_is_mean_softplus_of_minus_margin(quote_data):
    margins = [2.0, -1.0, 0.5]
    logits = logits_with_margins(quote_data, margins)
    expected = [math.log1p(math.exp(-m)) for m in margins]
    assert task_loss(logits, quote_data).item() == pytest.approx(sum(expected) / 3, rel=1e-5)
    assert task_loss(logits, quote_data, reduction="sum").item() == pytest.approx(sum(expected), rel=1e-5)
    assert task_loss(logits, quote_data, reduction="none").tolist() == pytest.approx(expected, rel=1e-5)
    with pytest.raises(ValueError, match="reduction"):
        task_loss(logits, quote_data, reduction="max")


def test_loss_for_margin_two_everywhere_is_softplus_minus_two(quote_data):
    logits = logits_with_margins(quote_data, [2.0, 2.0, 2.0])
    assert task_loss(logits, quote_data).item() == pytest.approx(math.log1p(math.exp(-2.0)), rel=1e-5)
    assert task_accuracy(logits, quote_data) == 1.0


def test_accuracy_counts_strictly_larger_correct_logits(quote_data):
    mixed = logits_with_margins(quote_data, [2.0, -1.0, 0.5])
    assert task_accuracy(mixed, quote_data) == pytest.approx(2 / 3)
    assert task_accuracy(logits_with_margins(quote_data, [0.0, 0.0, 0.0]), quote_data) == 0.0


def test_metrics_reject_logits_of_the_wrong_shape(quote_data):
    with pytest.raises(ValueError, match="batch"):
        task_logit_diff(torch.zeros(2, quote_data.tokens.shape[1], 8), quote_data)
    with pytest.raises(ValueError, match="positions"):
        task_logit_diff(torch.zeros(3, 2, 2048), quote_data)


def test_subset_trims_padding_and_keeps_the_gathered_logits(quote_data):
    margins = [2.0, -1.0, 0.5]
    logits = logits_with_margins(quote_data, margins)
    short = quote_data[[0, 2]]
    assert short.tokens.shape[1] == int(short.last_pos.max()) + 1 < quote_data.tokens.shape[1]
    assert short.prompts == [quote_data.prompts[0], quote_data.prompts[2]]
    diff = task_logit_diff(logits[[0, 2], :short.tokens.shape[1]], short)
    assert torch.allclose(diff, torch.tensor([2.0, 0.5]), atol=1e-5)


def test_subset_accepts_slices_ints_and_tensors(quote_data):
    assert quote_data[1:].prompts == quote_data.prompts[1:]
    assert quote_data[-1].prompts == quote_data.prompts[-1:]
    assert quote_data[torch.tensor([2, 0])].prompts == [quote_data.prompts[2], quote_data.prompts[0]]
    assert quote_data[torch.tensor([True, False, True])].prompts == quote_data[[0, 2]].prompts
    assert [len(b) for b in quote_data.batches(2)] == [2, 1]
    with pytest.raises(IndexError):
        quote_data[[3]]


def test_to_device_moves_every_tensor(quote_data):
    moved = quote_data.to("cpu")
    assert torch.equal(moved.tokens, quote_data.tokens) and moved.prompts == quote_data.prompts
    assert moved.correct.device.type == "cpu"


def test_from_prompts_rejects_a_candidate_that_merges_with_the_prompt(tokenizer):
    with pytest.raises(ValueError, match="not a single token after the prompt"):
        TaskData.from_prompts("merge", ["x = [[1]"], ["]"], ["]]"], tokenizer)


def test_from_prompts_rejects_a_multi_token_candidate(tokenizer):
    with pytest.raises(ValueError, match="is not a single token"):
        TaskData.from_prompts("multi", ["x = "], ["1234567 + y"], ["'"], tokenizer)
