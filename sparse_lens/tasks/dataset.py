"""`TaskData`: a batch of task prompts as right-padded token ids, with the position of each
prompt's last token and the ids of its correct and contrast next tokens.

`TaskData.from_prompts` checks, for every prompt, that each candidate is a single token *in
context*: the prompt's tokens followed by the candidate's id equal the tokens of prompt +
candidate (so the candidate starts at a token boundary and does not merge with the prompt's end).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from jaxtyping import Int
from torch import Tensor

from sparse_lens.tasks.base import MAX_PROMPT_TOKENS_LIMIT, Example, TaskSpec

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

Index = int | slice | Sequence[int] | Tensor


@dataclass
class TaskData:
    """A batch of examples of one binary next-token task.

    tokens:   [batch, pos] prompt token ids, right-padded with the pad id (0) to the longest
              prompt of this batch.
    last_pos: [batch] index of each prompt's final token (where the next token is predicted).
    correct / contrast: [batch] token ids of the right answer and of the alternative.
    labels:   [batch] the example's class (0/1; the classes swap the two answers), if known."""

    name: str
    description: str
    prompts: list[str]
    tokens: Int[Tensor, "batch pos"]
    last_pos: Int[Tensor, " batch"]
    correct: Int[Tensor, " batch"]
    contrast: Int[Tensor, " batch"]
    correct_str: list[str]
    contrast_str: list[str]
    labels: Int[Tensor, " batch"] | None = None

    def __post_init__(self):
        n = len(self.prompts)
        sizes = {len(self.correct_str), len(self.contrast_str), self.tokens.shape[0],
                 self.last_pos.shape[0], self.correct.shape[0], self.contrast.shape[0]}
        if self.labels is not None:
            sizes.add(self.labels.shape[0])
        if sizes != {n} or self.tokens.ndim != 2:
            raise ValueError(f"TaskData {self.name!r}: fields disagree on the batch size ({sizes} vs {n})")

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_prompts(
        cls,
        name: str,
        prompts: Sequence[str],
        correct: Sequence[str],
        contrast: Sequence[str],
        tokenizer: PreTrainedTokenizerBase,
        description: str = "",
        labels: Sequence[int] | None = None,
        max_prompt_tokens: int = MAX_PROMPT_TOKENS_LIMIT,
        n_ctx: int | None = None,
    ) -> TaskData:
        """Tokenize hand-made prompts and their two candidate continuations. Raises ValueError
        if a candidate is not a single token in context, a prompt is empty, or a prompt has more
        than `max_prompt_tokens` tokens or (when given) than a model's context `n_ctx`."""
        prompts, correct, contrast = list(prompts), list(correct), list(contrast)
        if not prompts or not len(prompts) == len(correct) == len(contrast):
            raise ValueError("from_prompts needs equally many (and at least one) prompts, "
                             "correct and contrast strings")
        prompt_ids = _encode(tokenizer, prompts)
        correct_ids = _candidate_ids(tokenizer, name, prompts, prompt_ids, correct)
        contrast_ids = _candidate_ids(tokenizer, name, prompts, prompt_ids, contrast)
        for prompt, ids in zip(prompts, prompt_ids):
            if not 1 <= len(ids) <= max_prompt_tokens:
                raise ValueError(f"task {name!r}: prompt has {len(ids)} tokens (allowed 1.."
                                 f"{max_prompt_tokens}): {prompt!r}")
        if n_ctx is not None:
            check_fits(name, [len(ids) for ids in prompt_ids], n_ctx, prompts)
        pad_id = _pad_id(tokenizer)
        width = max(len(ids) for ids in prompt_ids)
        tokens = torch.full((len(prompts), width), pad_id, dtype=torch.long)
        for row, ids in enumerate(prompt_ids):
            tokens[row, :len(ids)] = torch.tensor(ids, dtype=torch.long)
        return cls(
            name=name, description=description, prompts=prompts, tokens=tokens,
            last_pos=torch.tensor([len(ids) - 1 for ids in prompt_ids], dtype=torch.long),
            correct=torch.tensor(correct_ids, dtype=torch.long),
            contrast=torch.tensor(contrast_ids, dtype=torch.long),
            correct_str=correct, contrast_str=contrast,
            labels=None if labels is None else torch.tensor(list(labels), dtype=torch.long),
        )

    @classmethod
    def from_examples(cls, spec: TaskSpec, examples: Sequence[Example],
                      tokenizer: PreTrainedTokenizerBase) -> TaskData:
        """`from_prompts` for generated examples of the task `spec`."""
        return cls.from_prompts(
            spec.name, [e.prompt for e in examples], [e.correct for e in examples],
            [e.contrast for e in examples], tokenizer, description=spec.description,
            labels=[e.label for e in examples], max_prompt_tokens=spec.max_prompt_tokens)

    def check_fits(self, n_ctx: int) -> TaskData:
        """`self`, or ValueError naming the task, the longest prompt's length and `n_ctx` when a
        prompt is longer than a model's context."""
        check_fits(self.name, (self.last_pos + 1).tolist(), n_ctx, self.prompts)
        return self

    # ------------------------------------------------------------------ batching
    def __len__(self) -> int:
        return len(self.prompts)

    def subset(self, idx: Index) -> TaskData:
        """The examples at `idx` (an int, slice, sequence of ints, or an integer or boolean
        tensor on any device), with the padding trimmed to the subset's longest prompt."""
        rows = _rows(idx, len(self))
        index = torch.tensor(rows, dtype=torch.long, device=self.tokens.device)
        last_pos = self.last_pos[index]
        width = int(last_pos.max()) + 1 if rows else 0
        return dataclasses.replace(
            self,
            prompts=[self.prompts[i] for i in rows],
            tokens=self.tokens[index, :width],
            last_pos=last_pos,
            correct=self.correct[index],
            contrast=self.contrast[index],
            correct_str=[self.correct_str[i] for i in rows],
            contrast_str=[self.contrast_str[i] for i in rows],
            labels=None if self.labels is None else self.labels[index],
        )

    __getitem__ = subset

    def batches(self, batch_size: int) -> Iterator[TaskData]:
        """Consecutive subsets of at most `batch_size` examples."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        for start in range(0, len(self), batch_size):
            yield self[start:start + batch_size]

    def to(self, device: torch.device | str) -> TaskData:
        """A copy with every tensor on `device`."""
        moved = {f.name: getattr(self, f.name).to(device) for f in dataclasses.fields(self)
                 if isinstance(getattr(self, f.name), Tensor)}
        return dataclasses.replace(self, **moved)


# ---------------------------------------------------------------------- helpers
def check_fits(task: str, lengths: Sequence[int], n_ctx: int, prompts: Sequence[str]) -> None:
    """ValueError naming `task`, the longest of `lengths` (tokens) and `n_ctx` if it exceeds it."""
    longest = max(range(len(lengths)), key=lambda i: lengths[i], default=None)
    if longest is not None and lengths[longest] > n_ctx:
        raise ValueError(f"task {task!r}: a prompt has {lengths[longest]} tokens, more than the "
                         f"model's context n_ctx={n_ctx}: {prompts[longest][:80]!r}...")


def _encode(tokenizer: PreTrainedTokenizerBase, texts: list[str]) -> list[list[int]]:
    return tokenizer(texts, add_special_tokens=False)["input_ids"]


def _pad_id(tokenizer: PreTrainedTokenizerBase) -> int:
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return int(candidate)
    return 0


def _candidate_ids(tokenizer: PreTrainedTokenizerBase, task: str, prompts: list[str],
                   prompt_ids: list[list[int]], candidates: list[str]) -> list[int]:
    """The token id of each candidate; ValueError unless it is one token on its own and at
    the end of its prompt."""
    single: dict[str, int] = {}
    for text, ids in zip(sorted(set(candidates)), _encode(tokenizer, sorted(set(candidates)))):
        if len(ids) != 1:
            raise ValueError(f"task {task!r}: candidate {text!r} is not a single token: "
                             f"{tokenizer.convert_ids_to_tokens(ids)}")
        single[text] = ids[0]
    full_ids = _encode(tokenizer, [p + c for p, c in zip(prompts, candidates)])
    for prompt, ids, candidate, full in zip(prompts, prompt_ids, candidates, full_ids):
        if full != ids + [single[candidate]]:
            tail = tokenizer.convert_ids_to_tokens(full[max(0, len(ids) - 2):])
            raise ValueError(f"task {task!r}: {candidate!r} is not a single token after the prompt "
                             f"{prompt!r} (the end tokenizes as {tail})")
    return [single[c] for c in candidates]


def _rows(idx: Index, n: int) -> list[int]:
    """`idx` as a list of row numbers in [0, n)."""
    if isinstance(idx, Tensor):
        idx = idx.detach().cpu()
        if idx.dtype == torch.bool:
            if idx.shape != (n,):
                raise IndexError(f"boolean index of shape {tuple(idx.shape)} for {n} examples")
            idx = idx.nonzero().flatten()
        idx = idx.flatten().tolist() if idx.ndim else int(idx)
    if isinstance(idx, slice):
        return list(range(n))[idx]
    if isinstance(idx, int):
        idx = [idx]
    rows = [int(i) + n if int(i) < 0 else int(i) for i in idx]
    bad = [i for i in rows if not 0 <= i < n]
    if bad:
        raise IndexError(f"index {bad[0]} out of range for {n} examples")
    return rows
