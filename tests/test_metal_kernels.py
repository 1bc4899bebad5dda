"""The Metal kernels, executed without a Mac: tests/metal_shim compiles the exact source strings
of dmem_mlx/kernels/metal.py, in the signature MLX generates, as C++ and runs every thread of
the grid; the outputs must match delta_mem.scan_reference (the scan kernel) and
DeltaMemory.project → scan_reference → DeltaMemory.delta (the whole-layer decode kernel) to ~1e-5.
On a Mac with Metal, the same kernels also run through MLX (test_on_metal_*)."""

from __future__ import annotations

import collections
import io
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zlib
from pathlib import Path
from types import SimpleNamespace

import mlx.core as mx
import numpy as np
import pytest

from mlx.utils import tree_map

from dmem_mlx import scan as scan_module
from dmem_mlx.cache import make_prompt_cache
from dmem_mlx.config import DeltaMemConfig
from dmem_mlx.delta_mem import (
    DeltaMemory, MemoryInputs, normalize_heads, read_state, row_coefficients, scan_reference)
from dmem_mlx.kernels import metal
from dmem_mlx.kernels.metal import LAYER_DECODE_KERNEL, SCAN_KERNEL, layer_decode_launch, scan_launch
from dmem_mlx.model import attach_delta_mem, delta_parameters, load_delta_parameters
from dmem_mlx.tiny import build_model, tiny_args
from metal_shim.harness import compile_kernels, generate_source, mlx_generated_source

ROOT = Path(__file__).resolve().parents[1]
TOL = dict(rtol=1e-5, atol=1e-5)
MODES = ("standard", "lambda_outside", "no_lambda")
DTYPES = {"f32": mx.float32, "bf16": mx.bfloat16, "f16": mx.float16}

# (B, T, H, state_update_mode, mask with holes, rankwise gates, input dtype)
SCAN_CASES = [
    (B, T, H, MODES[n % 3], (B * T > 1) and n % 2 == 0, n % 4 != 3, "f32")
    for n, (B, H, T) in enumerate((B, H, T) for B in (1, 2) for H in (1, 4) for T in (1, 7, 64))
] + [
    (2, 7, 4, "standard", True, True, "bf16"),
    (2, 7, 2, "lambda_outside", True, False, "f16"),
    (1, 64, 4, "no_lambda", False, True, "bf16"),
]
RANK = 8


def case_id(case) -> str:
    return "-".join(str(x) for x in case)


def _rng(case) -> np.random.Generator:
    return np.random.default_rng(zlib.crc32(case_id(case).encode()))


def _gates(rng, shape, mode, rankwise):
    """(keep, erase, write) per row from random β, λ in (0, 1), as DeltaMemory.project does."""
    gate_shape = shape if rankwise else (*shape[:-1], 1)  # G = H: one scalar per head
    beta = mx.broadcast_to(mx.array(rng.uniform(0.05, 0.95, gate_shape), mx.float32), shape)
    lam = mx.broadcast_to(mx.array(rng.uniform(0.05, 0.95, gate_shape), mx.float32), shape)
    return row_coefficients(SimpleNamespace(state_update_mode=mode), beta, lam)


def make_scan_case(case):
    """(state, inputs in the case's dtype, valid or None) — deterministic per case."""
    B, T, H, mode, holes, rankwise, dtype = case
    rng = _rng(case)
    shape = (B, T, H, RANK)
    normal = lambda *s: mx.array(rng.normal(size=s), mx.float32)  # noqa: E731
    state = 0.5 * normal(B, H, RANK, RANK)
    q, k = normalize_heads(normal(*shape)), normalize_heads(normal(*shape))
    inputs = MemoryInputs(q, k, normal(*shape), *_gates(rng, shape, mode, rankwise))
    inputs = MemoryInputs(*(x.astype(DTYPES[dtype]) for x in inputs))
    valid = None
    if holes:
        mask = rng.uniform(size=(B, T)) < 0.7
        mask.flat[0], mask.flat[1] = True, False
        valid = mx.array(mask)
    return state, inputs, valid


# The whole-layer decode kernel, against DeltaMemory.project → scan_reference (or read_state)
# → DeltaMemory.delta on random parameters.
# (B, H, state_update_mode, couple_lambda, normalize_qk, rankwise_gates, delta_heads,
#  delta_o_rmsnorm, trainable_delta_scale, masked rows, input dtype, write, threads)
LAYER_CASES = [
    (1, 1, "standard", True, True, True, "q,o", False, "", False, "f32", True, 256),
    (2, 4, "lambda_outside", False, True, True, "q,k,v,o", True, "head", True, "f32", True, 256),
    (2, 4, "no_lambda", True, False, False, "q,k,v,o", False, "layer", False, "f32", True, 16),
    (2, 2, "standard", False, False, False, "o", True, "", True, "f32", True, 32),
    (2, 4, "standard", False, True, True, "q,k,v,o", True, "", True, "bf16", True, 64),
    (2, 4, "lambda_outside", True, True, True, "q,v", False, "", True, "f16", True, 64),
    (2, 4, "standard", False, True, True, "q,k,v,o", True, "", True, "f32", False, 64),
]
HIDDEN, OUT_DIMS = 40, {"q": 48, "k": 24, "v": 24, "o": 40}


def make_layer_case(case):
    """(memory with random parameters, h [B, 1, D], state, valid [B, 1] or None)."""
    B, H, mode, coupled, normalize, rankwise, heads, rmsnorm, scale, masked, dtype, _, _ = case
    cfg = DeltaMemConfig.from_dict({
        "rank": RANK, "num_state_heads": H, "state_update_mode": mode, "couple_lambda": coupled,
        "normalize_qk": normalize, "rankwise_gates": rankwise, "delta_heads": heads,
        "delta_o_rmsnorm": rmsnorm, "trainable_delta_scale": bool(scale),
        "delta_scale_granularity": scale or "layer"})
    rng = _rng(case)
    memory = DeltaMemory(cfg, HIDDEN, OUT_DIMS)
    memory.update(tree_map(
        lambda p: mx.array(rng.normal(scale=0.3, size=p.shape), mx.float32), memory.parameters()))
    if H > 1:  # an all-zero key head: its norm is clamped to 1e-6, k̃ = 0
        memory.memory_k_proj[RANK:2 * RANK] = 0.0
    if rmsnorm:
        memory.delta_o_rmsnorm_weight = mx.array(rng.uniform(0.5, 1.5, OUT_DIMS["o"]), mx.float32)
    h = mx.array(rng.normal(size=(B, 1, HIDDEN)), mx.float32).astype(DTYPES[dtype])
    state = 0.5 * mx.array(rng.normal(size=(B, H, RANK, RANK)), mx.float32)
    valid = mx.array([[True], [False]][:B]) if masked else None
    return memory, h, state, valid


def layer_launch(case, **overrides):
    memory, h, state, valid = make_layer_case(case)
    kwargs = dict(valid=valid, write=case[11], threads=case[12])
    return layer_decode_launch(memory, h, state, **{**kwargs, **overrides})


def layer_reference(case):
    """{head: Δ [B, 1, out] fp32}, new state: the readable path, one token."""
    memory, h, state, valid = make_layer_case(case)
    inputs = memory.project(h)
    if case[11]:
        reads, new_state = scan_reference(state, inputs, valid)
    else:
        reads, new_state = read_state(state, inputs.q, valid), state
    reads = reads.reshape(*reads.shape[:2], -1)
    return {x: memory.delta(x, reads) for x in memory.config.delta_heads}, new_state


def as_float(x: np.ndarray, dtype: str) -> np.ndarray:
    """A shim output in float32 (bf16 comes back as its raw uint16 bits)."""
    if dtype == "bf16":
        return (x.astype(np.uint32) << 16).view(np.float32)
    return x.astype(np.float32)


def rounded(x: mx.array, dtype: str) -> np.ndarray:
    return np.array(x.astype(DTYPES[dtype]).astype(mx.float32))


# The DESIGN §7 worked vector (r = 2, H = 1, rankwise, coupled λ, standard, S₀ = 0).
SPEC_RAW_Q = [[0.5, -1.0], [1.0, 0.2], [-0.3, 0.8]]
SPEC_RAW_K = [[1.0, 0.0], [0.4, 0.9], [-0.7, 0.1]]
SPEC_V = [[1.0, -2.0], [0.5, 0.5], [2.0, 1.0]]
SPEC_BETA = [[0.2, 0.5], [0.9, 0.1], [0.3, 0.3]]
SPEC_VALID = [[True, True, False]]
SPEC_READS = [[0.0, 0.0], [0.193604, -0.968020], [0.0, 0.0]]
SPEC_STATE = [[0.191343, 0.323023], [-0.854612, 0.085567]]


def spec_vector_scan():
    as_input = lambda x: mx.array(x, mx.float32).reshape(1, 3, 1, 2)  # noqa: E731
    beta = as_input(SPEC_BETA)
    q, k = normalize_heads(as_input(SPEC_RAW_Q)), normalize_heads(as_input(SPEC_RAW_K))
    inputs = MemoryInputs(q, k, as_input(SPEC_V), 1.0 - beta, beta, beta)
    return mx.zeros((1, 1, 2, 2)), inputs, mx.array(SPEC_VALID)


# Mutants: the harness must catch wrong kernels (if these passed, passing would prove nothing).
def mutant(kernel: dict, name: str, *edits: tuple[str, str]) -> dict:
    source = kernel["source"]
    for old, new in edits:
        assert old in source, old
        source = source.replace(old, new)
    return dict(kernel, name=name, source=source)


IGNORES_MASK = mutant(SCAN_KERNEL, "mutant_ignores_mask",
                      ("if (valid[b * T + t])", "if (true || valid[b * T + t])"))
READS_AFTER_WRITE = mutant(
    SCAN_KERNEL, "mutant_reads_after_write",
    ("read += s[j] * static_cast<float>(q[x + j]);", ""),
    ("reads[x + i] = read;",
     "for (int j = 0; j < r; ++j) read += s[j] * static_cast<float>(q[x + j]);\n"
     "      reads[x + i] = valid[b * T + t] ? read : 0.0f;"))
SKIPS_LAST_ROW = mutant(LAYER_DECODE_KERNEL, "mutant_skips_last_row",
                        ("if (g == 0) {", "if (g == 0 && row != R - 1) {"))
READS_PAST_END = mutant(LAYER_DECODE_KERNEL, "mutant_reads_past_end",
                        ("reads[n] * w_out[n * O + start + o];\n      }\n      ss",
                         "reads[n] * w_out[n * O + start + o + 1];\n      }\n      ss"))
# the reads of other threads used before they are all written
NO_BARRIER_BEFORE_CORRECTIONS = mutant(
    LAYER_DECODE_KERNEL, "mutant_no_barrier_before_corrections",
    ("    threadgroup_barrier(mem_flags::mem_threadgroup);\n\n    // 3.", "\n    // 3."))
ERASES_WITH_LAMBDA = mutant(LAYER_DECODE_KERNEL, "mutant_erases_with_lambda",
                            ("Mode == 1 ? lam * beta : beta", "lam * beta"))
MUTANT_SCAN_CASE = SCAN_CASES[4]
MUTANT_LAYER_CASE = LAYER_CASES[3]


def all_launches():
    calls = [(SCAN_KERNEL, scan_launch(*make_scan_case(c))) for c in SCAN_CASES]
    calls.append((SCAN_KERNEL, scan_launch(*spec_vector_scan())))
    calls += [(m, scan_launch(*make_scan_case(MUTANT_SCAN_CASE)))
              for m in (IGNORES_MASK, READS_AFTER_WRITE)]
    calls += [(LAYER_DECODE_KERNEL, layer_launch(c)) for c in LAYER_CASES]
    calls += [(m, layer_launch(MUTANT_LAYER_CASE))
              for m in (NO_BARRIER_BEFORE_CORRECTIONS, ERASES_WITH_LAMBDA, SKIPS_LAST_ROW,
                        READS_PAST_END)]
    return calls


@pytest.fixture(scope="session")
def shim(tmp_path_factory):
    """Every kernel variant the tests launch, compiled once (g++, AddressSanitizer + UBSan)."""
    if shutil.which("g++") is None:
        pytest.skip("g++ not found: the Metal kernel harness compiles the kernels as C++")
    return compile_kernels(all_launches(), tmp_path_factory.mktemp("metal_shim"))


def f32(x: mx.array) -> mx.array:
    return x.astype(mx.float32)


@pytest.mark.parametrize("case", SCAN_CASES, ids=case_id)
def test_scan_kernel_matches_reference(shim, case):
    state, inputs, valid = make_scan_case(case)
    reads, new_state = shim.run(SCAN_KERNEL, scan_launch(state, inputs, valid))
    ref_reads, ref_state = scan_reference(state, MemoryInputs(*map(f32, inputs)), valid)
    np.testing.assert_allclose(reads, np.array(ref_reads), **TOL)
    np.testing.assert_allclose(new_state, np.array(ref_state), **TOL)
    if valid is not None:  # padding tokens read exactly 0
        assert np.all(reads[~np.array(valid)] == 0.0)
    assert np.abs(reads).max() > 0.01  # the state was actually read


def test_scan_kernel_reproduces_spec_worked_vector(shim):
    """DESIGN §7 with r = 2: the template rank, the read-before-write order and a masked token."""
    reads, new_state = shim.run(SCAN_KERNEL, scan_launch(*spec_vector_scan()))
    np.testing.assert_allclose(reads.reshape(3, 2), SPEC_READS, atol=2e-6)
    np.testing.assert_allclose(new_state.reshape(2, 2), SPEC_STATE, atol=2e-6)


@pytest.mark.parametrize("case", LAYER_CASES, ids=case_id)
def test_layer_decode_kernel_matches_the_readable_layer(shim, case):
    """Projection, gates, read, write and every correction of one token, in one launch."""
    launch = layer_launch(case)
    deltas, new_state = shim.run(LAYER_DECODE_KERNEL, launch)
    dtype = case[10]
    deltas = as_float(deltas, dtype)
    ref_deltas, ref_state = layer_reference(case)
    tol = TOL if dtype == "f32" else dict(rtol=2 ** -7, atol=1e-3)  # one bf16/f16 rounding
    start = 0
    for head, ref in ref_deltas.items():
        width = ref.shape[-1]
        got = deltas[..., start:start + width]
        np.testing.assert_allclose(got, rounded(ref, dtype), **tol, err_msg=head)
        assert np.abs(got).max() > 0.01, head  # the memory was actually read
        start += width
    assert start == deltas.shape[-1]
    np.testing.assert_allclose(new_state, np.array(ref_state), **TOL)
    if case[9]:  # the padding row reads 0 and keeps its state exactly
        assert np.all(deltas[1] == 0.0)
        np.testing.assert_array_equal(new_state[1], np.array(make_layer_case(case)[2][1]))
    if not case[11]:
        np.testing.assert_array_equal(new_state, np.array(make_layer_case(case)[2]))


def test_layer_decode_launch_checks_its_inputs():
    memory, h, state, valid = make_layer_case(LAYER_CASES[1])
    with pytest.raises(ValueError, match="state has shape"):
        layer_decode_launch(memory, h, state[:, :2])
    with pytest.raises(ValueError, match="h has shape"):
        layer_decode_launch(memory, mx.concatenate([h, h], axis=1), state)
    with pytest.raises(ValueError, match="valid has shape"):
        layer_decode_launch(memory, h, state, valid=mx.ones((3, 1)))
    with pytest.raises(ValueError, match="threadgroup memory"):
        layer_decode_launch(memory, h, state, threads=16384)
    launch = layer_decode_launch(memory, h, state)
    assert launch["inputs"][5] is memory.fused_weights()["out"]  # concatenated once, kept


def test_harness_catches_wrong_kernels(shim):
    state, inputs, valid = make_scan_case(MUTANT_SCAN_CASE)
    ref_reads, ref_state = scan_reference(state, inputs, valid)
    for wrong in (IGNORES_MASK, READS_AFTER_WRITE):
        reads, new_state = shim.run(wrong, scan_launch(state, inputs, valid))
        assert not np.allclose(reads, np.array(ref_reads), **TOL), wrong["name"]
    layer = layer_launch(MUTANT_LAYER_CASE)
    with pytest.raises(RuntimeError, match="no thread writes"):
        shim.run(SKIPS_LAST_ROW, layer)
    with pytest.raises(RuntimeError, match="AddressSanitizer: heap-buffer-overflow"):
        shim.run(READS_PAST_END, layer)
    with pytest.raises(RuntimeError, match="differs between the two runs"):
        shim.run(NO_BARRIER_BEFORE_CORRECTIONS, layer)
    _, ref_state = layer_reference(MUTANT_LAYER_CASE)
    _, new_state = shim.run(ERASES_WITH_LAMBDA, layer)
    assert not np.allclose(new_state, np.array(ref_state), **TOL)


def test_harness_signature_is_the_one_mlx_generates(tmp_path):
    """The C++ harness compiles its own port of MLX's signature generation; where this MLX can
    print the source it would hand the Metal compiler (export tracing, no Metal needed), every
    launch of this file must produce identical text."""
    compared = 0
    for kernel, launch in all_launches():
        expected = mlx_generated_source(kernel, launch, tmp_path)
        if expected is None:
            pytest.skip("this MLX cannot generate a metal_kernel source without Metal")
        assert generate_source(kernel, launch)[1] == expected
        compared += 1
    assert compared == len(all_launches())


def test_launch_checks_shapes():
    state, inputs, valid = make_scan_case(SCAN_CASES[4])
    with pytest.raises(ValueError, match="keep has shape"):
        scan_launch(state, inputs._replace(keep=inputs.keep[:, :, :1]), valid)
    with pytest.raises(ValueError, match="valid has shape"):
        scan_launch(state, inputs, valid[:, :2])


def test_mixed_or_unsupported_dtypes_run_in_fp32():
    state, inputs, valid = make_scan_case(SCAN_CASES[4])
    mixed = inputs._replace(v=inputs.v.astype(mx.bfloat16))
    launch = scan_launch(state, mixed, valid)
    assert ("InT", mx.float32) in launch["template"]
    assert all(x.dtype == mx.float32 for x in launch["inputs"][:6])


@pytest.mark.skipif(scan_module.metal_available(), reason="this machine has Metal")
def test_without_metal_nothing_is_built_and_calls_fail_loudly():
    assert not scan_module.metal_available()
    probe = ("import dmem_mlx, dmem_mlx.scan, dmem_mlx.kernels.metal as m; "
             "print(m._kernel.cache_info().currsize)")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "0"  # importing builds no kernel
    with pytest.raises(RuntimeError, match="Metal"):
        mx.eval(metal.metal_scan(*make_scan_case(SCAN_CASES[4])))


@pytest.mark.skipif(scan_module.metal_available(), reason="this machine has Metal")
def test_without_metal_the_metal_backend_is_refused_in_one_line(tmp_path):
    from dmem_mlx.errors import ConfigError
    from dmem_mlx.tiny import make_tiny_dmem

    path = make_tiny_dmem(tmp_path / "tiny")
    env = {**os.environ, "DMEM_BACKEND": "metal", "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-m", "dmem_mlx.generate", "--model", str(path),
                          "-p", "Hi"], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 1 and out.stdout == ""
    assert out.stderr.count("\n") == 1 and "needs a Metal GPU" in out.stderr, out.stderr
    model = build_model(tiny_args("qwen3"), 0)
    attach_delta_mem(model, DeltaMemConfig())
    with pytest.raises(ConfigError, match="needs a Metal GPU"):
        model.delta_mem.backend = "metal"
    assert model.delta_mem.backend == "auto" and scan_module.resolve("auto") == "chunked"


@pytest.mark.skipif(not scan_module.metal_available(), reason="needs a Metal GPU")
@pytest.mark.parametrize("case", SCAN_CASES, ids=case_id)
def test_on_metal_scan(case):
    state, inputs, valid = make_scan_case(case)
    reads, new_state = metal.metal_scan(state, inputs, valid)
    ref_reads, ref_state = scan_reference(state, MemoryInputs(*map(f32, inputs)), valid)
    np.testing.assert_allclose(np.array(reads), np.array(ref_reads), **TOL)
    np.testing.assert_allclose(np.array(new_state), np.array(ref_state), **TOL)


@pytest.mark.skipif(not scan_module.metal_available(), reason="needs a Metal GPU")
@pytest.mark.parametrize("case", LAYER_CASES, ids=case_id)
def test_on_metal_layer_decode(case):
    memory, h, state, valid = make_layer_case(case)
    deltas, new_state = metal.metal_layer_decode(memory, h, state, valid, write=case[11])
    ref_deltas, ref_state = layer_reference(case)
    tol = TOL if case[10] == "f32" else dict(rtol=2 ** -7, atol=1e-3)
    for head, ref in ref_deltas.items():
        np.testing.assert_allclose(np.array(deltas[head].astype(mx.float32)),
                                   rounded(ref, case[10]), **tol, err_msg=head)
    np.testing.assert_allclose(np.array(new_state), np.array(ref_state), **TOL)


# -- what a decode token costs on the Metal path -------------------------------------------------

def dot_graph(*outputs: mx.array) -> tuple[dict, dict, dict]:
    """(primitive node → label, primitive → its output arrays, array → the primitives consuming
    it) of the graph MLX would run for `outputs` (from mx.export_to_dot)."""
    dot = io.StringIO()
    mx.export_to_dot(dot, *outputs)
    text = dot.getvalue()
    labels = dict(re.findall(r'\{ (\d+) \[label ="(\w+)", shape=rectangle\]; \}', text))
    produces, consumers = collections.defaultdict(list), collections.defaultdict(list)
    for a, b in re.findall(r'^"?(\w+)"? -> "?(\w+)"?$', text, re.MULTILINE):
        if a in labels:
            produces[a].append(b)
        else:
            consumers[a].append(b)
    return labels, produces, consumers


def delta_primitives(labels, produces, consumers) -> collections.Counter:
    """The primitives the δ layers add around their custom kernels: each kernel, what feeds only
    kernels, and the views of their outputs up to the additions into the backbone's arrays."""
    ours = {n for n, label in labels.items() if label == "CustomKernel"}
    grown = True
    while grown:  # producers whose every output feeds only what is already ours
        grown = False
        for node in labels.keys() - ours:
            outs = produces[node]
            if outs and all(consumers[x] and set(consumers[x]) <= ours for x in outs):
                ours.add(node)
                grown = True
    frontier = [x for n in ours if labels[n] == "CustomKernel" for x in produces[n]]
    while frontier:  # downstream: views of the outputs, then the additions they end in
        users = {u for x in frontier for u in consumers[x]} - ours
        ours |= users
        frontier = [x for u in users if labels[u] != "Add" for x in produces[u]]
    return collections.Counter(labels[n] for n in ours)


def test_metal_decode_is_one_kernel_per_layer(monkeypatch):
    """A decode token on the Metal backend, traced (no Metal here: `mx.export_function` builds
    the graph without running it): per δ layer one kernel dispatch does the projection, the
    state update and every correction; around it only views of its output and the additions
    of Δq and Δo into the projections."""
    monkeypatch.setattr(scan_module, "metal_available", lambda: True)
    model = build_model(tiny_args("qwen3"), 0)
    attach_delta_mem(model, DeltaMemConfig.from_dict({"delta_heads": ["q", "o"]}))
    rng = np.random.default_rng(1)
    load_delta_parameters(model, {
        k: mx.array(rng.normal(scale=0.1, size=v.shape).astype(np.float32))
        for k, v in delta_parameters(model).items()})
    state = model.delta_mem.new_state()
    cache = make_prompt_cache(model, state)
    model.delta_mem.backend = "reference"  # the prompt, on this machine
    mx.eval(model(mx.array([[1, 2, 3]]), cache=cache), [c.state for c in cache])
    mx.eval(list(state.layers.values()))
    for layer in model.delta_mem.layers.values():  # the concatenated δ weights, made once
        weights = layer.memory.fused_weights()
        layer_decode_launch(layer.memory, mx.zeros((1, 1, 64)), mx.zeros((1, 1, RANK, RANK)),
                            weights=weights)
        mx.eval(weights)
    model.delta_mem.backend = "metal"
    graphs = []

    def decode(ids):
        logits = model(ids, cache=cache)
        graphs.append(dot_graph(logits, *state.layers.values()))
        return logits

    with tempfile.TemporaryDirectory() as tmp:
        try:
            mx.export_function(str(Path(tmp) / "decode.mlxfn"), decode, mx.array([[4]]))
        except RuntimeError as exc:  # MLX < 0.32.4 cannot trace a Metal kernel without Metal
            if graphs or "Metal" not in str(exc):
                raise
            pytest.skip(f"this MLX cannot trace a metal_kernel here: {exc}")
    layers = len(model.delta_mem.layers)
    added = delta_primitives(*graphs[0])
    assert added == {"CustomKernel": layers, "Slice": 2 * layers, "Add": 2 * layers}, added
