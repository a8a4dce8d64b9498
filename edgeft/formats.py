"""The kinds of model file edgeft reads, in one table, and the file-layout rules they share.

A :class:`Format` says how a path is recognised, which runtimes run it (the first is the
default), whether an app bundle can embed it and with which runtime, and which reader
``edgeft inspect`` uses. ``edgeft bench``, ``edgeft package`` and ``edgeft inspect`` all
identify a path with :func:`detect`, so they agree on what it is.

The checks every layer needs on these files live here too, below the exporters that write
them and the runtimes that load them: model files inside their folder, a LoRA adapter file
against the model it is applied to.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from edgeft.errors import ModelError

ONNX_MODEL_FILE = "model.onnx"
GENAI_CONFIG = "genai_config.json"
ONNX_ADAPTER_SUFFIX = ".onnx_adapter"
# Metadata keys edgeft writes: the sha256 of the weights a file was made from (a GGUF file's
# metadata, an ONNX graph's metadata_props), and in a LoRA GGUF, that of the base it needs.
SOURCE_SHA_KEY = "edgeft.source.sha256"
BASE_SHA_KEY = "edgeft.base.sha256"
# Suffixes of pickled checkpoints: refused by name, never opened.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")


@dataclass(frozen=True)
class Format:
    name: str  # what results.json and manifest.json call it
    title: str  # what messages call it
    matches: Callable[[Path], bool]
    runtimes: tuple[str, ...] = ()  # that edgeft bench runs it in; the first by default
    packaged_with: str | None = None  # the runtime an app embeds to run it; None: not packaged
    inspected_as: str | None = None  # edgeft inspect's reader; None: not inspected

    @property
    def benchmarked(self) -> bool:
        return bool(self.runtimes)


def _file(suffix: str) -> Callable[[Path], bool]:
    return lambda path: path.is_file() and path.suffix.lower() == suffix


def _folder_with(name: str) -> Callable[[Path], bool]:
    return lambda path: path.is_dir() and (path / name).is_file()


# In the order they are tried: an edgeft adapter folder holds a config.json too.
FORMATS = (
    Format(
        "gguf",
        "GGUF file (.gguf)",
        _file(".gguf"),
        runtimes=("llama.cpp",),
        packaged_with="llama.cpp",
        inspected_as="gguf",
    ),
    Format(
        "onnx",
        "ONNX folder (model.onnx)",
        _folder_with(ONNX_MODEL_FILE),
        runtimes=("onnxruntime-genai", "onnxruntime"),
        packaged_with="onnxruntime-genai",
        inspected_as="onnx",
    ),
    Format(
        "onnx-file",
        "ONNX graph (.onnx)",
        _file(".onnx"),
        inspected_as="onnx",
    ),
    Format(
        "adapter",
        "edgeft adapter folder (adapter_config.json)",
        _folder_with("adapter_config.json"),
        runtimes=("torch",),
    ),
    Format(
        "hf",
        "Hugging Face checkpoint folder (config.json)",
        _folder_with("config.json"),
        runtimes=("torch",),
        inspected_as="checkpoint",
    ),
    Format(
        "onnx_adapter",
        "onnxruntime LoRA adapter (.onnx_adapter)",
        _file(ONNX_ADAPTER_SUFFIX),
        inspected_as="onnx_adapter",
    ),
    Format(
        "safetensors",
        "safetensors file (.safetensors)",
        _file(".safetensors"),
        inspected_as="safetensors",
    ),
)
BY_NAME = {f.name: f for f in FORMATS}


def detect(path: Path) -> Format | None:
    """The format of ``path``, by its name and layout (nothing is opened)."""
    path = Path(path)
    return next((f for f in FORMATS if f.matches(path)), None)


def titles(keep: Callable[[Format], bool]) -> str:
    """The titles of the formats ``keep`` accepts, for messages."""
    return ", ".join(f.title for f in FORMATS if keep(f))


def external_data_path(folder: Path, location: str, source: Path, what: str) -> Path:
    """The file a model-relative ``location`` names, if it is a relative path inside ``folder``
    (no absolute path, no ``..``, no backslash) to an existing file.

    Raises:
        ModelError: ``source`` (the file holding the location, for the message) names a file
            outside the folder, or one that is missing.
    """
    path = Path(location)
    if (
        not location
        or path.is_absolute()
        or ".." in path.parts
        or "\\" in location
        or not (folder / path).is_file()
    ):
        raise ModelError(
            f"{source}: {what} points to {location!r}, outside the folder or missing; "
            "model files must lie inside the model folder"
        )
    return folder / path


def genai_model_files(model: dict, source: Path) -> list[str]:
    """Every ``filename`` under a genai config's ``model`` section (decoder, embeddings, ...).

    Raises:
        ModelError: a ``filename`` that is not a string.
    """
    found: list[str] = []
    stack = [model]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            for key, value in item.items():
                if key == "filename":
                    if not isinstance(value, str):
                        raise ModelError(f"{source}: a 'filename' field is {value!r}, not text")
                    found.append(value)
                else:
                    stack.append(value)
        elif isinstance(item, list):
            stack.extend(item)
    return sorted(set(found))


def check_external_data(folder: Path, model_file: str = ONNX_MODEL_FILE, model=None) -> None:
    """Every external-data location of ``folder/model_file`` must be a relative path inside
    the folder (no absolute paths, no ``..``), and the file must exist.

    Args:
        model: the graph already loaded (without external data), to avoid reading it twice.

    Raises:
        ModelError: a location escapes the folder or is missing.
    """
    import onnx
    from onnx.external_data_helper import ExternalDataInfo, uses_external_data

    source = folder / model_file
    if model is None:
        model = onnx.load(str(source), load_external_data=False)
    for tensor in model.graph.initializer:
        if not uses_external_data(tensor):
            continue
        try:
            location = ExternalDataInfo(tensor).location
        except ValueError as exc:
            raise ModelError(f"{source}: tensor {tensor.name}: bad external data ({exc})") from None
        external_data_path(folder, location, source, f"the external data of tensor {tensor.name}")


# --- LoRA adapter files ---------------------------------------------------------------------


def base_version(weights_sha256: str) -> int:
    """The ``model_version`` an adapter file for this base carries."""
    return int(weights_sha256[:7], 16)


def graph_lora_inputs(model_path: Path) -> tuple[dict[str, list], str | None]:
    """The LoRA inputs of a graph (name → shape, the rank as a string) and the base weights'
    sha256 it records (None if it records none)."""
    import onnx

    model = onnx.load(str(model_path), load_external_data=False)
    inputs = {}
    for value in model.graph.input:
        if value.name.endswith((".lora_A", ".lora_B")):
            dims = value.type.tensor_type.shape.dim
            inputs[value.name] = [d.dim_param or d.dim_value for d in dims]
    sha = next((p.value for p in model.metadata_props if p.key == SOURCE_SHA_KEY), None)
    return inputs, sha


def check_adapter(adapter: Path, model_path: Path) -> None:
    """Refuse an ``.onnx_adapter`` file the graph at ``model_path`` cannot take: a base graph
    without LoRA inputs, a parameter it has no input for or of another shape, or one made for
    another base.

    Raises:
        ModelError: naming the file and, where one is at fault, the tensor.
    """
    import onnxruntime as ort

    adapter, model_path = Path(adapter), Path(model_path)
    if not adapter.is_file():
        raise ModelError(f"adapter {adapter} not found; pass an {ONNX_ADAPTER_SUFFIX} file")
    inputs, base_sha = graph_lora_inputs(model_path)
    if not inputs:
        raise ModelError(
            f"{model_path} takes no LoRA adapter (no LoRA inputs); export the base with "
            "'edgeft export onnx --adapter'"
        )
    try:
        reader = ort.AdapterFormat.read_adapter(str(adapter))
        parameters = reader.get_parameters()
    except Exception as exc:  # onnxruntime raises plain RuntimeError/Fail on a bad file
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ModelError(
            f"{adapter} is not an onnxruntime adapter file ({reason}); export it again"
        ) from exc
    if base_sha is not None and reader.get_model_version() != base_version(base_sha):
        raise ModelError(
            f"{adapter} was made for another base than {model_path} (weights sha256 "
            f"{base_sha[:12]}); export the adapter with this base"
        )
    ranks: dict[str, int] = {}
    for name, value in parameters.items():
        shape = inputs.get(name)
        if shape is None:
            raise ModelError(f"{adapter}: tensor {name} is not a LoRA input of {model_path}")
        have = list(value.shape())
        fixed = [(i, d) for i, d in enumerate(shape) if isinstance(d, int) and d > 0]
        if len(have) != len(shape) or any(have[i] != d for i, d in fixed):
            raise ModelError(
                f"{adapter}: tensor {name} has shape {have}, {model_path} takes {shape}; "
                "the adapter was made for another model"
            )
        module, rank = name.rsplit(".", 1)[0], have[1] if name.endswith("_A") else have[0]
        if ranks.setdefault(module, rank) != rank:
            raise ModelError(f"{adapter}: {module}'s lora_A and lora_B differ in rank")


def check_base(lora_meta: dict[str, str], base_meta: dict[str, str], lora: Path, base: Path):
    """Refuse a base GGUF that is not the model the adapter was trained on.

    Raises:
        ModelError: architectures differ, or the recorded base sha256 differs from (or is
            missing in) the base GGUF.
    """
    arch, base_arch = lora_meta.get("general.architecture"), base_meta.get("general.architecture")
    if arch != base_arch:
        raise ModelError(f"{lora} is a {arch} adapter but {base} is a {base_arch} model")
    wanted, have = lora_meta.get(BASE_SHA_KEY), base_meta.get(SOURCE_SHA_KEY)
    if wanted and have != wanted:
        found = f"weights sha256 {have[:12]}" if have else f"no {SOURCE_SHA_KEY} key"
        raise ModelError(
            f"{base} is not the base {lora} was trained on ({found}, adapter needs "
            f"{wanted[:12]}); export that base with 'edgeft export gguf'"
        )
