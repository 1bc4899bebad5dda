"""Hand-written Metal kernels for δ-mem: the prefill scan and the whole-layer decode token."""

from .metal import metal_layer_decode, metal_scan

__all__ = ["metal_layer_decode", "metal_scan"]
