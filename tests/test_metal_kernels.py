"""The Metal kernels, executed without a Mac: tests/metal_shim compiles the exact source strings
of dmem_mlx/kernels/metal.py, in the signature MLX generates, as C++ and runs every thread of
the grid; the outputs must match delta_mem.scan_reference / scan_step to ~1e-5.
On a Mac with Metal, the same kernels also run through MLX (test_on_metal_*)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zlib
from types import SimpleNamespace

import mlx.core as mx
import numpy as np
import pytest

from dmem_mlx.delta_mem import (
    MemoryInputs, normalize_heads, row_coefficients, scan_reference, scan_step)
from dmem_mlx.kernels import metal
from dmem_mlx.kernels.metal import DECODE_KERNEL, SCAN_KERNEL, decode_step_launch, scan_launch
from metal_shim.harness import compile_kernels, generate_source, mlx_generated_source

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
# (B, H, normalize_qk, state_update_mode, input dtype)
DECODE_CASES = [
    (1, 1, True, "standard", "f32"),
    (2, 4, True, "lambda_outside", "f32"),
    (2, 4, False, "no_lambda", "f32"),
    (1, 4, False, "standard", "f32"),
    (2, 4, True, "standard", "bf16"),
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


def make_decode_case(case):
    """(state, q_raw, k_raw, v, keep, erase, write) — deterministic per case."""
    B, H, _, mode, dtype = case
    rng = _rng(case)
    normal = lambda *s: mx.array(rng.normal(size=s), mx.float32)  # noqa: E731
    state = 0.5 * normal(B, H, RANK, RANK)
    q_raw, k_raw = 2.0 * normal(B, H, RANK), 2.0 * normal(B, H, RANK)
    if H > 1:
        k_raw[:, 1] = 0.0  # an all-zero head: the norm is clamped to 1e-6, k̃ = 0
    vectors = (q_raw, k_raw, normal(B, H, RANK), *_gates(rng, (B, H, RANK), mode, True))
    return (state, *(x.astype(DTYPES[dtype]) for x in vectors))


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
SKIPS_LAST_ROW = mutant(DECODE_KERNEL, "mutant_skips_last_row",
                        ("uint row", "if (i == r - 1) return;\n    uint row"))
READS_PAST_END = mutant(DECODE_KERNEL, "mutant_reads_past_end",
                        ("q[x + j]", "q[x + j + 1]"))
MUTANT_SCAN_CASE, MUTANT_DECODE_CASE = SCAN_CASES[4], DECODE_CASES[1]


def all_launches():
    calls = [(SCAN_KERNEL, scan_launch(*make_scan_case(c))) for c in SCAN_CASES]
    calls += [(DECODE_KERNEL, decode_step_launch(*make_decode_case(c), normalize_qk=c[2]))
              for c in DECODE_CASES]
    calls.append((SCAN_KERNEL, scan_launch(*spec_vector_scan())))
    calls += [(m, scan_launch(*make_scan_case(MUTANT_SCAN_CASE)))
              for m in (IGNORES_MASK, READS_AFTER_WRITE)]
    calls += [(m, decode_step_launch(*make_decode_case(MUTANT_DECODE_CASE)))
              for m in (SKIPS_LAST_ROW, READS_PAST_END)]
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


@pytest.mark.parametrize("case", DECODE_CASES, ids=case_id)
def test_decode_kernel_matches_scan_step(shim, case):
    state, q_raw, k_raw, v, keep, erase, write = make_decode_case(case)
    normalize = case[2]
    read, new_state = shim.run(
        DECODE_KERNEL, decode_step_launch(state, q_raw, k_raw, v, keep, erase, write, normalize))
    q, k = f32(q_raw), f32(k_raw)
    if normalize:
        q, k = normalize_heads(q), normalize_heads(k)
    ref_read, ref_state = scan_step(state, q, k, f32(v), f32(keep), f32(erase), f32(write))
    np.testing.assert_allclose(read, np.array(ref_read), **TOL)
    np.testing.assert_allclose(new_state, np.array(ref_state), **TOL)


def test_harness_catches_wrong_kernels(shim):
    state, inputs, valid = make_scan_case(MUTANT_SCAN_CASE)
    ref_reads, ref_state = scan_reference(state, inputs, valid)
    for wrong in (IGNORES_MASK, READS_AFTER_WRITE):
        reads, new_state = shim.run(wrong, scan_launch(state, inputs, valid))
        assert not np.allclose(reads, np.array(ref_reads), **TOL), wrong["name"]
    decode = decode_step_launch(*make_decode_case(MUTANT_DECODE_CASE))
    with pytest.raises(RuntimeError, match="no thread writes"):
        shim.run(SKIPS_LAST_ROW, decode)
    with pytest.raises(RuntimeError, match="AddressSanitizer: heap-buffer-overflow"):
        shim.run(READS_PAST_END, decode)


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
    decode = make_decode_case(DECODE_CASES[1])
    with pytest.raises(ValueError, match="state has shape"):
        decode_step_launch(decode[0][:1], *decode[1:])


def test_mixed_or_unsupported_dtypes_run_in_fp32():
    state, inputs, valid = make_scan_case(SCAN_CASES[4])
    mixed = inputs._replace(v=inputs.v.astype(mx.bfloat16))
    launch = scan_launch(state, mixed, valid)
    assert ("InT", mx.float32) in launch["template"]
    assert all(x.dtype == mx.float32 for x in launch["inputs"][:6])


@pytest.mark.skipif(metal.metal_available(), reason="this machine has Metal")
def test_without_metal_nothing_is_built_and_calls_fail_loudly():
    assert not metal.metal_available()
    probe = ("import dmem_mlx, dmem_mlx.scan, dmem_mlx.kernels.metal as m; "
             "print(m._kernel.cache_info().currsize)")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "0"  # importing builds no kernel
    with pytest.raises(RuntimeError, match="Metal"):
        mx.eval(metal.metal_scan(*make_scan_case(SCAN_CASES[4])))


@pytest.mark.skipif(not metal.metal_available(), reason="needs a Metal GPU")
@pytest.mark.parametrize("case", SCAN_CASES, ids=case_id)
def test_on_metal_scan(case):
    state, inputs, valid = make_scan_case(case)
    reads, new_state = metal.metal_scan(state, inputs, valid)
    ref_reads, ref_state = scan_reference(state, MemoryInputs(*map(f32, inputs)), valid)
    np.testing.assert_allclose(np.array(reads), np.array(ref_reads), **TOL)
    np.testing.assert_allclose(np.array(new_state), np.array(ref_state), **TOL)


@pytest.mark.skipif(not metal.metal_available(), reason="needs a Metal GPU")
@pytest.mark.parametrize("case", DECODE_CASES, ids=case_id)
def test_on_metal_decode_step(case):
    state, q_raw, k_raw, v, keep, erase, write = make_decode_case(case)
    read, new_state = metal.metal_decode_step(state, q_raw, k_raw, v, keep, erase, write, case[2])
    q, k = f32(q_raw), f32(k_raw)
    if case[2]:
        q, k = normalize_heads(q), normalize_heads(k)
    ref_read, ref_state = scan_step(state, q, k, f32(v), f32(keep), f32(erase), f32(write))
    np.testing.assert_allclose(np.array(read), np.array(ref_read), **TOL)
    np.testing.assert_allclose(np.array(new_state), np.array(ref_state), **TOL)
