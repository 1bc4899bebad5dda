"""Fast fp32 on Linux CPUs: run under the system's OpenBLAS when one is installed, and let
MLX reuse large buffers (`raise_cpu_cache_limit`).

The `mlx[cpu]` wheel for Linux bundles a reference BLAS (≈2.4 GFLOP/s for an fp32 GEMM on a
2-core x86); Debian/Ubuntu's OpenBLAS (package `libopenblas0-pthread`) runs the same GEMM at
≈184 GFLOP/s. MLX binds its BLAS symbols when it is loaded, so the switch has to happen before
the process starts: `reexec_with_openblas()`, called first thing by the command-line entry
points, re-executes the same command with `LD_PRELOAD` naming the library.

Environment: DMEM_NO_OPENBLAS=1 turns this off; DMEM_OPENBLAS_REEXEC marks the re-executed
process (so it never loops).
"""

from __future__ import annotations

import os
import platform
import sys
from pathlib import Path
from typing import Callable, Mapping, Optional, Sequence

OPT_OUT = "DMEM_NO_OPENBLAS"
REEXEC_MARK = "DMEM_OPENBLAS_REEXEC"
INSTALL_HINT = ("hint: matmuls on this CPU run on MLX's slow built-in BLAS; for ~50x faster "
                "fp32 install OpenBLAS: sudo apt install libopenblas0-pthread")
_VARIANTS = ("openblas-pthread", "openblas-openmp", "openblas-serial")
_TRIPLETS = {"x86_64": "x86_64-linux-gnu", "amd64": "x86_64-linux-gnu",
             "aarch64": "aarch64-linux-gnu", "arm64": "aarch64-linux-gnu"}
_hint_shown = False


def openblas_candidates(machine: Optional[str] = None) -> list[Path]:
    """Where Debian/Ubuntu install OpenBLAS's libblas.so.3, best first, for this machine."""
    triplet = _TRIPLETS.get((machine or platform.machine()).lower())
    if triplet is None:
        return []
    return [Path("/usr/lib") / triplet / variant / "libblas.so.3" for variant in _VARIANTS]


def find_openblas(machine: Optional[str] = None,
                  exists: Callable[[Path], bool] = Path.is_file) -> Optional[Path]:
    """The first installed OpenBLAS of `openblas_candidates`, or None."""
    return next((p for p in openblas_candidates(machine) if exists(p)), None)


def openblas_preloaded(environ: Mapping[str, str] = os.environ) -> bool:
    """True when LD_PRELOAD already names an OpenBLAS (ours, or one the user chose)."""
    entries = environ.get("LD_PRELOAD", "").replace(":", " ").split()
    return any("openblas" in Path(e).as_posix().lower() for e in entries)


def reexec_plan(
    argv: Sequence[str],
    environ: Mapping[str, str] = os.environ,
    system: Optional[str] = None,
    machine: Optional[str] = None,
    exists: Callable[[Path], bool] = Path.is_file,
) -> Optional[dict[str, str]]:
    """The environment to re-execute `argv` with, or None when nothing should happen.

    Nothing happens off Linux, when opted out, inside a re-executed process or a test, when an
    OpenBLAS is already preloaded, when none is installed, or without a command line to re-run.
    """
    if (system or platform.system()) != "Linux" or not argv:
        return None
    if environ.get(OPT_OUT, "") not in ("", "0") or environ.get(REEXEC_MARK):
        return None
    if environ.get("PYTEST_CURRENT_TEST"):  # a test calling main() must not restart pytest
        return None
    if openblas_preloaded(environ):
        return None
    library = find_openblas(machine, exists)
    if library is None:
        return None
    env = dict(environ)
    env["LD_PRELOAD"] = " ".join(filter(None, [str(library), environ.get("LD_PRELOAD", "")]))
    env[REEXEC_MARK] = "1"
    return env


def reexec_with_openblas(hint: bool = True) -> None:
    """Re-execute this process under OpenBLAS if that is possible and useful (see module doc).

    Call it before any work: the process is replaced and starts again from the top. When no
    OpenBLAS is installed (Linux, CPU backend) it prints the one-line install hint instead,
    unless hint=False.
    """
    argv = list(getattr(sys, "orig_argv", []))
    env = reexec_plan(argv)
    if env is None:
        if hint:
            print_openblas_hint()
        return
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execve(sys.executable, argv, env)
    except OSError:
        return  # keep running as we are, only slower


def openblas_hint(
    environ: Mapping[str, str] = os.environ,
    system: Optional[str] = None,
    machine: Optional[str] = None,
    exists: Callable[[Path], bool] = Path.is_file,
) -> Optional[str]:
    """INSTALL_HINT when this is Linux with no OpenBLAS installed or preloaded, else None."""
    if (system or platform.system()) != "Linux" or environ.get(OPT_OUT, "") not in ("", "0"):
        return None
    if openblas_preloaded(environ) or find_openblas(machine, exists) is not None:
        return None
    if _on_gpu():
        return None
    return INSTALL_HINT


def print_openblas_hint(file=None) -> None:
    """Print `openblas_hint()` once per process (to stderr), if there is one."""
    global _hint_shown
    hint = openblas_hint()
    if hint and not _hint_shown:
        _hint_shown = True
        print(hint, file=file or sys.stderr)


def raise_cpu_cache_limit(fraction: float = 0.25) -> Optional[int]:
    """On the CPU backend, let MLX keep freed buffers for reuse (up to `fraction` of its memory
    limit); returns the new limit, or None when nothing changed.

    MLX's CPU allocator caches only 32 MiB of freed buffers by default, so every large
    temporary of a long prefill (activations, MLP intermediates, attention scores: tens to
    hundreds of MB) is a fresh allocation whose pages the kernel must fault in and zero again.
    Measured on a 0.6B-shaped fp32 model, 2,048-token prefill: ~18% faster for plain mlx-lm,
    and most of δ-mem's prefill overhead (its Δ temporaries) gone.
    """
    import mlx.core as mx

    if _on_gpu():
        return None
    limit = int(mx.get_memory_limit() * fraction)
    current = mx.set_cache_limit(limit)
    if current >= limit:  # never lower a limit someone chose
        mx.set_cache_limit(current)
        return None
    return limit


def _on_gpu() -> bool:
    """True when MLX computes on a GPU (e.g. the CUDA backend), where the CPU BLAS matters little."""
    try:
        import mlx.core as mx
    except ImportError:
        return False
    return mx.default_device() == mx.gpu


class BlasThreads:
    """OpenBLAS's thread count, set at run time (`openblas_set_num_threads`) where the process
    runs on an OpenBLAS; elsewhere (MLX's built-in BLAS, a GPU) `use` does nothing.

    A batched decode step's GEMMs are a few rows by a weight (8 × 256 × 768 on the demo): past
    OpenBLAS's size threshold it splits them over two threads, whose hand-off costs more than
    the arithmetic whenever the other core is busy (the server's HTTP thread, its clients,
    another job). Demo, 2-core CPU beside a training job, 11 decode steps of 8 rows: 166 → 92
    ms on one thread (1 row: 82 → 50 ms, the LM head's GEMV is threaded too); prompts of 13
    tokens in 8 rows 63 → 36 ms, of ~200 tokens 315 → 302 ms. On an idle machine a long
    prompt's GEMMs gain from the threads, so the server reads long prompts on `use(None)`, the
    count OpenBLAS started with, and everything else on `use(1)`.
    """

    def __init__(self) -> None:
        import ctypes

        try:
            library = ctypes.CDLL(None)
            self._set = library.openblas_set_num_threads
            self._set.argtypes, self._set.restype = [ctypes.c_int], None
            get = library.openblas_get_num_threads
            get.restype = ctypes.c_int
            self.default: Optional[int] = int(get())
        except (AttributeError, OSError):  # no OpenBLAS loaded in this process
            self._set, self.default = None, None
        self._current = self.default

    def use(self, threads: Optional[int]) -> None:
        """Run the next BLAS calls on `threads` threads (None: the count OpenBLAS started with)."""
        threads = self.default if threads is None else min(threads, self.default or threads)
        if self._set is not None and threads != self._current:
            self._set(threads)
            self._current = threads
