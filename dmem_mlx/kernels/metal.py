"""Metal kernels for the δ-mem state update (DESIGN §1), through `mx.fast.metal_kernel`.

Both kernels give one thread to each state row S[b, h, i, :]: rows are independent (DESIGN §1),
so a row's r floats live in that thread's registers and no thread ever waits for another.
Grid (r, H, B): thread_position_in_grid = (row i, head h, batch b).

The kernels are built on first use, so importing this module never needs Metal.  The harness in
tests/metal_shim/ compiles the exact `source` strings below, wrapped in the signature MLX
generates, as C++ and runs them against `delta_mem.scan_reference` on every test run.

Shapes: B batch, T tokens, H state heads, r rank.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any, Optional

import mlx.core as mx

from ..delta_mem import MemoryInputs

# Template arguments shared by both kernels: InT the input dtype (float, float16_t or
# bfloat16_t; it also gives each dtype its own kernel name on every MLX version), H and r.
# Inputs are cast to float in the kernel; the state and all outputs are float32.

_SCAN_SOURCE = """
    // q, k (normalised), v, keep, erase, write: [B, T, H, r]; valid: [B, T] bool;
    // state_in: [B, H, r, r]; reads: [B, T, H, r]; state_out: [B, H, r, r].
    uint i = thread_position_in_grid.x;
    uint h = thread_position_in_grid.y;
    uint b = thread_position_in_grid.z;
    uint row = ((b * H + h) * r + i) * r;  // S[b, h, i, :]

    float s[r];
    for (int j = 0; j < r; ++j) {
      s[j] = state_in[row + j];
    }
    for (int t = 0; t < T; ++t) {
      uint x = ((b * T + t) * H + h) * r;  // q[b, t, h, :]
      float read = 0.0f;
      if (valid[b * T + t]) {  // a padding token reads 0 and leaves S unchanged
        float p = 0.0f;
        for (int j = 0; j < r; ++j) {
          read += s[j] * static_cast<float>(q[x + j]);  // read first: S before this write
          p += s[j] * static_cast<float>(k[x + j]);
        }
        // s <- keep_i s - erase_i (s.k) k + write_i v_i k
        float keep_i = static_cast<float>(keep[x + i]);
        float c = static_cast<float>(write[x + i]) * static_cast<float>(v[x + i])
                  - static_cast<float>(erase[x + i]) * p;
        for (int j = 0; j < r; ++j) {
          s[j] = keep_i * s[j] + c * static_cast<float>(k[x + j]);
        }
      }
      reads[x + i] = read;
    }
    for (int j = 0; j < r; ++j) {
      state_out[row + j] = s[j];
    }
"""

_DECODE_SOURCE = """
    // q, k (raw), v, keep, erase, write: [B, H, r]; state_in: [B, H, r, r];
    // reads: [B, H, r]; state_out: [B, H, r, r].
    uint i = thread_position_in_grid.x;
    uint h = thread_position_in_grid.y;
    uint b = thread_position_in_grid.z;
    uint x = (b * H + h) * r;  // q[b, h, :]
    uint row = (x + i) * r;    // S[b, h, i, :]

    float qn[r], kn[r];
    for (int j = 0; j < r; ++j) {
      qn[j] = static_cast<float>(q[x + j]);
      kn[j] = static_cast<float>(k[x + j]);
    }
    if (NormalizeQK) {
      // tanh(x) / max(|tanh(x)|, 1e-6) per head; each of the head's r threads does its own.
      float qq = 0.0f, kk = 0.0f;
      for (int j = 0; j < r; ++j) {
        qn[j] = metal::precise::tanh(qn[j]);
        kn[j] = metal::precise::tanh(kn[j]);
        qq += qn[j] * qn[j];
        kk += kn[j] * kn[j];
      }
      float q_norm = metal::max(metal::sqrt(qq), 1e-6f);
      float k_norm = metal::max(metal::sqrt(kk), 1e-6f);
      for (int j = 0; j < r; ++j) {
        qn[j] = qn[j] / q_norm;
        kn[j] = kn[j] / k_norm;
      }
    }

    float s[r];
    float read = 0.0f, p = 0.0f;
    for (int j = 0; j < r; ++j) {
      s[j] = state_in[row + j];
      read += s[j] * qn[j];  // read first: S before this write
      p += s[j] * kn[j];
    }
    // s <- keep_i s - erase_i (s.k) k + write_i v_i k
    float keep_i = static_cast<float>(keep[x + i]);
    float c = static_cast<float>(write[x + i]) * static_cast<float>(v[x + i])
              - static_cast<float>(erase[x + i]) * p;
    for (int j = 0; j < r; ++j) {
      state_out[row + j] = keep_i * s[j] + c * kn[j];
    }
    reads[x + i] = read;
"""

# The arguments of mx.fast.metal_kernel, kept as data so the test harness builds the very same.
SCAN_KERNEL = dict(
    name="dmem_scan",
    input_names=["q", "k", "v", "keep", "erase", "write", "valid", "state_in", "T"],
    output_names=["reads", "state_out"],
    source=_SCAN_SOURCE,
)
DECODE_KERNEL = dict(
    name="dmem_decode_step",
    input_names=["q", "k", "v", "keep", "erase", "write", "state_in"],
    output_names=["reads", "state_out"],
    source=_DECODE_SOURCE,
)

_SPECS = {spec["name"]: spec for spec in (SCAN_KERNEL, DECODE_KERNEL)}
_FLOAT_TYPES = (mx.float32, mx.float16, mx.bfloat16)


def metal_available() -> bool:
    """True when the kernels can run: a Metal device that is also the default device."""
    return mx.metal.is_available() and mx.default_device() == mx.gpu


@lru_cache(maxsize=None)
def _kernel(name: str):
    return mx.fast.metal_kernel(**_SPECS[name])


def _common_dtype(arrays) -> mx.Dtype:
    """The one input dtype the kernel is built for: theirs if shared and supported, else fp32."""
    dtypes = {x.dtype for x in arrays}
    dtype = dtypes.pop() if len(dtypes) == 1 else mx.float32
    return dtype if dtype in _FLOAT_TYPES else mx.float32


def _threadgroup(H: int, r: int) -> tuple[int, int, int]:
    return (r, max(1, min(H, 256 // r)), 1)


def scan_launch(
    state: mx.array, inputs: MemoryInputs, valid: Optional[mx.array] = None
) -> dict[str, Any]:
    """The keyword arguments of the prefill-scan kernel call (see `metal_scan`)."""
    B, T, H, r = inputs.q.shape
    for name, x in zip(MemoryInputs._fields, inputs):
        if tuple(x.shape) != (B, T, H, r):
            raise ValueError(f"metal_scan: {name} has shape {x.shape}, expected {(B, T, H, r)}")
    if tuple(state.shape) != (B, H, r, r):
        raise ValueError(f"metal_scan: state has shape {state.shape}, expected {(B, H, r, r)}")
    if valid is None:
        valid = mx.ones((B, T), dtype=mx.bool_)
    elif tuple(valid.shape) != (B, T):
        raise ValueError(f"metal_scan: valid has shape {valid.shape}, expected {(B, T)}")
    dtype = _common_dtype(inputs)
    return dict(
        inputs=[*(x.astype(dtype) for x in inputs), valid.astype(mx.bool_),
                state.astype(mx.float32), T],
        template=[("InT", dtype), ("H", H), ("r", r)],
        grid=(r, H, B),
        threadgroup=_threadgroup(H, r),
        output_shapes=[(B, T, H, r), (B, H, r, r)],
        output_dtypes=[mx.float32, mx.float32],
    )


def decode_step_launch(
    state: mx.array,
    q_raw: mx.array,
    k_raw: mx.array,
    v: mx.array,
    keep: mx.array,
    erase: mx.array,
    write: mx.array,
    normalize_qk: bool = True,
) -> dict[str, Any]:
    """The keyword arguments of the decode-step kernel call (see `metal_decode_step`)."""
    B, H, r = q_raw.shape
    vectors = (q_raw, k_raw, v, keep, erase, write)
    for name, x in zip(("q_raw", "k_raw", "v", "keep", "erase", "write"), vectors):
        if tuple(x.shape) != (B, H, r):
            raise ValueError(f"metal_decode_step: {name} has shape {x.shape}, expected {(B, H, r)}")
    if tuple(state.shape) != (B, H, r, r):
        raise ValueError(
            f"metal_decode_step: state has shape {state.shape}, expected {(B, H, r, r)}")
    dtype = _common_dtype(vectors)
    return dict(
        inputs=[*(x.astype(dtype) for x in vectors), state.astype(mx.float32)],
        template=[("InT", dtype), ("H", H), ("r", r), ("NormalizeQK", bool(normalize_qk))],
        grid=(r, H, B),
        threadgroup=_threadgroup(H, r),
        output_shapes=[(B, H, r), (B, H, r, r)],
        output_dtypes=[mx.float32, mx.float32],
    )


def metal_scan(
    state: mx.array, inputs: MemoryInputs, valid: Optional[mx.array] = None
) -> tuple[mx.array, mx.array]:
    """`delta_mem.scan_reference` in one launch: T tokens of every row, read before write.

    state: [B, H, r, r] (cast to fp32); inputs: [B, T, H, r] each, q and k already normalised,
    fp32/fp16/bf16; valid: [B, T] (nonzero = real token) or None.
    Returns (reads [B, T, H, r] fp32, final state [B, H, r, r] fp32).
    """
    reads, new_state = _kernel(SCAN_KERNEL["name"])(**scan_launch(state, inputs, valid))
    return reads, new_state


def metal_decode_step(
    state: mx.array,
    q_raw: mx.array,
    k_raw: mx.array,
    v: mx.array,
    keep: mx.array,
    erase: mx.array,
    write: mx.array,
    normalize_qk: bool = True,
) -> tuple[mx.array, mx.array]:
    """One token for all heads of a layer in one launch: normalise q/k, read, then write.

    state: [B, H, r, r]; q_raw, k_raw (before tanh/L2 normalisation when normalize_qk, else
    used as given), v, keep, erase, write: [B, H, r].
    Returns (read [B, H, r] fp32, new state [B, H, r, r] fp32), as `delta_mem.scan_step` on
    normalised q/k.
    """
    launch = decode_step_launch(state, q_raw, k_raw, v, keep, erase, write, normalize_qk)
    read, new_state = _kernel(DECODE_KERNEL["name"])(**launch)
    return read, new_state
