"""The δ layer in few ops: one input matmul, one addmm per correction, a compiled decode step.

At decode (T = 1) each op has a fixed cost (≈2–7 µs on the CPU backend, a kernel launch on a
GPU), and the readable path of delta_mem.py (project → scan_step → delta per head) adds ~86
primitives per layer (35 of them computing; heads q, o). This path adds ~32 (12 computing):
- the memory q/k/v projections and the β (and λ) projections are one matmul with a
  concatenated weight and bias;
- each correction is added to its projection's output by one addmm (out + reads·W'), W' the
  δ weight with α/r and the trainable scale folded in: no Δ array, no separate add (at a
  2,048-token prefill Δq alone is 16 MB);
- at T = 1 the step (projection, normalisation, gates, read, write) is one `mx.compile`d
  function, or one Metal kernel launch for the state update on a Mac.
The math is delta_mem.py's own functions; only the grouping of the matmuls differs, so results
match the readable path to fp32 rounding (tests/test_scan.py).

Concatenated weights are cached per layer and rebuilt whenever any source parameter is a
different array object (optimizer updates, `load_delta_parameters` and `Module.update` replace
arrays). Editing a weight in place (`w[...] = x`) is not seen: call `clear_cache(memory)`.
"""

from __future__ import annotations

import os
import shutil
from contextlib import contextmanager
from functools import lru_cache
from typing import Any, Callable, Iterator, Optional

import mlx.core as mx

from . import scan as scan_module
from .config import DELTA_HEADS, DeltaMemConfig
from .delta_mem import DeltaMemory, MemoryInputs, normalize_heads, row_coefficients

_enabled = os.environ.get("DMEM_REFERENCE", "") in ("", "0")


def enabled() -> bool:
    """False inside `reference_path()` (or with DMEM_REFERENCE=1): use the readable path."""
    return _enabled


@contextmanager
def reference_path() -> Iterator[None]:
    """Run the model on delta_mem.py's readable path and the per-token loop (the oracle)."""
    global _enabled
    before = _enabled, scan_module.FORCE_REFERENCE
    _enabled, scan_module.FORCE_REFERENCE = False, True
    try:
        yield
    finally:
        _enabled, scan_module.FORCE_REFERENCE = before


# -- cached concatenated weights --------------------------------------------------------------

def _has_lambda(cfg: DeltaMemConfig) -> bool:
    return cfg.state_update_mode != "no_lambda" and not cfg.couple_lambda


def _vectors(cfg: DeltaMemConfig) -> int:
    """K: per head, the fused projection holds K vectors of r: q, k, v, β (and λ)."""
    return 5 if _has_lambda(cfg) else 4


def _sources(memory: DeltaMemory) -> tuple:
    return tuple(memory.values())  # the layer's parameter arrays, in a fixed order


def _weights(memory: DeltaMemory) -> dict[str, mx.array]:
    """{"in": [D, H·K·r], "bias": [H·K·r], head: [R, out] (each active head, scaled)}, cached.

    The input columns are head-major, [H, K, r] with K = q, k, v, β (, λ): one head's vectors
    are adjacent, so the step needs no transposes. Gate rows are repeated r times when gates
    are per head (G = H), so gates need no broadcast either.
    """
    sources = _sources(memory)
    cached = memory.__dict__.get("_fused_cache")
    if cached is not None and len(cached[0]) == len(sources) and all(
            a is b for a, b in zip(cached[0], sources)):
        return cached[1]
    cfg = memory.config
    f32 = lambda x: x.astype(mx.float32)  # noqa: E731
    per_row = lambda x: x if cfg.rankwise_gates else mx.repeat(x, cfg.rank, axis=0)  # noqa: E731
    rows = [f32(memory.memory_q_proj), f32(memory.memory_k_proj), f32(memory.memory_v_proj),
            per_row(f32(memory.beta_proj))]
    biases = [mx.zeros((3 * cfg.state_dim,)), per_row(f32(memory.beta_bias))]
    if _has_lambda(cfg):
        rows.append(per_row(f32(memory.lambda_proj)))
        biases.append(per_row(f32(memory.lambda_bias)))
    K, H, r, D = len(rows), cfg.num_state_heads, cfg.rank, rows[0].shape[1]
    w_in = mx.stack(rows).reshape(K, H, r, D).transpose(1, 0, 2, 3).reshape(-1, D)
    bias = mx.concatenate(biases).reshape(K, H, r).transpose(1, 0, 2).reshape(-1)
    weights = {"in": w_in.T, "bias": bias}
    for head in cfg.delta_heads:
        scale = cfg.scaling
        if cfg.trainable_delta_scale:
            idx = DELTA_HEADS.index(head) if cfg.delta_scale_granularity == "head" else 0
            scale = mx.sigmoid(f32(memory.delta_scale_raw[idx])) * cfg.delta_scale_max * scale
        weights[head] = (f32(getattr(memory, f"delta_{head}_proj")) * scale).T
    # Kept lazy: evaluated with the first call that uses it (eval is not allowed under compile).
    object.__setattr__(memory, "_fused_cache", (sources, weights))
    return weights


def clear_cache(memory: DeltaMemory) -> None:
    """Forget the concatenated weights of a layer (after editing a weight in place)."""
    memory.__dict__.pop("_fused_cache", None)


# -- inputs, corrections ------------------------------------------------------------------------

def _split(cfg: DeltaMemConfig, proj: mx.array) -> MemoryInputs:
    """MemoryInputs [..., H, r] from the fused projection [..., H·K·r], as DeltaMemory.project."""
    x = proj.reshape(*proj.shape[:-1], cfg.num_state_heads, _vectors(cfg), cfg.rank)
    q, k = x[..., 0, :], x[..., 1, :]
    if cfg.normalize_qk:
        q, k = normalize_heads(q), normalize_heads(k)
    return MemoryInputs(q, k, x[..., 2, :], *_coefficients(cfg, x))


def _coefficients(cfg: DeltaMemConfig, x: mx.array):
    """(keep, erase, write) [..., H, r] from the gate vectors of x [..., H, K, r]."""
    beta = mx.sigmoid(x[..., 3, :])
    if cfg.state_update_mode == "no_lambda":
        lam = mx.ones_like(beta)
    elif cfg.couple_lambda:
        lam = 1.0 - beta
    else:
        lam = mx.sigmoid(x[..., 4, :])
    return row_coefficients(cfg, beta, lam)


def project(memory: DeltaMemory, h: mx.array) -> MemoryInputs:
    """`DeltaMemory.project` with one matmul.  h: [B, T, D] → MemoryInputs [B, T, H, r]."""
    w = _weights(memory)
    return _split(memory.config, mx.addmm(w["bias"], h.astype(mx.float32), w["in"]))


def deltas(memory: DeltaMemory, reads: mx.array) -> dict[str, mx.array]:
    """`DeltaMemory.delta` of every active head.  reads: [B, T, R] → {x: Δx [B, T, out_x]}."""
    return {head: _delta(memory, head, reads, w) for head, w in _head_weights(memory).items()}


def corrections(memory: DeltaMemory, reads: mx.array) -> dict[str, Any]:
    """Each active head's Δ for `add_correction`: (reads, weight) to fuse into one addmm with
    the projection's output, or the Δ array itself when it has to be normalised first."""
    out = {}
    for head, w in _head_weights(memory).items():
        if head == "o" and memory.config.delta_o_rmsnorm:
            out[head] = _delta(memory, head, reads, w)
        else:
            out[head] = (reads, w)
    return out


def add_correction(out: mx.array, delta: Any) -> mx.array:
    """out + Δ, in one addmm when Δ comes as (reads, weight) and out is float32."""
    if isinstance(delta, mx.array):
        return out + delta.astype(out.dtype)
    reads, w = delta
    if out.dtype == mx.float32:
        return mx.addmm(out, reads, w)
    return out + (reads @ w).astype(out.dtype)  # Δ in fp32 first, as the readable path


def _head_weights(memory: DeltaMemory) -> dict[str, mx.array]:
    w = _weights(memory)
    return {head: w[head] for head in memory.config.delta_heads}


def _delta(memory: DeltaMemory, head: str, reads: mx.array, w: mx.array) -> mx.array:
    d = reads @ w
    if head == "o" and memory.config.delta_o_rmsnorm:
        d = mx.fast.rms_norm(d, memory.delta_o_rmsnorm_weight.astype(mx.float32),
                             memory.config.delta_o_rmsnorm_eps)
    return d


# -- the decode step ----------------------------------------------------------------------------

def decode_step(
    memory: DeltaMemory,
    h: mx.array,
    state: mx.array,
    valid: Optional[mx.array] = None,
    write: bool = True,
) -> tuple[mx.array, mx.array]:
    """One token through the memory: (reads [B, 1, R], new state [B, H, r, r]).

    h: [B, 1, D]; state: [B, H, r, r] fp32; valid: [B, 1] or None. With write=False the state
    is only read (and returned as is).
    """
    cfg = memory.config
    w = _weights(memory)
    if write and scan_module.metal():
        proj = mx.addmm(w["bias"], h.astype(mx.float32), w["in"])
        read, new_state = _metal_step(cfg, proj[:, 0], state)
        read = read.reshape(read.shape[0], 1, -1)
        if valid is not None:
            m = valid.astype(mx.float32)
            read, new_state = read * m[..., None], mx.where(m[..., None, None] > 0, new_state, state)
        return read, new_state
    steps = memory.__dict__.setdefault("_fused_steps", {})
    step = steps.get((write, valid is not None))
    if step is None:
        step = steps[write, valid is not None] = _step_function(cfg, write, valid is not None)
    args = (h, state, w["in"], w["bias"])
    return step(*args) if valid is None else step(*args, valid)


@lru_cache(maxsize=None)
def _step_function(cfg: DeltaMemConfig, write: bool, masked: bool) -> Callable:
    """The decode step of one config: `scan_step` on the fused projection, compiled when the
    backend can compile. Written for few primitives: both matvecs S q̃ and S k̃ are one
    matmul, and nothing is transposed."""
    K, H, r = _vectors(cfg), cfg.num_state_heads, cfg.rank

    def step(h, state, w_in, bias, valid=None):
        B = h.shape[0]
        x = mx.addmm(bias, h.astype(mx.float32), w_in).reshape(B, H, K, r)
        qk = normalize_heads(x[:, :, :2]) if cfg.normalize_qk else x[:, :, :2]  # [B, H, 2, r]
        if write:
            rp = qk @ state.swapaxes(-1, -2)  # [B, H, 2, r]: S q̃ (the read) and p = S k̃
            keep, erase, write_ = _coefficients(cfg, x)
            # S'[i,j] = keep_i S[i,j] − erase_i p_i k̃_j + write_i v_i k̃_j
            c = write_ * x[:, :, 2] - erase * rp[:, :, 1]
            new_state = keep[..., None] * state + c[..., None] * qk[:, :, 1:]
            read = rp[:, :, 0]
        else:
            read, new_state = (qk[:, :, :1] @ state.swapaxes(-1, -2))[:, :, 0], state
        if masked:
            m = valid.astype(mx.float32)
            read = read * m[..., None]
            new_state = mx.where(m[..., None, None] > 0, new_state, state)
        return read.reshape(B, 1, -1), new_state  # [B, 1, R]

    return mx.compile(step) if can_compile() else step


def _metal_step(cfg: DeltaMemConfig, proj: mx.array, state: mx.array):
    """The state update on the Metal decode kernel (q/k normalised in the kernel).  proj: [B, P]."""
    from .kernels import metal_decode_step

    x = proj.reshape(proj.shape[0], cfg.num_state_heads, _vectors(cfg), cfg.rank)
    keep, erase, write = _coefficients(cfg, x)
    return metal_decode_step(state, x[:, :, 0], x[:, :, 1], x[:, :, 2], keep, erase, write,
                             cfg.normalize_qk)


@lru_cache(maxsize=None)
def can_compile() -> bool:
    """True when `mx.compile` can run here: a GPU, or a CPU with the C++ compiler MLX uses.

    MLX's CPU backend compiles fused kernels with `g++` at run time; without one (or with
    DMEM_NO_COMPILE=1) the step runs uncompiled. A probe catches any other failure once.
    """
    if os.environ.get("DMEM_NO_COMPILE", "") not in ("", "0"):
        return False
    if mx.default_device() == mx.cpu and shutil.which("g++") is None:
        return False
    try:
        probe = mx.compile(lambda x: mx.tanh(x) * x + 1.0)
        mx.eval(probe(mx.ones((2,))))
    except Exception:  # noqa: BLE001 - any failure means: don't compile
        return False
    return True
