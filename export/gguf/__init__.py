"""GGUF export for llama.cpp: a converter written on the ``gguf`` package, llama.cpp's own
quantizer, LoRA adapters as GGUF, and parity checks through llama.cpp itself."""

from edgeft.export.gguf.export import GGUF_TYPES, GGUFExport, export_gguf, parse_types
from edgeft.export.gguf.lora import LoraExport, export_gguf_lora

__all__ = [
    "GGUF_TYPES",
    "GGUFExport",
    "LoraExport",
    "export_gguf",
    "export_gguf_lora",
    "parse_types",
]
