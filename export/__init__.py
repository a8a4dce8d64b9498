"""Exporters: a merged checkpoint to the files edge runtimes load, one sub-package per format.

Each format's module is imported only when used, so a missing optional dependency matters only
to the format that needs it.
"""

# format name → module under edgeft.export. Later formats add rows here.
FORMATS = {"gguf": "gguf", "onnx": "onnx"}
