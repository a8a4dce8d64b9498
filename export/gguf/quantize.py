"""GGUF quantization through llama.cpp's own quantizer (``llama_model_quantize``)."""

from __future__ import annotations

import ctypes
from pathlib import Path

from edgeft.errors import ModelError
from edgeft.runtimes.llamacpp import quiet_logs, take_log_errors

# edgeft name → llama.cpp ftype constant name in llama_cpp.
QUANTIZED_TYPES = {
    "q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0",
    "q6_k": "LLAMA_FTYPE_MOSTLY_Q6_K",
    "q5_k_m": "LLAMA_FTYPE_MOSTLY_Q5_K_M",
    "q4_k_m": "LLAMA_FTYPE_MOSTLY_Q4_K_M",
    "q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0",
}


def quantize(src: Path, dst: Path, quant: str, *, threads: int, allow_requantize: bool = False):
    """Quantize the GGUF ``src`` to ``quant`` at ``dst`` with llama.cpp's quantizer.

    Raises:
        ModelError: unknown type, or llama.cpp refused (its message is in the log).
    """
    import llama_cpp

    if quant not in QUANTIZED_TYPES:
        raise ModelError(
            f"unknown quantization {quant!r}; choose from {', '.join(QUANTIZED_TYPES)}"
        )
    quiet_logs()
    take_log_errors()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, QUANTIZED_TYPES[quant])
    params.nthread = threads
    params.allow_requantize = allow_requantize
    status = llama_cpp.llama_model_quantize(
        str(src).encode(), str(dst).encode(), ctypes.byref(params)
    )
    if status != 0:
        reason = take_log_errors() or f"status {status}"
        raise ModelError(f"{src}: llama.cpp could not quantize to {quant}: {reason}")
