"""The δ layer in few ops: one input matmul, one output matmul, a compiled decode step.

At decode (T = 1) each op has a fixed cost (≈3–7 µs on the CPU backend), and the readable path
of delta_mem.py (project → scan_step → delta per head) spends ~60 of them per layer. Here:
- the memory q/k/v projections and the β (and λ) projections are one matmul with a
  concatenated weight and bias;
- the corrections of all active heads are one matmul with a concatenated weight in which α/r
  and the trainable scale are folded;
- at T = 1 the whole step (projection, normalisation, gates, read, write, corrections) is one
  `mx.compile`d function, or one Metal kernel launch for the state update on a Mac.
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
from typing import Callable, Iterator, Optional

import mlx.core as mx

from .config import DELTA_HEADS, DeltaMemConfig
from .delta_mem import DeltaMemory, MemoryInputs, normalize_heads, row_coefficients, scan_step

_enabled = os.environ.get("DMEM_REFERENCE", "") in ("", "0")


def enabled() -> bool:
    """False inside `reference_path()` (or with DMEM_REFERENCE=1): use the readable path."""
    return _enabled


@contextmanager
def reference_path() -> Iterator[None]:
    """Run the model on delta_mem.py's readable path and the per-token loop (the oracle)."""
    global _enabled
    from . import scan

    before = _enabled, scan.FORCE_REFERENCE
    _enabled, scan.FORCE_REFERENCE = False, True
    try:
        yield
    finally:
        _enabled, scan.FORCE_REFERENCE = before


# -- cached concatenated weights --------------------------------------------------------------

def _input_names(cfg: DeltaMemConfig) -> list[str]:
    names = ["memory_q_proj", "memory_k_proj", "memory_v_proj", "beta_proj"]
    if _has_lambda(cfg):
        names.append("lambda_proj")
    return names


def _has_lambda(cfg: DeltaMemConfig) -> bool:
    return cfg.state_update_mode != "no_lambda" and not cfg.couple_lambda


def _sources(memory: DeltaMemory) -> tuple:
    return tuple(memory.values())  # the layer's parameter arrays, in a fixed order


def _weights(memory: DeltaMemory) -> dict[str, mx.array]:
    """{"in": [D, P] (q|k|v|β|λ), "bias": [P], "out": [R, ΣO] (all heads, scaled)}, cached."""
    sources = _sources(memory)
    cached = memory.__dict__.get("_fused_cache")
    if cached is not None and len(cached[0]) == len(sources) and all(
            a is b for a, b in zip(cached[0], sources)):
        return cached[1]
    cfg = memory.config
    f32 = lambda x: x.astype(mx.float32)  # noqa: E731
    w_in = mx.concatenate([f32(getattr(memory, n)) for n in _input_names(cfg)], axis=0)
    biases = [mx.zeros((3 * cfg.state_dim,)), f32(memory.beta_bias)]
    if _has_lambda(cfg):
        biases.append(f32(memory.lambda_bias))
    weights = {"in": w_in.T, "bias": mx.concatenate(biases)}
    if cfg.delta_heads:
        outs = []
        for head in cfg.delta_heads:
            scale = cfg.scaling
            if cfg.trainable_delta_scale:
                idx = DELTA_HEADS.index(head) if cfg.delta_scale_granularity == "head" else 0
                scale = mx.sigmoid(f32(memory.delta_scale_raw[idx])) * cfg.delta_scale_max * scale
            outs.append(f32(getattr(memory, f"delta_{head}_proj")) * scale)
        weights["out"] = mx.concatenate(outs, axis=0).T
    # Kept lazy: evaluated with the first call that uses it (eval is not allowed under compile).
    object.__setattr__(memory, "_fused_cache", (sources, weights))
    return weights


def clear_cache(memory: DeltaMemory) -> None:
    """Forget the concatenated weights of a layer (after editing a weight in place)."""
    memory.__dict__.pop("_fused_cache", None)


# -- inputs, corrections ------------------------------------------------------------------------

def _split(cfg: DeltaMemConfig, proj: mx.array) -> MemoryInputs:
    """MemoryInputs from the fused projection [..., P], exactly as DeltaMemory.project does."""
    H, R, G = cfg.num_state_heads, cfg.state_dim, cfg.gate_dim
    heads = lambda x: x.reshape(*x.shape[:-1], H, -1)  # noqa: E731
    q, k, v = heads(proj[..., :R]), heads(proj[..., R:2 * R]), heads(proj[..., 2 * R:3 * R])
    if cfg.normalize_qk:
        q, k = normalize_heads(q), normalize_heads(k)
    beta = mx.sigmoid(proj[..., 3 * R:3 * R + G])
    if cfg.state_update_mode == "no_lambda":
        lam = mx.ones_like(beta)
    elif cfg.couple_lambda:
        lam = 1.0 - beta
    else:
        lam = mx.sigmoid(proj[..., 3 * R + G:])
    beta = mx.broadcast_to(heads(beta), q.shape)
    lam = mx.broadcast_to(heads(lam), q.shape)
    return MemoryInputs(q, k, v, *row_coefficients(cfg, beta, lam))


def project(memory: DeltaMemory, h: mx.array) -> MemoryInputs:
    """`DeltaMemory.project` with one matmul.  h: [B, T, D] → MemoryInputs [B, T, H, r]."""
    w = _weights(memory)
    return _split(memory.config, mx.addmm(w["bias"], h.astype(mx.float32), w["in"]))


def deltas(memory: DeltaMemory, reads: mx.array) -> dict[str, mx.array]:
    """`DeltaMemory.delta` of every active head with one matmul.  reads: [B, T, R] → {x: Δx}."""
    if not memory.config.delta_heads:
        return {}
    return _split_deltas(memory, reads @ _weights(memory)["out"])


def _split_deltas(memory: DeltaMemory, out: mx.array) -> dict[str, mx.array]:
    cfg = memory.config
    result, start = {}, 0
    for head in cfg.delta_heads:
        width = getattr(memory, f"delta_{head}_proj").shape[0]
        d = out[..., start:start + width]
        if head == "o" and cfg.delta_o_rmsnorm:
            d = mx.fast.rms_norm(d, memory.delta_o_rmsnorm_weight.astype(mx.float32),
                                 cfg.delta_o_rmsnorm_eps)
        result[head] = d
        start += width
    return result


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
    from .scan import _metal

    cfg = memory.config
    w = _weights(memory)
    if write and _metal():
        proj = mx.addmm(w["bias"], h.astype(mx.float32), w["in"])
        read, new_state = _metal_step(cfg, proj[:, 0], state)
        read = read.reshape(read.shape[0], 1, -1)
        if valid is not None:
            m = valid.astype(mx.float32)
            read, new_state = read * m[..., None], mx.where(m[..., None, None] > 0, new_state, state)
        return read, new_state
    step = _step_function(cfg, write, valid is not None)
    args = (h, state, w["in"], w["bias"]) + (() if valid is None else (valid,))
    return step(*args)


@lru_cache(maxsize=None)
def _step_function(cfg: DeltaMemConfig, write: bool, masked: bool) -> Callable:
    """The decode step for one config, compiled when the backend can compile."""

    def step(h, state, w_in, bias, valid=None):
        x = _split(cfg, mx.addmm(bias, h.astype(mx.float32), w_in))
        if write:
            read, new_state = scan_step(state, *(a[:, 0] for a in x))
        else:
            read, new_state = (state @ x.q[:, 0, ..., None])[..., 0], state
        if valid is not None:
            m = valid.astype(mx.float32)
            read = read * m[..., None]
            new_state = mx.where(m[..., None, None] > 0, new_state, state)
        return read.reshape(read.shape[0], 1, -1), new_state  # [B, 1, R]

    return mx.compile(step) if can_compile() else step


def _metal_step(cfg: DeltaMemConfig, proj: mx.array, state: mx.array):
    """The state update on the Metal decode kernel (q/k normalised in the kernel)."""
    from .kernels import metal_decode_step

    H, R, G = cfg.num_state_heads, cfg.state_dim, cfg.gate_dim
    heads = lambda x: x.reshape(x.shape[0], H, -1)  # noqa: E731
    gates = _split(cfg, proj[:, None])  # gates only; its q/k are not used
    keep, erase, write = (x[:, 0] for x in gates[3:])
    return metal_decode_step(state, heads(proj[:, :R]), heads(proj[:, R:2 * R]),
                             heads(proj[:, 2 * R:3 * R]), keep, erase, write, cfg.normalize_qk)


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
