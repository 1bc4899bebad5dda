"""Load a repository script (benchmarks/, tools/) as a module: they are scripts, not package
modules, so tests import them by path."""

import importlib.util
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[1]


def load_script(relative: str) -> ModuleType:
    """The script at ROOT/relative (e.g. "benchmarks/bench_speed.py"), executed as a module."""
    path = ROOT / relative
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
