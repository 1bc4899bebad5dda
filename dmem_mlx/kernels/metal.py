"""Metal kernels for the δ-mem state update (DESIGN §1), through `mx.fast.metal_kernel`.

Two kernels:
- the scan (a prefill call's tokens): one thread per state row S[b, h, i, :]. Rows are
  independent (DESIGN §1), so a row's r floats live in that thread's registers and no thread
  ever waits for another. Grid (r, H, B): thread_position_in_grid = (row i, head h, batch b).
- the layer decode (one token): the whole δ part of a layer in one launch — the fused input
  projection, q/k normalisation, gates, read, write and every correction; its threadgroups
  share the projection and the reads through threadgroup memory.

The kernels are built on first use, so importing this module never needs Metal.  The harness in
tests/metal_shim/ compiles the exact `source` strings below, wrapped in the signature MLX
generates, as C++ and runs them against delta_mem.py (`scan_reference`; `DeltaMemory.project`,
`scan_reference` and `DeltaMemory.delta`) on every test run.

Shapes: B batch, T tokens, H state heads, r rank.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any, Optional

import mlx.core as mx

from ..delta_mem import DeltaMemory, MemoryInputs, projection_vectors

# Template arguments of both kernels: InT the input dtype (float, float16_t or
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

_LAYER_DECODE_SOURCE = """
    // One decode token through one δ layer (DESIGN §1): the fused input projection, q/k
    // normalisation, gates, the read and the write of every state row, and the corrections.
    // One threadgroup of Threads threads per (correction head g, batch row b); each group
    // computes the projection and the reads itself (a few thousand FMAs), group 0 alone writes
    // the state, group g writes the columns of head g.
    // h: [B, D] attention input (InT); w_in: [(1,) D, P] fp32, P = H·r·K, column (head, row i, m)
    // for entry i of the vector m = q, k, v, β (, λ) of each head (`DeltaMemory.fused_weights`:
    // gates given per state row); bias: [(1, 1,) P];
    // state_in: [B, H, r, r]; valid: [B] (false: a padding row, reads 0 and keeps its state);
    // w_out: [(1,) R, O] fp32, the scaled δ weights of the active heads side by side, head g in
    // columns head_start[g] .. head_start[g + 1] - 1; norm_weight, norm_eps: the RMSNorm of
    // the Δ of group NormGroup when DeltaNorm (template ints must not be negative: MLX puts
    // them in the kernel's name).
    // Outputs: deltas [B, O] (InT), state_out [B, H, r, r] fp32.
    constexpr int K = SeparateLambda ? 5 : 4;
    constexpr int P = H * r * K;
    constexpr int R = H * r;
    uint t = thread_position_in_threadgroup.x;
    uint g = threadgroup_position_in_grid.x;
    uint b = threadgroup_position_in_grid.z;
    threadgroup float partial[P * Slices];
    threadgroup float proj[P];
    threadgroup float reads[R];
    threadgroup float sums[Threads];

    // 1. proj = h·w_in + bias; Slices threads share each column's sum over D
    for (uint n = t; n < P * Slices; n += Threads) {
      uint c = n % P;
      float acc = 0.0f;
      for (uint d = n / P; d < D; d += Slices) {
        acc += static_cast<float>(h[b * D + d]) * w_in[d * P + c];
      }
      partial[n] = acc;
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
    for (uint c = t; c < P; c += Threads) {
      float acc = bias[c];
      for (uint s = 0; s < Slices; ++s) {
        acc += partial[s * P + c];
      }
      proj[c] = acc;
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);

    // 2. state rows S[b, head, i, :]: read first, then the gated delta write
    bool real = valid[b];
    for (uint row = t; row < R; row += Threads) {
      uint x = (row / r) * r * K;  // proj[x + j * K + m]: entry j of vector m (q, k, v, β, λ)
      uint i = row % r;
      float qn[r], kn[r];
      for (int j = 0; j < r; ++j) {
        qn[j] = proj[x + j * K];
        kn[j] = proj[x + j * K + 1];
      }
      if (NormalizeQK) {  // tanh(x) / max(|tanh(x)|, 1e-6) per head
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
      // gates β, λ and the row coefficients (keep, erase, write) of the update mode
      float beta = 1.0f / (1.0f + metal::precise::exp(-proj[x + i * K + 3]));
      float lam = 1.0f - beta;  // coupled
      if (Mode == 2) {
        lam = 1.0f;  // no_lambda
      } else if (SeparateLambda) {
        lam = 1.0f / (1.0f + metal::precise::exp(-proj[x + i * K + 4]));
      }
      float erase = Mode == 1 ? lam * beta : beta;  // lambda_outside: λβ
      uint srow = (b * R + row) * r;  // S[b, head, i, :]
      float s[r];
      float read = 0.0f, p = 0.0f;
      for (int j = 0; j < r; ++j) {
        s[j] = state_in[srow + j];
        read += s[j] * qn[j];  // read first: S before this write
        p += s[j] * kn[j];
      }
      reads[row] = real ? read : 0.0f;
      if (g == 0) {
        // s <- keep_i s - erase_i (s.k) k + write_i v_i k, keep = λ, write = β
        float c = beta * proj[x + i * K + 2] - erase * p;
        for (int j = 0; j < r; ++j) {
          state_out[srow + j] = (Write && real) ? lam * s[j] + c * kn[j] : s[j];
        }
      }
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);

    // 3. this group's correction: Δ = reads·W over its head's columns
    uint start = head_start[g];
    uint width = head_start[g + 1] - start;
    float ss = 0.0f;
    for (uint o = t; o < width; o += Threads) {
      float acc = 0.0f;
      for (int n = 0; n < R; ++n) {
        acc += reads[n] * w_out[n * O + start + o];
      }
      ss += acc * acc;
      if (!DeltaNorm || int(g) != NormGroup) {
        deltas[b * O + start + o] = static_cast<InT>(acc);
      }
    }
    if (DeltaNorm && int(g) == NormGroup) {  // Δ · rsqrt(mean(Δ²) + eps) · weight
      sums[t] = ss;
      threadgroup_barrier(mem_flags::mem_threadgroup);
      float total = 0.0f;
      for (int n = 0; n < Threads; ++n) {
        total += sums[n];
      }
      float scale = metal::precise::rsqrt(total / float(width) + norm_eps);
      for (uint o = t; o < width; o += Threads) {
        float acc = 0.0f;
        for (int n = 0; n < R; ++n) {
          acc += reads[n] * w_out[n * O + start + o];
        }
        deltas[b * O + start + o] = static_cast<InT>(acc * scale * norm_weight[o]);
      }
    }
"""

# The arguments of mx.fast.metal_kernel, kept as data so the test harness builds the very same.
SCAN_KERNEL = dict(
    name="dmem_scan",
    input_names=["q", "k", "v", "keep", "erase", "write", "valid", "state_in", "T"],
    output_names=["reads", "state_out"],
    source=_SCAN_SOURCE,
)
LAYER_DECODE_KERNEL = dict(
    name="dmem_layer_decode",
    input_names=["h", "w_in", "bias", "state_in", "valid", "w_out", "head_start", "norm_weight",
                 "norm_eps"],
    output_names=["deltas", "state_out"],
    source=_LAYER_DECODE_SOURCE,
)

_SPECS = {spec["name"]: spec for spec in (SCAN_KERNEL, LAYER_DECODE_KERNEL)}
_FLOAT_TYPES = (mx.float32, mx.float16, mx.bfloat16)


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


UPDATE_MODES = ("standard", "lambda_outside", "no_lambda")  # the kernel's Mode 0, 1, 2
THREADGROUP_MEMORY = 32768  # bytes per threadgroup on every Apple GPU


def layer_decode_launch(
    memory: DeltaMemory,
    h: mx.array,
    state: mx.array,
    valid: Optional[mx.array] = None,
    write: bool = True,
    weights: Optional[dict] = None,
    threads: int = 256,
) -> dict[str, Any]:
    """The keyword arguments of the whole-layer decode kernel call (see `metal_layer_decode`).

    The kernel reads the layer's `fused_weights()` (input projection, scaled δ weights); the δ
    weights of the active heads are concatenated once per set of weights (kept in that dict).
    """
    cfg = memory.config
    w = memory.fused_weights() if weights is None else weights
    B, D = h.shape[0], h.shape[-1]
    H, r = cfg.num_state_heads, cfg.rank
    if h.size != B * D:
        raise ValueError(f"metal_layer_decode: h has shape {h.shape}, expected [B, 1, D]")
    if tuple(state.shape) != (B, H, r, r):
        raise ValueError(f"metal_layer_decode: state has shape {state.shape}, expected "
                         f"{(B, H, r, r)}")
    if valid is not None and valid.size != B:
        raise ValueError(f"metal_layer_decode: valid has shape {valid.shape}, expected [B, 1]")
    heads = cfg.delta_heads
    if not heads:
        raise ValueError("metal_layer_decode: the layer corrects no head")
    K = projection_vectors(cfg)
    P, R = H * r * K, H * r
    slices = max(1, min(threads // P, D))
    memory_bytes = 4 * (P * slices + P + R + threads)
    if memory_bytes > THREADGROUP_MEMORY:
        raise ValueError(f"metal_layer_decode: {memory_bytes} bytes of threadgroup memory "
                         f"(H = {H}, r = {r}) exceed {THREADGROUP_MEMORY}")
    if "out" not in w:  # [1, R, O]: the active heads' scaled δ weights side by side
        w["out"] = mx.concatenate([w[x] for x in heads], axis=-1)
    widths = [w[x].shape[-1] for x in heads]
    starts = [0]
    for width in widths:
        starts.append(starts[-1] + width)
    normalized = cfg.delta_o_rmsnorm and "o" in heads
    # (constants made from Python lists: no primitive to run per call)
    norm_weight = memory.delta_o_rmsnorm_weight if normalized else mx.array([0.0])
    dtype = h.dtype if h.dtype in _FLOAT_TYPES else mx.float32
    return dict(
        inputs=[h.astype(dtype), w["in"], w["bias"], state.astype(mx.float32),
                (mx.array([True] * B) if valid is None else valid.astype(mx.bool_)),
                w["out"], mx.array(starts, mx.int32), norm_weight.astype(mx.float32),
                mx.array(cfg.delta_o_rmsnorm_eps, mx.float32)],
        template=[("InT", dtype), ("D", D), ("H", H), ("r", r), ("O", starts[-1]),
                  ("Mode", UPDATE_MODES.index(cfg.state_update_mode)),
                  ("SeparateLambda", K == 5), ("NormalizeQK", bool(cfg.normalize_qk)),
                  ("Write", bool(write)), ("DeltaNorm", normalized),
                  ("NormGroup", heads.index("o") if normalized else 0), ("Threads", threads),
                  ("Slices", slices)],
        grid=(threads * len(heads), 1, B),
        threadgroup=(threads, 1, 1),
        output_shapes=[(*h.shape[:-1], starts[-1]), (B, H, r, r)],
        output_dtypes=[dtype, mx.float32],
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


def metal_layer_decode(
    memory: DeltaMemory,
    h: mx.array,
    state: mx.array,
    valid: Optional[mx.array] = None,
    write: bool = True,
    weights: Optional[dict] = None,
) -> tuple[dict[str, mx.array], mx.array]:
    """One decode token through a δ layer in one launch: `DeltaMemory.project`, `scan_step`
    (or only the read, write=False) and `DeltaMemory.delta` of every active head.

    memory: the layer's `DeltaMemory`; h: [B, 1, D] attention input; state: [B, H, r, r];
    valid: [B, 1] (0 = a padding row: reads 0, state kept) or None; weights: its
    `fused_weights()` if at hand. Returns ({head: Δ [B, 1, out_x] in h's dtype}, new state
    [B, H, r, r] float32).
    """
    w = memory.fused_weights() if weights is None else weights
    launch = layer_decode_launch(memory, h, state, valid, write, w)
    deltas, new_state = _kernel(LAYER_DECODE_KERNEL["name"])(**launch)
    heads = memory.config.delta_heads
    if len(heads) == 1:
        return {heads[0]: deltas}, new_state
    out, start = {}, 0
    for x in heads:  # each head's columns: views, no copy
        width = w[x].shape[-1]
        out[x], start = deltas[..., start:start + width], start + width
    return out, new_state
