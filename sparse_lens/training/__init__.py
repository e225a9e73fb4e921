"""Weight-sparse training (and the dense baseline, with sparsity off).

One step (`train_step`): forward, loss, backward, global gradient RMS rescale, AdamW step, then the
projection of every matrix onto its top-k (`SparseHookedTransformer.project_weights_`). The step
is the unit a torch DDP wrapper drives: it takes the (possibly wrapped) model, and the projection
is deterministic, so it runs identically on every rank after the all-reduced step.

Choices (the paper's, unless said):
- L0 annealed from 1 (dense) to the target: dense for the first `dense_frac` of steps, linear to
  the target by `anneal_end_frac` (see `sparsity.l0_at_step`).
- LR "sharkfin": base x linear warmup-then-decay x 1/sqrt(L0(step)) (`sparsity.lr_at_step`).
- AdamW, betas (0.9, 0.95), eps 0.1, weight decay 0.1 on matrices only (PyTorch's fused kernels
  where they run; a run resumes with the implementation it was saved with).
- Gradient RMS: the paper says "clip at 1", the reference code always rescales to RMS 1. We
  rescale by default (`grad_rms_mode="rescale"`): with eps = 0.1 an unnormalised gradient of
  small RMS would make Adam's update vanish, so the large eps only makes sense with it. "clip"
  only scales down.
- Batches are a pure function of (seed, step) and the optimizer state is checkpointed, so
  `resume=True` ends with bitwise the weights an uninterrupted run has (CPU, same seed).

The run directory (`rundir`) is also a model directory and a working folder; a checkpoint replaces
only the trainer's own entries. A new run refuses a directory that already holds a model unless
`overwrite=True`; `resume=True` refuses one with nothing to resume. Ctrl-C (SIGINT) finishes the
current step, writes a checkpoint and raises `TrainingInterrupted`, which says how to resume;
`snapshot_every` keeps a model directory every so many steps under `snapshots/`.

Reproducibility. On CPU, `train` runs its steps under `deterministic_algorithms()`: without it,
the backward of the token embedding (TransformerLens's `W_E[tokens]`, an `index_put_` with
accumulate) adds its rows with parallel atomic float adds whenever more than one thread runs and
the batch has >= 32768 embedding entries, so two runs of the same command (even in one process)
ended with different weights, and after 1400 steps the `small` model's validation loss differed by
0.04 nats. With it, a run is bitwise reproducible across processes and hash seeds *for the same
torch build, CPU and thread count* (`torch.get_num_threads()`, recorded in the checkpoint): other
threads split float reductions (matmuls, sums) differently, so 1, 2 or 4 threads give weights that
differ in the last bits, and training amplifies that. On CUDA nothing is forced (cuBLAS needs
`CUBLAS_WORKSPACE_CONFIG` set before it starts); GPU runs are not promised to be bitwise reproducible.
Randomness comes from the seed alone: the model is initialised under `torch.random.fork_rng`, so
the caller's global RNG state is left untouched.

Data-parallel. Under `torchrun` (see `sparse_lens.distributed`) `train` wraps the model in
DistributedDataParallel, each rank trains on its rows of a global batch of `batch_size x world
size`, rank 0 alone writes the run directory, and the ranks' weights are checked to stay bitwise
equal. With one process nothing of that runs. `TrainConfig.dtype="bf16"` runs the forward pass
under bfloat16 autocast (for GPUs).

Modules: `config` (TrainConfig, TrainResult, the errors), `step` (one optimisation step and its
parts), `loop` (the loop plain and bridged runs share), `rundir` (checkpoints, resume, generic
optimizer state), `run` (`train`), `graphed` (the step as a CUDA graph, `TrainConfig.cuda_graph`).
"""

from sparse_lens.training.config import (
    AUTOCAST_DTYPES, NonFiniteLossError, TrainConfig, TrainingInterrupted, TrainResult,
)
from sparse_lens.training.loop import Job, Loop, run_loop
from sparse_lens.training.run import seeded_model, train
from sparse_lens.training.rundir import (
    DERIVED_FILES, SNAPSHOTS_DIR, TRAINING_DIR, load_optimizer_state, optimizer_tensors,
    read_trainer_state, saved_configs, write_trainer_state,
)
from sparse_lens.training.step import (
    autocast, corpus_for, deterministic_algorithms, evaluate, is_fused, make_optimizer,
    rescale_grad_rms_, train_step,
)

__all__ = [
    "AUTOCAST_DTYPES", "DERIVED_FILES", "Job", "Loop", "NonFiniteLossError", "SNAPSHOTS_DIR",
    "TRAINING_DIR", "TrainConfig", "TrainResult", "TrainingInterrupted", "autocast", "corpus_for",
    "deterministic_algorithms", "evaluate", "is_fused", "load_optimizer_state", "make_optimizer",
    "optimizer_tensors", "read_trainer_state", "rescale_grad_rms_", "run_loop", "saved_configs",
    "seeded_model", "train", "train_step", "write_trainer_state",
]
