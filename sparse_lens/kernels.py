"""Which implementation the training step uses for AbsTopK, attention and AdamW: fast or reference.

The fast kernels (`abstopk.abs_topk`, `attention.causal_attention`) compute what the reference
ones compute (`abstopk.abs_topk_reference`, TransformerLens's own attention) to float tolerance,
with fewer passes over memory; they are the default. `reference_kernels()` switches them off for
the body of a `with` statement, in the current thread (and the tasks it starts): the benchmark
times the old step beside the new one with it, and the tests pin the two paths equal with it.
The optimizer is chosen when it is built (`training.make_optimizer`): PyTorch's fused AdamW, or
under `reference_kernels()` its per-parameter loop.

    with reference_kernels():
        logits = model(tokens)  # topk + scatter AbsTopK, TransformerLens attention
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator

_FAST = contextvars.ContextVar("sparse_lens_fast_kernels", default=True)


def fast_kernels_enabled() -> bool:
    """Whether AbsTopK and attention use their fast implementations here (the default)."""
    return _FAST.get()


@contextlib.contextmanager
def reference_kernels(enabled: bool = True) -> Iterator[None]:
    """Use the reference AbsTopK (topk + scatter) and TransformerLens's attention inside the
    body (`enabled=False`: the fast ones); the previous choice is restored on exit, exception
    included."""
    token = _FAST.set(not enabled)
    try:
        yield
    finally:
        _FAST.reset(token)
