"""Hand-written kernels for the δ-mem state update; see metal.py."""

from .metal import metal_available, metal_decode_step, metal_scan

__all__ = ["metal_available", "metal_decode_step", "metal_scan"]
