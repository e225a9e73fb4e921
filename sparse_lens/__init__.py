"""sparse_lens: weight-sparse transformers and their circuits, in TransformerLens.

    from sparse_lens import SparseHookedTransformer, SparseHookedTransformerConfig, train
    circuit = sparse_lens.prune(model, "single_double_quote"); print(circuit); circuit.verify()

The public names are imported lazily, so `import sparse_lens` (and `sparse-lens --help`) does not
pay TransformerLens's import time until a model is needed.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "SparseHookedTransformer": "sparse_lens.model",
    "SparseHookedTransformerConfig": "sparse_lens.config",
    "TrainConfig": "sparse_lens.training",
    "train": "sparse_lens.training",
    "load_tokenizer": "sparse_lens.tokenizer",
    "load_corpus": "sparse_lens.data",
    "CheckpointError": "sparse_lens.checkpoint",
    "NonFiniteLossError": "sparse_lens.training",
    "prune": "sparse_lens.pruning",
    "PruneConfig": "sparse_lens.pruning",
    "Circuit": "sparse_lens.circuit",
    "list_tasks": "sparse_lens.tasks",
    "get_task": "sparse_lens.tasks",
    "sparse_matmuls": "sparse_lens.sparse_kernels",
}
_SUBPACKAGES = ("tasks", "hooks", "viz", "bridges", "analyses")

__all__ = [*_EXPORTS, *_SUBPACKAGES, "__version__"]

if TYPE_CHECKING:
    from sparse_lens import analyses, bridges, hooks, tasks, viz
    from sparse_lens.checkpoint import CheckpointError
    from sparse_lens.circuit import Circuit
    from sparse_lens.pruning import PruneConfig, prune
    from sparse_lens.sparse_kernels import sparse_matmuls
    from sparse_lens.tasks import get_task, list_tasks
    from sparse_lens.config import SparseHookedTransformerConfig
    from sparse_lens.data import load_corpus
    from sparse_lens.model import SparseHookedTransformer
    from sparse_lens.tokenizer import load_tokenizer
    from sparse_lens.training import NonFiniteLossError, TrainConfig, train


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    if name in _SUBPACKAGES:
        return importlib.import_module(f"sparse_lens.{name}")
    raise AttributeError(f"module 'sparse_lens' has no attribute {name!r}")
