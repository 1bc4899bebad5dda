"""The token scan of DESIGN §1 without a per-token loop: the chunked (WY / UT) form.

Row i of a state head is a 1×r vector s with its own gates (keep a, erase b, write w) and the
head's unit key k; each valid token applies the affine map

    s ← s (a·I − b·k kᵀ) + c kᵀ,        c = w·v_i,

and reads s·q before it. Substituting u_t = c_t − b_t (s_{t−1}·k_t) gives s_t = a_t s_{t−1} + u_t k_tᵀ,
so inside a chunk of C tokens that starts from s₀ (γ_t = a_1⋯a_t, E[t,j] = a_{j+1}⋯a_{t−1}):

    u_t + b_t Σ_{j<t} E[t,j] (k_t·k_j) u_j = c_t − b_t γ_{t−1} (k_t·s₀)      (I + L) u = c − W'·s₀
    read_t = γ_{t−1} (q_t·s₀) + Σ_{j<t} E[t,j] (q_t·k_j) u_j
    s_C    = s₀ (γ_C I − Σ_j d_j W_j k_jᵀ) + Σ_j d_j u_c,j k_j,                 d_j = a_{j+1}⋯a_C

with u = u_c − W s₀ by linearity. Every chunk is solved at once from C×C matrices (the triangular
inverse by block doubling, no per-token step), the chunks' affine maps are chained by a
log-depth scan, and a final matmul turns each chunk's start state into its reads. Invalid tokens
are the identity map (a = 1, b = c = 0) and read 0. Decays are products (cumprod), not exp/log,
so a keep of exactly 0 is fine. Every op is differentiable.

Shapes: B batch, T tokens, H state heads, r rank, N chunks of C tokens; the per-row work runs
on [B, H, r, N, C, …] ("rows"), the per-head work on [B, H, 1, N, C, …].
"""

from __future__ import annotations

from functools import lru_cache
from typing import Optional

import mlx.core as mx
import numpy as np

from .delta_mem import MemoryInputs

# Measured on a 2-core x86 CPU (benchmarks/bench_speed.py --sections scan): batched 16×16
# matmuls stay in BLAS's small-matrix path; 32×32 are ~25× slower per matrix.
DEFAULT_CHUNK = 16
GROUP = 16  # chunk maps composed per level of the inter-chunk scan


@lru_cache(maxsize=None)
def _masks(C: int) -> tuple[mx.array, mx.array, tuple[mx.array, ...]]:
    """(strict lower [C, C], lower below the first subdiagonal [C, C], off-block masks per level).

    Made from NumPy, so they are data, not graph nodes: no work per call, and safe to cache
    when first made inside an `mx.compile` trace.
    """
    t = np.arange(C)[:, None]
    j = np.arange(C)[None, :]
    strict = mx.array((t > j).astype(np.float32))
    below = mx.array((t > j + 1).astype(np.float32))
    levels = []
    m = 1
    while m < C:
        # Rows in the odd m-block and columns in the even m-block of the same 2m-block.
        same = (t // (2 * m)) == (j // (2 * m))
        levels.append(mx.array((same & ((t // m) % 2 == 1) & ((j // m) % 2 == 0))
                               .astype(np.float32)))
        m *= 2
    return strict, below, tuple(levels)


@lru_cache(maxsize=None)
def _eye(n: int) -> mx.array:
    """The n×n identity as data (`mx.eye` would add several graph nodes to every call)."""
    return mx.array(np.eye(n, dtype=np.float32))


def _pad_last(x: mx.array, before: int, after: int, value: float) -> mx.array:
    """x with `before`/`after` entries of `value` around its last axis (one op)."""
    return mx.pad(x, [(0, 0)] * (x.ndim - 1) + [(before, after)], constant_values=value)


def unit_lower_inverse(L: mx.array) -> mx.array:
    """(I + L)⁻¹ for strictly lower-triangular L [..., C, C], C a power of two.

    Block doubling: with X the inverse restricted to diagonal m-blocks and L₂₁ the blocks just
    below them, X' = X − X L₂₁ X is the inverse on 2m-blocks (exact block substitution, so no
    cancellation between large terms as in a Neumann series).
    """
    C = L.shape[-1]
    _, _, offs = _masks(C)
    if not offs:
        return mx.broadcast_to(_eye(C), L.shape)
    X = _eye(C) - L * offs[0]
    for off in offs[1:]:
        X = X - (X @ (L * off)) @ X  # (this association is ~2x faster on the CPU backend)
    return X


def _compose_prefix(A: mx.array) -> mx.array:
    """Inclusive prefix products A_0, A_0A_1, … along axis -3 (Hillis–Steele).  A: [..., N, n, n]."""
    N, n = A.shape[-3], A.shape[-1]
    d = 1
    while d < N:
        eye = mx.broadcast_to(_eye(n), (*A.shape[:-3], d, n, n))
        A = mx.concatenate([eye, A[..., : N - d, :, :]], axis=-3) @ A
        d *= 2
    return A


def affine_states(s0: mx.array, A: mx.array) -> mx.array:
    """States after each affine map: s_{i+1} = [s_i, 1] A_i, in log depth.

    s0: [..., n] (last entry 1); A: [..., N, n, n] augmented maps [[M, 0], [offset, 1]].
    Returns [..., N, n]. Maps are composed within groups of GROUP, the groups recursively.
    """
    N, n = A.shape[-3], A.shape[-1]
    if N <= GROUP:
        return (s0[..., None, None, :] @ _compose_prefix(A))[..., 0, :]
    G = -(-N // GROUP)
    if pad := G * GROUP - N:
        eye = mx.broadcast_to(_eye(n), (*A.shape[:-3], pad, n, n))
        A = mx.concatenate([A, eye], axis=-3)
    local = _compose_prefix(A.reshape(*A.shape[:-3], G, GROUP, n, n))  # [..., G, GROUP, n, n]
    after = affine_states(s0, local[..., -1, :, :])  # state after each group [..., G, n]
    start = mx.concatenate([s0[..., None, :], after[..., :-1, :]], axis=-2)
    states = (start[..., None, None, :] @ local)[..., 0, :]  # [..., G, GROUP, n]
    return states.reshape(*states.shape[:-3], G * GROUP, n)[..., :N, :]


def chunked_scan(
    state: mx.array,
    inputs: MemoryInputs,
    valid: Optional[mx.array] = None,
    chunk: int = DEFAULT_CHUNK,
) -> tuple[mx.array, mx.array]:
    """Reads [B, T, H, r] and final state [B, H, r, r]: `scan_reference` without the loop.

    state: [B, H, r, r]; inputs: [B, T, H, r] each (float32); valid: [B, T] or None.
    chunk: tokens per chunk, a power of two (shrunk to fit short inputs).
    """
    q, k, v, keep, erase, write = inputs
    B, T, H, r = q.shape
    C = min(chunk, 1 << max(T - 1, 1).bit_length())
    c = write * v
    if valid is not None:
        valid = valid[:, :, None, None].astype(mx.float32)  # [B, T, 1, 1]
        real = (valid > 0).astype(mx.float32)  # as products, the masks fuse with the coefficients
        keep = keep * real + (1.0 - real)
        erase = erase * real
        c = c * real
    N = -(-T // C)
    if pad := N * C - T:
        widths = [(0, 0), (0, pad), (0, 0), (0, 0)]
        q, k, c, erase = (mx.pad(x, widths) for x in (q, k, c, erase))
        keep = mx.pad(keep, widths, constant_values=1.0)

    def heads(x):  # [B, T, H, r] → [B, H, 1, N, C, r]
        return x.reshape(B, N, C, H, 1, r).transpose(0, 3, 4, 1, 2, 5)

    def rows(x):  # [B, T, H, r] → [B, H, r, N, C]
        return x.reshape(B, N, C, H, r).transpose(0, 3, 4, 1, 2)

    qh, kh = heads(q), heads(k)
    a, b, c = rows(keep), rows(erase), rows(c)
    strict, below, _ = _masks(C)

    # Decays as products: E[t,j] = a_{j+1}⋯a_{t−1} (t > j), γ_{t−1}, d_j = a_{j+1}⋯a_C.
    a_prev = _pad_last(a[..., :-1], 1, 0, 1.0)
    E = mx.cumprod(a_prev[..., None] * below + (1.0 - below), axis=-2) * strict
    g_prev = mx.cumprod(a, axis=-1, inclusive=False)
    d = mx.cumprod(a, axis=-1, reverse=True, inclusive=False)
    g_all = (g_prev * a)[..., -1:]  # a_1⋯a_C: [B, H, r, N, 1]

    kt = kh.swapaxes(-1, -2)
    L = E * (kh @ kt) * b[..., None]  # [B, H, r, N, C, C]
    rhs = mx.concatenate([c[..., None], (b * g_prev)[..., None] * kh], axis=-1)
    UW = unit_lower_inverse(L) @ rhs  # [u_c | W]: [B, H, r, N, C, 1 + r]
    OZ = (E * (qh @ kt)) @ UW
    Z = g_prev[..., None] * qh - OZ[..., 1:]  # read_t = OZ_t[0] + Z_t · s_start

    # Chunk maps s_end = s_start M + n as augmented [[M, 0], [n, 1]]: [B, H, r, N, r+1, r+1].
    DK = (UW * d[..., None]).swapaxes(-1, -2) @ kh  # [n; Σ d W kᵀ]: [B, H, r, N, 1 + r, r]
    M = g_all[..., None] * _eye(r) - DK[..., 1:, :]
    maps = mx.concatenate([_pad_last(M, 0, 1, 0.0), _pad_last(DK[..., :1, :], 0, 1, 1.0)],
                          axis=-2)
    s0 = _pad_last(state, 0, 1, 1.0)  # [B, H, r, r+1]
    ends = affine_states(s0, maps)[..., :r]  # [B, H, r, N, r]
    starts = mx.concatenate([state[..., None, :], ends[..., :-1, :]], axis=-2)

    reads = OZ[..., :1] + Z @ starts[..., None]  # [B, H, r, N, C, 1]
    reads = reads.transpose(0, 3, 4, 1, 2, 5).reshape(B, N * C, H, r)[:, :T]
    if valid is not None:
        reads = reads * valid
    return reads, ends[..., -1, :]
