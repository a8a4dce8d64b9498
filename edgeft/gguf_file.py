"""A bounds-checked GGUF header reader: metadata and tensor table, never tensor data.

Every length read from the file is checked against what is left of the file before it is
used, so a truncated or crafted header is an error naming the file and the field, not a hang,
a huge allocation or a crash. Arrays (the vocabulary, merges) are skipped unless asked for.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path

from edgeft.errors import ModelError

# general.file_type values (llama_ftype) of full-precision files.
FULL_PRECISION_FILE_TYPES = {0: "f32", 1: "f16", 32: "bf16"}

_MAX_COUNT = 1 << 24  # tensors or keys in one file; real files have thousands
_MAX_DIMS = 8
# GGUF value types → struct format of the scalar (8 = string, 9 = array).
_SCALARS = {
    0: "B",
    1: "b",
    2: "H",
    3: "h",
    4: "I",
    5: "i",
    6: "f",
    7: "?",
    10: "Q",
    11: "q",
    12: "d",
}
_STRING, _ARRAY = 8, 9


@dataclass(frozen=True)
class TensorInfo:
    name: str
    type: str  # ggml type name, lower case: "f16", "q4_k", ...
    shape: tuple[int, ...]  # GGUF order: fastest dimension first
    offset: int  # from the start of the data section
    nbytes: int


@dataclass(frozen=True)
class GGUFInfo:
    version: int
    metadata: dict
    tensors: list[TensorInfo]
    data_offset: int
    # key → element count of every array value (the vocabulary's size without reading it)
    array_lengths: dict[str, int] = field(default_factory=dict)

    def tensor_type_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for tensor in self.tensors:
            counts[tensor.type] = counts.get(tensor.type, 0) + 1
        return dict(sorted(counts.items(), key=lambda kv: -kv[1]))


class _Cursor:
    def __init__(self, path: Path, f, size: int) -> None:
        self.path, self.f, self.size = path, f, size
        self.array_length = 0  # element count of the last array read

    def _check(self, n: int, what: str) -> None:
        if n < 0 or self.f.tell() + n > self.size:
            raise ModelError(
                f"{self.path}: {what} runs past the end of the file (truncated or damaged GGUF)"
            )

    def take(self, n: int, what: str) -> bytes:
        self._check(n, what)
        return self.f.read(n)

    def skip(self, n: int, what: str) -> None:
        self._check(n, what)
        self.f.seek(n, 1)

    def unpack(self, fmt: str, what: str):
        return struct.unpack("<" + fmt, self.take(struct.calcsize(fmt), what))[0]

    def string(self, what: str) -> str:
        n = self.unpack("Q", what)
        try:
            return self.take(n, what).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ModelError(f"{self.path}: {what} is not UTF-8") from exc

    def value(self, kind: int, what: str, keep_arrays: bool):
        if kind in _SCALARS:
            return self.unpack(_SCALARS[kind], what)
        if kind == _STRING:
            return self.string(what)
        if kind == _ARRAY:
            item_kind = self.unpack("I", what)
            count = self.array_length = self.unpack("Q", what)
            if item_kind in _SCALARS:
                width = struct.calcsize(_SCALARS[item_kind])
                if not keep_arrays:  # checked and skipped, never read into memory
                    self.skip(count * width, what)
                    return None
                raw = self.take(count * width, what)
                return list(struct.unpack(f"<{count}{_SCALARS[item_kind]}", raw))
            if item_kind == _STRING:
                if count > self.size:  # each string needs at least its 8-byte length
                    raise ModelError(f"{self.path}: {what} claims {count} strings")
                items = [self.string(what) for _ in range(count)]
                return items if keep_arrays else None
            raise ModelError(f"{self.path}: {what} is an array of unsupported type {item_kind}")
        raise ModelError(f"{self.path}: {what} has unknown value type {kind}")


def read_gguf(path: Path, *, keep_arrays: bool = False) -> GGUFInfo:
    """Read and check a GGUF file's header, metadata and tensor table.

    Raises:
        ModelError: not a GGUF file, unsupported version, or any count, length, shape or
            offset that does not fit the file.
    """
    import gguf
    import numpy as np

    path = Path(path)
    if not path.is_file():
        raise ModelError(f"{path}: no such GGUF file")
    size = path.stat().st_size
    with open(path, "rb") as f:
        cur = _Cursor(path, f, size)
        if size < 4 or f.read(4) != b"GGUF":
            raise ModelError(f"{path}: not a GGUF file (no GGUF magic)")
        version = cur.unpack("I", "version")
        if version not in (2, 3):
            raise ModelError(f"{path}: GGUF version {version} is not supported (2 or 3)")
        n_tensors = cur.unpack("Q", "tensor count")
        n_kv = cur.unpack("Q", "metadata count")
        if n_tensors > _MAX_COUNT or n_kv > _MAX_COUNT:
            raise ModelError(f"{path}: absurd counts ({n_tensors} tensors, {n_kv} keys)")
        metadata, array_lengths = {}, {}
        for i in range(n_kv):
            key = cur.string(f"metadata key #{i}")
            kind = cur.unpack("I", f"type of {key}")
            value = cur.value(kind, f"value of {key}", keep_arrays)
            if kind == _ARRAY:
                array_lengths[key] = cur.array_length
            if value is not None or keep_arrays:
                metadata[key] = value
        alignment = metadata.get("general.alignment", 32)
        if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
            raise ModelError(f"{path}: general.alignment {alignment!r} is not a power of two")
        infos = []
        for i in range(n_tensors):
            name = cur.string(f"tensor name #{i}")
            n_dims = cur.unpack("I", f"dimensions of {name}")
            if not 1 <= n_dims <= _MAX_DIMS:
                raise ModelError(f"{path}: tensor {name} has {n_dims} dimensions")
            shape = tuple(cur.unpack("Q", f"shape of {name}") for _ in range(n_dims))
            type_id = cur.unpack("I", f"type of {name}")
            offset = cur.unpack("Q", f"offset of {name}")
            try:
                qtype = gguf.GGMLQuantizationType(type_id)
            except ValueError as exc:
                raise ModelError(f"{path}: tensor {name} has unknown type {type_id}") from exc
            block, type_size = gguf.GGML_QUANT_SIZES[qtype]
            elements = int(np.prod(shape, dtype=object))
            if min(shape) <= 0 or shape[0] % block or elements > size * 64:
                raise ModelError(f"{path}: tensor {name} has an impossible shape {shape}")
            infos.append(
                TensorInfo(name, qtype.name.lower(), shape, offset, elements // block * type_size)
            )
        data_offset = -(-f.tell() // alignment) * alignment
    for info in infos:
        if info.offset % alignment or data_offset + info.offset + info.nbytes > size:
            raise ModelError(
                f"{path}: tensor {info.name} lies past the end of the file (truncated GGUF)"
            )
    return GGUFInfo(version, metadata, infos, data_offset, array_lengths)


def gguf_metadata(path: Path) -> dict:
    """A GGUF's scalar and string metadata (arrays such as the vocabulary are left out)."""
    return read_gguf(path).metadata


def file_type_name(meta: dict) -> str:
    """``general.file_type`` as a name (``f16``, ``q4_k_m``, ...)."""
    import gguf

    value = meta.get("general.file_type")
    if value is None:
        return "unknown"
    try:
        return gguf.LlamaFileType(value).name.removeprefix("MOSTLY_").removeprefix("ALL_").lower()
    except ValueError:
        return f"type {value}"
