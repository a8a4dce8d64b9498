"""LoRA adapters that onnxruntime and onnxruntime-genai apply to one shipped base graph.

An app ships the base ONNX folder once and swaps small adapter files: the fused graph is
written with a LoRA pair as graph inputs beside each adapted projection
(:func:`edgeft.export.onnx.graph.build_fused_graph`, ``lora=``), defaulting to empty (rank 0)
initializers, and each ``edgeft train`` adapter becomes an ``.onnx_adapter`` file (onnxruntime's
flatbuffers adapter format) holding those inputs by name:

* ``{module}.lora_A`` = ``Aᵀ`` ``[in, rank]`` and ``{module}.lora_B`` = ``scale · Bᵀ``
  ``[rank, out]``, peft's ``alpha / rank`` (or rsLoRA's) folded into B, so the graph computes
  ``x·Wᵀ + (x·A)·B`` exactly as peft does;
* a projection that another adapter adapts and this one does not gets empty tensors (rank 0):
  every file names every LoRA input of the base;
* a fused projection (Phi-3's ``qkv_proj``) is split by rows into the graph's q, k and v, each
  with the shared A;
* the file's ``model_version`` is the base weights' identity (the first 28 bits of their
  sha256, which the base graph records in full under ``edgeft.source.sha256``), so a runtime
  can refuse an adapter made for another base whose shapes happen to fit.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgeft._io import sha256_file
from edgeft.errors import EdgeftError, ModelError
from edgeft.formats import SOURCE_SHA_KEY, base_version
from edgeft.hfcompat import model_config
from edgeft.provenance import TrainRecord

ADAPTERS_DIR = "adapters"
# The adapter file's format and adapter versions (onnxruntime's format reads both).
ADAPTER_VERSION = 1


@dataclass
class OnnxAdapter:
    """One ``edgeft train`` adapter as the base graph's LoRA inputs take it."""

    name: str
    source: Path
    sha256: str  # of adapter_model.safetensors
    base_sha256: str  # of the base weights it was trained on
    rank: int
    method: str
    record: TrainRecord  # the adapter's edgeft.json
    pairs: dict[str, tuple[np.ndarray, np.ndarray]]  # module → (A [in, r], scale·B [r, out])


def parse_adapters(specs: Sequence[str]) -> dict[str, Path]:
    """``["cooking=runs/a", "runs/b"]`` → ``{"cooking": runs/a, "b": runs/b}``.

    Raises:
        EdgeftError: an empty or repeated name, or a name that is not a plain file name.
    """
    adapters: dict[str, Path] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep:
            name, path = Path(spec).name, spec
        if not name or not path or not name.replace("-", "").replace("_", "").isalnum():
            raise EdgeftError(
                f"--adapter {spec!r}: give NAME=DIR or DIR, the name of letters, digits, - and _"
            )
        if name in adapters:
            raise EdgeftError(f"--adapter {spec!r}: the name {name!r} is given twice")
        adapters[name] = Path(path)
    return adapters


def read_adapters(adapters: dict[str, Path], base: Path, base_sha256: str) -> list[OnnxAdapter]:
    """Read each adapter and check it was trained on ``base`` (weights sha256).

    Raises:
        ModelError: an adapter that is not an ``edgeft train`` LoRA output, one trained on
            another base, one with ``fan_in_fan_out``, or one whose modules do not fit the
            base's projections.
    """

    from edgeft.architectures import architecture_of, split_fused
    from edgeft.merge import lora_scale, read_adapter
    from edgeft.weights import safetensors_index

    config_path = Path(base) / "config.json"
    base_config = model_config(config_path)
    architecture = architecture_of(base_config, config_path)
    index = safetensors_index(base)
    read = []
    for name, path in adapters.items():
        record, config, lora = read_adapter(path)
        trained_on = record.inputs.base.weights_sha256
        if trained_on != base_sha256:
            raise ModelError(
                f"adapter {name} ({path}) was trained on another base (weights sha256 "
                f"{trained_on[:12]}), not {base} ({base_sha256[:12]}); export it with its base"
            )
        if config.get("fan_in_fan_out"):
            raise ModelError(f"adapter {name} ({path}): fan_in_fan_out LoRA is not supported")
        pairs = {}
        for module, (a, b) in lora.items():
            a = a.float().numpy()
            b = b.float().numpy() * np.float32(lora_scale(config, a.shape[0]))
            stored = index.get(f"{module}.weight")
            if stored is None or tuple(stored.shape) != (b.shape[0], a.shape[1]):
                raise ModelError(
                    f"adapter {name} ({path}): module {module} does not fit a projection of "
                    f"{base}; it was made for another model"
                )
            fused = next((f for f in architecture.fused if module.endswith(f".{f.module}")), None)
            if fused is None:
                pairs[module] = (np.ascontiguousarray(a.T), np.ascontiguousarray(b.T))
                continue
            layer = module[: -len(fused.module)]
            group = fused.module.split(".")[0]
            for part, rows in split_fused(architecture, base_config, fused.module).items():
                pairs[f"{layer}{group}.{part}"] = (
                    np.ascontiguousarray(a.T),
                    np.ascontiguousarray(b[rows].T),
                )
        for module, (a, b) in pairs.items():
            if not (np.isfinite(a).all() and np.isfinite(b).all()):
                raise ModelError(
                    f"adapter {name} ({path}): module {module} has non-finite LoRA values "
                    "(NaN or inf); the adapter is corrupt"
                )
        read.append(
            OnnxAdapter(
                name=name,
                source=Path(path),
                sha256=sha256_file(Path(path) / "adapter_model.safetensors"),
                base_sha256=trained_on,
                rank=int(next(iter(lora.values()))[0].shape[0]),
                method=record.settings.method,
                record=record,
                pairs=pairs,
            )
        )
    return read


def lora_modules(adapters: Sequence[OnnxAdapter]) -> dict[str, tuple[int, int]]:
    """Every projection any of ``adapters`` adapts → its (in, out)."""
    modules: dict[str, tuple[int, int]] = {}
    for adapter in adapters:
        for module, (a, b) in adapter.pairs.items():
            modules[module] = (a.shape[0], b.shape[1])
    return modules


def write_adapter(
    path: Path, adapter: OnnxAdapter, modules: dict[str, tuple[int, int]], base_sha256: str
) -> None:
    """Write ``adapter`` as an ``.onnx_adapter`` file covering every LoRA input of the base."""
    import onnxruntime as ort

    from edgeft.export.onnx.graph import lora_names

    parameters = {}
    for module, (n_in, n_out) in sorted(modules.items()):
        a, b = adapter.pairs.get(
            module, (np.zeros((n_in, 0), np.float32), np.zeros((0, n_out), np.float32))
        )
        name_a, name_b = lora_names(module)
        parameters[name_a] = ort.OrtValue.ortvalue_from_numpy(a)
        parameters[name_b] = ort.OrtValue.ortvalue_from_numpy(b)
    writer = ort.AdapterFormat()
    writer.set_adapter_version(ADAPTER_VERSION)
    writer.set_model_version(base_version(base_sha256))
    writer.set_parameters(parameters)
    writer.export_adapter(str(path))


def mark_base(folder: Path, weights_sha256: str, model_file: str = "model.onnx") -> None:
    """Record the base weights' sha256 in ``folder``'s graph (``edgeft.source.sha256``)."""
    import onnx

    path = folder / model_file
    model = onnx.load(str(path), load_external_data=False)
    for prop in list(model.metadata_props):
        if prop.key == SOURCE_SHA_KEY:
            model.metadata_props.remove(prop)
    model.metadata_props.add(key=SOURCE_SHA_KEY, value=weights_sha256)
    path.write_bytes(model.SerializeToString())
