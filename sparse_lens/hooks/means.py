"""The mean of every node over the pretraining distribution: what a pruned node is replaced by.

Means are taken over all positions of windows of the training corpus, with exactly the forward
pass the masked model runs (AbsTopK included: the hooks sit after it). They are saved next to the
model as `node_means.safetensors`, with the number of tokens they were averaged over and the
digest of the token stream they came from. By default that stream is the model's own training
corpus, as its directory records it (`recorded_corpus`), and a cached file computed on another
stream is recomputed.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float, Int
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from sparse_lens.hooks.nodes import NodeRegistry

MEANS_FILE = "node_means.safetensors"


@torch.no_grad()
def compute_node_means(
    model,
    registry: NodeRegistry,
    tokens: Int[torch.Tensor, " n"],
    n_tokens: int = 1 << 16,
    batch_size: int = 16,
    seq_len: int | None = None,
    seed: int = 0,
    sparse_kernels: bool | str = "auto",
) -> Float[torch.Tensor, " n_nodes"]:
    """Mean activation of every node over `n_tokens` tokens (rounded up to whole batches) of
    random windows of the token stream `tokens` (e.g. `corpus.train`). Sums in float64.
    `sparse_kernels`: CSR matmuls (`sparse_lens.sparse_kernels.sparse_matmuls`; "auto" = where
    measured faster)."""
    from sparse_lens.data import sample_batch
    from sparse_lens.sparse_kernels import sparse_matmuls

    seq_len = seq_len or model.cfg.n_ctx
    if n_tokens < 1:
        raise ValueError(f"n_tokens must be >= 1; got {n_tokens}")
    sums = {s.hook_name: torch.zeros(s.shape, dtype=torch.float64, device=model.cfg.device)
            for s in registry.sites}

    def accumulate(activation: torch.Tensor, hook) -> None:
        sums[hook.name] += activation.flatten(0, 1).sum(0, dtype=torch.float64)

    hooks = [(s.hook_name, accumulate) for s in registry.sites]
    seen, step = 0, 0
    with sparse_matmuls(model, sparse_kernels):
        while seen < n_tokens:
            batch = sample_batch(tokens, batch_size, seq_len, step, seed).to(model.cfg.device)
            model.run_with_hooks(batch, return_type=None, fwd_hooks=hooks)
            seen += batch.numel()
            step += 1
    flat = torch.cat([sums[s.hook_name].flatten() for s in registry.sites]) / seen
    return flat.to(model.cfg.dtype)


#: where a model directory records the corpus it was trained on (the first that exists wins):
#: a training run's state, or the provenance of a shipped checkpoint (`sparse_lens.pretrained`)
CORPUS_RECORDS = ("training/state.json", "provenance.json")


def tokens_digest(tokens: Int[torch.Tensor, " n"]) -> str:
    """SHA-256 of a token stream's ids (as int64): which corpus means were computed on."""
    return hashlib.sha256(tokens.detach().cpu().to(torch.int64).numpy().tobytes()).hexdigest()


def save_node_means(means: torch.Tensor, model_dir: str | Path, n_tokens: int,
                    tokens: Int[torch.Tensor, " n"] | None = None, corpus: str = "") -> Path:
    """Write `means` to `model_dir`, recording `n_tokens`, the digest of the stream `tokens` they
    were computed on (when given) and a description of its `corpus`."""
    path = Path(model_dir) / MEANS_FILE
    metadata = {"n_tokens": str(n_tokens), "corpus": corpus}
    if tokens is not None:
        metadata["tokens_sha256"] = tokens_digest(tokens)
    save_file({"means": means.detach().cpu().contiguous()}, str(path), metadata=metadata)
    return path


def load_node_means(model_dir: str | Path, registry: NodeRegistry) -> Float[torch.Tensor, " n_nodes"] | None:
    """The saved means of the model in `model_dir`, or None if none were saved."""
    path = Path(model_dir) / MEANS_FILE
    if not path.is_file():
        return None
    try:
        tensors = load_file(str(path))
    except Exception as err:  # safetensors raises its own error types
        raise ValueError(f"{path} is not a valid node-means file: {err}") from err
    if "means" not in tensors:
        raise ValueError(f"{path} has no tensor 'means': not a node-means file")
    means = tensors["means"]
    if means.shape != (registry.n_nodes,):
        raise ValueError(f"{path} holds {tuple(means.shape)} means; this model has "
                         f"{registry.n_nodes} nodes")
    return means


def _saved_digest(model_dir: str | Path) -> str | None:
    with safe_open(str(Path(model_dir) / MEANS_FILE), framework="pt") as f:
        return (f.metadata() or {}).get("tokens_sha256")


def recorded_corpus(model_dir: str | Path) -> tuple[dict[str, Any], Path] | None:
    """The corpus the model in `model_dir` was trained on, as its directory records it
    (`CORPUS_RECORDS`; a run's snapshot, `<run>/snapshots/step-N`, by its run's):
    `{"sources", "val_fraction", "max_files"}` (sources None = the standard library) and the file
    it came from; None when nothing is recorded."""
    from sparse_lens.checkpoint import read_json
    from sparse_lens.training.rundir import snapshot_of_run

    records = [Path(model_dir) / name for name in CORPUS_RECORDS]
    snapshot = snapshot_of_run(model_dir)
    if snapshot is not None:
        records += [snapshot[0] / name for name in CORPUS_RECORDS]
    for record in records:
        if record.is_file():
            tc = read_json(record).get("train_config")
            if isinstance(tc, dict):
                return ({"sources": tc.get("sources"), "val_fraction": tc.get("val_fraction", 0.02),
                         "max_files": tc.get("max_files")}, record)
    return None


def _training_stream(model, spec: dict[str, Any] | None, record: Path | None) -> Int[torch.Tensor, " n"]:
    """The training stream of the recorded corpus `spec` (None: the standard library)."""
    from sparse_lens.data import default_cache_dir, load_corpus

    spec = spec or {"sources": None, "val_fraction": 0.02, "max_files": None}
    try:
        return load_corpus(spec["sources"], model.tokenizer, val_fraction=spec["val_fraction"],
                           max_files=spec["max_files"], cache_dir=default_cache_dir()).train
    except ValueError as err:
        raise ValueError(f"cannot load the training corpus recorded in {record}: {err}") from err


def node_means_for(model, model_dir: str | Path | None = None, tokens=None, n_tokens: int = 1 << 16,
                   sparse_kernels: bool | str = "auto"):
    """The model's node means over `tokens`, by default the training stream of the corpus the
    model was trained on, as recorded in `model_dir` (or in the directory the model was loaded
    from, `model.loaded_from`; see `recorded_corpus`), else the standard library.

    Cached in `model_dir` with the digest of the stream they were computed on: a cached file is
    used when that digest matches the stream wanted, else recomputed (with a warning). When
    neither `tokens` nor a recorded corpus says which stream is wanted, a cached file is used
    as it is."""
    registry = NodeRegistry.for_model(model)
    given = tokens is not None
    corpus_dir = model_dir if model_dir is not None else getattr(model, "loaded_from", None)
    found = recorded_corpus(corpus_dir) if corpus_dir is not None and tokens is None else None
    spec, record = found if found is not None else (None, None)
    cached = load_node_means(model_dir, registry) if model_dir is not None else None
    if cached is not None:
        if tokens is None and spec is None:
            return cached.to(model.cfg.device)
        tokens = _training_stream(model, spec, record) if tokens is None else tokens
        if _saved_digest(model_dir) == tokens_digest(tokens):
            return cached.to(model.cfg.device)
        warnings.warn(f"{Path(model_dir) / MEANS_FILE} was computed on another corpus than "
                      f"{'the one recorded in ' + str(record) if record else 'the tokens given'} "
                      "(or on one it does not record); recomputing it", UserWarning, stacklevel=2)
    if tokens is None:
        if corpus_dir is not None and spec is None:
            warnings.warn(f"{corpus_dir} records no training corpus ({' or '.join(CORPUS_RECORDS)}); "
                          "node means over the standard library", UserWarning, stacklevel=2)
        tokens = _training_stream(model, spec, record)
    means = compute_node_means(model, registry, tokens, n_tokens=n_tokens, sparse_kernels=sparse_kernels)
    if model_dir is not None:
        corpus = ("tokens given to node_means_for" if given else json.dumps(spec) if spec is not None
                  else "the standard library (no corpus recorded)")
        save_node_means(means, model_dir, n_tokens, tokens=tokens, corpus=corpus)
    return means
