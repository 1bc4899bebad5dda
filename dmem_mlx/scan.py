"""Choosing the state-update implementation: Metal kernel, chunked scan, or the per-token step.

All of them compute `delta_mem.scan_reference` (the per-token oracle) within fp32 rounding;
see tests/test_scan.py. On a Metal device the kernels of `kernels/metal.py` run (with the
chunked scan's gradient, so training works there too); elsewhere (CPU, CUDA) the chunked WY
scan of `chunked_scan.py`. A few tokens are cheaper as plain steps than as one chunk.
"""

from __future__ import annotations

import os
from functools import lru_cache
from typing import Optional

import mlx.core as mx

from .chunked_scan import chunked_scan
from .delta_mem import MemoryInputs, scan_reference, scan_step

# Up to this many tokens the unrolled steps beat the chunked scan's fixed cost (measured on
# the CPU backend: ~0.3 ms for a chunk vs ~0.07 ms per step).
MAX_STEPS = 4
# DMEM_NO_METAL=1 keeps the portable path on a Mac (for comparisons and debugging).
USE_METAL = os.environ.get("DMEM_NO_METAL", "") in ("", "0")
# Set by `fused.reference_path()`: every call runs the per-token oracle.
FORCE_REFERENCE = False


def scan(
    state: mx.array, inputs: MemoryInputs, valid: Optional[mx.array] = None
) -> tuple[mx.array, mx.array]:
    """Reads [B, T, H, r] and the final state [B, H, r, r] of one call (read before write).

    state: [B, H, r, r] float32; inputs: [B, T, H, r] each; valid: [B, T] (0 = padding) or None.
    """
    if FORCE_REFERENCE:
        return scan_reference(state, inputs, valid)
    if metal():
        return _metal_scan(state, inputs, valid)
    if inputs.q.shape[1] <= MAX_STEPS:
        return scan_steps(state, inputs, valid)
    return chunked_scan(state, inputs, valid)


def scan_steps(
    state: mx.array, inputs: MemoryInputs, valid: Optional[mx.array] = None
) -> tuple[mx.array, mx.array]:
    """`scan_reference` for a few tokens, one `scan_step` each (what decode uses on T = 1)."""
    reads = []
    for t in range(inputs.q.shape[1]):
        read, new_state = scan_step(state, *(x[:, t] for x in inputs))
        if valid is None:
            state = new_state
        else:
            m = valid[:, t].astype(mx.float32)[:, None, None]
            read = read * m
            state = mx.where(m[..., None] > 0, new_state, state)
        reads.append(read)
    if not reads:
        return mx.zeros(inputs.q.shape, mx.float32), state
    return (reads[0][:, None] if len(reads) == 1 else mx.stack(reads, axis=1)), state


def metal() -> bool:
    """True when the Metal kernels run: a Metal default device (and not DMEM_NO_METAL)."""
    return USE_METAL and _has_metal() and mx.default_device() == mx.gpu


@lru_cache(maxsize=None)
def _has_metal() -> bool:
    try:
        from . import kernels  # noqa: F401 - the kernels must be importable
    except ImportError:
        return False
    return mx.metal.is_available()


def _metal_scan(state, inputs, valid):
    from .kernels import metal_scan

    valid = mx.ones(inputs.q.shape[:2], mx.float32) if valid is None else valid
    return with_portable_vjp(metal_scan)(state, *inputs, valid)


_vjp_wrapped = {}


def with_portable_vjp(forward):
    """`forward(state, inputs, valid)` as a function of arrays whose gradient is the chunked scan's.

    Custom kernels have no autodiff; training through them gets the same derivatives from the
    chunked scan (recomputed in the backward pass). Returns f(state, q, k, v, keep, erase,
    write, valid) → (reads, state).
    """
    if forward in _vjp_wrapped:
        return _vjp_wrapped[forward]

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

    _vjp_wrapped[forward] = fn
    return fn
