"""Run `mx.fast.metal_kernel` kernels without a Mac: the exact kernel source, wrapped in the
signature MLX generates around it, compiled as C++ under msl_shim.h and run over its grid.

A kernel is described by the arguments of `mx.fast.metal_kernel` (name, input_names,
output_names, source, header) and one call by the keyword arguments of the kernel call
(inputs, template, grid, threadgroup, output_shapes, output_dtypes).  `generate_source` ports
MLX's signature generation (mlx/backend/common/metal_kernel.cpp: `metal_kernel`,
`write_signature`, `write_template`, `make_template_hash`, v0.29–0.32), so the C++ compiler
sees the same text the Metal compiler would, minus MLX's utils preamble (replaced by the shim).

    program = compile_kernels([(KERNEL, launch), ...], workdir)   # one g++ run
    outputs = program.run(KERNEL, launch)                         # list of numpy arrays
"""

from __future__ import annotations

import itertools
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Iterable, NamedTuple

import mlx.core as mx
import numpy as np

SHIM_DIR = Path(__file__).resolve().parent
MAX_CONSTANT_ARRAY_SIZE = 8  # smaller inputs go to the `constant` address space
_exports = itertools.count()

# MLX's type strings, and how each dtype's bytes are read back here (bf16 as raw uint16).
TYPE_STRINGS = {
    mx.float32: "float", mx.float16: "float16_t", mx.bfloat16: "bfloat16_t",
    mx.bool_: "bool", mx.int8: "int8_t", mx.int16: "int16_t", mx.int32: "int32_t",
    mx.int64: "int64_t", mx.uint8: "uint8_t", mx.uint16: "uint16_t", mx.uint32: "uint32_t",
    mx.uint64: "uint64_t",
}
NUMPY_DTYPES = {
    mx.float32: np.float32, mx.float16: np.float16, mx.bfloat16: np.uint16, mx.bool_: np.bool_,
    mx.int8: np.int8, mx.int16: np.int16, mx.int32: np.int32, mx.int64: np.int64,
    mx.uint8: np.uint8, mx.uint16: np.uint16, mx.uint32: np.uint32, mx.uint64: np.uint64,
}

# MLX adds a parameter for each of these names that occurs anywhere in the source (in this
# order); the shim's driver models the ones mapped to a ThreadInfo field.
METAL_ATTRIBUTES = [
    ("dispatch_quadgroups_per_threadgroup", "uint"),
    ("dispatch_simdgroups_per_threadgroup", "uint"),
    ("dispatch_threads_per_threadgroup", "uint3"),
    ("grid_origin", "uint3"),
    ("grid_size", "uint3"),
    ("quadgroup_index_in_threadgroup", "uint"),
    ("quadgroups_per_threadgroup", "uint"),
    ("simdgroup_index_in_threadgroup", "uint"),
    ("simdgroups_per_threadgroup", "uint"),
    ("thread_execution_width", "uint"),
    ("thread_index_in_quadgroup", "uint"),
    ("thread_index_in_simdgroup", "uint"),
    ("thread_index_in_threadgroup", "uint"),
    ("thread_position_in_grid", "uint3"),
    ("thread_position_in_threadgroup", "uint3"),
    ("threadgroup_position_in_grid", "uint3"),
    ("threadgroups_per_grid", "uint3"),
    ("threads_per_grid", "uint3"),
    ("threads_per_simdgroup", "uint"),
    ("threads_per_threadgroup", "uint3"),
]
MODELLED_ATTRIBUTES = {
    "grid_size": "threads_per_grid",
    "thread_position_in_grid": "thread_position_in_grid",
    "thread_position_in_threadgroup": "thread_position_in_threadgroup",
    "threadgroup_position_in_grid": "threadgroup_position_in_grid",
    "threadgroups_per_grid": "threadgroups_per_grid",
    "threads_per_grid": "threads_per_grid",
}


class Buffer(NamedTuple):
    """One [[buffer(i)]] parameter: its C++ declaration type, how it is passed, its bytes."""

    ctype: str  # element type, e.g. "float"
    kind: str  # "pointer" | "reference" | "output"
    data: bytes  # inputs only


def _as_array(value: Any) -> mx.array:
    """A kernel input as MLX's `to_array` makes it: Python bool/int/float → bool/int32/float32."""
    return value if isinstance(value, mx.array) else mx.array(value)


def _to_numpy(x: mx.array) -> np.ndarray:
    if x.dtype == mx.bfloat16:
        x = x.view(mx.uint16)
    return np.ascontiguousarray(np.array(x))  # ensure_row_contiguous=True


def _template_value(arg: Any) -> tuple[str, str]:
    """(C++ parameter kind, value text) of one template argument, as MLX writes them."""
    if isinstance(arg, bool):  # before int: bool is an int in Python
        return "bool", str(int(arg))
    if isinstance(arg, int):
        return "int", str(arg)
    if isinstance(arg, mx.Dtype):
        return "typename", TYPE_STRINGS[arg]
    raise TypeError(f"template argument {arg!r} is not a Dtype, int or bool")


def generate_source(kernel: dict, launch: dict) -> tuple[str, str, list[Buffer], list[str]]:
    """(kernel_name, source with explicit instantiation, buffers in [[buffer]] order, attributes)
    exactly as MLX builds them for this call."""
    name, source = kernel["name"], kernel["source"]
    input_names, output_names = kernel["input_names"], kernel["output_names"]
    header = kernel.get("header", "")
    inputs = [_as_array(x) for x in launch["inputs"]]
    output_dtypes = launch["output_dtypes"]
    template = launch.get("template") or []
    if len(inputs) != len(input_names) or len(output_dtypes) != len(output_names):
        raise ValueError(f"{name}: inputs/outputs do not match the kernel's names")

    attributes = [(a, t) for a, t in METAL_ATTRIBUTES if a in source]
    unmodelled = [a for a, _ in attributes if a not in MODELLED_ATTRIBUTES]
    if unmodelled:
        raise NotImplementedError(f"{name}: the shim does not model {', '.join(unmodelled)}")

    kernel_name = "custom_kernel_" + name
    template_def = ""
    if template:
        template_def = "<" + ", ".join(_template_value(a)[1] for _, a in template) + ">"
        template_hash = template_def.replace("<", "_").replace(">", "_").replace(", ", "_")[:-1]
        kernel_name += "_" + template_hash
    for x in inputs:
        kernel_name += "_" + TYPE_STRINGS[x.dtype]
        if x.ndim == 0:
            kernel_name += "s"
        elif x.size < MAX_CONSTANT_ARRAY_SIZE:
            kernel_name += "c"
    for dtype in output_dtypes:
        kernel_name += "_" + TYPE_STRINGS[dtype]

    params, buffers = [], []
    for input_name, x in zip(input_names, inputs):
        location = "constant" if x.size < MAX_CONSTANT_ARRAY_SIZE else "device"
        ctype = TYPE_STRINGS[x.dtype]
        ref = "&" if x.ndim == 0 else "*"
        params.append(f"  const {location} {ctype}{ref} {input_name} [[buffer({len(buffers)})]]")
        buffers.append(Buffer(ctype, "reference" if x.ndim == 0 else "pointer",
                              _to_numpy(x).tobytes()))
        if x.ndim > 0:
            shape = np.array(x.shape, np.int32)
            strides = np.array([int(np.prod(x.shape[i + 1:])) for i in range(x.ndim)], np.int64)
            for suffix, ctype, ref, data in (("_shape", "int", "*", shape),
                                             ("_strides", "int64_t", "*", strides),
                                             ("_ndim", "int", "&", np.int32(x.ndim))):
                if input_name + suffix in source:
                    params.append(f"  const constant {ctype}{ref} {input_name}{suffix} "
                                  f"[[buffer({len(buffers)})]]")
                    buffers.append(Buffer(ctype, "pointer" if ref == "*" else "reference",
                                          data.tobytes()))
    for output_name, dtype in zip(output_names, output_dtypes):
        ctype = TYPE_STRINGS[dtype]
        params.append(f"  device {ctype}* {output_name} [[buffer({len(buffers)})]]")
        buffers.append(Buffer(ctype, "output", b""))
    params += [f"  {t} {a} [[{a}]]" for a, t in attributes]

    text = header
    if template:
        text += "template <" + ", ".join(
            f"{_template_value(a)[0]} {n}" for n, a in template) + ">\n"
    text += f"[[kernel]] void {kernel_name}(\n" + ",\n".join(params) + ") {\n"
    text += source + "\n}\n"
    if template:
        full = kernel_name + template_def
        text += (f'\ntemplate [[host_name("{kernel_name}")]] [[kernel]] decltype({full}) '
                 f"{full};\n")
    return kernel_name, text, buffers, [a for a, _ in attributes]


def mlx_generated_source(kernel: dict, launch: dict, workdir: Path) -> str | None:
    """The kernel source MLX itself generates for this call, or None if this MLX cannot.

    Without Metal, MLX (>= 0.32.4) still builds the source when the call is traced by
    `mx.export_function`; `verbose=True` makes it print the text on the C++ stdout.
    """
    arrays = [x for x in launch["inputs"] if isinstance(x, mx.array)]

    def call(*args):
        it = iter(args)
        inputs = [next(it) if isinstance(x, mx.array) else x for x in launch["inputs"]]
        return mx.fast.metal_kernel(**kernel)(**{**launch, "inputs": inputs}, verbose=True)

    sys.stdout.flush()
    with tempfile.TemporaryFile() as captured:
        saved = os.dup(1)
        os.dup2(captured.fileno(), 1)
        try:
            path = workdir / f"{kernel['name']}_{next(_exports)}.mlxfn"
            mx.export_function(str(path), call, *arrays)
        except (RuntimeError, ValueError):
            return None
        finally:
            os.dup2(saved, 1)
            os.close(saved)
        captured.seek(0)
        text = captured.read().decode()
    start = text.find("```\n")
    end = text.rfind("\n```")
    return text[start + 4:end] if 0 <= start < end else None


def _launcher(kernel_name: str, template_def: str, buffers: list[Buffer],
              attributes: list[str], barriers: bool) -> str:
    """C++ lambda calling the instantiated kernel for one thread with the driver's buffers."""
    args = []
    for i, b in enumerate(buffers):
        if b.kind == "pointer":
            args.append(f"(const {b.ctype}*)bufs[{i}]")
        elif b.kind == "reference":
            args.append(f"*(const {b.ctype}*)bufs[{i}]")
        else:
            args.append(f"({b.ctype}*)bufs[{i}]")
    args += [f"t.{MODELLED_ATTRIBUTES[a]}" for a in attributes]
    call = f"{kernel_name}{template_def}(\n        " + ",\n        ".join(args) + ")"
    return (f'  {{"{kernel_name}", [](void** bufs, const ThreadInfo& t) {{\n'
            f"      {call};\n    }}, {'true' if barriers else 'false'}}},\n")


class CompiledKernels:
    """The compiled program holding every kernel variant it was built for."""

    def __init__(self, binary: Path, workdir: Path, names: set[str]):
        self.binary, self.workdir, self.names = binary, workdir, names
        self._runs = 0

    def run(self, kernel: dict, launch: dict) -> list[np.ndarray]:
        """Run the kernel over launch["grid"] on the CPU.  Outputs: numpy, bf16 as uint16."""
        kernel_name, _, buffers, _ = generate_source(kernel, launch)
        if kernel_name not in self.names:
            raise KeyError(f"{kernel_name} was not among the launches compiled")
        self._runs += 1
        rundir = self.workdir / f"run{self._runs}"
        rundir.mkdir()
        n_in = sum(b.kind != "output" for b in buffers)
        for i, b in enumerate(buffers[:n_in]):
            (rundir / f"buf{i}.bin").write_bytes(b.data)
        out_types = [NUMPY_DTYPES[d] for d in launch["output_dtypes"]]
        out_bytes = [int(np.prod(s)) * np.dtype(t).itemsize
                     for s, t in zip(launch["output_shapes"], out_types)]
        argv = [str(self.binary), kernel_name, str(rundir), *map(str, launch["grid"]),
                *map(str, launch["threadgroup"]), str(n_in), *map(str, out_bytes)]
        # AddressSanitizer must be the first library loaded: drop any LD_PRELOAD (e.g. OpenBLAS).
        env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
        proc = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=300)
        if proc.returncode != 0:
            raise RuntimeError(f"{kernel_name} failed (exit {proc.returncode}):\n{proc.stderr}")
        return [np.fromfile(rundir / f"buf{n_in + j}.bin", dtype=t).reshape(s)
                for j, (s, t) in enumerate(zip(launch["output_shapes"], out_types))]


def compile_kernels(calls: Iterable[tuple[dict, dict]], workdir: Path) -> CompiledKernels:
    """Compile every distinct kernel variant of `calls` into one program, with one g++ run.

    Built with AddressSanitizer and UBSan: out-of-bounds accesses and undefined behaviour in a
    kernel abort the run.
    """
    compiler = shutil.which("g++")
    if compiler is None:
        raise FileNotFoundError("g++ not found")
    kernels, launchers = {}, []
    for kernel, launch in calls:
        kernel_name, text, buffers, attributes = generate_source(kernel, launch)
        if kernel_name in kernels:
            if kernels[kernel_name] != text:  # MLX too assumes one name, one source
                raise ValueError(f"two different sources named {kernel_name}")
            continue
        kernels[kernel_name] = text
        template = launch.get("template") or []
        template_def = ("<" + ", ".join(_template_value(a)[1] for _, a in template) + ">"
                        if template else "")
        barriers = "threadgroup_barrier" in kernel["source"]
        launchers.append(_launcher(kernel_name, template_def, buffers, attributes, barriers))
    program = ['#include "msl_shim.h"', '#include "driver.h"', ""]
    program += [f"// ---- {n} ----\n{t}" for n, t in kernels.items()]
    program += ["static const KernelEntry entries[] = {", *launchers, "};",
                "int main(int argc, char** argv) {",
                "  return driver_main(argc, argv, entries, sizeof(entries) / sizeof(entries[0]));",
                "}"]
    workdir.mkdir(parents=True, exist_ok=True)
    cpp, binary = workdir / "kernels.cpp", workdir / "kernels"
    cpp.write_text("\n".join(program) + "\n")
    cmd = [compiler, "-std=c++17", "-pthread", "-O1", "-g", "-Wall", "-Wno-attributes",
           "-Wno-unused-variable", "-fsanitize=address,undefined", "-fno-sanitize-recover=all",
           "-I", str(SHIM_DIR), str(cpp), "-o", str(binary)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise RuntimeError(f"g++ failed on {cpp}:\n{proc.stderr}")
    return CompiledKernels(binary, workdir, set(kernels))
