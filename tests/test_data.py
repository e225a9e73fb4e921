"""Corpora, the train/val split, the token cache, batches and the unigram baselines."""

import math
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from sparse_lens import data


def write_corpus(root: Path, n: int = 8) -> list[Path]:
    files = []
    for i in range(n):
        sub = root / ("pkg" if i % 2 else "") / f"mod_{i}.py"
        sub.parent.mkdir(parents=True, exist_ok=True)
        sub.write_text(f"def f_{i}(x):\n    return x + {i}\n\nclass C{i}:\n    pass\n" * (i + 1))
        files.append(sub)
    (root / "notes.txt").write_text("not python")
    return sorted(files)


# ------------------------------------------------------------------------------ files
def test_stdlib_files_are_sorted_python_and_exclude_site_packages():
    files = data.stdlib_source_files()
    assert len(files) > 500 and files == sorted(files)
    assert all(f.suffix == ".py" and f.is_file() for f in files)
    assert not any({"site-packages", "dist-packages"} & set(f.parts) for f in files)
    assert data.stdlib_dir() / "os.py" in files
    assert data.resolve_source_files(None) == files


def test_resolve_dirs_files_and_globs(tmp_path):
    files = write_corpus(tmp_path)
    assert data.resolve_source_files([tmp_path]) == files
    assert data.resolve_source_files([str(tmp_path / "**" / "*.py")]) == files
    assert data.resolve_source_files([str(tmp_path / "*.py")]) == [f for f in files if f.parent == tmp_path]
    one = files[3]
    # overlapping entries are deduplicated; a file entry is taken as is
    assert data.resolve_source_files([one, str(one), tmp_path / "pkg"]) == sorted(
        {one, *[f for f in files if f.parent.name == "pkg"]})
    assert data.resolve_source_files([tmp_path / "notes.txt"]) == [tmp_path / "notes.txt"]


def test_resolve_names_the_sources_that_match_nothing(tmp_path):
    write_corpus(tmp_path)
    with pytest.raises(ValueError, match=r"missing_dir.*\*\.pyx|\*\.pyx.*missing_dir"):
        data.resolve_source_files([tmp_path, str(tmp_path / "missing_dir"), str(tmp_path / "*.pyx")])
    with pytest.raises(ValueError, match="empty"):
        (tmp_path / "empty").mkdir()
        data.resolve_source_files([tmp_path / "empty"])


# ------------------------------------------------------------------------------ split
def test_split_is_deterministic_disjoint_and_order_independent():
    files = data.stdlib_source_files()
    train, val = data.split_train_val(files)
    assert set(train).isdisjoint(val) and sorted(train + val) == files
    assert 0.005 < len(val) / len(files) < 0.05
    shuffled = [files[i] for i in torch.randperm(len(files), generator=torch.Generator().manual_seed(0))]
    assert data.split_train_val(shuffled) == (train, val)
    # a file's side does not depend on which other files are present
    half_train, half_val = data.split_train_val(files[::2])
    assert set(val) & set(files[::2]) and set(half_val) == set(val) & set(files[::2])


def test_split_depends_on_the_path_relative_to_the_corpus_root(tmp_path):
    a = write_corpus(tmp_path / "a", 40)
    b = write_corpus(tmp_path / "elsewhere" / "b", 40)
    split_a = data.split_train_val(a, 0.3)
    split_b = data.split_train_val(b, 0.3)
    rel = lambda split, root: [[p.relative_to(root) for p in part] for part in split]  # noqa: E731
    assert rel(split_a, tmp_path / "a") == rel(split_b, tmp_path / "elsewhere" / "b")


def test_split_val_is_nonempty_and_fraction_is_validated(tmp_path):
    files = write_corpus(tmp_path, 2)
    train, val = data.split_train_val(files, 0.001)
    assert len(train) == 1 and len(val) == 1
    train, val = data.split_train_val(files, 0.999)
    assert len(train) == 1 and len(val) == 1
    for bad in (0, 1, -0.1, 1.5):
        with pytest.raises(ValueError, match="val_fraction"):
            data.split_train_val(files, bad)


def test_subset_is_deterministic_and_spread(tmp_path):
    files = data.stdlib_source_files()
    subset = data.select_subset(files, 50)
    assert len(subset) == 50 and subset == sorted(subset) and set(subset) <= set(files)
    assert data.select_subset(list(reversed(files)), 50) == subset
    assert len({f.parent for f in subset}) > 3  # not just the first 50 names


# ------------------------------------------------------------------------------ tokenizing
def test_tokenize_files_appends_eos_after_each_document(tmp_path, tokenizer):
    files = write_corpus(tmp_path, 3)
    stream = data.tokenize_files(files, tokenizer)
    assert stream.dtype == torch.long and stream.ndim == 1
    expected = []
    for f in files:
        expected += tokenizer(f.read_text(), add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert stream.tolist() == expected
    assert (stream == tokenizer.eos_token_id).sum() == 3


def test_tokenize_reads_invalid_utf8_with_replacement(tmp_path, tokenizer):
    f = tmp_path / "latin.py"
    f.write_bytes(b"s = 'caf\xe9'\n")
    stream = data.tokenize_files([f], tokenizer)
    assert tokenizer.decode(stream[:-1].tolist()) == "s = 'caf\ufffd'\n"


def test_cache_round_trip_and_invalidation(tmp_path, tokenizer):
    files = write_corpus(tmp_path / "src", 4)
    cache = tmp_path / "cache"
    first = data.tokenize_files(files, tokenizer, cache_dir=cache)
    cached = list(cache.glob("*.npy"))
    assert len(cached) == 1 and np.load(cached[0], allow_pickle=False).dtype == np.uint16
    assert not list(cache.glob("*.tmp"))
    again = data.tokenize_files(files, tokenizer, cache_dir=cache)
    assert torch.equal(first, again) and again.dtype == torch.long
    # the cache is really read: corrupting its content changes the result
    arr = np.load(cached[0]); arr[0] = 7; np.save(cached[0], arr)
    assert data.tokenize_files(files, tokenizer, cache_dir=cache)[0] == 7
    # editing a file invalidates the cache
    files[0].write_text("x = 1\n")
    st = files[0].stat()
    os.utime(files[0], ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    fresh = data.tokenize_files(files, tokenizer, cache_dir=cache)
    assert torch.equal(fresh, data.tokenize_files(files, tokenizer))
    assert not torch.equal(fresh, first)
    assert len(list(cache.glob("*.npy"))) == 2


def test_default_cache_dir_honours_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("SPARSE_LENS_CACHE", str(tmp_path / "c"))
    assert data.default_cache_dir() == tmp_path / "c"
    monkeypatch.delenv("SPARSE_LENS_CACHE")
    assert data.default_cache_dir() == Path.home() / ".cache" / "sparse_lens"


@pytest.mark.slow
def test_load_corpus_on_a_stdlib_subset(tmp_path, tokenizer):
    corpus = data.load_corpus(None, tokenizer, max_files=40, cache_dir=tmp_path)
    assert len(corpus.train_files) + len(corpus.val_files) == 40 and corpus.val_files
    assert set(corpus.train_files).isdisjoint(corpus.val_files)
    assert corpus.train.dtype == corpus.val.dtype == torch.long
    assert corpus.train.numel() > 10_000 and corpus.val.numel() > 0
    assert int(corpus.train.max()) < len(tokenizer)
    assert (corpus.train == tokenizer.eos_token_id).sum() == len(corpus.train_files)
    again = data.load_corpus(None, tokenizer, max_files=40, cache_dir=tmp_path)
    assert torch.equal(again.train, corpus.train) and torch.equal(again.val, corpus.val)


def test_load_corpus_from_a_directory(tmp_path, tokenizer):
    write_corpus(tmp_path / "src", 10)
    corpus = data.load_corpus([tmp_path / "src"], tokenizer, val_fraction=0.2, cache_dir=None)
    assert len(corpus.train_files) + len(corpus.val_files) == 10 and corpus.val_files


def test_hf_dataset_path_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` fail
    with pytest.raises(ImportError, match="pip install datasets"):
        data.load_hf_dataset_texts("bigcode/the-stack-smol")


# ------------------------------------------------------------------------------ batches
STREAM = torch.arange(1000) * 7 % 2048


def test_sample_batch_is_a_pure_function_of_seed_and_step():
    a = data.sample_batch(STREAM, 8, 16, step=5, seed=1)
    torch.manual_seed(123)  # the global RNG plays no part
    assert torch.equal(a, data.sample_batch(STREAM, 8, 16, step=5, seed=1))
    assert not torch.equal(a, data.sample_batch(STREAM, 8, 16, step=6, seed=1))
    assert not torch.equal(a, data.sample_batch(STREAM, 8, 16, step=5, seed=2))
    assert a.shape == (8, 16) and a.dtype == torch.long


def test_sampled_windows_are_real_slices_of_the_stream():
    stream = torch.arange(500)
    batch = data.sample_batch(stream, 16, 10, step=0, seed=0)
    for row in batch:
        start = int(row[0])
        assert torch.equal(row, stream[start:start + 10])
    # the last window can be drawn; none run past the end
    many = torch.cat([data.sample_batch(torch.arange(12), 64, 10, step=s, seed=0) for s in range(10)])
    assert int(many[:, 0].max()) == 2 and int(many[:, 0].min()) == 0


def test_sample_batch_rejects_a_short_stream():
    with pytest.raises(ValueError, match="fewer than seq_len"):
        data.sample_batch(torch.arange(5), 2, 10, step=0, seed=0)
    assert data.sample_batch(torch.arange(10), 2, 10, step=0, seed=0).shape == (2, 10)


def test_validation_batches_are_fixed_evenly_spaced_and_disjoint():
    stream = torch.arange(1000)
    batches = data.validation_batches(stream, 4, 20, 3)
    assert len(batches) == 3 and all(b.shape == (4, 20) for b in batches)
    rows = torch.cat(batches)
    starts = rows[:, 0].tolist()
    assert starts[0] == 0 and len(set(torch.diff(torch.tensor(starts)).tolist())) == 1
    assert all(b - a >= 20 for a, b in zip(starts, starts[1:]))
    for row in rows:
        assert torch.equal(row, stream[int(row[0]):int(row[0]) + 20])
    again = data.validation_batches(stream, 4, 20, 3)
    assert all(torch.equal(x, y) for x, y in zip(batches, again))
    with pytest.warns(UserWarning, match="overlap"):
        data.validation_batches(torch.arange(50), 4, 20, 3)
    with pytest.raises(ValueError):
        data.validation_batches(torch.arange(5), 1, 20, 1)


# ------------------------------------------------------------------------------ baselines
def test_unigram_entropy():
    assert data.unigram_entropy(torch.tensor([3, 3, 3])) == pytest.approx(0.0)
    assert data.unigram_entropy(torch.tensor([0, 1, 2, 3] * 5)) == pytest.approx(math.log(4))
    p = torch.tensor([0.5, 0.25, 0.25])
    assert data.unigram_entropy(torch.tensor([0, 0, 1, 2])) == pytest.approx(float(-(p * p.log()).sum()))


def test_unigram_cross_entropy_is_add_one_smoothed():
    train, val = torch.tensor([0, 0, 1]), torch.tensor([0, 2])
    # counts + 1 over vocab 4: [3, 2, 1, 1] / 7
    expected = -(math.log(3 / 7) + math.log(1 / 7)) / 2
    assert data.unigram_cross_entropy(train, val, 4) == pytest.approx(expected)
    with pytest.raises(ValueError):
        data.unigram_cross_entropy(train, torch.tensor([4]), 4)
    # on a large sample the smoothed cross-entropy approaches the entropy
    g = torch.Generator().manual_seed(0)
    big = torch.multinomial(torch.tensor([0.6, 0.3, 0.1]), 100_000, replacement=True, generator=g)
    assert data.unigram_cross_entropy(big, big, 3) == pytest.approx(data.unigram_entropy(big), abs=1e-3)
