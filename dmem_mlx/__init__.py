"""δ-mem on Apple MLX: an online r×r memory per attention layer for mlx-lm models."""

from .config import ConfigError, DeltaMemConfig
from .model import DeltaMem, attach_delta_mem
from .utils import generate, load, stream_generate

__version__ = "0.1.0"
__all__ = ["load", "generate", "stream_generate", "attach_delta_mem", "DeltaMem",
           "DeltaMemConfig", "ConfigError", "__version__"]
