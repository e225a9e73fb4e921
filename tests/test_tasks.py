"""Tests of sparse_lens.tasks: the 20 binary next-token tasks, TaskData and the task metrics."""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch

from sparse_lens.tasks import (
    CORPUS_TASKS, LEVELS, TOO_EASY_ACCURACY, TaskData, bigram_guard, corpus_class_counts,
    evaluate_levels, generate_examples, get_spec, get_task, last_token_accuracy, list_tasks,
    task_accuracy, task_logit_diff, task_loss,
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
    """get_task(name, n=N, seed=0, split="train", level=level), computed once per task and level."""
    cache: dict[tuple[str, str], TaskData] = {}

    def get(name: str, level: str = "core") -> TaskData:
        if (name, level) not in cache:
            cache[name, level] = get_task(name, tokenizer, n=N, seed=0, split="train", level=level)
        return cache[name, level]

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
@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("name", PAPER_TASKS)
def test_same_seed_gives_the_same_examples(tokenizer, train_data, name, level):
    again = get_task(name, tokenizer, n=N, seed=0, split="train", level=level)
    assert again.prompts == train_data(name, level).prompts
    assert torch.equal(again.tokens, train_data(name, level).tokens)
    other_seed = get_task(name, tokenizer, n=N, seed=1, split="train", level=level)
    assert other_seed.prompts != train_data(name, level).prompts


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("name", PAPER_TASKS)
def test_train_and_test_prompts_are_disjoint_and_unique(tokenizer, train_data, name, level):
    test = get_task(name, tokenizer, n=N, seed=0, split="test", level=level)
    train = train_data(name, level)
    assert len(set(train.prompts)) == len(set(test.prompts)) == N
    assert not set(train.prompts) & set(test.prompts)


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("name", PAPER_TASKS)
def test_classes_are_balanced(train_data, name, level):
    """Half the examples are of each class; no token is the right answer much more often than
    half the time; when a task has one fixed pair of answers, each class always gives the same
    one and the classes swap them."""
    data = train_data(name, level)
    assert Counter(data.labels.tolist()) == {0: N // 2, 1: N // 2}
    most_common_correct = Counter(data.correct.tolist()).most_common(1)[0][1]
    assert most_common_correct <= N / 2 + 2 * math.sqrt(N)
    if len(set(data.correct_str) | set(data.contrast_str)) == 2:
        by_class = {label: {c for c, l in zip(data.correct_str, data.labels.tolist()) if l == label}
                    for label in (0, 1)}
        assert len(by_class[0]) == len(by_class[1]) == 1 and by_class[0] != by_class[1]


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("name", PAPER_TASKS)
def test_candidates_are_single_tokens_in_context(tokenizer, train_data, name, level):
    data = train_data(name, level)
    for row, prompt in enumerate(data.prompts):
        prompt_ids = encode(tokenizer, prompt)
        assert data.tokens[row, :data.last_pos[row] + 1].tolist() == prompt_ids
        for text, token in ((data.correct_str[row], data.correct[row]),
                            (data.contrast_str[row], data.contrast[row])):
            assert encode(tokenizer, text) == [int(token)]
            assert encode(tokenizer, prompt + text) == prompt_ids + [int(token)]
        assert data.correct_str[row] != data.contrast_str[row]


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("name", PAPER_TASKS)
def test_correct_continuation_is_valid_python(tokenizer, train_data, name, level):
    """prompt + correct + suffix compiles; where the example says the contrast is impossible,
    prompt + contrast + suffix does not."""
    examples = generate_examples(name, n=N, seed=0, split="train", tokenizer=tokenizer, level=level)
    assert [e.prompt for e in examples] == train_data(name, level).prompts
    for example in examples:
        assert compiles(example.prompt + example.correct + example.suffix), example
        if example.contrast_invalid:
            assert not compiles(example.prompt + example.contrast + example.suffix), example


def test_some_tasks_check_that_the_contrast_is_invalid(tokenizer):
    checked = [name for name in PAPER_TASKS
               if any(e.contrast_invalid for e in generate_examples(name, n=8, tokenizer=tokenizer))]
    assert len(checked) >= len(PAPER_TASKS) // 2


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("name", PAPER_TASKS)
def test_prompts_fit_the_budget_and_padding_is_to_the_longest(train_data, name, level):
    data, spec = train_data(name, level), get_spec(name, level)
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


# ---------------------------------------------------------------------------- levels
#: SHA-256 of repr() of every hard example (n=64, seed 0, both splits, all tasks), measured with
#: the generators before levels existed: the hard level must keep drawing exactly those.
HARD_FINGERPRINT = "ba6e6aacd7e107bc92d821045b67480467e0c1ed89b649371b29fc26d512d6c2"


def test_hard_level_draws_exactly_the_examples_of_the_generators_before_levels(tokenizer):
    import hashlib

    digest = hashlib.sha256()
    for name in PAPER_TASKS:
        for split in ("train", "test"):
            for example in generate_examples(name, n=64, seed=0, split=split, tokenizer=tokenizer,
                                             level="hard"):
                digest.update(repr(example).encode())
    assert digest.hexdigest() == HARD_FINGERPRINT


def test_core_is_the_default_level_and_bad_levels_are_rejected(tokenizer, train_data):
    assert get_task("for_while", tokenizer, n=N).prompts == train_data("for_while", "core").prompts
    assert get_spec("for_while").level == "core" and get_spec("for_while", "hard").level == "hard"
    with pytest.raises(ValueError, match="level must be one of"):
        get_task("for_while", tokenizer, n=4, level="medium")


@pytest.mark.parametrize("name", PAPER_TASKS)
def test_every_task_documents_what_the_hard_level_adds(name):
    core, hard = get_spec(name, "core"), get_spec(name, "hard")
    assert core.hard_adds and core.hard_adds == hard.hard_adds
    assert core.hard_adds in hard.description and core.hard_adds not in core.description


def test_core_quote_prompts_hold_no_other_quote_but_hard_ones_do(train_data):
    """Core: the only quote in the prompt is the one the string opened with."""
    data = train_data("single_double_quote", "core")
    for prompt, answer in zip(data.prompts, data.correct_str):
        assert prompt.count("'") + prompt.count('"') == 1 and prompt.count(answer) == 1
    hard = train_data("single_double_quote", "hard")
    assert sum(p.count("'") + p.count('"') > 1 for p in hard.prompts) > N // 4


def test_core_distractors_are_gone(train_data):
    """The distractors each hard generator adds are absent from its core prompts."""
    assert not any("]" in p for p in train_data("bracket_counting", "core").prompts)
    assert any("]" in p for p in train_data("bracket_counting", "hard").prompts)
    for p in train_data("set_or_string", "core").prompts:
        assert p.count("set()") + p.count('""') + p.count("''") + p.count("str()") == 1
    assert sum(p.count("while ") + p.count("for ") for p in train_data("for_while", "core").prompts) == N
    assert not any("super().__init__()" in p for p in train_data("class_init", "core").prompts)
    assert not any(" else " in p for p in train_data("if_ternary", "core").prompts)
    assert not any(p.count("is None") + p.count("if not") > 1 for p in train_data("var_if", "core").prompts)


# ---------------------------------------------------------------------------- the last-token guard
def test_last_token_predictor_solves_a_last_token_task_and_not_a_context_task(tokenizer):
    """Answers decided by the last token: 1.0; by an earlier token with the same last token: 0.5."""
    by_last = TaskData.from_prompts("last", ["x = 1\nif a", "x = 1\nfor b", "y = 2\nif a", "y = 2\nfor b"],
                                    [":", " in", ":", " in"], [" in", ":", " in", ":"], tokenizer)
    by_context = TaskData.from_prompts("ctx", ["s = '\nx = s", 's = "\nx = s'] * 2, ["'", '"'] * 2,
                                       ['"', "'"] * 2, tokenizer)
    assert last_token_accuracy(by_last, by_last) == 1.0
    assert last_token_accuracy(by_context, by_context) == 0.5
    with pytest.raises(ValueError, match="nonempty"):
        last_token_accuracy(by_last[[]], by_last)


@pytest.mark.slow
def test_core_tasks_marked_too_easy_are_exactly_those_the_guard_solves(tokenizer):
    """The guard's verdict on each core task agrees with `TaskSpec.too_easy` (lambda_func is
    the one marked: its last token gives the answer away)."""
    marked = {name for name in PAPER_TASKS if get_spec(name).too_easy}
    assert marked == {"lambda_func"}
    for name in PAPER_TASKS:
        accuracy = bigram_guard(name, "core", tokenizer, n_train=256, n_test=128)
        assert (accuracy > TOO_EASY_ACCURACY) == (name in marked), (name, accuracy)


# ---------------------------------------------------------------------------- tasks from real code
CORPUS_FILE = '''\
names = ['alpha', 'beta', "gamma", "delta"]
table = {"one": [1, 2], 'two': [3, [4, 5]]}
grid = [[1, 2], [3, 4]]
matrix = [[row[i] for row in grid] for i in range(2)]
print('done', "ok", len(names[0]), grid[0][1])
values = {1, 2, names[1]}
'''


@pytest.fixture
def corpus_dir(tmp_path):
    """A small corpus: the file above under a few names (prompts are distinct per file only by
    content, so the copies vary a line each), and one file that does not compile."""
    for i in range(40):
        (tmp_path / f"m{i}.py").write_text(f"x{i} = '{i}'\nk{i} = [[{i}]]\n" + CORPUS_FILE)
    (tmp_path / "broken.py").write_text("names = ['a', \"b\"\nprint(]\n")
    return tmp_path


@pytest.mark.slow
@pytest.mark.parametrize("name", CORPUS_TASKS)
def test_corpus_instances_are_real_balanced_checked_and_split(tokenizer, corpus_dir, name):
    files = [corpus_dir]
    counts = corpus_class_counts(name, tokenizer, "train", files)
    n = 2 * min(min(counts), 8)
    assert n >= 4
    train = get_task(name, tokenizer, n=n, split="train", source="corpus", corpus=files)
    test_counts = corpus_class_counts(name, tokenizer, "test", files)
    test = get_task(name, tokenizer, n=2 * min(test_counts), split="test", source="corpus", corpus=files)
    assert train.labels.tolist() == [0, 1] * (n // 2)
    assert not set(train.prompts) & set(test.prompts)
    sources = [f.read_text() for f in sorted(corpus_dir.glob("m*.py"))]
    for prompt, correct, contrast in zip(train.prompts, train.correct_str, train.contrast_str):
        assert any(prompt + correct in text for text in sources), prompt  # real text, real answer
        assert encode(tokenizer, prompt + correct) == encode(tokenizer, prompt) + encode(tokenizer, correct)
        assert correct != contrast
    assert not any("print(]" in p for p in train.prompts)  # files that do not compile are skipped


def test_corpus_answers_are_the_right_ones(tokenizer, corpus_dir):
    quotes = get_task("single_double_quote", tokenizer, n=8, source="corpus", corpus=[corpus_dir])
    for prompt, correct in zip(quotes.prompts, quotes.correct_str):
        line = prompt.rsplit("\n", 1)[-1]
        assert line.count(correct) % 2 == 1  # the string it closes was opened with that quote
    depth = get_task("bracket_counting", tokenizer, n=8, source="corpus", corpus=[corpus_dir])
    for prompt, correct in zip(depth.prompts, depth.correct_str):
        line = prompt.rsplit("\n", 1)[-1]
        opened = line.count("[") - line.count("]")
        assert opened >= len(correct) and (correct == "]]" or opened == 1 or "(" in line or "{" in line)


def test_corpus_source_errors_are_clear(tokenizer, corpus_dir):
    with pytest.raises(ValueError, match="has no corpus source"):
        get_task("var_swap", tokenizer, n=4, source="corpus", corpus=[corpus_dir])
    with pytest.raises(ValueError, match="no levels"):
        get_task("single_double_quote", tokenizer, n=4, source="corpus", level="hard", corpus=[corpus_dir])
    with pytest.raises(ValueError, match="only .* instances"):
        get_task("single_double_quote", tokenizer, n=100000, source="corpus", corpus=[corpus_dir])
    with pytest.raises(ValueError, match="source must be one of"):
        get_task("single_double_quote", tokenizer, n=4, source="github")
    with pytest.raises(ValueError, match="only read with source='corpus'"):
        get_task("single_double_quote", tokenizer, n=4, corpus=[corpus_dir])


@pytest.mark.slow
def test_default_corpus_is_the_stdlib_validation_split(tokenizer):
    from sparse_lens import data
    from sparse_lens.tasks import default_corpus_files

    files = default_corpus_files()
    assert files == data.split_train_val(data.stdlib_source_files())[1] and files
    quotes = get_task("single_double_quote", tokenizer, n=16, source="corpus", split="test")
    assert len(quotes) == 16 and quotes.labels.tolist() == [0, 1] * 8


# ---------------------------------------------------------------------------- evaluate_levels
@pytest.mark.slow
def test_evaluate_levels_reports_the_task_loss_of_each_level(tokenizer):
    from sparse_lens.config import SparseHookedTransformerConfig
    from sparse_lens.model import SparseHookedTransformer

    torch.manual_seed(0)
    model = SparseHookedTransformer(SparseHookedTransformerConfig.preset("tiny"), tokenizer=tokenizer)
    model.train()
    table = evaluate_levels(model, names=["for_while", "single_double_quote"], n=16, batch_size=5)
    assert model.training  # put back
    assert list(zip(table.task, table.level)) == [
        ("for_while", "core"), ("for_while", "hard"), ("single_double_quote", "core"),
        ("single_double_quote", "hard"), ("single_double_quote", "corpus")]
    data = get_task("for_while", tokenizer, n=16, split="test", level="hard")
    model.eval()
    with torch.no_grad():
        logits = model(data.tokens)
    row = table.iloc[1]
    assert row.loss == pytest.approx(task_loss(logits, data).item(), rel=1e-4)
    assert row.accuracy == pytest.approx(task_accuracy(logits, data))
    assert set(table.columns) >= {"n", "bigram_accuracy", "too_easy", "solved"}
    with pytest.raises(ValueError, match="levels must be among"):
        evaluate_levels(model, names=["for_while"], levels=["easy"])
