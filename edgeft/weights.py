"""Checkpoint weights one tensor at a time: the safetensors reader every stage uses, and a
sharded safetensors writer.

Nothing here maps or loads a whole checkpoint: a tensor is read with one seek and one read
into memory of its own, so a stage that handles one tensor (or one layer) at a time holds
that much, whatever the model's size. The headers are checked against the files before any
tensor is read.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgeft.errors import ModelError

# safetensors dtype → (numpy dtype of the stored bytes, converter to float32)
SAFETENSORS_DTYPES: dict[str, tuple[str, Callable[[np.ndarray], np.ndarray]]] = {
    "F32": ("<f4", lambda a: a),
    "F16": ("<f2", lambda a: a.astype(np.float32)),
    "BF16": ("<u2", lambda a: (a.astype(np.uint32) << 16).view(np.float32)),
}

# edgeft's dtype names (merge --dtype) → safetensors'.
DTYPE_NAMES = {"fp32": "F32", "fp16": "F16", "bf16": "BF16"}

# Largest shard a written checkpoint gets, as transformers' save_pretrained does by default.
MAX_SHARD_BYTES = 5 * 10**9
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


# safetensors' own limit on the JSON header (safetensors/src/tensor.rs MAX_HEADER_SIZE).
SAFETENSORS_MAX_HEADER = 100_000_000
# safetensors dtype → bits per element.
SAFETENSORS_BITS = {
    "BOOL": 8,
    "U8": 8,
    "I8": 8,
    "F8_E5M2": 8,
    "F8_E4M3": 8,
    "F8_E8M0": 8,
    "I16": 16,
    "U16": 16,
    "F16": 16,
    "BF16": 16,
    "I32": 32,
    "U32": 32,
    "F32": 32,
    "F64": 64,
    "I64": 64,
    "U64": 64,
    "C64": 64,
    "F4": 4,
    "F6_E2M3": 6,
    "F6_E3M2": 6,
}


def inspect_safetensors(path: Path) -> dict:
    """A safetensors file's header, parsed here and checked against the file size; no tensor
    is read.

    Raises:
        ModelError: a header length past the end, an unreadable header, or any tensor whose
            dtype, shape or offsets do not fit the file.
    """
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise ModelError(
                f"{path}: header length: the file has {size} bytes, fewer than the 8-byte "
                "header length (truncated safetensors)"
            )
        (header_len,) = struct.unpack("<Q", raw)
        if header_len > size - 8:
            raise ModelError(
                f"{path}: header length {header_len} runs past the end of the file "
                f"({size} bytes; truncated or not safetensors)"
            )
        if header_len > SAFETENSORS_MAX_HEADER:
            raise ModelError(
                f"{path}: header length {header_len} exceeds safetensors' "
                f"{SAFETENSORS_MAX_HEADER}-byte limit"
            )
        text = f.read(header_len)
    try:
        header = json.loads(text.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ModelError(f"{path}: header is not valid JSON ({reason})") from None
    if not isinstance(header, dict):
        raise ModelError(f"{path}: header is a JSON {type(header).__name__}, not an object")
    data_size = size - 8 - header_len
    metadata = header.pop("__metadata__", None)
    if metadata is not None and not (
        isinstance(metadata, dict)
        and all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items())
    ):
        raise ModelError(f"{path}: __metadata__ must map strings to strings")

    dtypes: dict[str, int] = {}
    parameters = 0
    spans = []
    for name, entry in header.items():
        where = f"{path}: tensor {name!r}"
        if not isinstance(entry, dict):
            raise ModelError(f"{where} is a JSON {type(entry).__name__}, not an object")
        dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        bits = SAFETENSORS_BITS.get(dtype) if isinstance(dtype, str) else None
        if bits is None:
            raise ModelError(f"{where}: dtype {dtype!r} is not a safetensors dtype")
        if not isinstance(shape, list) or not all(_natural(d) for d in shape):
            raise ModelError(f"{where}: shape {shape!r} is not a list of non-negative integers")
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(_natural(o) for o in offsets)
            or offsets[0] > offsets[1]
        ):
            raise ModelError(f"{where}: data_offsets {offsets!r} are not [begin, end]")
        begin, end = offsets
        if end > data_size:
            raise ModelError(
                f"{where}: data_offsets [{begin}, {end}] lie past the end of the file (the data "
                f"section holds {data_size} bytes; truncated or crafted)"
            )
        elements = math.prod(shape)
        if elements * bits != (end - begin) * 8:
            raise ModelError(
                f"{where}: data_offsets span {end - begin} bytes but {dtype} {shape} needs "
                f"{elements * bits / 8:g}"
            )
        dtypes[dtype] = dtypes.get(dtype, 0) + 1
        parameters += elements
        spans.append((begin, end, name))
    spans.sort()
    for (_, prev_end, prev), (begin, _, name) in zip(spans, spans[1:], strict=False):
        if begin < prev_end:
            raise ModelError(f"{path}: tensors {prev!r} and {name!r} overlap in data_offsets")
    return {
        "format": "safetensors",
        "path": str(path),
        "bytes": size,
        "header_bytes": header_len,
        "tensor_count": len(spans),
        "parameter_count": parameters,
        "dtypes": dict(sorted(dtypes.items(), key=lambda kv: -kv[1])),
        "metadata": metadata or {},
    }


def _natural(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


@dataclass(frozen=True)
class StoredTensor:
    """Where one tensor lies in a safetensors file."""

    file: Path
    dtype: str
    shape: tuple[int, ...]
    offset: int
    nbytes: int
    name: str = ""


def safetensors_index(model_dir: Path) -> dict[str, StoredTensor]:
    """Name → location of every tensor in the checkpoint's safetensors files (headers only).

    Raises:
        ModelError: no safetensors files (pickles are named and refused), or a header that
            does not fit its file.
    """
    model_dir = Path(model_dir)
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        pickled = [p.name for p in model_dir.glob("*.bin")] + [
            p.name for p in model_dir.glob("*.pt")
        ]
        hint = f" (found {', '.join(pickled)}: edgeft does not unpickle)" if pickled else ""
        raise ModelError(f"{model_dir} has no *.safetensors weights{hint}")
    index: dict[str, StoredTensor] = {}
    for path in files:
        inspect_safetensors(path)  # every field type, offset and length checked against the file
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise ModelError(f"{path}: truncated safetensors file")
            (header_len,) = struct.unpack("<Q", raw)
            if header_len > min(size - 8, 100 << 20):
                raise ModelError(f"{path}: safetensors header length {header_len} is past the end")
            try:
                header = json.loads(f.read(header_len))
            except (UnicodeDecodeError, json.JSONDecodeError) as exc:
                raise ModelError(f"{path}: unreadable safetensors header: {exc}") from exc
        data_start = 8 + header_len
        for name, info in header.items():
            if name == "__metadata__":
                continue
            begin, end = info["data_offsets"]
            dtype = info["dtype"]
            if dtype not in SAFETENSORS_DTYPES:
                raise ModelError(
                    f"{path}: tensor {name} is {dtype}; only F32/F16/BF16 weights can be "
                    "read (is this checkpoint already quantized?)"
                )
            shape = tuple(int(d) for d in info["shape"])
            itemsize = np.dtype(SAFETENSORS_DTYPES[dtype][0]).itemsize
            if (
                end - begin != int(np.prod(shape, dtype=np.int64)) * itemsize
                or data_start + end > size
            ):
                raise ModelError(
                    f"{path}: tensor {name} has inconsistent size or lies past the end"
                )
            if name in index:
                raise ModelError(f"{path}: tensor {name} is also in {index[name].file.name}")
            index[name] = StoredTensor(path, dtype, shape, data_start + begin, end - begin, name)
    return index


def checkpoint_params(model_dir: Path) -> int:
    """Parameters stored in a checkpoint's safetensors (a tied table once)."""
    return sum(int(np.prod(t.shape, dtype=np.int64)) for t in safetensors_index(model_dir).values())


def read_raw(stored: StoredTensor) -> np.ndarray:
    """One tensor's stored values (BF16 as ``uint16``), shaped, without conversion."""
    dtype = SAFETENSORS_DTYPES[stored.dtype][0]
    with open(stored.file, "rb") as f:
        f.seek(stored.offset)
        data = np.fromfile(f, dtype=dtype, count=stored.nbytes // np.dtype(dtype).itemsize)
    return data.reshape(stored.shape)


def read_f32(stored: StoredTensor, *, check: bool = True) -> np.ndarray:
    """One tensor as fp32, checked finite: every exporter reads weights through here
    (``check=False`` only to read again what was checked before).

    Raises:
        ModelError: the tensor holds NaN or inf (named, with its file).
    """
    data = SAFETENSORS_DTYPES[stored.dtype][1](read_raw(stored))
    if check and not np.isfinite(data).all():
        raise ModelError(
            f"{stored.file}: tensor {stored.name} has non-finite values (NaN or inf); the "
            "checkpoint is corrupt: re-run the stage that wrote it"
        )
    return data


def read_rows(stored: StoredTensor, rows: np.ndarray) -> np.ndarray:
    """Rows ``rows`` (sorted, unique) of a 2-D tensor as fp32: an embedding lookup that reads
    only the looked-up rows."""
    dtype, to_f32 = SAFETENSORS_DTYPES[stored.dtype]
    width = stored.shape[1]
    row_bytes = width * np.dtype(dtype).itemsize
    out = np.empty((len(rows), width), dtype=np.float32)
    with open(stored.file, "rb") as f:
        for i, row in enumerate(rows.tolist()):
            f.seek(stored.offset + row * row_bytes)
            out[i] = to_f32(np.fromfile(f, dtype=dtype, count=width))
    return out


def read_row_range(
    stored: StoredTensor, start: int, stop: int, *, raw: bool = False, check: bool = False
) -> np.ndarray:
    """Rows ``start:stop`` (along the first axis) of a tensor, read in one piece: fp32, or
    with ``raw`` as stored; ``check`` refuses non-finite values as :func:`read_f32` does."""
    dtype, to_f32 = SAFETENSORS_DTYPES[stored.dtype]
    row_items = int(np.prod(stored.shape[1:], dtype=np.int64))
    start, stop = max(0, start), min(stop, stored.shape[0])
    with open(stored.file, "rb") as f:
        f.seek(stored.offset + start * row_items * np.dtype(dtype).itemsize)
        data = np.fromfile(f, dtype=dtype, count=(stop - start) * row_items)
    data = data.reshape(stop - start, *stored.shape[1:])
    if raw:
        return data
    data = to_f32(data)
    if check and not np.isfinite(data).all():
        raise ModelError(
            f"{stored.file}: tensor {stored.name} has non-finite values (NaN or inf); the "
            "checkpoint is corrupt: re-run the stage that wrote it"
        )
    return data


def row_chunks(stored: StoredTensor, max_bytes: int = 64 << 20, *, raw: bool = False):
    """A tensor in pieces of whole rows (along its first axis) of at most ``max_bytes``
    stored: fp32 (checked finite) or, with ``raw``, as stored. A 1-D tensor is one piece."""
    if len(stored.shape) < 2:
        yield read_raw(stored) if raw else read_f32(stored)
        return
    row_bytes = stored.nbytes // max(1, stored.shape[0])
    step = max(1, max_bytes // max(1, row_bytes))
    for start in range(0, stored.shape[0], step):
        yield read_row_range(stored, start, start + step, raw=raw, check=not raw)


def encode(values: np.ndarray, dtype: str) -> np.ndarray:
    """fp32 values in safetensors dtype ``dtype`` (BF16 rounded to nearest even, as torch
    does), as the array whose bytes are stored."""
    values = np.ascontiguousarray(values, dtype=np.float32)
    if dtype == "F32":
        return values
    if dtype == "F16":
        return values.astype("<f2")
    bits = values.view(np.uint32)
    rounded = bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))
    out = (rounded >> np.uint32(16)).astype("<u2")
    nan = np.isnan(values)
    if nan.any():
        out[nan] = 0x7FC0
    return out


class ShardedWriter:
    """Write a safetensors checkpoint tensor by tensor, split in shards of at most
    ``max_shard_bytes``, named as transformers names them (``model.safetensors``, or
    ``model-0000i-of-0000n.safetensors`` with ``model.safetensors.index.json``).

    Every tensor's name, dtype and shape are declared up front, so each shard's header is
    written first and the data after it, one tensor at a time, in the declared order.
    """

    def __init__(
        self,
        folder: Path,
        layout: Iterable[tuple[str, str, tuple[int, ...]]],
        *,
        max_shard_bytes: int | None = None,
    ) -> None:
        self.folder = Path(folder)
        max_shard_bytes = max_shard_bytes or MAX_SHARD_BYTES
        layout = list(layout)
        shards: list[list[tuple[str, str, tuple[int, ...]]]] = [[]]
        size = 0
        for entry in layout:
            nbytes = _nbytes(entry[1], entry[2])
            if shards[-1] and size + nbytes > max_shard_bytes:
                shards.append([])
                size = 0
            shards[-1].append(entry)
            size += nbytes
        n = len(shards)
        self._names = [
            SINGLE_FILE if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)
        ]
        self._shards = shards
        self._plan = [(i, *entry) for i, shard in enumerate(shards) for entry in shard]
        self._next = 0
        self._file = None
        self.total_bytes = sum(_nbytes(dtype, shape) for _, dtype, shape in layout)

    def write(self, name: str, values: np.ndarray | Iterable[np.ndarray]) -> None:
        """Write the next declared tensor, already in its declared dtype's storage: one array
        of its shape, or consecutive pieces of it (rows of a large table) in order."""
        shard, expected, dtype, shape = self._plan[self._next]
        if name != expected:
            raise ValueError(f"tensor {name!r} written where {expected!r} was declared")
        stored = np.dtype(SAFETENSORS_DTYPES[dtype][0])
        if isinstance(values, np.ndarray) and tuple(values.shape) != tuple(shape):
            raise ValueError(
                f"tensor {name}: {values.dtype}{tuple(values.shape)} where "
                f"{stored}{tuple(shape)} was declared"
            )
        if self._file is None or self._file_shard != shard:
            self._open(shard)
        written = 0
        for piece in [values] if isinstance(values, np.ndarray) else values:
            if piece.dtype != stored:
                raise ValueError(f"tensor {name}: {piece.dtype} where {stored} was declared")
            np.ascontiguousarray(piece).tofile(self._file)
            written += piece.size
        if written != int(np.prod(shape, dtype=np.int64)):
            raise ValueError(f"tensor {name}: {written} values written, {tuple(shape)} declared")
        self._next += 1

    def _open(self, shard: int) -> None:
        if self._file is not None:
            self._file.close()
        header: dict = {"__metadata__": {"format": "pt"}}
        offset = 0
        for name, dtype, shape in self._shards[shard]:
            nbytes = _nbytes(dtype, shape)
            header[name] = {
                "dtype": dtype,
                "shape": list(shape),
                "data_offsets": [offset, offset + nbytes],
            }
            offset += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned
        self._file = open(self.folder / self._names[shard], "wb")  # noqa: SIM115 closed in close()
        self._file_shard = shard
        self._file.write(struct.pack("<Q", len(raw)))
        self._file.write(raw)

    def close(self) -> list[Path]:
        """Finish the last shard and write the index; returns the shard files."""
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._next != len(self._plan):
            raise ValueError(f"{len(self._plan) - self._next} declared tensors were not written")
        if len(self._names) > 1:
            weight_map = {name: self._names[shard] for shard, name, _, _ in self._plan}
            (self.folder / INDEX_FILE).write_text(
                json.dumps(
                    {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map},
                    indent=2,
                )
                + "\n",
                encoding="utf-8",
            )
        return [self.folder / name for name in self._names]


def _nbytes(dtype: str, shape: tuple[int, ...]) -> int:
    return int(np.prod(shape, dtype=np.int64)) * np.dtype(SAFETENSORS_DTYPES[dtype][0]).itemsize
