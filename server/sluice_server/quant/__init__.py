"""Quantized weights: one representation (`QuantizedWeight`, the layout Sluice's CPU kernel
reads) and a reader per checkpoint format that fills it (`gguf`, and `checkpoint` for AWQ and
GPTQ)."""

from .weight import CodeFormat, QuantizedWeight, concat_rows, pack_4bit

__all__ = ["CodeFormat", "QuantizedWeight", "concat_rows", "pack_4bit"]
