"""δ-mem on Apple MLX: an online r×r memory per attention layer for mlx-lm models.

The public names are loaded on first use (PEP 562), so `import dmem_mlx.config` or the memory
file module stays light: neither mlx-lm nor transformers is imported until a name needs it.
"""

from __future__ import annotations

import sys
from types import ModuleType
from typing import Any

from .lazy import lazy_exports

__version__ = "0.1.0"

# public name → the submodule defining it
_EXPORTS = {
    "load": "utils",
    "generate": "generate",
    "stream_generate": "generate",
    "attach_delta_mem": "model",
    "DeltaMem": "model",
    "DeltaMemConfig": "config",
    "ConfigError": "config",
    "DmemError": "errors",
    "sharded_load": "distributed",
    "pipeline_load": "distributed",
}
__all__ = [*_EXPORTS, "__version__"]


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)


class _Package(ModuleType):
    """`dmem_mlx.generate` is the function, as `mlx_lm.generate` is.

    Importing a submodule binds it on its package under its own name; the submodule
    `dmem_mlx.generate` would then hide the function `generate`. The binding is skipped for the
    names exported here (the submodule stays reachable through sys.modules, `from
    dmem_mlx.generate import main` and `python -m dmem_mlx.generate`).
    """

    def __setattr__(self, name: str, value: Any) -> None:
        if isinstance(value, ModuleType) and _EXPORTS.get(name) == name:
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
