"""Importance matrices for GGUF quantization, computed from calibration text in PyTorch.

llama.cpp's k-quants and i-quants pick each block's scales to minimise the weighted squared
error ``sum_j w_j (W_ij - Q_ij)^2`` of a weight row, and with an importance matrix ``w_j`` is
the mean square of input column ``j``'s activation over calibration text: the columns the
model's inputs actually drive are kept more exactly. ``llama-imatrix`` measures it by running
text through llama.cpp; here the same statistic (sum of ``x_j^2`` over every token, and the
token count) is gathered at each Linear of the decoder layers of the checkpoint itself, one
layer at a time, and mapped to the GGUF tensor names the converter writes.

Files are written in llama.cpp's own imatrix format (a GGUF with ``general.type = imatrix``,
``<tensor>.in_sum2`` and ``<tensor>.counts`` per weight, ``imatrix.datasets``,
``imatrix.chunk_count``, ``imatrix.chunk_size``), so ``llama-quantize --imatrix`` takes them;
both that format and the older ``.dat`` one are read back.
"""

from __future__ import annotations

import random
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edgeft.errors import EdgeftError, ModelError

SUM2, COUNTS = ".in_sum2", ".counts"
# Calibration tokens by default: a per-column mean square settles within a few thousand tokens
# (a 2-core CPU runs SmolLM2-135M over 8192 of them in about 15 s).
IMATRIX_TOKENS = 8192


@dataclass
class Imatrix:
    """Per GGUF weight name: the sum of squared input activations per input column (float64
    while gathered) and the number of tokens summed."""

    sums: dict[str, np.ndarray]
    counts: dict[str, int]
    chunks: int
    chunk_size: int
    datasets: list[str] = field(default_factory=list)

    def values(self, name: str) -> np.ndarray:
        """The importance of ``name``'s input columns: the mean squared activation."""
        return (self.sums[name] / max(self.counts[name], 1)).astype(np.float32)

    def check_fits(self, shapes: dict[str, tuple[int, ...]], source: str) -> None:
        """Raise unless every entry names a weight of the model with that many input columns
        (``shapes``: GGUF tensor name → GGUF shape, fastest dimension first), and some do."""
        for name, sums in self.sums.items():
            shape = shapes.get(name)
            if shape is None:
                raise ModelError(
                    f"{source}: importance matrix entry {name} is not a tensor of the model; "
                    "it was computed for another architecture"
                )
            if shape[0] != sums.shape[0]:
                raise ModelError(
                    f"{source}: importance matrix entry {name} has {sums.shape[0]} columns, "
                    f"the tensor has {shape[0]}; it was computed for another model size"
                )
        if not self.sums:
            raise ModelError(f"{source}: the importance matrix has no entries")


def gguf_linear_names(model_dir: Path):
    """A function from checkpoint Linear module name (``model.layers.0.self_attn.q_proj``) to
    GGUF weight name (``blk.0.attn_q.weight``), as the converter names them."""
    import gguf

    from edgeft.export.gguf.convert import read_model_spec

    spec = read_model_spec(model_dir)
    arch = next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == spec.architecture.gguf_arch)
    names = gguf.get_tensor_name_map(arch, spec.n_layer)

    def name(module: str) -> str:
        found = names.get_name(f"{module}.weight", try_suffixes=(".weight",))
        if found is None:
            raise ModelError(
                f"{model_dir}: Linear {module} has no llama.cpp equivalent in "
                f"{spec.architecture.gguf_arch}"
            )
        return found

    return name


def collect(
    model_dir: Path,
    texts: Sequence[str],
    *,
    datasets: Sequence[str] = (),
    tokens: int | None = None,
) -> Imatrix:
    """The importance matrix of ``model_dir``'s decoder Linears over ``texts``.

    The texts, in a fixed shuffled order, are tokenized and cut into chunks of
    :data:`~edgeft.calibration.CHUNK_TOKENS`, up to ``tokens`` in all (default
    :data:`IMATRIX_TOKENS`, fewer for big models: the GPTQ calibration budget). A
    model larger than its share of memory is streamed: one decoder layer's weights at a time.

    Raises:
        EdgeftError: fewer than 64 calibration tokens.
    """
    import torch
    from transformers import AutoModelForCausalLM

    from edgeft.calibration import CHUNK_TOKENS, calibration_budget, calibration_ids
    from edgeft.isolate import trim_memory
    from edgeft.streaming import (
        CALIBRATION_RESIDENT_SHARE,
        _layer_list,
        decoder_inputs,
        held,
        should_stream,
        streamed_model,
    )
    from edgeft.weights import checkpoint_params

    model_dir = Path(model_dir)
    if tokens is None:
        tokens = min(IMATRIX_TOKENS, calibration_budget(checkpoint_params(model_dir)))
    # rows from all over the data, not its first few: a fixed shuffle
    chunks = calibration_ids(model_dir, random.Random(0).sample(list(texts), len(texts)), tokens)
    if should_stream(model_dir, CALIBRATION_RESIDENT_SHARE):
        model = streamed_model(model_dir)
    else:
        model = AutoModelForCausalLM.from_pretrained(
            model_dir, dtype=torch.float32, use_safetensors=True, trust_remote_code=False
        ).eval()
    names = gguf_linear_names(model_dir)
    prefix, layers = _layer_list(model)
    inputs, layer_kwargs = decoder_inputs(model, chunks)
    sums: dict[str, np.ndarray] = {}
    counts: dict[str, int] = {}
    for index in range(len(layers)):
        with held(layers[index]) as layer, torch.inference_mode():
            hooks, last = [], []
            for name, module in layer.named_modules():
                if isinstance(module, torch.nn.Linear):
                    gguf_name = names(f"{prefix}.{index}.{name}")
                    hook = _accumulate(gguf_name, sums, counts, last)
                    hooks.append(module.register_forward_pre_hook(hook))
            try:
                outputs = [layer(x, **k) for x, k in zip(inputs, layer_kwargs[index], strict=True)]
            finally:
                for hook in hooks:
                    hook.remove()
        inputs = [out[0] if isinstance(out, tuple) else out for out in outputs]
        layer_kwargs[index] = []
        trim_memory()
    return Imatrix(
        sums=sums,
        counts=counts,
        chunks=len(chunks),
        chunk_size=CHUNK_TOKENS,
        datasets=list(datasets),
    )


def _accumulate(name: str, sums: dict, counts: dict, last: list):
    """A forward pre-hook adding the squares of a Linear's input columns to ``sums[name]``;
    Linears that read the same tensor (q, k and v; gate and up) share one computation."""

    def hook(_module, args):
        x = args[0]
        if last and last[0] is x:
            squares, tokens = last[1], last[2]
        else:
            flat = x.detach().reshape(-1, x.shape[-1])
            squares, tokens = (flat * flat).sum(dim=0).double().numpy(), flat.shape[0]
            last[:] = [x, squares, tokens]
        if name in sums:
            sums[name] += squares
            counts[name] += tokens
        else:
            sums[name], counts[name] = squares.copy(), tokens

    return hook


def write_imatrix(imatrix: Imatrix, path: Path) -> None:
    """``imatrix`` as llama.cpp's GGUF imatrix file at ``path``."""
    import gguf

    writer = gguf.GGUFWriter(str(path), arch="")
    # llama-imatrix's files have no architecture key; gguf-py's writer always adds one
    writer.kv_data[0].pop(gguf.Keys.General.ARCHITECTURE, None)
    writer.add_type("imatrix")
    writer.add_array("imatrix.datasets", list(imatrix.datasets) or ["unknown"])
    writer.add_uint32("imatrix.chunk_count", imatrix.chunks)
    writer.add_uint32("imatrix.chunk_size", imatrix.chunk_size)
    for name in sorted(imatrix.sums):
        writer.add_tensor(name + SUM2, imatrix.sums[name].astype(np.float32).reshape(1, -1))
        writer.add_tensor(name + COUNTS, np.array([[imatrix.counts[name]]], dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def read_imatrix(path: Path) -> Imatrix:
    """An imatrix file as ``llama-imatrix`` writes it (GGUF, or the older ``.dat``), or as
    :func:`write_imatrix` does. Every length is checked against the file.

    Raises:
        EdgeftError: not an imatrix file, or a truncated or inconsistent one (named).
    """
    path = Path(path)
    try:
        with path.open("rb") as f:
            magic = f.read(4)
    except OSError as exc:
        raise EdgeftError(f"{path}: cannot read the importance matrix: {exc}") from exc
    return _read_gguf_imatrix(path) if magic == b"GGUF" else _read_dat_imatrix(path)


def _read_gguf_imatrix(path: Path) -> Imatrix:
    from edgeft.gguf_file import read_gguf

    info = read_gguf(path, keep_arrays=True)
    if info.metadata.get("general.type") != "imatrix":
        raise EdgeftError(
            f"{path}: a GGUF file but not an importance matrix (general.type is "
            f"{info.metadata.get('general.type')!r}, not 'imatrix')"
        )
    data = np.memmap(path, dtype=np.uint8, mode="r")
    tensors = {t.name: t for t in info.tensors}
    sums: dict[str, np.ndarray] = {}
    counts: dict[str, int] = {}
    for tensor in info.tensors:
        if not tensor.name.endswith(SUM2):
            continue
        name = tensor.name[: -len(SUM2)]
        count = tensors.get(name + COUNTS)
        if count is None or tensor.type != "f32" or count.type != "f32":
            raise EdgeftError(f"{path}: entry {name} lacks an F32 {COUNTS} or {SUM2} tensor")
        columns, matrices = tensor.shape[0], int(np.prod(tensor.shape[1:], dtype=np.int64))
        if matrices != 1:
            raise EdgeftError(
                f"{path}: entry {name} holds {matrices} matrices (experts); edgeft's models "
                "have none"
            )
        sums[name] = _f32(data, info.data_offset + tensor.offset, columns).astype(np.float64)
        counts[name] = int(_f32(data, info.data_offset + count.offset, 1)[0])
    meta = info.metadata
    datasets = meta.get("imatrix.datasets") or []
    return Imatrix(
        sums=sums,
        counts=counts,
        chunks=int(meta.get("imatrix.chunk_count", 0)),
        chunk_size=int(meta.get("imatrix.chunk_size", 0)),
        datasets=[str(d) for d in datasets] if isinstance(datasets, list) else [str(datasets)],
    )


def _f32(data: np.ndarray, start: int, count: int) -> np.ndarray:
    return np.frombuffer(data[start : start + 4 * count].tobytes(), dtype="<f4")


def _read_dat_imatrix(path: Path) -> Imatrix:
    """The legacy format: int32 entry count; per entry the name's length and bytes, the call
    count and the value count, then the values (mean squares times the call count); the last
    chunk number and the dataset's name at the end."""
    blob = path.read_bytes()
    at = 0

    def take(n: int, what: str) -> bytes:
        nonlocal at
        if n < 0 or at + n > len(blob):
            raise EdgeftError(
                f"{path}: not an importance matrix (GGUF or llama.cpp .dat): {what} runs past "
                f"the end of the file at byte {at}"
            )
        at += n
        return blob[at - n : at]

    def int32(what: str) -> int:
        return struct.unpack("<i", take(4, what))[0]

    entries = int32("the entry count")
    if not 0 < entries <= 1 << 20:
        raise EdgeftError(f"{path}: not an importance matrix: {entries} entries")
    sums: dict[str, np.ndarray] = {}
    counts: dict[str, int] = {}
    for i in range(entries):
        name = take(int32(f"entry {i}'s name length"), f"entry {i}'s name").decode(
            "utf-8", errors="replace"
        )
        calls, values = int32(f"{name}'s call count"), int32(f"{name}'s value count")
        raw = np.frombuffer(take(4 * values, f"{name}'s values"), dtype="<f4")
        # stored: mean square × calls; kept as a sum over `calls` pseudo-tokens
        sums[name], counts[name] = raw.astype(np.float64), max(calls, 1)
    chunks, dataset = 0, []
    if at < len(blob):
        chunks = int32("the chunk count")
        if at < len(blob):
            dataset = [
                take(int32("the dataset name length"), "the dataset name").decode(
                    "utf-8", errors="replace"
                )
            ]
    return Imatrix(sums=sums, counts=counts, chunks=chunks, chunk_size=0, datasets=dataset)
