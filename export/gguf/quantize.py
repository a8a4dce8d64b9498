"""GGUF quantization through llama.cpp's own quantizer (``llama_model_quantize``)."""

from __future__ import annotations

import ctypes
from pathlib import Path

import numpy as np

from edgeft.errors import ModelError
from edgeft.export.gguf.imatrix import Imatrix
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
    "iq4_xs": "LLAMA_FTYPE_MOSTLY_IQ4_XS",
    "iq3_m": "LLAMA_FTYPE_MOSTLY_IQ3_M",
    "iq3_s": "LLAMA_FTYPE_MOSTLY_IQ3_S",
    "q2_k": "LLAMA_FTYPE_MOSTLY_Q2_K",
}
# Types only worth making with an importance matrix: without one their few bits per weight
# go to columns the model's inputs barely drive (llama.cpp itself refuses the 2-bit i-quants
# and Q2_K_S without one; edgeft refuses these too).
NEEDS_IMATRIX = frozenset({"iq4_xs", "iq3_m", "iq3_s", "q2_k"})
# Types whose blocks ignore an importance matrix.
IGNORES_IMATRIX = frozenset({"q8_0"})


def quantize(
    src: Path,
    dst: Path,
    quant: str,
    *,
    threads: int,
    allow_requantize: bool = False,
    imatrix: Imatrix | None = None,
    metadata: dict[str, str | int] | None = None,
    require_imatrix: bool = True,
):
    """Quantize the GGUF ``src`` to ``quant`` at ``dst`` with llama.cpp's quantizer.

    ``src`` is bounds-checked first; llama.cpp validates every block it writes (NaN or inf
    scales fail the quantization), and the error names the tensor it was on. ``imatrix``
    weights each block's rounding error by its columns' importance (see
    :mod:`edgeft.export.gguf.imatrix`); ``metadata`` keys (strings or integers) are written
    into the output's header. ``require_imatrix=False`` makes the types of
    :data:`NEEDS_IMATRIX` without one (to measure what it buys).

    Raises:
        ModelError: unknown type, a type that needs an importance matrix without one, an
            importance matrix of another model, or llama.cpp refused (its message is in the
            log).
    """
    import llama_cpp

    from edgeft.gguf_file import read_gguf

    info = read_gguf(src)
    if quant not in QUANTIZED_TYPES:
        raise ModelError(
            f"unknown quantization {quant!r}; choose from {', '.join(QUANTIZED_TYPES)}"
        )
    if quant in NEEDS_IMATRIX and imatrix is None and require_imatrix:
        raise ModelError(
            f"{quant} needs an importance matrix: pass --imatrix auto (computed from "
            "--calibration or the fine-tuning data) or --imatrix FILE"
        )
    if imatrix is not None:
        imatrix.check_fits({t.name: t.shape for t in info.tensors}, str(src))
    quiet_logs()
    take_log_errors()
    take_log_tensor()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, QUANTIZED_TYPES[quant])
    params.nthread = threads
    params.allow_requantize = allow_requantize
    keep = []  # the C arrays must outlive the call
    if imatrix is not None and quant not in IGNORES_IMATRIX:
        entries = (llama_cpp.llama_model_imatrix_data * (len(imatrix.sums) + 1))()
        for entry, name in zip(entries, sorted(imatrix.sums), strict=False):
            values = np.ascontiguousarray(imatrix.values(name), dtype=np.float32)
            keep.append(values)
            entry.name = name.encode()
            entry.data = values.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
            entry.size = values.size
        params.imatrix = entries  # ends with an entry whose name is NULL
        keep.append(entries)
    if metadata:
        overrides = (llama_cpp.llama_model_kv_override * (len(metadata) + 1))()
        for override, (key, value) in zip(overrides, metadata.items(), strict=False):
            override.key = key.encode()
            if isinstance(value, int):
                override.tag = llama_cpp.LLAMA_KV_OVERRIDE_TYPE_INT
                override.value.val_i64 = value
            else:
                override.tag = llama_cpp.LLAMA_KV_OVERRIDE_TYPE_STR
                override.value.val_str = str(value).encode()[:127]
        params.kv_overrides = overrides  # ends with an empty key
        keep.append(overrides)
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

    from edgeft.gguf_file import read_gguf

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
