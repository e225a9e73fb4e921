"""Keep freed CPU memory in the process for the next tensors, instead of handing it back to the OS.

PyTorch's CPU tensors come from the C library's `malloc`, with no cache of its own. glibc serves
large blocks (above 128 KiB, a threshold that adapts up to 32 MiB) with fresh `mmap`s and unmaps
them on free, and trims the heap's freed top back to the OS: every large activation or gradient a
forward or backward pass allocates is then new memory, and the kernel zeroes each of its 4 KiB
pages on first touch. Measured on this project's 2-core machine, one thread:

- a pruning step at the `paper` preset's shape (2 of its 8 layers, CSR weights, 32 x 64 tokens):
  ~600,000 page faults and ~1.8 s of kernel time in a 4.8-5.4 s step; with `retain_freed_memory()`
  no faults once warm and 3.6-4.1 s;
- a `small`-preset training step: 3,600-7,500 page faults and 12-16 ms of kernel time per step.

`retain_freed_memory()` turns both off for the whole process (glibc's `mallopt`: no `mmap` for
large blocks, no trimming), so freed blocks are reused from the heap. The cost: the process keeps
its peak memory until it exits, as a caching allocator (PyTorch's own, on CUDA) does (measured:
120 `small` training steps peak at 802 MB resident either way; a freed block serves later tensors
that fit in it, so a loop of equal shapes reaches a steady state with no new pages). The
`sparse-lens` command and the benchmarks call it at start; in a notebook, call it once. Results
are unchanged (it only decides where memory comes from). On other C libraries (macOS, musl) it
does nothing and says so. The same from the shell, for any process:
`MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=-1`.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import functools
import sys

# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4


@functools.cache
def retain_freed_memory() -> bool:
    """Make this process reuse freed memory for new tensors (see the module docstring).
    Returns whether it applies (glibc on Linux); idempotent."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return False
    if not (hasattr(libc, "mallopt") and hasattr(libc, "gnu_get_libc_version")):
        return False  # not glibc
    libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    # mallopt returns 1 on success; -1 for the trim threshold means "never trim"
    return libc.mallopt(_M_MMAP_MAX, 0) == 1 and libc.mallopt(_M_TRIM_THRESHOLD, -1) == 1


def add_retain_flag(parser: argparse.ArgumentParser) -> None:
    """`--retain-freed-memory` (default) / `--no-retain-freed-memory`, for the benchmarks; apply
    it with `apply_retain_flag(args)`."""
    parser.add_argument("--retain-freed-memory", action=argparse.BooleanOptionalAction, default=True,
                        help="reuse freed memory as the sparse-lens command does (sparse_lens.allocator); "
                             "--no-retain-freed-memory: glibc's defaults")


def apply_retain_flag(args: argparse.Namespace) -> None:
    if args.retain_freed_memory:
        retain_freed_memory()
