"""The fast paths against the per-token oracle: chunked scan, dispatcher, decode step, BLAS setup."""

import collections
import io
import re
from functools import partial
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.models.cache import make_prompt_cache

from dmem_mlx import blas
from dmem_mlx import scan as scan_module
from dmem_mlx.chunked_scan import chunked_scan, unit_lower_inverse
from dmem_mlx.config import DeltaMemConfig
from dmem_mlx.delta_mem import (DeltaMemory, MemoryInputs, normalize_heads, read_state,
                                row_coefficients, scan_reference, scan_step)
from dmem_mlx.model import attach_delta_mem, delta_parameters, load_delta_parameters
from dmem_mlx.scan import scan, step, with_portable_vjp
from dmem_mlx.tiny import build_model, tiny_args

MODES = [  # (state_update_mode, couple_lambda, rankwise_gates)
    ("standard", True, True), ("standard", False, True), ("lambda_outside", True, True),
    ("lambda_outside", False, False), ("no_lambda", True, True), ("standard", True, False),
]


def random_inputs(B, T, H, r=8, mode=("standard", True, True), seed=0, gate_shift=0.0):
    """MemoryInputs as DeltaMemory.project makes them, from random raw projections."""
    cfg = DeltaMemConfig(rank=r, num_state_heads=H, state_update_mode=mode[0],
                         couple_lambda=mode[1], rankwise_gates=mode[2])
    rng = np.random.default_rng(seed)
    n = lambda *s: mx.array(rng.normal(size=s).astype(np.float32))  # noqa: E731
    G = cfg.gate_dim
    beta = mx.sigmoid(n(B, T, G) * 2 + gate_shift)
    lam = 1 - beta if cfg.couple_lambda else mx.sigmoid(n(B, T, G) * 2 - gate_shift)
    if cfg.state_update_mode == "no_lambda":
        lam = mx.ones_like(beta)
    beta = mx.broadcast_to(beta.reshape(B, T, H, -1), (B, T, H, r))
    lam = mx.broadcast_to(lam.reshape(B, T, H, -1), (B, T, H, r))
    q, k = normalize_heads(n(B, T, H, r)), normalize_heads(n(B, T, H, r))
    return MemoryInputs(q, k, n(B, T, H, r), *row_coefficients(cfg, beta, lam))


def holes(B, T, seed=0):
    """A validity mask with isolated holes and a run of padding at the start of row 0."""
    valid = np.random.default_rng(seed).random((B, T)) > 0.25
    valid[0, : min(T, 7)] = False
    return mx.array(valid)


def assert_close(got, want, atol):
    np.testing.assert_allclose(np.array(got), np.array(want), atol=atol, rtol=0)


# -- chunked scan ---------------------------------------------------------------------------

SCAN_CASES = [(mode, H, T) for mode in MODES
              for H, T in [(1, 1), (1, 2), (4, 3), (1, 16), (1, 17), (4, 33), (4, 100)]]
SCAN_CASES += [(MODES[0], 1, 2000), (MODES[3], 4, 2000)]  # long ones: the oracle loop is slow


@pytest.mark.parametrize("mode,H,T", SCAN_CASES)
def test_chunked_scan_matches_reference(mode, H, T):
    B = 2
    inputs = random_inputs(B, T, H, mode=mode, seed=T)
    state = mx.array(np.random.default_rng(1).normal(size=(B, H, 8, 8)).astype(np.float32))
    for valid in (None, holes(B, T)):
        want_reads, want_state = scan_reference(state, inputs, valid)
        reads, new_state = chunked_scan(state, inputs, valid)
        assert reads.shape == want_reads.shape and new_state.shape == want_state.shape
        assert_close(reads, want_reads, 2e-6)
        assert_close(new_state, want_state, 2e-6)
        if valid is not None:
            assert float(mx.abs(reads[0, :7]).max()) == 0.0  # padding reads exactly 0


@pytest.mark.parametrize("chunk", [2, 4, 8, 32, 64])
def test_every_chunk_size_gives_the_same_scan(chunk):
    inputs = random_inputs(1, 150, 2, seed=3)
    state = mx.ones((1, 2, 8, 8)) * 0.1
    want_reads, want_state = scan_reference(state, inputs)
    reads, new_state = chunked_scan(state, inputs, chunk=chunk)
    assert_close(reads, want_reads, 2e-6)
    assert_close(new_state, want_state, 2e-6)


def test_extreme_gates_stay_exact():
    """keep exactly 0 or 1, erase 1 and one repeated key: the hard cases for a chunked solve."""
    T, r = 64, 8
    rng = np.random.default_rng(5)
    k = normalize_heads(mx.array(rng.normal(size=(1, 1, 1, r)).astype(np.float32)))
    k = mx.broadcast_to(k, (1, T, 1, r))
    q = normalize_heads(mx.array(rng.normal(size=(1, T, 1, r)).astype(np.float32)))
    v = mx.array(rng.normal(size=(1, T, 1, r)).astype(np.float32))
    keep = mx.array((rng.random((1, T, 1, r)) > 0.5).astype(np.float32))  # 0 or 1
    ones = mx.ones((1, T, 1, r))
    inputs = MemoryInputs(q, k, v, keep, ones, ones)
    state = mx.ones((1, 1, r, r))
    want_reads, want_state = scan_reference(state, inputs)
    reads, new_state = chunked_scan(state, inputs)
    assert_close(reads, want_reads, 1e-5)
    assert_close(new_state, want_state, 1e-5)


def test_unit_lower_inverse():
    rng = np.random.default_rng(0)
    L = np.tril(rng.normal(size=(3, 16, 16)), -1).astype(np.float32)
    inv = unit_lower_inverse(mx.array(L))
    np.testing.assert_allclose(np.array(inv) @ (np.eye(16) + L), np.broadcast_to(np.eye(16), L.shape),
                               atol=1e-4)


def _loss(fn, valid, weights):
    def loss(state, *xs):
        reads, final = fn(state, MemoryInputs(*xs), valid)
        return (reads * weights[0]).sum() + (final * weights[1]).sum()
    return loss


def test_chunked_scan_gradient_equals_the_loop_gradient():
    B, T, H = 2, 45, 2
    inputs = random_inputs(B, T, H, mode=("standard", False, True), seed=7)
    state = mx.array(np.random.default_rng(2).normal(size=(B, H, 8, 8)).astype(np.float32))
    valid = holes(B, T)
    rng = np.random.default_rng(3)
    weights = (mx.array(rng.normal(size=(B, T, H, 8)).astype(np.float32)),
               mx.array(rng.normal(size=(B, H, 8, 8)).astype(np.float32)))
    argnums = list(range(7))
    want = mx.grad(_loss(scan_reference, valid, weights), argnums=argnums)(state, *inputs)
    got = mx.grad(_loss(chunked_scan, valid, weights), argnums=argnums)(state, *inputs)
    for g, w in zip(got, want):
        assert float(mx.abs(w).max()) > 0
        assert_close(g, w, 1e-5)


def test_kernel_wrapper_takes_the_chunked_gradient():
    """with_portable_vjp(forward): forward's values, the chunked scan's derivatives."""
    calls = []

    def forward(state, inputs, valid):
        calls.append(1)
        return scan_reference(state, inputs, valid)

    B, T, H = 1, 20, 1
    inputs = random_inputs(B, T, H, seed=11)
    state = mx.ones((B, H, 8, 8)) * 0.2
    valid = holes(B, T).astype(mx.float32)
    weights = (mx.ones((B, T, H, 8)), mx.ones((B, H, 8, 8)))
    fn = with_portable_vjp(forward)
    reads, final = fn(state, *inputs, valid)
    want_reads, want_state = scan_reference(state, inputs, valid)
    assert_close(reads, want_reads, 0)
    assert_close(final, want_state, 0)

    def wrapped_loss(state, *xs):
        reads, final = fn(state, *xs, valid)
        return (reads * weights[0]).sum() + (final * weights[1]).sum()

    got = mx.grad(wrapped_loss, argnums=list(range(7)))(state, *inputs)
    want = mx.grad(_loss(chunked_scan, valid, weights), argnums=list(range(7)))(state, *inputs)
    for g, w in zip(got, want):
        assert_close(g, w, 1e-6)
    assert calls


# -- dispatcher -----------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["auto", "chunked", "reference"])
@pytest.mark.parametrize("T", [1, 2, 4, 5, 40])
def test_dispatcher_matches_reference(T, backend):
    inputs = random_inputs(2, T, 1, seed=T)
    state = mx.ones((2, 1, 8, 8)) * 0.3
    for valid in (None, holes(2, T)):
        want_reads, want_state = scan_reference(state, inputs, valid)
        reads, new_state = scan(state, inputs, valid, backend)
        assert_close(reads, want_reads, 2e-6)
        assert_close(new_state, want_state, 2e-6)


# Lengths around the chunk boundaries, where `token_scan` switches between the per-token loop,
# chunks of 16, chunks of 8 and chunks followed by a few steps of the loop.
BOUNDARY_LENGTHS = [2, 4, 5, 7, 8, 9, 12, 15, 16, 17, 20, 21, 24, 25, 31, 32, 33, 36, 37, 40, 48,
                    63, 64, 65]


@pytest.mark.parametrize("T", BOUNDARY_LENGTHS)
def test_token_scan_matches_reference_around_chunk_boundaries(T):
    """The compiled prefill path (projection + planned scan, tokens padded by token_padding)
    against the reference: the projection, then the per-token loop of delta_mem.py."""
    if not scan_module.can_compile():
        pytest.skip("mx.compile cannot run here: token_scan takes the uncompiled path")
    for cfg in (CONFIGS[0], mode_config(MODES[4], num_state_heads=4),
                mode_config(MODES[3], num_state_heads=2)):
        memory = random_memory(cfg, seed=T)
        rng = np.random.default_rng(T)
        h = mx.array(rng.normal(size=(3, T, 64)).astype(np.float32))
        state = mx.array(rng.normal(size=(3, cfg.num_state_heads, 8, 8)).astype(np.float32) * 0.3)
        for valid in (None, holes(3, T, seed=T).astype(mx.float32)):
            want_reads, want_state = scan_reference(state, memory.project(h), valid)
            reads, new_state = scan_module.token_scan(memory, h, state, valid, "chunked")
            assert reads.shape == (3, T, cfg.state_dim)
            assert_close(reads, want_reads.reshape(3, T, -1), 1e-5)
            assert_close(new_state, want_state, 1e-5)


def test_token_scan_plan_covers_every_token():
    """Every length is split into chunks and steps that add up to it once padded, padding stays
    under half a chunk, and no padded length needs a second chunk for a few tokens; a batch of
    LOOP_ROWS rows or more runs up to LOOP_TOKENS tokens by the loop alone, unpadded."""
    for rows in (1, scan_module.LOOP_ROWS - 1, scan_module.LOOP_ROWS, 8):
        batched = rows >= scan_module.LOOP_ROWS
        for T in range(1, 200):
            pad = scan_module.token_padding(T, rows)
            chunked, chunk, steps = scan_module._plan(T + pad, rows)
            assert chunked + steps == T + pad and chunked % chunk == 0
            assert pad < scan_module.HALF_CHUNK
            loop_only = T <= (scan_module.LOOP_TOKENS if batched else scan_module.MAX_STEPS)
            assert steps <= (T if loop_only else scan_module.TAIL_STEPS)
            assert (chunked == 0 and pad == 0) if loop_only else chunked > 0
            assert chunk in (scan_module.HALF_CHUNK, scan_module.DEFAULT_CHUNK)


@pytest.mark.parametrize("T", [5, 14, 17, 32, 33])
def test_token_scan_of_a_batch_matches_reference(T):
    """A batch of LOOP_ROWS rows (several users' prompts prefilled at once) takes the per-token
    loop up to LOOP_TOKENS tokens and the chunked scan past it: both equal the reference, with
    rows of padding that is never written."""
    if not scan_module.can_compile():
        pytest.skip("mx.compile cannot run here: token_scan takes the uncompiled path")
    B = scan_module.LOOP_ROWS
    for cfg in (CONFIGS[0], mode_config(MODES[4], num_state_heads=4)):
        memory = random_memory(cfg, seed=T)
        rng = np.random.default_rng(T)
        h = mx.array(rng.normal(size=(B, T, 64)).astype(np.float32))
        state = mx.array(rng.normal(size=(B, cfg.num_state_heads, 8, 8)).astype(np.float32) * 0.3)
        for valid in (None, holes(B, T, seed=T).astype(mx.float32)):
            want_reads, want_state = scan_reference(state, memory.project(h), valid)
            reads, new_state = scan_module.token_scan(memory, h, state, valid, "chunked")
            assert reads.shape == (B, T, cfg.state_dim)
            assert_close(reads, want_reads.reshape(B, T, -1), 1e-5)
            assert_close(new_state, want_state, 1e-5)


def test_dispatcher_handles_an_empty_call():
    inputs = MemoryInputs(*(mx.zeros((2, 0, 1, 8)) for _ in range(6)))
    state = mx.ones((2, 1, 8, 8))
    reads, new_state = scan(state, inputs)
    assert reads.shape == (2, 0, 1, 8) and new_state is state


def test_backend_picks_the_path(monkeypatch):
    used = []
    monkeypatch.setattr(scan_module, "scan_reference",
                        lambda *a: used.append("loop") or scan_reference(*a))
    monkeypatch.setattr(scan_module, "chunked_scan",
                        lambda *a: used.append("chunked") or chunked_scan(*a))
    inputs = random_inputs(1, 30, 1)
    scan(mx.zeros((1, 1, 8, 8)), inputs, backend="reference")
    scan(mx.zeros((1, 1, 8, 8)), inputs, backend="chunked")
    scan(mx.zeros((1, 1, 8, 8)), inputs, backend="auto")
    assert used == ["loop", "chunked", "chunked"]  # auto is chunked without Metal
    assert scan_module.resolve("auto") == "chunked"


def test_backend_attribute_and_environment(monkeypatch):
    model = make_model(CONFIGS[0])
    assert model.delta_mem.backend == "auto"
    model.delta_mem.backend = "reference"
    with pytest.raises(ValueError, match="unknown δ backend 'fast'"):
        model.delta_mem.backend = "fast"
    with pytest.raises(ValueError, match="needs a Metal GPU"):
        model.delta_mem.backend = "metal"
    assert model.delta_mem.backend == "reference"
    monkeypatch.setenv("DMEM_BACKEND", "reference")
    assert make_model(CONFIGS[0]).delta_mem.backend == "reference"
    monkeypatch.setenv("DMEM_BACKEND", "nope")
    with pytest.raises(ValueError, match="unknown δ backend"):
        make_model(CONFIGS[0])


def test_metal_wiring_with_stand_in_kernels(monkeypatch):
    """On a Mac the dispatcher calls the kernels; here Python stand-ins check the wiring."""
    import dmem_mlx.kernels as kernels

    calls = []

    def fake_scan(state, inputs, valid=None):
        calls.append("scan")
        return scan_reference(state, inputs, valid)

    def fake_layer(memory, h, state, valid=None, write=True, weights=None):
        calls.append("layer")
        inputs = memory.project(h, weights)
        if write:
            reads, new_state = scan_reference(state, inputs, valid)
        else:
            reads, new_state = read_state(state, inputs.q, valid), state
        reads = reads.reshape(*reads.shape[:2], -1)
        return {x: memory.delta(x, reads, weights).astype(h.dtype)
                for x in memory.config.delta_heads}, new_state

    monkeypatch.setattr(kernels, "metal_scan", fake_scan)
    monkeypatch.setattr(kernels, "metal_layer_decode", fake_layer)
    monkeypatch.setattr(scan_module, "metal_available", lambda: True)
    for cfg in [mode_config(mode) for mode in MODES[:3]] + CONFIGS[-3:]:
        want = run_model(make_model(cfg), backend="reference")
        got = run_model(make_model(cfg), backend="metal")
        for g, w in zip(got, want):
            np.testing.assert_allclose(g, w, atol=1e-5)
    assert "scan" in calls and "layer" in calls
    model = make_model(CONFIGS[0])  # a read-only decode token reads and keeps the state
    model.delta_mem.backend = "metal"
    model(mx.array([[3, 1, 4, 1, 5, 9, 2, 6]]))
    before = model.delta_mem.snapshot()
    with model.delta_mem.read_only():
        got = model(mx.array([[7]]))
    model.delta_mem.backend = "reference"
    with model.delta_mem.read_only():
        want = model(mx.array([[7]]))
    np.testing.assert_allclose(np.array(got), np.array(want), atol=1e-5)
    for name, state in model.delta_mem.snapshot().items():
        np.testing.assert_array_equal(np.array(state), np.array(before[name]))


# -- the projection, the corrections and the decode step ---------------------------------------

def mode_config(mode, **extra) -> DeltaMemConfig:
    return DeltaMemConfig.from_dict({"state_update_mode": mode[0], "couple_lambda": mode[1],
                                     "rankwise_gates": mode[2], "delta_heads": ["q", "k", "v", "o"],
                                     **extra})


CONFIGS = [mode_config(m) for m in MODES] + [
    mode_config(MODES[0], num_state_heads=4),
    mode_config(MODES[1], delta_heads=["q", "o"], delta_o_rmsnorm=True, trainable_delta_scale=True,
                delta_scale_granularity="head"),
    mode_config(MODES[0], delta_heads=["v"], trainable_delta_scale=True),
    mode_config(MODES[0], delta_heads=[], normalize_qk=False),
]


def random_memory(cfg: DeltaMemConfig, D=64, seed=0) -> DeltaMemory:
    memory = DeltaMemory(cfg, D, {"q": 64, "k": 32, "v": 32, "o": D})
    rng = np.random.default_rng(seed)
    memory.update({k: mx.array(rng.normal(size=v.shape).astype(np.float32) * 0.3)
                   for k, v in memory.parameters().items()})
    return memory


def projection_by_matrix(memory: DeltaMemory, h: mx.array) -> MemoryInputs:
    """DESIGN §1 steps 1–2 with the named parameters one by one (independent of the fused layout)."""
    cfg = memory.config
    heads = lambda x: x.reshape(*x.shape[:-1], cfg.num_state_heads, -1)  # noqa: E731
    q, k = heads(h @ memory.memory_q_proj.T), heads(h @ memory.memory_k_proj.T)
    if cfg.normalize_qk:
        q, k = normalize_heads(q), normalize_heads(k)
    beta = mx.sigmoid(h @ memory.beta_proj.T + memory.beta_bias)
    if cfg.state_update_mode == "no_lambda":
        lam = mx.ones_like(beta)
    elif cfg.couple_lambda:
        lam = 1.0 - beta
    else:
        lam = mx.sigmoid(h @ memory.lambda_proj.T + memory.lambda_bias)
    beta, lam = mx.broadcast_to(heads(beta), q.shape), mx.broadcast_to(heads(lam), q.shape)
    return MemoryInputs(q, k, heads(h @ memory.memory_v_proj.T),
                        *row_coefficients(cfg, beta, lam))


def delta_by_matrix(memory: DeltaMemory, head: str, reads: mx.array) -> mx.array:
    """Δx = (α/r) · s_x · W_Δx read (+ RMSNorm for o), from the named parameters."""
    cfg = memory.config
    out = reads @ getattr(memory, f"delta_{head}_proj").T * cfg.scaling
    if cfg.trainable_delta_scale:
        idx = "qkvo".index(head) if cfg.delta_scale_granularity == "head" else 0
        out = out * mx.sigmoid(memory.delta_scale_raw[idx]) * cfg.delta_scale_max
    if head == "o" and cfg.delta_o_rmsnorm:
        out = mx.fast.rms_norm(out, memory.delta_o_rmsnorm_weight, cfg.delta_o_rmsnorm_eps)
    return out


@pytest.mark.parametrize("cfg", CONFIGS, ids=range(len(CONFIGS)))
def test_projection_and_corrections_match_the_parameters(cfg):
    memory = random_memory(cfg)
    h = mx.array(np.random.default_rng(1).normal(size=(2, 5, 64)).astype(np.float32))
    for got, want in zip(memory.project(h), projection_by_matrix(memory, h)):
        assert_close(got, want, 1e-6)
    reads = mx.array(np.random.default_rng(2).normal(size=(2, 5, cfg.state_dim)).astype(np.float32))
    out = mx.ones((2, 5, 64))
    for head in cfg.delta_heads:
        want = delta_by_matrix(memory, head, reads)
        assert_close(memory.delta(head, reads), want, 2e-5)
        width = want.shape[-1]
        assert_close(memory.correct(head, out[..., :width], reads), out[..., :width] + want, 2e-5)


@pytest.mark.parametrize("backend", ["chunked", "reference"])
@pytest.mark.parametrize("cfg", CONFIGS, ids=range(len(CONFIGS)))
def test_decode_step_matches_project_and_scan_step(cfg, backend):
    memory = random_memory(cfg)
    rng = np.random.default_rng(4)
    h = mx.array(rng.normal(size=(2, 1, 64)).astype(np.float32))
    state = mx.array(rng.normal(size=(2, cfg.num_state_heads, 8, 8)).astype(np.float32))
    x = projection_by_matrix(memory, h)
    want_read, want_state = scan_step(state, *(a[:, 0] for a in x))
    reads, new_state = step(memory, h, state, backend=backend)
    assert_close(reads, want_read.reshape(2, 1, -1), 2e-6)
    assert_close(new_state, want_state, 2e-6)
    valid = mx.array([[True], [False]])
    reads, new_state = step(memory, h, state, valid, backend=backend)
    assert_close(reads[0], want_read[0].reshape(1, -1), 2e-6)
    assert float(mx.abs(reads[1]).max()) == 0.0
    assert_close(new_state[1], state[1], 0)
    reads, kept = step(memory, h, state, write=False, backend=backend)
    assert_close(reads, (state @ x.q[:, 0, ..., None])[..., 0].reshape(2, 1, -1), 2e-6)
    assert_close(kept, state, 0)


def test_fused_weights_follow_weight_updates():
    memory = random_memory(CONFIGS[0], seed=0)
    h = mx.ones((1, 1, 64))
    first = memory.project(h).v
    memory.update({k: v * 2 for k, v in memory.parameters().items()})  # new arrays, as training does
    assert_close(memory.project(h).v, projection_by_matrix(memory, h).v, 1e-6)
    assert float(mx.abs(memory.project(h).v - first).max()) > 0.1
    reads = mx.ones((1, 1, 8))
    assert_close(memory.delta("q", reads), delta_by_matrix(memory, "q", reads), 1e-5)
    memory.memory_v_proj[0, 0] = 100.0  # in place: not seen until the cache is cleared
    memory.clear_fused_weights()
    assert_close(memory.project(h).v, projection_by_matrix(memory, h).v, 1e-5)


def test_projection_and_corrections_are_differentiable():
    memory = random_memory(CONFIGS[1])
    h = mx.array(np.random.default_rng(0).normal(size=(1, 3, 64)).astype(np.float32))

    def loss(params, fused):
        memory.update(params)
        x = memory.project(h) if fused else projection_by_matrix(memory, h)
        reads = (x.q + x.k * x.erase + x.v * x.keep * x.write).reshape(1, 3, -1)
        delta = memory.delta if fused else partial(delta_by_matrix, memory)
        return sum(delta(k, reads).sum() for k in "qkvo")

    params = memory.parameters()
    got = mx.grad(loss)(params, True)
    want = mx.grad(loss)(params, False)
    for key in want:
        assert_close(got[key], want[key], 1e-4)


# -- the whole model: every backend against the reference, every gate mode -------------------------

def make_model(cfg: DeltaMemConfig, seed=0):
    """The tiny qwen3 backbone with random δ weights that change its logits by O(1).

    (Much larger memory projections saturate tanh and the gates; the random model then turns
    fp32 rounding differences into ~1e-5 logit differences whatever the scan.)
    """
    model = build_model(tiny_args("qwen3"), seed)
    attach_delta_mem(model, cfg)
    rng = np.random.default_rng(seed + 1)
    load_delta_parameters(model, {
        k: mx.array(rng.normal(size=v.shape).astype(np.float32) * (0.1 if ".delta_" in k else 0.2))
        for k, v in delta_parameters(model).items()})
    return model


def run_model(model, backend: str = "auto"):
    """Logits of a 40-token prefill (with a padded batch row), then 3 decode steps."""
    rng = np.random.default_rng(0)
    prompt = mx.array(rng.integers(0, 512, size=(2, 40)))
    valid = np.ones((2, 40), bool)
    valid[1, :6] = False
    cache = make_prompt_cache(model)
    model.delta_mem.backend = backend
    out = []
    with model.delta_mem.inputs(valid=valid):
        out.append(model(prompt, cache=cache))
    for t in range(3):
        out.append(model(prompt[:, t:t + 1], cache=cache))
    out.extend(model.delta_mem.snapshot().values())
    mx.eval(out)
    return [np.array(x) for x in out]


# Unnormalised keys of this random size make the delta rule diverge: a model-level comparison
# would compare overflows. normalize_qk=False is covered per layer above.
MODEL_CONFIGS = CONFIGS[:-1] + [mode_config(MODES[0], delta_heads=[])]


@pytest.mark.parametrize("cfg", MODEL_CONFIGS, ids=range(len(MODEL_CONFIGS)))
def test_model_logits_fast_path_equal_reference(cfg):
    got = run_model(make_model(cfg))
    want = run_model(make_model(cfg), backend="reference")
    for g, w in zip(got[:4], want[:4]):  # logits of the prefill and the 3 decode steps
        np.testing.assert_allclose(g, w, atol=1e-5, rtol=0)
    for g, w in zip(got[4:], want[4:]):  # states
        np.testing.assert_allclose(g, w, atol=1e-5, rtol=0)
    if not cfg.delta_heads:
        return
    base = build_model(tiny_args("qwen3"), 0)
    prompt = mx.array(np.random.default_rng(0).integers(0, 512, size=(2, 40)))
    assert np.abs(want[0][0] - np.array(base(prompt))[0]).max() > 0.1  # δ-mem matters here


def test_compiled_paths_run_from_any_thread():
    """MLX streams belong to threads (an app's engine thread, then the main thread): what one
    thread compiled or cached must not break another."""
    import threading

    want = run_model(make_model(CONFIGS[1]), backend="reference")
    got = []
    worker = threading.Thread(target=lambda: got.append(run_model(make_model(CONFIGS[1]))))
    worker.start()
    worker.join()
    got.append(run_model(make_model(CONFIGS[1])))
    assert len(got) == 2
    for run in got:
        for g, w in zip(run, want):
            np.testing.assert_allclose(g, w, atol=1e-5, rtol=0)


def test_bf16_backbone_gets_fp32_corrections():
    """Corrections are computed in fp32 and cast when the backbone is not fp32 (the single
    addmm form is used only for fp32 outputs)."""
    memory = random_memory(CONFIGS[0])
    reads = mx.array(np.random.default_rng(0).normal(size=(1, 3, 8)).astype(np.float32))
    out = mx.ones((1, 3, 64), mx.bfloat16)
    got = memory.correct("q", out, reads)
    want = out + delta_by_matrix(memory, "q", reads).astype(mx.bfloat16)
    assert got.dtype == mx.bfloat16
    assert_close(got.astype(mx.float32), want.astype(mx.float32), 0)


def test_model_decode_runs_one_step_per_layer(monkeypatch):
    import dmem_mlx.model as model_module

    used = []
    original = model_module.step
    monkeypatch.setattr(model_module, "step", lambda *a: used.append(a[5]) or original(*a))
    run_model(make_model(CONFIGS[0]))
    assert used == ["auto"] * (3 * 4)  # 3 decode steps × 4 layers, on the model's backend


def primitives(*outputs: mx.array) -> collections.Counter:
    """The primitives MLX would run to evaluate `outputs`, by name (from mx.export_to_dot)."""
    dot = io.StringIO()
    mx.export_to_dot(dot, *outputs)
    return collections.Counter(re.findall(r'label ="(\w+)", shape=rectangle', dot.getvalue()))


def decode_graph(model) -> collections.Counter:
    """Primitives of one steady decode step: logits, KV cache and δ state of the next token."""
    cache = make_prompt_cache(model)
    for ids in ([[1, 2, 3]], [[4]]):  # the prompt, then a first step (compiles, builds weights)
        mx.eval(model(mx.array(ids), cache=cache), [c.state for c in cache])
        if hasattr(model, "delta_mem"):
            mx.eval(list(model.delta_mem.state.layers.values()))
    logits = model(mx.array([[5]]), cache=cache)
    outputs = [logits, *(a for c in cache for a in c.state if isinstance(a, mx.array))]
    if hasattr(model, "delta_mem"):
        outputs += list(model.delta_mem.state.layers.values())
    return primitives(*outputs)


# Per δ layer and decode token on the CPU path (heads q and o, one state head): the input
# projection (1 matmul), its pieces (1 reshape, 1 split), the q/k normalisation (2
# mx.compile fusions around 1 sum), the step (1 matmul, 1 split, the k̃ row as 1 slice and 1
# transpose, 1 fusion with the gates and their biases), the reads as [B, 1, R] (1 reshape) and
# the two corrections (2 addmm).
DECODE_PRIMITIVES_PER_LAYER = 14


def test_decode_primitives_per_layer_are_pinned():
    """Walks the graph MLX dispatches for a decode token and pins what δ-mem adds per layer."""
    cfg = DeltaMemConfig.from_dict({"delta_heads": ["q", "o"]})
    plain = build_model(tiny_args("qwen3"), 0)
    model = make_model(cfg)
    added = decode_graph(model)
    added.subtract(decode_graph(plain))
    layers = len(model.delta_mem.layers)
    assert sum(added.values()) == DECODE_PRIMITIVES_PER_LAYER * layers, dict(added)
    assert added["AddMM"] == 2 * layers  # one addmm per correction
    assert added["Matmul"] == 2 * layers  # the input projection, both state products
    if scan_module.can_compile():
        assert sum(n for name, n in added.items() if name.startswith("Compiled")) == 3 * layers


# -- OpenBLAS detection ---------------------------------------------------------------------

X86 = "/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3"


def plan(environ=None, system="Linux", machine="x86_64", installed=(X86,), argv=("python", "x")):
    return blas.reexec_plan(list(argv), environ or {}, system, machine,
                            exists=lambda p: str(p) in installed)


def test_reexec_plan_preloads_an_installed_openblas():
    env = plan({"PATH": "/bin"})
    assert env["LD_PRELOAD"] == X86 and env[blas.REEXEC_MARK] == "1" and env["PATH"] == "/bin"
    env = plan({"LD_PRELOAD": "/opt/libfoo.so"})
    assert env["LD_PRELOAD"] == f"{X86} /opt/libfoo.so"
    arm = "/usr/lib/aarch64-linux-gnu/openblas-openmp/libblas.so.3"
    assert plan(machine="aarch64", installed=(arm,))["LD_PRELOAD"] == arm


@pytest.mark.parametrize("case", [
    dict(environ={blas.OPT_OUT: "1"}),
    dict(environ={blas.REEXEC_MARK: "1"}),  # never loops
    dict(environ={"PYTEST_CURRENT_TEST": "test_x.py::test_main"}),  # never restarts pytest
    dict(environ={"LD_PRELOAD": "/usr/lib/x86_64-linux-gnu/libopenblas.so.0"}),  # already there
    dict(system="Darwin"),
    dict(installed=()),
    dict(machine="riscv64"),
    dict(argv=()),
])
def test_reexec_plan_does_nothing(case):
    assert plan(**case) is None


def test_opt_out_zero_means_no_opt_out():
    assert plan({blas.OPT_OUT: "0"}) is not None


def test_install_hint_only_when_nothing_is_installed():
    hint = blas.openblas_hint({}, "Linux", "x86_64", exists=lambda p: False)
    assert hint is not None and "sudo apt install libopenblas0-pthread" in hint
    assert blas.openblas_hint({}, "Linux", "x86_64", exists=lambda p: str(p) == X86) is None
    assert blas.openblas_hint({"LD_PRELOAD": X86}, "Linux", "x86_64", exists=lambda p: False) is None
    assert blas.openblas_hint({}, "Darwin", "arm64", exists=lambda p: False) is None
    assert blas.openblas_hint({blas.OPT_OUT: "1"}, "Linux", "x86_64", exists=lambda p: False) is None


def test_hint_is_printed_once(monkeypatch, capsys):
    monkeypatch.setattr(blas, "openblas_hint", lambda: blas.INSTALL_HINT)
    monkeypatch.setattr(blas, "_hint_shown", False)
    blas.reexec_with_openblas()  # under pytest: never re-executes, prints the hint instead
    blas.print_openblas_hint()
    assert capsys.readouterr().err.count("libopenblas0-pthread") == 1
    blas.reexec_with_openblas(hint=False)
    assert capsys.readouterr().err == ""


def test_cpu_cache_limit_is_raised_never_lowered():
    before = mx.set_cache_limit(32 << 20)
    try:
        limit = blas.raise_cpu_cache_limit(0.25)
        assert limit == int(mx.get_memory_limit() * 0.25) > 32 << 20
        assert mx.set_cache_limit(limit) == limit
        assert blas.raise_cpu_cache_limit(0.25) is None  # already there
        mx.set_cache_limit(limit * 2)
        assert blas.raise_cpu_cache_limit(0.25) is None and mx.set_cache_limit(limit * 2) == limit * 2
    finally:
        mx.set_cache_limit(before)


def test_candidates_cover_debian_layouts():
    paths = [str(p) for p in blas.openblas_candidates("x86_64")]
    assert paths[0] == X86 and all(Path(p).name == "libblas.so.3" for p in paths)
    assert blas.openblas_candidates("sparc") == []


def test_blas_threads_follow_use_under_openblas():
    """Under an OpenBLAS (preloaded in a child process) `use(1)` sets one thread and `use(None)`
    puts back the count it started with; without one, `use` changes nothing."""
    import subprocess
    import sys

    code = ("from dmem_mlx.blas import BlasThreads; import ctypes; b = BlasThreads(); "
            "get = (lambda: ctypes.CDLL(None).openblas_get_num_threads()) if b.default else "
            "(lambda: None); seen = [get()]; b.use(1); seen.append(get()); b.use(None); "
            "seen.append(get()); print(b.default, *seen)")
    root = str(Path(__file__).resolve().parents[1])
    for preload in ([X86] if Path(X86).is_file() else []) + [""]:
        env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": root, "LD_PRELOAD": preload,
               "OPENBLAS_NUM_THREADS": "2"}
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                             text=True, timeout=120)
        assert out.returncode == 0, out.stderr[-500:]
        assert out.stdout.split() == (["2", "2", "1", "2"] if preload else ["None"] * 4)
