"""ONNX export for onnxruntime and onnxruntime-genai: optimum-onnx's KV-cache decoder, weight-only
int8/int4 and quantized embeddings, genai_config.json, and parity checks in both runtimes."""

from edgeft.export.onnx.export import OnnxExport, export_onnx, parse_types
from edgeft.export.onnx.quantize import ONNX_TYPES, QuantSettings

__all__ = ["ONNX_TYPES", "OnnxExport", "QuantSettings", "export_onnx", "parse_types"]
