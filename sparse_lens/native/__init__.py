"""Native (C) kernels for the training step on CPU: exact selections by magnitude, attention, norm.

`kernels.c` holds them: AbsTopK (each row's k-th largest |x| by bisection on the bit patterns,
AVX-512 where the CPU has it, then the output and the byte mask in one pass), its backward, the
weight projection's global top-k with the per-unit counts (wrapped for tensors in `selection`;
each has a PyTorch/NumPy twin that computes the same bits), causal attention for 16-wide heads
(`attention`) and RMSNorm (`norm`), both equal to TransformerLens's to float tolerance. The
tests compare every kernel with its twin or with TransformerLens.
The file is compiled on first use with `$CC`, the compiler Python was built with, or `cc`
(`-O3 -march=native -fopenmp`; a flag the compiler refuses is dropped, `-march=native` first)
into `data.default_cache_dir()/native/`, under a name that hashes the source, the flags, the
compiler and the CPU, and loaded with `ctypes`. Where that fails (no compiler, say) `library()`
returns None, with one warning, and callers use their twins. `SPARSE_LENS_NATIVE=0` turns the
kernels off.

OpenMP: the library links `libgomp.so.1`, which resolves to the one PyTorch has already loaded
(the dynamic loader reuses a loaded library of the same soname), and every call passes its
thread count (`torch.get_num_threads()`), so the kernels share PyTorch's threads.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shlex
import shutil
import subprocess
import sysconfig
import tempfile
import warnings
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("kernels.c")
FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c11")
#: dropped one at a time, in this order, when the compiler refuses them (an older compiler
#: that does not know this CPU; Apple's clang, which has no OpenMP: then one thread)
_OPTIONAL_FLAGS = ("-march=native", "-fopenmp")

_P, _I, _INT = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
_SIGNATURES = {
    "abstopk_apply": [_P, _P, _P, _P, _I, _I, _I, _INT],
    "abstopk_rows": [_P, _P, _P, _P, _I, _I, _I, _INT],
    "select_is_vectorised": [],
    "mul_keep": [_P, _P, _P, _I, _INT],
    "weight_topk": [_P, _I, _I, _I, _I, _I, _P, _P, _P],
    "weight_apply": [_P, _I, ctypes.c_uint32, _I],
    "attention_head_dim": [],
    "attention_forward": [_P, _P, _P, _P, _P, _P, _I, _I, _I, ctypes.c_float, _INT],
    "attention_backward": [_P, _P, _P, _P, _P, _P, _P, _P, _P, _P, _P, _I, _I, _I, ctypes.c_float, _INT],
    "rms_norm_forward": [_P, _P, _P, _P, _I, _I, ctypes.c_float, _INT],
    "rms_norm_backward": [_P, _P, _P, _P, _P, _P, _P, _I, _I, _INT],
}
_RETURNS_INT = ("select_is_vectorised", "attention_head_dim", "attention_forward", "attention_backward")


def compiler() -> list[str] | None:
    """The C compiler command: `$CC`, the one Python was built with, or `cc`; None if absent."""
    for candidate in (os.environ.get("CC"), sysconfig.get_config_var("CC"), "cc", "gcc"):
        if candidate:
            argv = shlex.split(candidate)
            if argv and shutil.which(argv[0]):
                return argv
    return None


def _cpu_fingerprint() -> str:
    """What `-march=native` depends on: the CPU's model and flags (Linux), else the machine."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        return "\n".join(sorted({ln for ln in lines if ln.startswith(("model name", "flags"))}))
    except OSError:
        return platform.machine() + platform.processor()


def build(cache_dir: Path | None = None) -> Path:
    """Compile `kernels.c` into the cache (once per source, flags, compiler and CPU); returns
    the shared library's path. Flags the compiler refuses are dropped (`_OPTIONAL_FLAGS`).
    Raises `OSError` or `subprocess.CalledProcessError` if even the plain build fails."""
    from sparse_lens.data import default_cache_dir

    cc = compiler()
    if cc is None:
        raise OSError("no C compiler found (set $CC)")
    version = subprocess.run([*cc, "--version"], capture_output=True, text=True, check=True).stdout
    out_dir = (cache_dir or default_cache_dir()) / "native"
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError:  # a read-only cache: this user's temporary directory instead
        out_dir = Path(tempfile.gettempdir()) / f"sparse_lens-native-{getattr(os, 'getuid', lambda: 0)()}"
    flags = list(FLAGS)
    while True:
        try:
            return _compile(cc, flags, version, out_dir)
        except subprocess.CalledProcessError:
            optional = [f for f in _OPTIONAL_FLAGS if f in flags]
            if not optional:
                raise
            flags.remove(optional[0])


def _compile(cc: list[str], flags: list[str], version: str, out_dir: Path) -> Path:
    key = hashlib.sha256(b"\0".join([SOURCE.read_bytes(), " ".join(flags).encode(), version.encode(),
                                     _cpu_fingerprint().encode()])).hexdigest()[:16]
    target = out_dir / f"kernels-{key}.so"
    if target.exists():
        return target
    out_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out_dir)
    os.close(fd)
    try:
        subprocess.run([*cc, *flags, "-o", tmp, str(SOURCE), "-lm"], capture_output=True, text=True,
                       check=True)
        os.replace(tmp, target)  # atomic: concurrent builders each write a whole file
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


@functools.lru_cache(maxsize=None)
def library() -> ctypes.CDLL | None:
    """The loaded kernels, or None (disabled, or the build failed: warned once)."""
    if os.environ.get("SPARSE_LENS_NATIVE", "1") == "0":
        return None
    try:
        lib = ctypes.CDLL(str(build()))
    except (OSError, subprocess.CalledProcessError) as err:
        detail = getattr(err, "stderr", None) or err
        warnings.warn(f"sparse_lens: native kernels unavailable ({str(detail).strip()[:300]}); "
                      "using the PyTorch/NumPy versions", RuntimeWarning, stacklevel=2)
        return None
    for name, argtypes in _SIGNATURES.items():
        getattr(lib, name).argtypes = argtypes
        getattr(lib, name).restype = ctypes.c_int if name in _RETURNS_INT else None
    return lib


def library_for(*tensors):
    """The kernels if they apply to all `tensors` (CPU float32) and load, else None."""
    if any(t.device.type != "cpu" or t.dtype != torch.float32 for t in tensors):
        return None
    return library()
