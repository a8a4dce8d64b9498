"""GGUF quantization through llama.cpp's own quantizer (``llama_model_quantize``)."""

from __future__ import annotations

import ctypes
from pathlib import Path

from edgeft.errors import ModelError
from edgeft.runtimes.llamacpp import quiet_logs, take_log_errors, take_log_tensor

# Full-precision GGUF types → numpy dtype of their stored values (BF16 as raw 16-bit words).
_FLOAT_TYPES = {"f32": "<f4", "f16": "<f2", "bf16": "<u2"}

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

    ``src`` is bounds-checked first; llama.cpp validates every block it writes (NaN or inf
    scales fail the quantization), and the error names the tensor it was on.

    Raises:
        ModelError: unknown type, or llama.cpp refused (its message is in the log).
    """
    import llama_cpp

    from edgeft.export.gguf.reader import read_gguf

    read_gguf(src)
    if quant not in QUANTIZED_TYPES:
        raise ModelError(
            f"unknown quantization {quant!r}; choose from {', '.join(QUANTIZED_TYPES)}"
        )
    quiet_logs()
    take_log_errors()
    take_log_tensor()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, QUANTIZED_TYPES[quant])
    params.nthread = threads
    params.allow_requantize = allow_requantize
    status = llama_cpp.llama_model_quantize(
        str(src).encode(), str(dst).encode(), ctypes.byref(params)
    )
    if status != 0:
        reason = take_log_errors() or f"status {status}"
        tensor = take_log_tensor()
        at = f" at tensor {tensor}" if tensor else ""
        raise ModelError(f"{src}: llama.cpp could not quantize to {quant}{at}: {reason}")


def check_finite(path: Path) -> None:
    """Raise unless every full-precision (F32, F16, BF16) tensor of a GGUF is finite.

    Read through a memory map one tensor at a time, after the bounds-checked reader has
    placed every tensor inside the file. Quantized tensors are left to llama.cpp's own
    validation.

    Raises:
        ModelError: a tensor holds NaN or inf (named).
    """
    import numpy as np

    from edgeft.export.gguf.reader import read_gguf

    info = read_gguf(path)
    data = np.memmap(path, dtype=np.uint8, mode="r")
    for tensor in info.tensors:
        dtype = _FLOAT_TYPES.get(tensor.type)
        if dtype is None:
            continue
        start = info.data_offset + tensor.offset
        values = data[start : start + tensor.nbytes].view(dtype)
        if tensor.type == "bf16":
            bad = ((values & 0x7F80) == 0x7F80).any()  # exponent all ones: inf or NaN
        else:
            bad = not np.isfinite(values).all()
        if bad:
            raise ModelError(
                f"{path}: tensor {tensor.name} has non-finite values (NaN or inf); the file is "
                "corrupt: export it again from the checkpoint"
            )
