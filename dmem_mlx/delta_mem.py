"""The δ-mem layer math, to be read line by line against DESIGN §1–2.

Shapes: B batch, T tokens, D hidden size, H state heads, r rank, R = r·H, G gate width.
All memory math runs in float32 whatever the backbone dtype (DESIGN §6).
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

import mlx.core as mx
import mlx.nn as nn

from .config import DELTA_HEADS, DeltaMemConfig

NORM_EPS = 1e-6


class MemoryInputs(NamedTuple):
    """One call's memory projections and per-row coefficients, each [B, T, H, r] float32."""

    q: mx.array
    k: mx.array
    v: mx.array
    keep: mx.array
    erase: mx.array
    write: mx.array


def normalize_heads(x: mx.array) -> mx.array:
    """q̃ = tanh(q) / max(‖tanh(q)‖₂, 1e-6) on each head's r-slice.  x: [..., H, r]."""
    t = mx.tanh(x)
    # sqrt of max(·, eps²): the same value, and a zero gradient (not NaN) for an all-zero x
    norm = mx.sqrt(mx.maximum(mx.sum(t * t, axis=-1, keepdims=True), NORM_EPS * NORM_EPS))
    return t / mx.maximum(norm, NORM_EPS)


def row_coefficients(
    config: DeltaMemConfig, beta: mx.array, lam: mx.array
) -> tuple[mx.array, mx.array, mx.array]:
    """(keep, erase, write) per state row from the gates (DESIGN §1 table).  beta, lam: [..., H, r]."""
    mode = config.state_update_mode
    if mode == "standard":
        return lam, beta, beta
    if mode == "lambda_outside":
        return lam, lam * beta, beta
    return mx.ones_like(beta), beta, beta  # no_lambda


def scan_step(
    state: mx.array,
    q: mx.array,
    k: mx.array,
    v: mx.array,
    keep: mx.array,
    erase: mx.array,
    write: mx.array,
) -> tuple[mx.array, mx.array]:
    """One token for every head: read first, then the gated delta write.

    state: [B, H, r, r]; q, k, v, keep, erase, write: [B, H, r].
    Returns (read [B, H, r], new state [B, H, r, r]).
    """
    read = (state @ q[..., None])[..., 0]  # S q̃ (state before this token's write)
    p = (state @ k[..., None])[..., 0]  # S k̃
    # S'[i,j] = keep_i S[i,j] − erase_i p_i k̃_j + write_i v_i k̃_j
    new_state = keep[..., None] * state + (write * v - erase * p)[..., None] * k[..., None, :]
    return read, new_state


def scan_reference(
    state: mx.array, inputs: MemoryInputs, valid: Optional[mx.array] = None
) -> tuple[mx.array, mx.array]:
    """The per-token loop, written straight from DESIGN §1: the oracle for every fast path.

    state: [B, H, r, r]; inputs: [B, T, H, r] each; valid: [B, T] (1 = real token) or None.
    Returns (reads [B, T, H, r], final state [B, H, r, r]).
    """
    reads = []
    for t in range(inputs.q.shape[1]):
        read, new_state = scan_step(state, *(x[:, t] for x in inputs))
        if valid is not None:
            m = valid[:, t].astype(mx.float32)
            read = read * m[:, None, None]
            state = mx.where(m[:, None, None, None] > 0, new_state, state)
        else:
            state = new_state
        reads.append(read)
    return mx.stack(reads, axis=1), state


def read_state(state: mx.array, q: mx.array, valid: Optional[mx.array] = None) -> mx.array:
    """Reads of a fixed state (read-only mode, message-mean reads).  q: [B, T, H, r]."""
    reads = mx.einsum("bhij,bthj->bthi", state, q)
    if valid is not None:
        reads = reads * valid.astype(mx.float32)[:, :, None, None]
    return reads


def group_means(
    hidden: mx.array, group_ids: mx.array, active: mx.array, groups: list[int]
) -> tuple[mx.array, mx.array]:
    """Mean hidden vector of each group id in `groups` (increasing), over active tokens.

    hidden: [B, T, D]; group_ids, active: [B, T].  Returns (means [B, U, D], present [B, U]).
    """
    ids = mx.array(groups, dtype=group_ids.dtype)
    member = (group_ids[:, None, :] == ids[None, :, None]) & active[:, None, :]  # [B, U, T]
    weights = member.astype(mx.float32)
    counts = weights.sum(axis=-1)
    means = (weights @ hidden.astype(mx.float32)) / mx.maximum(counts, 1.0)[..., None]
    return means, counts > 0


class DeltaMemory(nn.Module):
    """The δ parameters of one attention layer; names and shapes are those of DESIGN §4."""

    def __init__(self, config: DeltaMemConfig, hidden_size: int, out_dims: dict[str, int]):
        super().__init__()
        self.config = config
        R, G, D = config.state_dim, config.gate_dim, hidden_size
        self.memory_q_proj = mx.zeros((R, D))
        self.memory_k_proj = mx.zeros((R, D))
        self.memory_v_proj = mx.zeros((R, D))
        for head in config.delta_heads:  # inactive heads hold no weights
            setattr(self, f"delta_{head}_proj", mx.zeros((out_dims[head], R)))
        if config.delta_o_rmsnorm and "o" in config.delta_heads:
            self.delta_o_rmsnorm_weight = mx.ones((out_dims["o"],))
        self.beta_proj = mx.zeros((G, D))
        self.beta_bias = mx.zeros((G,))
        if not config.couple_lambda:
            self.lambda_proj = mx.zeros((G, D))
            self.lambda_bias = mx.zeros((G,))
        if config.trainable_delta_scale:
            n = len(DELTA_HEADS) if config.delta_scale_granularity == "head" else 1
            self.delta_scale_raw = mx.zeros((n,))

    def project(self, h: mx.array) -> MemoryInputs:
        """Memory projections and gates of hidden states h [B, T, D] (DESIGN §1)."""
        cfg = self.config
        H = cfg.num_state_heads
        h = h.astype(mx.float32)
        heads = lambda x: x.reshape(*x.shape[:-1], H, -1)  # noqa: E731  [.., R] → [.., H, r]
        q = heads(h @ self.memory_q_proj.T)
        k = heads(h @ self.memory_k_proj.T)
        v = heads(h @ self.memory_v_proj.T)  # v is used raw
        if cfg.normalize_qk:
            q, k = normalize_heads(q), normalize_heads(k)
        beta = mx.sigmoid(h @ self.beta_proj.T + self.beta_bias)
        if cfg.state_update_mode == "no_lambda":
            lam = mx.ones_like(beta)
        elif cfg.couple_lambda:
            lam = 1.0 - beta
        else:
            lam = mx.sigmoid(h @ self.lambda_proj.T + self.lambda_bias)
        # G = H: one scalar per head, broadcast to that head's r rows.
        beta = mx.broadcast_to(heads(beta), q.shape)
        lam = mx.broadcast_to(heads(lam), q.shape)
        keep, erase, write = row_coefficients(cfg, beta, lam)
        return MemoryInputs(q, k, v, keep, erase, write)

    def delta(self, head: str, reads: mx.array) -> mx.array:
        """Δx = (α/r) · s_x · W_Δx read, float32.  reads: [B, T, R] → [B, T, out_x]."""
        cfg = self.config
        scale = cfg.scaling
        out = reads @ getattr(self, f"delta_{head}_proj").T
        if cfg.trainable_delta_scale:
            idx = DELTA_HEADS.index(head) if cfg.delta_scale_granularity == "head" else 0
            out = out * (mx.sigmoid(self.delta_scale_raw[idx]) * cfg.delta_scale_max)
        out = out * scale
        if head == "o" and cfg.delta_o_rmsnorm:
            out = mx.fast.rms_norm(out, self.delta_o_rmsnorm_weight.astype(mx.float32),
                                   cfg.delta_o_rmsnorm_eps)
        return out

    def initialize(self, base_weights: dict[str, mx.array], seed: Optional[int] = None) -> None:
        """Fresh parameters from the config's init fields, as the reference initialises them.

        base_weights: the (dequantized) base projection weights {"q": W_q, "k": …, "o": W_o}.
        """
        cfg = self.config
        key = mx.random.key(seed) if seed is not None else None
        keys = mx.random.split(key, 4) if key is not None else [None] * 4
        D = self.memory_q_proj.shape[1]
        bound = 1.0 / math.sqrt(D)  # kaiming_uniform(a=√5) on an [R, D] weight
        for i, name in enumerate(("memory_q_proj", "memory_k_proj", "memory_v_proj")):
            setattr(self, name, mx.random.uniform(-bound, bound, (cfg.state_dim, D), key=keys[i]))
        for head in cfg.delta_heads:
            w = getattr(self, f"delta_{head}_proj")
            setattr(self, f"delta_{head}_proj",
                    _init_delta_head(cfg, w.shape, base_weights[head], keys[3]))
        self.beta_proj = mx.zeros_like(self.beta_proj)
        self.beta_bias = mx.full(self.beta_bias.shape, cfg.beta_bias_init)
        if not cfg.couple_lambda:
            self.lambda_proj = mx.zeros_like(self.lambda_proj)
            self.lambda_bias = mx.full(self.lambda_bias.shape, -cfg.beta_bias_init)
        if cfg.trainable_delta_scale:
            frac = min(max(cfg.delta_scale_init / cfg.delta_scale_max, 1e-4), 1 - 1e-4)
            self.delta_scale_raw = mx.full(self.delta_scale_raw.shape, math.log(frac / (1 - frac)))
        if "delta_o_rmsnorm_weight" in self:
            self.delta_o_rmsnorm_weight = mx.ones_like(self.delta_o_rmsnorm_weight)


def _init_delta_head(cfg: DeltaMemConfig, shape, base_weight: mx.array, key) -> mx.array:
    """output_init: zero, random (kaiming · gain), or a column-normalised slice of the base weight."""
    out_dim, R = shape
    if cfg.output_init == "zero":
        return mx.zeros(shape)
    if cfg.output_init == "random":
        bound = 1.0 / math.sqrt(R)
        return mx.random.uniform(-bound, bound, shape, key=key) * cfg.online_gain
    width = min(cfg.rank, base_weight.shape[1])
    if cfg.output_init == "base_slice_fixed":
        width = min(cfg.base_slice_ref_width, width)
    piece = base_weight[:, :width].astype(mx.float32)
    piece = piece / mx.maximum(mx.linalg.norm(piece, axis=0, keepdims=True), NORM_EPS)
    head = mx.zeros(shape)
    head[:, :width] = piece * cfg.online_gain
    return head
