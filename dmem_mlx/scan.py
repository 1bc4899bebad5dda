"""The one place that picks how the state update runs: `backend` = auto | reference | chunked | metal.

Every path computes delta_mem.py's math (`scan_reference`, `decode_step`) within fp32 rounding;
see tests/test_scan.py.
- reference: the per-token loop of delta_mem.py as written (the oracle), never compiled;
- chunked: the portable path. One token (decode) runs `delta_mem.decode_step` compiled by
  `mx.compile` (when this machine can compile); a few tokens run the per-token loop; longer
  calls the chunked WY scan of chunked_scan.py (a call's last few tokens past a whole number
  of chunks by the loop; see `token_scan`);
- metal: the Metal kernels of kernels/metal.py: the scan for a call's tokens (with the chunked
  scan's gradient), and for a decode token the whole δ part of the layer — projection, step,
  corrections — in one dispatch (`layer_step`, called by model.py);
- auto: metal on a Metal default device, else chunked.

The backend is `model.delta_mem.backend`, like mlx-lm's `use_kernel=`; its default comes from
the environment variable DMEM_BACKEND (read only in `default_backend`), else "auto".
"""

from __future__ import annotations

import os
import shutil
import threading
from functools import lru_cache, partial
from typing import Callable, Optional

import mlx.core as mx
import numpy as np

from .chunked_scan import DEFAULT_CHUNK, chunked_scan
from .config import DeltaMemConfig
from .delta_mem import MemoryInputs, decode_step, project, scan_reference
from .errors import ConfigError

BACKENDS = ("auto", "reference", "chunked", "metal")
ENVIRONMENT = "DMEM_BACKEND"
# Up to this many tokens the per-token loop beats the chunked scan's fixed cost (measured on
# the CPU backend: ~0.3 ms for a chunk vs ~0.07 ms per step).
MAX_STEPS = 4
# After whole chunks, this many more tokens run as steps rather than in a padded chunk: the loop
# wins there once a chunk is costly (batched rows, many state heads) and loses little on one row.
TAIL_STEPS = 2
HALF_CHUNK = DEFAULT_CHUNK // 2
# From this many batch rows (users' prompts prefilled together), a call of up to LOOP_TOKENS
# tokens runs the per-token loop: the chunked scan's batched 16×16 matmuls are one BLAS call per
# state row of every head and chunk (512 a layer at 8 rows of the demo's 8×8 heads), so its cost
# grows with the rows, the loop's mostly with the tokens (demo, 2-core CPU, per layer: 8 rows ×
# 14 tokens 2.6 → 1.8 ms, × 32 tokens 5.9 → 4.8 ms; 4 rows break even at 14 tokens).
LOOP_ROWS = 4
LOOP_TOKENS = 32


def default_backend() -> str:
    """The backend named by DMEM_BACKEND, or "auto" (the only place the environment is read)."""
    backend = os.environ.get(ENVIRONMENT, "") or "auto"
    try:
        return check_backend(backend)
    except ConfigError as exc:
        raise ConfigError(f"{ENVIRONMENT}={backend}: {exc}") from None


def check_backend(backend: str) -> str:
    """`backend` if it is one of BACKENDS (and "metal" only where the kernels can run); else
    ConfigError (a ValueError), one line."""
    if backend not in BACKENDS:
        raise ConfigError(f"unknown δ backend {backend!r}; choose from {', '.join(BACKENDS)}")
    if backend == "metal" and not metal_available():
        raise ConfigError("the δ backend 'metal' needs a Metal GPU as MLX's default device "
                          "(use 'auto' or 'chunked' here)")
    return backend


def resolve(backend: str) -> str:
    """The concrete path of `backend`: "auto" becomes "metal" or "chunked"."""
    if backend == "auto":
        return "metal" if metal_available() else "chunked"
    return backend


def metal_available() -> bool:
    """True when the Metal kernels can run: a Metal GPU that is MLX's default device."""
    return _has_metal() and mx.default_device() == mx.gpu


@lru_cache(maxsize=None)
def _has_metal() -> bool:
    try:
        from . import kernels  # noqa: F401 - the kernels must be importable
    except ImportError:
        return False
    return mx.metal.is_available()


# -- a call's tokens, already projected ---------------------------------------------------------

def scan(
    state: mx.array, inputs: MemoryInputs, valid: Optional[mx.array] = None,
    backend: str = "auto",
) -> tuple[mx.array, mx.array]:
    """Reads [B, T, H, r] and the final state [B, H, r, r] of one call (read before write).

    state: [B, H, r, r] float32; inputs: [B, T, H, r] each; valid: [B, T] (0 = padding) or None.
    """
    path = resolve(backend)
    if path == "metal":
        return _metal_scan(state, inputs, valid)
    if path == "reference" or inputs.q.shape[1] <= MAX_STEPS:
        return scan_reference(state, inputs, valid)
    return chunked_scan(state, inputs, valid)


# -- a call's tokens, projection included (token writes) --------------------------------------------

def token_scan(
    memory, h: mx.array, state: mx.array, valid: Optional[mx.array] = None,
    backend: str = "auto", weights: Optional[dict] = None,
) -> tuple[mx.array, mx.array]:
    """`DeltaMemory.project` then `scan` for a call that writes every token (T > 1).

    On the chunked path with `mx.compile` available, projection and scan run as one compiled
    function (traced once per shape) of the tokens padded as `token_padding` says (padding is
    the identity map and reads 0, so results are unchanged); `_plan` splits them into chunks.
    h: [B, T, D]; valid: [B, T] or None. Returns (reads [B, T, R], final state [B, H, r, r]).
    """
    w = memory.fused_weights() if weights is None else weights
    B, T, _ = h.shape
    if resolve(backend) != "chunked" or not can_compile():
        reads, new_state = scan(state, memory.project(h, w), valid, backend)
        return reads.reshape(B, T, -1), new_state
    pad = token_padding(T, B)
    if pad:
        valid = (_real_tokens(B, T, pad) if valid is None
                 else mx.pad(valid.astype(mx.float32), [(0, 0), (0, pad)]))
        h = mx.pad(h, [(0, 0), (0, pad), (0, 0)])
    fn = _compiled_token_scan(memory.config, valid is not None, threading.get_ident())
    args = (h, state, w["in"], w["gate_bias"])
    reads, new_state = fn(*args) if valid is None else fn(*args, valid)
    return (reads[:, :T] if pad else reads), new_state


@lru_cache(maxsize=64)
def _real_tokens(batch: int, tokens: int, pad: int) -> mx.array:
    """[batch, tokens + pad]: 1 for a call's tokens, 0 for the padding after them (data made
    from NumPy, so no primitive runs per call)."""
    return mx.array(np.repeat(np.r_[np.ones(tokens), np.zeros(pad)][None], batch, 0)
                    .astype(np.float32))


def token_padding(tokens: int, rows: int = 1) -> int:
    """Identity tokens added to a call of `tokens` (in `rows` batch rows) before `token_scan`'s
    compiled function: none when `_plan` needs none (the loop alone, or TAIL_STEPS past a
    multiple of DEFAULT_CHUNK), else up to a multiple of HALF_CHUNK. So the shapes traced stay
    few, and a call just past a chunk boundary (17 tokens) is not padded to two whole chunks
    (32)."""
    if steps_only(tokens, rows) or tokens % DEFAULT_CHUNK <= TAIL_STEPS:
        return 0
    return -tokens % HALF_CHUNK


def steps_only(tokens: int, rows: int = 1) -> bool:
    """Whether a call of `tokens` in `rows` batch rows runs by the per-token loop alone: a few
    tokens, or up to LOOP_TOKENS in a batch of LOOP_ROWS or more."""
    return tokens <= MAX_STEPS or (rows >= LOOP_ROWS and tokens <= LOOP_TOKENS)


def _plan(tokens: int, rows: int = 1) -> tuple[int, int, int]:
    """(chunked tokens, chunk size, tokens after them run by the per-token loop) for a call of
    `tokens` in `rows` batch rows, padded by `token_padding`: the loop alone where `steps_only`
    says so; a multiple of the chunk in chunks; a few past one, the chunks and then the loop
    (17 tokens: 16 + 1 step, not a second chunk of 15 padding steps); an odd multiple of
    HALF_CHUNK in chunks of that size (21 → 24: three of 8, not two of 16; a chunk's cost grows
    faster than its length)."""
    if steps_only(tokens, rows):
        return 0, DEFAULT_CHUNK, tokens
    tail = tokens % DEFAULT_CHUNK
    if tail <= TAIL_STEPS:
        return tokens - tail, DEFAULT_CHUNK, tail
    return tokens, HALF_CHUNK, 0


def planned_scan(state: mx.array, inputs: MemoryInputs, valid: Optional[mx.array] = None
                 ) -> tuple[mx.array, mx.array]:
    """`scan_reference`'s result by `_plan`: chunked scan, then the per-token loop for the rest.
    Shapes as `scan`."""
    chunked, chunk, _ = _plan(inputs.q.shape[1], inputs.q.shape[0])
    if not chunked:
        return scan_reference(state, inputs, valid)
    head = MemoryInputs(*(x[:, :chunked] for x in inputs))
    reads, state = chunked_scan(state, head, None if valid is None else valid[:, :chunked], chunk)
    if chunked == inputs.q.shape[1]:
        return reads, state
    rest = MemoryInputs(*(x[:, chunked:] for x in inputs))
    more, state = scan_reference(state, rest, None if valid is None else valid[:, chunked:])
    return mx.concatenate([reads, more], axis=1), state


@lru_cache(maxsize=64)
def _compiled_token_scan(config: DeltaMemConfig, masked: bool, thread: int) -> Callable:
    """Per thread: MLX streams belong to a thread, and a compiled graph to the stream it was
    traced on."""
    def fn(h, state, w_in, gate_bias, valid=None):
        reads, new_state = planned_scan(state, project(config, h, w_in, gate_bias), valid)
        return reads.reshape(*reads.shape[:2], -1), new_state

    return mx.compile(fn)


# -- one token: projection and step ---------------------------------------------------------------

def step(
    memory, h: mx.array, state: mx.array, valid: Optional[mx.array] = None,
    write: bool = True, backend: str = "auto", weights: Optional[dict] = None,
) -> tuple[mx.array, mx.array]:
    """`delta_mem.decode_step` of a layer's `DeltaMemory` on the path of `backend`.

    h: [B, 1, D]; state: [B, H, r, r]; valid: [B, 1] or None; weights: the layer's
    `fused_weights()` if already at hand. Returns (reads [B, 1, R] float32, new state
    [B, H, r, r]).
    """
    w = memory.fused_weights() if weights is None else weights
    # (on Metal the model decodes with `layer_step`; this is the portable step of every
    # backend but "reference", compiled where this machine can compile)
    key = (write, valid is not None, backend != "reference", threading.get_ident())
    steps = memory.__dict__.get("_steps")  # this layer's step functions, by key
    fn = None if steps is None else steps.get(key)
    if fn is None:
        if steps is None or len(steps) > 64:  # threads come and go
            steps = memory.__dict__["_steps"] = {}
        fn = steps[key] = step_function(memory.config, write, key[2], key[3])
    if valid is None:
        return fn(h, state, w["in"], w["gate_bias"])
    return fn(h, state, w["in"], w["gate_bias"], valid)


@lru_cache(maxsize=64)
def step_function(config: DeltaMemConfig, write: bool, compiled: bool, thread: int) -> Callable:
    """`decode_step` for one config, compiled when asked and the backend can compile (per
    thread, as `_compiled_token_scan`)."""
    fn = partial(decode_step, config, write)
    return mx.compile(fn) if compiled and can_compile() else fn


@lru_cache(maxsize=None)
def can_compile() -> bool:
    """True when `mx.compile` can run here: a GPU, or a CPU with the C++ compiler MLX uses.

    MLX's CPU backend compiles fused kernels with `g++` at run time; without one the step runs
    uncompiled. A probe catches any other failure once.
    """
    if mx.default_device() == mx.cpu and shutil.which("g++") is None:
        return False
    try:
        probe = mx.compile(lambda x: mx.tanh(x) * x + 1.0)
        mx.eval(probe(mx.ones((2,))))
    except Exception:  # noqa: BLE001 - any failure means: don't compile
        return False
    return True


# -- Metal ------------------------------------------------------------------------------------------

def _metal_scan(state, inputs, valid):
    from .kernels import metal_scan

    valid = mx.ones(inputs.q.shape[:2], mx.float32) if valid is None else valid
    return with_portable_vjp(metal_scan)(state, *inputs, valid)


def layer_step(memory, h: mx.array, state: mx.array, valid: Optional[mx.array] = None,
               write: bool = True, weights: Optional[dict] = None):
    """A whole decode token of a layer on the Metal layer kernel: the projection, the step (or
    a read only) and every correction, one dispatch. Returns ({head: Δ [B, 1, out]}, new state).
    See `kernels.metal_layer_decode`."""
    from .kernels import metal_layer_decode

    return metal_layer_decode(memory, h, state, valid, write, weights)


@lru_cache(maxsize=None)
def with_portable_vjp(forward: Callable) -> Callable:
    """`forward(state, inputs, valid)` as a function of arrays whose gradient is the chunked scan's.

    Custom kernels have no autodiff; training through them gets the same derivatives from the
    chunked scan (recomputed in the backward pass). Returns f(state, q, k, v, keep, erase,
    write, valid) → (reads, state).
    """

    @mx.custom_function
    def fn(state, q, k, v, keep, erase, write, valid):
        return forward(state, MemoryInputs(q, k, v, keep, erase, write), valid)

    @fn.vjp
    def fn_vjp(primals, cotangents, outputs):
        *arrays, valid = primals

        def portable(state, q, k, v, keep, erase, write):
            return chunked_scan(state, MemoryInputs(q, k, v, keep, erase, write), valid)

        _, grads = mx.vjp(portable, arrays, list(cotangents))
        return (*grads, mx.zeros_like(valid))

    return fn
