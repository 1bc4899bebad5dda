"""The δ-mem layer math, to be read line by line against DESIGN §1–2.

Shapes: B batch, T tokens, D hidden size, H state heads, r rank, R = r·H, G gate width.
All memory math runs in float32 whatever the backbone dtype (DESIGN §6).
"""

from __future__ import annotations

import math
import operator
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


def normalize_heads(x: mx.array, axis: int = -1) -> mx.array:
    """q̃ = tanh(q) / max(‖tanh(q)‖₂, 1e-6) on each head's r-slice.  x: [..., H, r] (the r
    entries along `axis`)."""
    # ‖tanh(x)‖² summed from tanh(|x|)², the same numbers (tanh is odd, bit for bit in MLX): a
    # tanh of its own, so that under mx.compile the squares fuse with it and the normalisation
    # with the other, instead of tanh(x) and its squares being two dispatches (DESIGN §9)
    squares = mx.sum(mx.square(mx.tanh(mx.abs(x))), axis=axis, keepdims=True)
    # sqrt of max(·, eps²): the same value, and a zero gradient (not NaN) for an all-zero x
    norm = mx.sqrt(mx.maximum(squares, NORM_EPS * NORM_EPS))
    return mx.tanh(x) / mx.maximum(norm, NORM_EPS)


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
    column = lambda x: x[..., None]  # noqa: E731
    read, new_state = _step(state, mx.stack([q, k], axis=-1), column(v), column(keep),
                            column(erase), column(write))
    return read[..., 0], new_state


def _step(state, qk, v, keep, erase, write):
    """`scan_step` on columns: qk [B, H, r, 2] (q̃, k̃); v, keep, erase, write [B, H, r, 1].

    Returns (read [B, H, r, 1], new state). Written for the fewest MLX primitives (each costs a
    dispatch at decode, DESIGN §9): both matvecs are one matmul, split in one op, and nothing
    is transposed but k̃.
    """
    read, p = mx.split(state @ qk, 2, axis=-1)  # S q̃ (the read: S before this write), S k̃
    # S'[i,j] = keep_i S[i,j] + (write_i v_i − erase_i p_i) k̃_j
    return read, keep * state + (write * v - erase * p) * qk[..., 1:].swapaxes(-1, -2)


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
    if not reads:
        return mx.zeros(inputs.q.shape, mx.float32), state
    return mx.stack(reads, axis=1), state


def decode_step(
    config: DeltaMemConfig,
    write: bool,
    h: mx.array,
    state: mx.array,
    w_in: mx.array,
    gate_bias: tuple[mx.array, ...],
    valid: Optional[mx.array] = None,
) -> tuple[mx.array, mx.array]:
    """One token through the memory: the projection (`DeltaMemory.project`) and `scan_step`.

    A pure function of arrays, so that it can be compiled (see scan.py). h: [B, 1, D];
    state: [B, H, r, r]; w_in, gate_bias: `DeltaMemory.fused_weights()`; valid: [B, 1] or None.
    write=False only reads. Returns (reads [B, 1, R], new state [B, H, r, r]).
    """
    B = h.shape[0]
    x = (h.astype(mx.float32) @ w_in).reshape(B, config.num_state_heads, config.rank, -1)
    qk, v, keep, erase, write_ = _gated(config, x, gate_bias)
    if write:
        read, new_state = _step(state, qk, v, keep, erase, write_)
    else:
        read, new_state = state @ qk[..., :1], state
    if valid is not None:
        m = valid.astype(mx.float32).reshape(B, 1, 1, 1)
        read = read * m
        new_state = mx.where(m > 0, new_state, state)
    return read.reshape(B, 1, -1), new_state


def project(config: DeltaMemConfig, h: mx.array, w_in: mx.array,
            gate_bias: tuple[mx.array, ...]) -> MemoryInputs:
    """`DeltaMemory.project` as a pure function of arrays (w_in, gate_bias: `fused_weights()`)."""
    qk, *rest = _gated(config, h.astype(mx.float32) @ w_in, gate_bias)
    drop = lambda x: x.reshape(x.shape[:-1])  # noqa: E731 - [..., 1] → [...], one op each
    return MemoryInputs(*map(drop, (*mx.split(qk, 2, axis=-1), *rest)))


def _gated(config: DeltaMemConfig, x: mx.array, gate_bias: tuple[mx.array, ...]):
    """(qk̃ [..., H, r, 2], v, keep, erase, write [..., H, r, 1]) from the fused projection.

    x: h·W_in, [..., P] or [..., H, r, K]: per head and state row i the K entries q_i, k_i, v_i,
    β_i (, λ_i) (see `DeltaMemory.fused_weights`; per-head gates are repeated on every row);
    gate_bias: the β (, λ) biases [H, r, 1], added here so that under mx.compile the addition
    fuses with the gates (q, k and v have no bias).
    """
    cfg = config
    K = projection_vectors(cfg)
    if x.ndim < 4 or x.shape[-1] != K:
        x = x.reshape(*x.shape[:-1], cfg.num_state_heads, cfg.rank, K)
    qk, v, *gates = mx.split(x, [2, 3, 4][:K - 2], axis=-1)  # one op for all the pieces
    qk = normalize_heads(qk, axis=-2) if cfg.normalize_qk else qk
    return (qk, v, *gate_coefficients(cfg, *map(operator.add, gates, gate_bias)))


def gate_coefficients(config: DeltaMemConfig, beta_logit: mx.array,
                      lambda_logit: Optional[mx.array] = None
                      ) -> tuple[mx.array, mx.array, mx.array]:
    """(keep, erase, write) per state row (DESIGN §1): β = σ(β_logit), λ = σ(λ_logit),
    1 − β (coupled) or 1 (no_lambda). lambda_logit: only when λ is learned."""
    beta = mx.sigmoid(beta_logit)
    if config.state_update_mode == "no_lambda":
        lam = mx.ones_like(beta)
    elif lambda_logit is None:  # coupled
        lam = 1.0 - beta
    else:
        lam = mx.sigmoid(lambda_logit)
    return row_coefficients(config, beta, lam)


def projection_vectors(config: DeltaMemConfig) -> int:
    """K: per head, the fused projection holds K vectors of r: q, k, v, β (and λ)."""
    return 5 if config.state_update_mode != "no_lambda" and not config.couple_lambda else 4


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


def parameter_shapes(config: DeltaMemConfig, hidden_size: int, out_dims: dict[str, int],
                     stored: bool = False) -> dict[str, tuple[int, ...]]:
    """Name → shape of the δ parameters of one layer (DESIGN §4): the one table of them.

    out_dims: output width of the layer's q/k/v/o projections. stored=True lists what the
    official code saves, which also holds the inactive Δ heads (as zeros) and the o rms-norm
    weight whether or not o is active; δ-mem itself holds only the active ones.
    """
    R, G, D = config.state_dim, config.gate_dim, hidden_size
    heads = DELTA_HEADS if stored else config.delta_heads
    shapes = {f"memory_{x}_proj": (R, D) for x in ("q", "k", "v")}
    shapes.update({f"delta_{head}_proj": (out_dims[head], R) for head in heads})
    if config.delta_o_rmsnorm and "o" in heads:
        shapes["delta_o_rmsnorm_weight"] = (out_dims["o"],)
    shapes["beta_proj"], shapes["beta_bias"] = (G, D), (G,)
    if not config.couple_lambda:
        shapes["lambda_proj"], shapes["lambda_bias"] = (G, D), (G,)
    if config.trainable_delta_scale:
        n = len(DELTA_HEADS) if config.delta_scale_granularity == "head" else 1
        shapes["delta_scale_raw"] = (n,)
    return shapes


class DeltaMemory(nn.Module):
    """The δ parameters of one attention layer; names and shapes are those of DESIGN §4."""

    def __init__(self, config: DeltaMemConfig, hidden_size: int, out_dims: dict[str, int]):
        super().__init__()
        self.config = config
        for name, shape in parameter_shapes(config, hidden_size, out_dims).items():
            setattr(self, name, (mx.ones if name == "delta_o_rmsnorm_weight" else mx.zeros)(shape))

    def fused_weights(self) -> dict[str, mx.array]:
        """The parameters arranged for few ops, cached until a parameter is replaced.

        {"in": [1, D, P], "bias": [1, 1, P]}: the memory q/k/v and gate projections as one
        matmul, P = H·r·K columns ordered [H, r, K] (K = q, k, v, β (, λ): the entries of one
        state row are adjacent), gate rows repeated r times when the gates are per head
        (G = H); "gate_bias": the β (, λ) part of "bias" as a tuple of [H, r, 1] (what `project`
        adds; the Metal kernel reads "bias"); and per active head x: [1, R, out_x], W_Δx with
        α/r and the trainable scale folded in. (The leading 1s let a decode token's [1, 1, D]
        input meet them in one matmul or `addmm` with no reshape or broadcast around it.)
        Rebuilt whenever a parameter is another
        array object (optimizer updates, `load_delta_parameters`, `Module.update`); after
        editing a weight in place (`w[...] = x`) call `clear_fused_weights()`.
        """
        sources = tuple(self.values())
        cached = self.__dict__.get("_fused")
        if cached is not None and len(cached[0]) == len(sources) and all(
                map(operator.is_, cached[0], sources)):
            return cached[1]
        cfg = self.config
        f32 = lambda x: x.astype(mx.float32)  # noqa: E731
        per_row = lambda x: x if cfg.rankwise_gates else mx.repeat(x, cfg.rank, axis=0)  # noqa: E731
        rows = [f32(self.memory_q_proj), f32(self.memory_k_proj), f32(self.memory_v_proj),
                per_row(f32(self.beta_proj))]
        biases = [mx.zeros((3 * cfg.state_dim,)), per_row(f32(self.beta_bias))]
        if projection_vectors(cfg) == 5:
            rows.append(per_row(f32(self.lambda_proj)))
            biases.append(per_row(f32(self.lambda_bias)))
        K, H, r, D = len(rows), cfg.num_state_heads, cfg.rank, rows[0].shape[1]
        w_in = mx.stack(rows).reshape(K, H, r, D).transpose(1, 2, 0, 3).reshape(-1, D)
        bias = mx.concatenate(biases).reshape(K, H, r).transpose(1, 2, 0).reshape(-1)
        gate_bias = tuple(b.reshape(H, r, 1) for b in biases[1:])  # contiguous, unlike slices
        weights = {"in": w_in.T[None], "bias": bias[None, None], "gate_bias": gate_bias}
        for head in cfg.delta_heads:
            scale = cfg.scaling  # Δx = (α/r) · s_x · W_Δx read
            if cfg.trainable_delta_scale:
                idx = DELTA_HEADS.index(head) if cfg.delta_scale_granularity == "head" else 0
                scale = mx.sigmoid(f32(self.delta_scale_raw[idx])) * cfg.delta_scale_max * scale
            weights[head] = (f32(getattr(self, f"delta_{head}_proj")) * scale).T[None]
        # Kept lazy: evaluated with the first call that uses it (eval is not allowed under compile).
        self.__dict__["_fused"] = (sources, weights)
        return weights

    def clear_fused_weights(self) -> None:
        self.__dict__.pop("_fused", None)

    def project(self, h: mx.array, weights: Optional[dict] = None) -> MemoryInputs:
        """Memory projections and per-row coefficients of hidden states h [B, T, D] (DESIGN §1).

        weights: `fused_weights()` if already at hand (the same for every method below).
        """
        w = self.fused_weights() if weights is None else weights
        return project(self.config, h, w["in"], w["gate_bias"])

    def delta(self, head: str, reads: mx.array, weights: Optional[dict] = None) -> mx.array:
        """Δx = (α/r) · s_x · W_Δx read, float32 (RMS-normalised for o if configured).

        reads: [B, T, R] → [B, T, out_x].
        """
        cfg = self.config
        out = reads @ (self.fused_weights() if weights is None else weights)[head]
        if head == "o" and cfg.delta_o_rmsnorm:
            out = mx.fast.rms_norm(out, self.delta_o_rmsnorm_weight.astype(mx.float32),
                                   cfg.delta_o_rmsnorm_eps)
        return out

    def correct(self, head: str, out: mx.array, reads: mx.array,
                weights: Optional[dict] = None) -> mx.array:
        """out + Δx: one addmm when out is float32 and Δx needs no normalisation."""
        w = self.fused_weights() if weights is None else weights
        if out.dtype == mx.float32 and not (head == "o" and self.config.delta_o_rmsnorm):
            return mx.addmm(out, reads, w[head])
        return out + self.delta(head, reads, w).astype(out.dtype)  # Δ in fp32 first

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
