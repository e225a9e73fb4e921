"""The mean of every node over the pretraining distribution: what a pruned node is replaced by.

Means are taken over all positions of windows of the training corpus, with exactly the forward
pass the masked model runs (AbsTopK included: the hooks sit after it). They are saved next to the
model as `node_means.safetensors`, with the number of tokens they were averaged over.
"""

from __future__ import annotations

from pathlib import Path

import torch
from jaxtyping import Float, Int
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


def save_node_means(means: torch.Tensor, model_dir: str | Path, n_tokens: int) -> Path:
    path = Path(model_dir) / MEANS_FILE
    save_file({"means": means.detach().cpu().contiguous()}, str(path),
              metadata={"n_tokens": str(n_tokens)})
    return path


def load_node_means(model_dir: str | Path, registry: NodeRegistry) -> Float[torch.Tensor, " n_nodes"] | None:
    """The saved means of the model in `model_dir`, or None if none were saved."""
    path = Path(model_dir) / MEANS_FILE
    if not path.is_file():
        return None
    try:
        means = load_file(str(path))["means"]
    except Exception as err:  # safetensors raises its own error types
        raise ValueError(f"{path} is not a valid node-means file: {err}") from err
    if means.shape != (registry.n_nodes,):
        raise ValueError(f"{path} holds {tuple(means.shape)} means; this model has "
                         f"{registry.n_nodes} nodes")
    return means


def node_means_for(model, model_dir: str | Path | None = None, tokens=None, n_tokens: int = 1 << 16,
                   sparse_kernels: bool | str = "auto"):
    """The model's node means: loaded from `model_dir` if saved there, else computed on
    `tokens` (default: the standard-library training stream) and saved to `model_dir`."""
    registry = NodeRegistry.for_model(model)
    if model_dir is not None:
        means = load_node_means(model_dir, registry)
        if means is not None:
            return means.to(model.cfg.device)
    if tokens is None:
        from sparse_lens.data import default_cache_dir, load_corpus

        tokens = load_corpus(None, model.tokenizer, cache_dir=default_cache_dir()).train
    means = compute_node_means(model, registry, tokens, n_tokens=n_tokens, sparse_kernels=sparse_kernels)
    if model_dir is not None:
        save_node_means(means, model_dir, n_tokens)
    return means
