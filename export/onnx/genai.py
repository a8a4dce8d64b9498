"""``genai_config.json`` for an optimum-exported ONNX folder, so onnxruntime-genai can run it.

optimum-onnx writes a plain decoder graph (past key/values in, present key/values out, the new
positions concatenated inside the graph) beside the checkpoint's config and tokenizer files, but
not the ``genai_config.json`` that ``onnxruntime_genai.Model`` reads. Cache names, layer count,
cache shape and vocabulary size are read from the graph itself, so a quantized or fp16 graph gets
a config that fits it rather than one guessed from config.json.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from edgeft.architectures import ARCHITECTURES, attention_shape
from edgeft.errors import ModelError
from edgeft.formats import GENAI_CONFIG
from edgeft.runtimes.hf import eos_token_ids, load_tokenizer, read_json

# config.json model_type → onnxruntime-genai 0.18 model type, from the architecture table
GENAI_MODEL_TYPES = {a.model_type: a.genai_type for a in ARCHITECTURES.values()}


_PLAIN_INPUTS = ("input_ids", "attention_mask", "position_ids")


def write_genai_config(
    folder: Path,
    *,
    model_file: str = "model.onnx",
    context_length: int | None = None,
    share_buffer: bool = False,
) -> dict:
    """Write ``folder/genai_config.json`` for the decoder graph ``folder/model_file`` and
    return what was written.

    Search defaults are greedy (``do_sample`` false, one beam) with ``max_length`` equal to
    the context length. ``share_buffer`` (``past_present_share_buffer``) suits graphs whose
    attention writes into a preallocated cache (GroupQueryAttention); optimum graphs return a
    new, longer present tensor each step and need it off. The session options name no thread
    count, so a runtime sets it when it loads the folder.

    Raises:
        ModelError: the folder lacks the graph or config.json, the graph has no KV cache
            inputs, or the architecture is one onnxruntime-genai is not set up for here.
    """
    folder = Path(folder)
    graph = _graph_io(folder / model_file)
    config = read_json(folder / "config.json", required=True)

    model_type = config.get("model_type")
    if model_type not in GENAI_MODEL_TYPES:
        raise ModelError(
            f"{folder / 'config.json'} has model_type {model_type!r}; onnxruntime-genai configs "
            f"are written for {', '.join(sorted(GENAI_MODEL_TYPES))} only"
        )
    if context_length is None:
        context_length = config.get("max_position_embeddings")
        if not context_length:
            raise ModelError(
                f"{folder / 'config.json'} has no max_position_embeddings; pass context_length"
            )

    inputs, outputs = graph["inputs"], graph["outputs"]
    for name in ("input_ids", "attention_mask"):
        if name not in inputs:
            raise ModelError(f"{folder / model_file} has no {name} input; export it with optimum")
    if "logits" not in outputs:
        raise ModelError(f"{folder / model_file} has no logits output; export it with optimum")
    past_key, past_value, layers = _cache_templates(inputs, folder / model_file, "input")
    present_key, present_value, present_layers = _cache_templates(
        outputs, folder / model_file, "output"
    )
    if present_layers != layers:
        raise ModelError(
            f"{folder / model_file} has {layers} past and {present_layers} present layers; "
            "re-export it with optimum"
        )

    # [batch, kv_heads, past, head_dim]: take static dims from the graph, else from config.json.
    key_shape = inputs[past_key % 0]
    shape = attention_shape(config)
    heads = shape.heads
    head_size = _static(key_shape, 3) or shape.head_dim
    kv_heads = _static(key_shape, 1) or shape.kv_heads
    vocab_size = _static(outputs["logits"], 2) or config["vocab_size"]

    bos, eos, pad = _special_token_ids(folder, config)
    decoder_inputs = {name: name for name in _PLAIN_INPUTS if name in inputs}
    decoder_inputs |= {"past_key_names": past_key, "past_value_names": past_value}
    genai = {
        "model": {
            "type": GENAI_MODEL_TYPES[model_type],
            "bos_token_id": bos,
            "eos_token_id": eos if len(eos) > 1 else eos[0],
            "pad_token_id": pad,
            "context_length": int(context_length),
            "vocab_size": int(vocab_size),
            "decoder": {
                "filename": model_file,
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "head_size": int(head_size),
                "hidden_size": int(config["hidden_size"]),
                "num_attention_heads": int(heads),
                "num_key_value_heads": int(kv_heads),
                "num_hidden_layers": layers,
                "inputs": decoder_inputs,
                "outputs": {
                    "logits": "logits",
                    "present_key_names": present_key,
                    "present_value_names": present_value,
                },
            },
        },
        "search": {
            "do_sample": False,
            "num_beams": 1,
            "num_return_sequences": 1,
            "max_length": int(context_length),
            "min_length": 0,
            "past_present_share_buffer": share_buffer,
            "early_stopping": True,
            "length_penalty": 1.0,
            "repetition_penalty": 1.0,
            "no_repeat_ngram_size": 0,
            "diversity_penalty": 0.0,
            "temperature": 1.0,
            "top_k": 50,
            "top_p": 1.0,
        },
    }
    (folder / GENAI_CONFIG).write_text(json.dumps(genai, indent=4) + "\n", encoding="utf-8")
    return genai


def _graph_io(path: Path) -> dict:
    """Input and output names of an ONNX graph → their dims (int, or a symbolic name)."""
    import onnx

    if not path.is_file():
        raise ModelError(f"{path} not found; export the checkpoint to ONNX first")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # onnx raises DecodeError and others for a damaged file
        raise ModelError(f"{path} is not a readable ONNX model ({exc}); export it again") from exc

    def dims(values) -> dict:
        return {
            v.name: [d.dim_value or d.dim_param for d in v.type.tensor_type.shape.dim]
            for v in values
        }

    return {"inputs": dims(model.graph.input), "outputs": dims(model.graph.output)}


def _cache_templates(names: dict, path: Path, side: str) -> tuple[str, str, int]:
    """``(key template, value template, layers)`` of the per-layer cache tensors among
    ``names``, e.g. ``past_key_values.%d.key``: the one number in a name becomes ``%d``."""
    layers: dict[tuple[str, str], set[int]] = {}
    for name in names:
        match = re.fullmatch(r"(\D*?)(\d+)(\D*)", name)
        if name not in _PLAIN_INPUTS and match:
            layers.setdefault((match[1], match[3]), set()).add(int(match[2]))
    # Told apart by what follows the layer number: "past_key_values" itself says both.
    keys = [t for t in layers if "key" in t[1]]
    values = [t for t in layers if "value" in t[1]]
    if len(keys) != 1 or len(values) != 1:
        kind = "past_key_values inputs" if side == "input" else "present outputs"
        raise ModelError(
            f"{path} has no {kind}: it was exported without a KV cache; export it with "
            "task text-generation-with-past"
        )
    (key,), (value,) = keys, values
    count = len(layers[key])
    if layers[key] != set(range(count)) or layers[value] != set(range(count)):
        raise ModelError(f"{path} has gaps in its per-layer cache {side}s; export it again")
    return "%d".join(key), "%d".join(value), count


def _static(shape: list, axis: int) -> int | None:
    return shape[axis] if len(shape) > axis and isinstance(shape[axis], int) else None


def _special_token_ids(folder: Path, config: dict) -> tuple[int, list, int]:
    """bos, eos (generation_config.json's eos ids, then the tokenizer's eos, as the torch
    runtime counts them) and pad, falling back from generation_config.json to config.json to
    the tokenizer."""
    tokenizer = load_tokenizer(folder)
    generation = read_json(folder / "generation_config.json")

    def first(name: str):
        for value in (generation.get(name), config.get(name), getattr(tokenizer, name, None)):
            if value is not None:
                return value
        return None

    eos = eos_token_ids(folder, tokenizer)
    if not eos:
        raise ModelError(f"{folder} names no eos token in its config or tokenizer")
    bos, pad = first("bos_token_id"), first("pad_token_id")
    return (
        int(bos) if bos is not None else eos[0],
        eos,
        int(pad) if pad is not None else eos[0],
    )
