import contextlib
import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def load_script(relative_path: str):
    """A repository script that is not a package module (e.g. "scripts/check_structure.py"),
    imported by path."""
    path = ROOT / relative_path
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def tokenizer():
    from sparse_lens.tokenizer import load_tokenizer

    return load_tokenizer()


def save_tiny_model_with_means(tokenizer, path):
    """Save an untrained `tiny` model (seed 0) at `path` with node means of random tokens cached
    next to it; return the model and the means."""
    import torch

    from sparse_lens.config import SparseHookedTransformerConfig
    from sparse_lens.hooks import NodeRegistry, compute_node_means, save_node_means
    from sparse_lens.model import SparseHookedTransformer

    torch.manual_seed(0)
    model = SparseHookedTransformer(SparseHookedTransformerConfig.preset("tiny"), tokenizer=tokenizer)
    model.save_pretrained(path)
    stream = torch.randint(1, 2048, (8192,), generator=torch.Generator().manual_seed(0))
    means = compute_node_means(model, NodeRegistry.for_model(model), stream, n_tokens=1024)
    save_node_means(means, path, 1024)
    return model, means


@contextlib.contextmanager
def killed_at_step(monkeypatch, step: int):
    """Inside the body, drawing the batch of training step `step` raises KeyboardInterrupt (a run
    killed there, before that step's update); the real sampler is back afterwards."""
    from sparse_lens import data

    real_sample = data.sample_batch

    def sample(tokens, batch_size, seq_len, at, seed):
        if at == step:
            raise KeyboardInterrupt("killed")
        return real_sample(tokens, batch_size, seq_len, at, seed)

    monkeypatch.setattr(data, "sample_batch", sample)
    try:
        yield
    finally:
        monkeypatch.setattr(data, "sample_batch", real_sample)
