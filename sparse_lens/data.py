"""Corpora of Python source, their token streams, and deterministic batches.

The default corpus is the running interpreter's standard library. Files are split into train
and validation *by file*, from a hash of each file's path relative to its corpus root, so the
split does not depend on the order files are listed in or on the machine. A corpus is tokenized
into one 1-D stream per split (each document followed by the EOS token) and cached on disk as
`.npy`. Training batches are random windows of the stream whose offsets are a pure function of
(seed, step), so a resumed run sees exactly the batches it would have seen.
"""

from __future__ import annotations

import hashlib
import math
import os
import tempfile
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from jaxtyping import Int

from sparse_lens.sources import (  # noqa: F401  (public here too, as before)
    _corpus_root, resolve_source_files, select_subset, split_train_val, stdlib_dir, stdlib_source_files,
)

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

_ENCODE_BATCH_FILES = 64  # files per call into the fast tokenizer (it parallelises a batch)


# ------------------------------------------------------------------------------ files
def default_cache_dir() -> Path:
    """`$SPARSE_LENS_CACHE`, else `~/.cache/sparse_lens`."""
    env = os.environ.get("SPARSE_LENS_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "sparse_lens"


def _tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        content = backend.to_str()
    else:  # a slow tokenizer: its vocabulary stands in for it
        content = repr(sorted(tokenizer.get_vocab().items()))
    return hashlib.sha256(f"{content}\0eos={tokenizer.eos_token_id}".encode()).hexdigest()


def _cache_key(files: Sequence[Path], tokenizer: PreTrainedTokenizerBase) -> str:
    h = hashlib.sha256()
    h.update(b"sparse_lens.tokens.v1\0")
    h.update(_tokenizer_fingerprint(tokenizer).encode())
    for f in files:
        st = Path(f).stat()
        h.update(f"\0{os.path.normpath(Path(f).absolute())}\0{st.st_size}\0{st.st_mtime_ns}".encode())
    return h.hexdigest()[:40]


def _encode_texts(texts: list[str], tokenizer: PreTrainedTokenizerBase) -> list[list[int]]:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        return [e.ids for e in backend.encode_batch(texts, add_special_tokens=False)]
    return tokenizer(texts, add_special_tokens=False)["input_ids"]


def tokenize_files(
    files: Sequence[str | Path],
    tokenizer: PreTrainedTokenizerBase,
    cache_dir: str | Path | None = None,
) -> Int[torch.Tensor, "n_tokens"]:
    """One 1-D stream (torch.long) of the token ids of `files`, in the given order, each file
    read as UTF-8 (undecodable bytes replaced) and followed by the EOS id. With `cache_dir`, the
    stream is cached there as `.npy` (uint16 when the vocabulary fits), keyed by the tokenizer
    and every file's (path, size, mtime), so editing a file invalidates it."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no EOS token (documents are separated by it)")
    files = [Path(f) for f in files]
    dtype = np.uint16 if len(tokenizer) <= 2**16 else np.int32
    cache_file = None
    if cache_dir is not None:
        cache_file = Path(cache_dir) / f"tokens-{_cache_key(files, tokenizer)}.npy"
        if cache_file.is_file():
            try:
                return torch.from_numpy(np.load(cache_file, allow_pickle=False).astype(np.int64))
            except (OSError, ValueError) as e:  # a damaged cache entry is rebuilt
                warnings.warn(f"ignoring unreadable token cache {cache_file}: {e}", stacklevel=2)

    chunks: list[np.ndarray] = []
    for i in range(0, len(files), _ENCODE_BATCH_FILES):
        batch = files[i:i + _ENCODE_BATCH_FILES]
        texts = [f.read_text(encoding="utf-8", errors="replace") for f in batch]
        for ids in _encode_texts(texts, tokenizer):
            chunks.append(np.asarray(ids, dtype=dtype))
            chunks.append(np.asarray([eos], dtype=dtype))
    stream = np.concatenate(chunks) if chunks else np.zeros(0, dtype=dtype)

    if cache_file is not None:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=cache_file.parent, prefix=cache_file.stem, suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as fh:
                np.save(fh, stream, allow_pickle=False)
            os.replace(tmp, cache_file)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    return torch.from_numpy(stream.astype(np.int64))


# ------------------------------------------------------------------------------ corpus
@dataclass(frozen=True)
class TokenCorpus:
    """Train and validation token streams (1-D torch.long) and the files they came from."""

    train: Int[torch.Tensor, "n_train"]
    val: Int[torch.Tensor, "n_val"]
    train_files: list[Path] = field(default_factory=list)
    val_files: list[Path] = field(default_factory=list)

    @staticmethod
    def load(*args, **kwargs) -> TokenCorpus:
        """Same as `load_corpus`."""
        return load_corpus(*args, **kwargs)

    def __repr__(self) -> str:
        return (f"TokenCorpus(train={self.train.numel():,} tokens / {len(self.train_files)} files, "
                f"val={self.val.numel():,} tokens / {len(self.val_files)} files)")


def load_corpus(
    sources: Sequence[str | Path] | None = None,
    tokenizer: PreTrainedTokenizerBase | None = None,
    val_fraction: float = 0.02,
    cache_dir: str | Path | None | bool = True,
    max_files: int | None = None,
) -> TokenCorpus:
    """Resolve `sources` (None = the standard library), optionally keep a deterministic subset of
    `max_files` files, split by file into train/val, and tokenize both (with `tokenizer`,
    default the shipped one). `cache_dir`: a directory, True for `default_cache_dir()`, or
    None/False for no cache."""
    if tokenizer is None:
        from sparse_lens.tokenizer import load_tokenizer

        tokenizer = load_tokenizer()
    files = resolve_source_files(sources)
    root = _corpus_root(files)
    if max_files is not None:
        files = select_subset(files, max_files, root=root)
    train_files, val_files = split_train_val(files, val_fraction, root=root)
    if cache_dir is True:
        cache_dir = default_cache_dir()
    elif cache_dir is False:
        cache_dir = None
    return TokenCorpus(
        train=tokenize_files(train_files, tokenizer, cache_dir),
        val=tokenize_files(val_files, tokenizer, cache_dir),
        train_files=train_files,
        val_files=val_files,
    )


def load_hf_dataset_texts(
    name: str, split: str = "train", text_column: str = "content", max_docs: int | None = None,
) -> list[str]:
    """The texts of column `text_column` of a Hugging Face dataset (streamed when `max_docs` is
    given). Needs the optional `datasets` package (`pip install datasets`) and network access."""
    try:
        import datasets
    except ImportError as e:
        raise ImportError("load_hf_dataset_texts needs the `datasets` package: "
                          "pip install datasets  (or: pip install 'sparse-lens[hub]')") from e
    ds = datasets.load_dataset(name, split=split, streaming=max_docs is not None)
    texts: list[str] = []
    for row in ds:
        if max_docs is not None and len(texts) >= max_docs:
            break
        texts.append(row[text_column])
    return texts


# ------------------------------------------------------------------------------ batches
def _check_stream(tokens: torch.Tensor, seq_len: int) -> int:
    if tokens.ndim != 1:
        raise ValueError(f"expected a 1-D token stream, got shape {tuple(tokens.shape)}")
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    n = tokens.numel()
    if n < seq_len:
        raise ValueError(f"the token stream has {n} tokens, fewer than seq_len={seq_len}; "
                         "use more source files or a shorter seq_len")
    return n


def sample_batch(
    tokens: Int[torch.Tensor, "n"], batch_size: int, seq_len: int, step: int, seed: int,
) -> Int[torch.Tensor, "batch seq_len"]:
    """`batch_size` windows of `seq_len` consecutive tokens at random offsets that are a pure
    function of (seed, step), so resuming a run at `step` reproduces its batches exactly."""
    n = _check_stream(tokens, seq_len)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    gen = torch.Generator().manual_seed((seed * 1_000_003 + step) % 2**63)
    offsets = torch.randint(0, n - seq_len + 1, (batch_size,), generator=gen)
    index = offsets[:, None] + torch.arange(seq_len)[None, :]
    return tokens[index.to(tokens.device)].long()


def validation_batches(
    tokens: Int[torch.Tensor, "n"], batch_size: int, seq_len: int, n_batches: int,
) -> list[Int[torch.Tensor, "batch seq_len"]]:
    """`n_batches` fixed batches of windows at evenly spaced offsets over the whole stream,
    non-overlapping whenever the stream holds `n_batches * batch_size * seq_len` tokens (if
    it is shorter, the windows overlap, with a warning). Deterministic."""
    n = _check_stream(tokens, seq_len)
    if batch_size < 1 or n_batches < 1:
        raise ValueError(f"batch_size and n_batches must be >= 1, got {batch_size}, {n_batches}")
    k = batch_size * n_batches
    stride = (n - seq_len) // (k - 1) if k > 1 else 0
    if k > 1 and stride < seq_len:
        warnings.warn(f"the validation stream ({n} tokens) is shorter than {k} windows of {seq_len}; "
                      "the validation windows overlap", stacklevel=2)
    offsets = torch.arange(k) * stride
    index = offsets[:, None] + torch.arange(seq_len)[None, :]
    windows = tokens[index.to(tokens.device)].long()
    return list(windows.split(batch_size))


# ------------------------------------------------------------------------------ baselines
def unigram_entropy(tokens: Int[torch.Tensor, "n"]) -> float:
    """Entropy in nats of the stream's unigram distribution: the cross-entropy of the unigram
    model measured on the very stream it was counted on."""
    if tokens.numel() == 0:
        raise ValueError("unigram_entropy of an empty stream")
    counts = torch.bincount(tokens.flatten().long().cpu()).double()
    p = counts[counts > 0] / counts.sum()
    return float(-(p * p.log()).sum())


def unigram_cross_entropy(
    train_tokens: Int[torch.Tensor, "n_train"], val_tokens: Int[torch.Tensor, "n_val"], vocab_size: int,
) -> float:
    """Cross-entropy in nats on `val_tokens` of the add-one-smoothed unigram distribution of
    `train_tokens` over `vocab_size` ids: the baseline a language model must beat."""
    if val_tokens.numel() == 0:
        raise ValueError("unigram_cross_entropy: the validation stream is empty")
    train_tokens = train_tokens.flatten().long().cpu()
    val_tokens = val_tokens.flatten().long().cpu()
    top = max(int(train_tokens.max()) if train_tokens.numel() else -1, int(val_tokens.max()))
    if top >= vocab_size or min(int(val_tokens.min()), int(train_tokens.min()) if train_tokens.numel() else 0) < 0:
        raise ValueError(f"token ids must be in [0, {vocab_size}); found {top}")
    counts = torch.bincount(train_tokens, minlength=vocab_size).double() + 1.0
    logp = counts.log() - math.log(float(counts.sum()))
    return float(-logp[val_tokens].mean())
