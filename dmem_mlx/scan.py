"""Choosing the state-update implementation: decode step, Metal kernel, or portable scan.

All of them compute exactly `delta_mem.scan_reference` (the per-token oracle) within fp32
rounding; see tests/test_scan.py.
"""

from __future__ import annotations

from typing import Optional

import mlx.core as mx

from .delta_mem import MemoryInputs, scan_reference, scan_step


def scan(
    state: mx.array, inputs: MemoryInputs, valid: Optional[mx.array] = None
) -> tuple[mx.array, mx.array]:
    """Reads [B, T, H, r] and the final state [B, H, r, r] of one call (read before write)."""
    if inputs.q.shape[1] == 1:
        read, new_state = scan_step(state, *(x[:, 0] for x in inputs))
        if valid is None:
            return read[:, None], new_state
        m = valid[:, 0].astype(mx.float32)[:, None, None]
        return (read * m)[:, None], mx.where(m[..., None] > 0, new_state, state)
    return scan_reference(state, inputs, valid)
