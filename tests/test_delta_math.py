"""The δ-mem layer math against DESIGN §1, §7, and a naive NumPy loop written straight from DESIGN §1."""

import itertools

import mlx.core as mx
import numpy as np
import pytest

from dmem_mlx.config import DeltaMemConfig
from dmem_mlx.delta_mem import (DeltaMemory, MemoryInputs, normalize_heads, row_coefficients,
                                scan_reference)
from dmem_mlx.scan import scan


def test_worked_vector_spec_7():
    cfg = DeltaMemConfig(rank=2)
    q = normalize_heads(mx.array([[0.5, -1.0], [1.0, 0.2], [-0.3, 0.8]])[None, :, None])
    k = normalize_heads(mx.array([[1.0, 0.0], [0.4, 0.9], [-0.7, 0.1]])[None, :, None])
    v = mx.array([[1.0, -2.0], [0.5, 0.5], [2.0, 1.0]])[None, :, None]
    beta = mx.array([[0.2, 0.5], [0.9, 0.1], [0.3, 0.3]])[None, :, None]
    keep, erase, write = row_coefficients(cfg, beta, 1 - beta)
    inputs = MemoryInputs(q, k, v, keep, erase, write)
    valid = mx.array([[1, 1, 0]])
    for fn in (scan_reference, scan):
        reads, state = fn(mx.zeros((1, 1, 2, 2)), inputs, valid)
        np.testing.assert_allclose(np.array(reads[0, :, 0]),
                                   [[0, 0], [0.193604, -0.968020], [0, 0]], atol=1e-6)
        np.testing.assert_allclose(np.array(state).reshape(-1),
                                   [0.191343, 0.323023, -0.854612, 0.085567], atol=1e-6)
    # t = 0 alone: S₁ = (0.2, 0, −1, 0)
    _, s1 = scan_reference(mx.zeros((1, 1, 2, 2)), MemoryInputs(*(x[:, :1] for x in inputs)))
    np.testing.assert_allclose(np.array(s1).reshape(-1), [0.2, 0, -1, 0], atol=1e-7)


# ---- a naive NumPy implementation of DESIGN §1, one token, one row at a time --------------

def _sigmoid(x):
    return 1 / (1 + np.exp(-x))


def naive_layer(cfg: DeltaMemConfig, p: dict, h: np.ndarray, valid: np.ndarray, S: np.ndarray):
    """h [T, D] (batch 1), valid [T], S [H, r, r] → (Δ per head {x: [T, out]}, final S)."""
    H, r = cfg.num_state_heads, cfg.rank
    deltas = {x: [] for x in cfg.delta_heads}
    S = S.copy()
    for t in range(h.shape[0]):
        q, k, v = p["memory_q_proj"] @ h[t], p["memory_k_proj"] @ h[t], p["memory_v_proj"] @ h[t]
        beta = _sigmoid(p["beta_proj"] @ h[t] + p["beta_bias"])
        if cfg.state_update_mode == "no_lambda":
            lam = np.ones_like(beta)
        elif cfg.couple_lambda:
            lam = 1 - beta
        else:
            lam = _sigmoid(p["lambda_proj"] @ h[t] + p["lambda_bias"])
        read = np.zeros(H * r)
        for head in range(H):
            sl = slice(head * r, (head + 1) * r)
            qh, kh, vh = q[sl], k[sl], v[sl]
            if cfg.normalize_qk:
                qh = np.tanh(qh) / max(np.linalg.norm(np.tanh(qh)), 1e-6)
                kh = np.tanh(kh) / max(np.linalg.norm(np.tanh(kh)), 1e-6)
            read[sl] = valid[t] * (S[head] @ qh)
            pred = S[head] @ kh
            new = S[head].copy()
            for i in range(r):
                g = head * r + i if cfg.rankwise_gates else head
                b, l = beta[g], lam[g]
                keep, erase, write = {"standard": (l, b, b), "lambda_outside": (l, l * b, b),
                                      "no_lambda": (1.0, b, b)}[cfg.state_update_mode]
                for j in range(r):
                    new[i, j] = keep * S[head, i, j] - erase * pred[i] * kh[j] + write * vh[i] * kh[j]
            if valid[t]:
                S[head] = new
        for x in cfg.delta_heads:
            d = cfg.alpha / cfg.rank * (p[f"delta_{x}_proj"] @ read)
            if cfg.trainable_delta_scale:
                idx = "qkvo".index(x) if cfg.delta_scale_granularity == "head" else 0
                d = d * _sigmoid(p["delta_scale_raw"][idx]) * cfg.delta_scale_max
            if x == "o" and cfg.delta_o_rmsnorm:
                d = d / np.sqrt(np.mean(d * d) + cfg.delta_o_rmsnorm_eps) * p["delta_o_rmsnorm_weight"]
            deltas[x].append(d)
    return {x: np.stack(v) for x, v in deltas.items()}, S


def random_memory(cfg: DeltaMemConfig, D: int, out: dict, seed: int) -> DeltaMemory:
    mem = DeltaMemory(cfg, D, out)
    rng = np.random.default_rng(seed)
    mem.update({k: mx.array(rng.normal(0, 0.5, v.shape).astype(np.float32))
                for k, v in mem.parameters().items()})
    return mem


MODES = list(itertools.product(["standard", "lambda_outside", "no_lambda"], [True, False],
                               [True, False], [1, 4]))


@pytest.mark.parametrize("mode,rankwise,coupled,heads", MODES)
def test_layer_matches_naive_loop(mode, rankwise, coupled, heads):
    seed = MODES.index((mode, rankwise, coupled, heads))
    rng = np.random.default_rng(seed)
    cfg = DeltaMemConfig(rank=4, alpha=8.0, state_update_mode=mode, rankwise_gates=rankwise,
                         couple_lambda=coupled, num_state_heads=heads,
                         delta_heads=["q", "k", "v", "o"], trainable_delta_scale=bool(seed % 2),
                         delta_scale_granularity=("head", "layer")[seed % 3 == 0],
                         delta_o_rmsnorm=bool(seed % 3), normalize_qk=seed != 5)
    D, T = 12, 9
    out = {"q": 10, "k": 6, "v": 6, "o": 12}
    mem = random_memory(cfg, D, out, seed)
    h = rng.normal(size=(T, D)).astype(np.float32)
    valid = (rng.random(T) > 0.3).astype(np.float32)
    S0 = rng.normal(0, 0.3, (heads, 4, 4)).astype(np.float32)
    p = {k: np.array(v) for k, v in mem.parameters().items()}
    want_delta, want_S = naive_layer(cfg, p, h, valid, S0)

    inputs = mem.project(mx.array(h)[None])
    reads, S = scan(mx.array(S0)[None], inputs, mx.array(valid)[None])
    np.testing.assert_allclose(np.array(S[0]), want_S, atol=2e-5, rtol=1e-5)
    flat = reads.reshape(1, T, -1)
    for x in cfg.delta_heads:
        np.testing.assert_allclose(np.array(mem.delta(x, flat)[0]), want_delta[x],
                                   atol=5e-5, rtol=1e-4)
