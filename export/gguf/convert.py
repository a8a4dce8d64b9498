"""Hugging Face checkpoint → full-precision GGUF (F32, F16 or BF16), one tensor at a time.

Weights are read straight from the safetensors files (no torch, no whole-model copy): each
tensor is read, renamed to llama.cpp's name, permuted where llama.cpp's rotary layout needs it,
cast, written and dropped before the next is read. Peak memory is the largest tensor twice
over, plus the interpreter.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edgeft.architectures import (
    ARCHITECTURES,
    Architecture,
    LayerAttention,
    attention_shape,
    head_is_table,
    inverse_frequencies,
    layer_attention,
    longrope_attention_factor,
    longrope_threshold,
    rope_kind,
    rotary_dim,
    tied_embeddings,
)
from edgeft.errors import ModelError
from edgeft.export.gguf.vocab import GGUFVocab, read_vocab
from edgeft.models import read_export_config
from edgeft.weights import StoredTensor, read_f32, row_chunks, safetensors_index

OutType = str  # "f32" | "f16" | "bf16"
OUT_TYPES = ("f32", "f16", "bf16")


def permute_rotary(weight: np.ndarray, n_head: int) -> np.ndarray:
    """Reorder q/k rows from Hugging Face's half-split rotary layout to llama.cpp's interleaved
    one: within each head, rows [0..d/2) and [d/2..d) are interleaved pairwise."""
    head_dim = weight.shape[0] // n_head
    return (
        weight.reshape(n_head, 2, head_dim // 2, *weight.shape[1:])
        .swapaxes(1, 2)
        .reshape(weight.shape)
    )


@dataclass
class ModelSpec:
    """A checkpoint's config, read and checked for what llama.cpp can run."""

    model_dir: Path
    config: dict
    architecture: Architecture
    hf_architecture: str
    n_layer: int
    n_head: int
    n_head_kv: int
    head_dim: int
    n_vocab: int
    tied: bool
    layers: list[LayerAttention] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def read_model_spec(model_dir: Path) -> ModelSpec:
    """Read ``config.json`` and check the architecture is one this converter maps, with a rope,
    window and rope-free-layer layout llama.cpp computes the same way.

    Raises:
        ModelError: missing config, unsupported architecture or rope kind, quantized checkpoint,
            or a layout llama.cpp would compute differently (named).
    """
    model_dir = Path(model_dir)
    path = model_dir / "config.json"
    config, hf_arch = read_export_config(model_dir, tuple(ARCHITECTURES), "GGUF")
    architecture = ARCHITECTURES[hf_arch]
    layers = layer_attention(architecture, config, path)
    notes = []
    windows = {layer.window for layer in layers} - {None}
    if windows and not architecture.gguf_windows:
        notes.append(
            f"sliding_window {max(windows)} is not written: llama.cpp attends to the whole "
            f"context for {architecture.gguf_arch}, identical up to that many tokens"
        )
    if len(windows) > 1:
        raise ModelError(f"{path}: layers with different sliding windows ({sorted(windows)})")
    if not all(layer.rope for layer in layers):
        every = architecture.gguf_no_rope_every
        expected = [every is not None and (i + 1) % every != 0 for i in range(len(layers))]
        if [layer.rope for layer in layers] != expected:
            raise ModelError(
                f"{path}: no_rope_layers {[int(layer.rope) for layer in layers]} cannot be written "
                f"for llama.cpp's {architecture.gguf_arch}"
                + (f", which skips rotary on every {every}th layer" if every else "")
            )
    shape = attention_shape(config)
    if architecture.gguf_query_scale and "query_pre_attn_scalar" in config:
        scalar = float(config["query_pre_attn_scalar"])
        if scalar != shape.head_dim:
            notes.append(
                f"query_pre_attn_scalar {scalar:g} is folded into the q norms (llama.cpp scales "
                f"queries by 1/sqrt(head_dim {shape.head_dim}))"
            )
    return ModelSpec(
        model_dir=model_dir,
        config=config,
        architecture=architecture,
        hf_architecture=hf_arch,
        n_layer=config["num_hidden_layers"],
        n_head=shape.heads,
        n_head_kv=shape.kv_heads,
        head_dim=shape.head_dim,
        n_vocab=config["vocab_size"],
        tied=tied_embeddings(config),
        layers=layers,
        notes=notes,
    )


def _write_hparams(writer, spec: ModelSpec) -> None:
    import gguf

    config = spec.config
    writer.add_context_length(config.get("max_position_embeddings", 2048))
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(spec.n_layer)
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(spec.n_head)
    writer.add_head_count_kv(spec.n_head_kv)
    writer.add_rope_dimension_count(rotary_dim(config))
    writer.add_key_length(spec.head_dim)
    writer.add_value_length(spec.head_dim)
    writer.add_layer_norm_rms_eps(config.get("rms_norm_eps", 1e-6))
    writer.add_rope_freq_base(float(config.get("rope_theta", 10000.0)))
    scaling = config.get("rope_scaling")
    if rope_kind(scaling) == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(scaling["factor"]))
    elif rope_kind(scaling) == "longrope":
        writer.add_rope_scaling_attn_factors(longrope_attention_factor(config))
        writer.add_rope_scaling_orig_ctx_len(longrope_threshold(config))
    sliding = [layer.window is not None for layer in spec.layers]
    if spec.architecture.gguf_windows and any(sliding):
        writer.add_sliding_window(next(layer.window for layer in spec.layers if layer.window))
        writer.add_sliding_window_pattern(sliding)
        local = next(layer.rope_theta for layer in spec.layers if layer.window)
        writer.add_rope_freq_base_swa(local)
    if config.get("final_logit_softcapping"):
        writer.add_final_logit_softcapping(float(config["final_logit_softcapping"]))
    writer.add_vocab_size(spec.n_vocab)


def rope_tables(spec: ModelSpec) -> dict[str, np.ndarray]:
    """The rope tensors llama.cpp reads for this checkpoint's rope kind, by llama.cpp name:
    Llama 3's ``rope_freqs`` (the divisor of each default frequency) and LongRoPE's
    ``rope_factors_long`` / ``rope_factors_short``."""
    config = spec.config
    scaling = config.get("rope_scaling")
    theta = float(config.get("rope_theta", 10000.0))
    if rope_kind(scaling) == "llama3":
        default, _ = inverse_frequencies(config, theta, None)
        scaled, _ = inverse_frequencies(config, theta, scaling)
        return {"rope_freqs.weight": (default / scaled).astype(np.float32)}
    if rope_kind(scaling) == "longrope":
        inverse_frequencies(config, theta, scaling, long=True)  # checks the factors' length
        return {
            f"rope_factors_{kind}.weight": np.asarray(scaling[f"{kind}_factor"], np.float32)
            for kind in ("long", "short")
        }
    return {}


def gguf_tensors(
    spec: ModelSpec, index: dict[str, StoredTensor]
) -> Iterator[tuple[str, StoredTensor | np.ndarray, Callable[[np.ndarray], np.ndarray]]]:
    """Yield (llama.cpp name, stored tensor or computed array, transform) for every tensor
    llama.cpp needs.

    Raises:
        ModelError: a tensor with no llama.cpp name, or a required tensor missing.
    """
    import gguf

    architecture = spec.architecture
    arch = next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == architecture.gguf_arch)
    names = gguf.get_tensor_name_map(arch, spec.n_layer)
    for name, table in rope_tables(spec).items():
        yield name, table, _identity
    for hf_name in sorted(index, key=_tensor_order):
        if hf_name.endswith("rotary_emb.inv_freq"):
            continue
        if hf_name == "lm_head.weight" and spec.tied:
            continue
        new_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if new_name is None:
            raise ModelError(
                f"{spec.model_dir}: tensor {hf_name} has no llama.cpp equivalent in "
                f"{architecture.gguf_arch}; the checkpoint has parts this converter does "
                "not know"
            )
        yield new_name, index[hf_name], _transform(spec, hf_name)
    head_is_table(spec.config, index, spec.model_dir)  # an untied config needs its head


def _transform(spec: ModelSpec, hf_name: str) -> Callable[[np.ndarray], np.ndarray]:
    """What a tensor goes through on its way into llama.cpp's layout, from the entry's quirks."""
    architecture = spec.architecture
    if architecture.permute_qk and hf_name.endswith(("q_proj.weight", "q_proj.bias")):
        return _rotary(spec.n_head)
    if architecture.permute_qk and hf_name.endswith(("k_proj.weight", "k_proj.bias")):
        return _rotary(spec.n_head_kv)
    if not hf_name.endswith("norm.weight"):
        return _identity
    offset, scale = architecture.norm_offset, 1.0
    if architecture.gguf_query_scale and hf_name.endswith("q_norm.weight"):
        scale = math.sqrt(
            spec.head_dim / float(spec.config.get("query_pre_attn_scalar", spec.head_dim))
        )
    if offset == 0.0 and scale == 1.0:
        return _identity
    return lambda a: (a + np.float32(offset)) * np.float32(scale)


# llama.cpp sets attributes of these tokens, looked up by text, in any model whose
# general.name contains "phi3" or "phi-3", and fails to load one whose vocabulary lacks them.
_PHI3_NAME_TOKENS = ("</s>", "<unk>", "<s>", "<|endoftext|>")


def _general_name(name: str, vocab: GGUFVocab) -> str:
    """``general.name``, with "phi3"/"phi-3" spelled "phi 3" when llama.cpp would otherwise look
    up Phi-3's SentencePiece tokens in a vocabulary that lacks them (Phi-4-mini's, a tiny one)."""
    if set(_PHI3_NAME_TOKENS) <= set(vocab.tokens):
        return name
    import re

    return re.sub(r"(?i)(phi)-?(3)", r"\1 \2", name)


def _identity(a: np.ndarray) -> np.ndarray:
    return a


def _rotary(n_head: int) -> Callable[[np.ndarray], np.ndarray]:
    return lambda a: permute_rotary(a, n_head)


def _tensor_order(name: str) -> tuple:
    """Embeddings first, then layers in numeric order, then the final norm and head."""
    parts = name.split(".")
    layer = next((int(p) for p in parts if p.isdigit()), None)
    if "embed_tokens" in name:
        return (0, 0, name)
    if layer is not None:
        return (1, layer, name)
    return (2, 0, name)


def _cast(out_type: OutType, data: np.ndarray):
    """Target array and GGML type for one tensor: 1-D tensors (norms, biases) stay F32."""
    import gguf

    if out_type == "f32" or data.ndim < 2:
        return np.ascontiguousarray(data, dtype=np.float32), gguf.GGMLQuantizationType.F32
    if out_type == "f16":
        return data.astype(np.float16), gguf.GGMLQuantizationType.F16
    return gguf.quants.quantize(
        data, gguf.GGMLQuantizationType.BF16
    ), gguf.GGMLQuantizationType.BF16


def _lazy(stored: StoredTensor, transform, out_type: OutType):
    """A tensor the GGUF writer reads only when it writes it."""
    import gguf
    from gguf.lazy import LazyNumpyTensor

    ndim = len(stored.shape)
    if out_type == "f32" or ndim < 2:
        meta_dtype, shape = np.float32, stored.shape
    elif out_type == "f16":
        meta_dtype, shape = np.float16, stored.shape
    else:  # gguf's BF16 rows come back as bytes: two per value
        meta_dtype, shape = np.uint8, (*stored.shape[:-1], 2 * stored.shape[-1])
    meta = LazyNumpyTensor.meta_with_dtype_and_shape(meta_dtype, shape)

    def cast(values: np.ndarray) -> np.ndarray:
        with np.errstate(over="ignore"):  # an overflow is reported below, naming the tensor
            data = _cast(out_type, values)[0]
        # Finite fp32 values beyond the target's range become inf: F16 tops out at 65504.
        overflow = (
            not np.isfinite(data).all()
            if data.dtype != np.uint8
            else ((data.view("<u2") & 0x7F80) == 0x7F80).any()  # BF16 bytes: exponent all ones
        )
        if overflow:
            raise ModelError(
                f"{stored.file}: tensor {stored.name} overflows {out_type.upper()} (values beyond "
                "its range); export f32 instead"
            )
        return data

    def load() -> np.ndarray:
        if transform is not _identity or ndim < 2:
            return cast(transform(read_f32(stored)))  # read_f32: finite input
        # Row by row into the output: an 8B model's 128256-row table is 2.1 GB in fp32, and
        # the whole table in fp32 beside its cast would be the export's peak.
        out, start = np.empty(shape, dtype=meta_dtype), 0
        for rows in row_chunks(stored):  # fp32, checked finite
            out[start : start + len(rows)] = cast(rows)
            start += len(rows)
        return out

    raw_dtype = None if (out_type != "bf16" or ndim < 2) else gguf.GGMLQuantizationType.BF16
    return LazyNumpyTensor(meta=meta, func=load), raw_dtype


def convert_checkpoint(
    model_dir: Path,
    out_file: Path,
    out_type: OutType = "f16",
    *,
    name: str | None = None,
    metadata: dict[str, str] | None = None,
    vocab: GGUFVocab | None = None,
    progress: bool = False,
) -> tuple[ModelSpec, GGUFVocab]:
    """Write ``model_dir`` as one GGUF file of ``out_type`` at ``out_file``.

    The caller owns atomicity: write to a temporary name and rename.

    Args:
        metadata: extra string keys (``edgeft.*`` provenance) written into the file.
        vocab: tokenizer metadata already read by :func:`read_vocab`.
        progress: show a progress bar over the bytes written.

    Raises:
        ModelError: see :func:`read_model_spec`, :func:`read_vocab` and :func:`gguf_tensors`.
    """
    import gguf

    if out_type not in OUT_TYPES:
        raise ModelError(
            f"unknown GGUF output type {out_type!r}; choose from {', '.join(OUT_TYPES)}"
        )
    spec = read_model_spec(model_dir)
    vocab = vocab or read_vocab(spec.model_dir, spec.n_vocab)
    index = safetensors_index(spec.model_dir)
    tensors = list(gguf_tensors(spec, index))

    writer = gguf.GGUFWriter(out_file, spec.architecture.gguf_arch)
    try:
        writer.add_type(gguf.GGUFType.MODEL)
        writer.add_name(_general_name(name or spec.model_dir.name, vocab))
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        writer.add_file_type(
            {
                "f32": gguf.LlamaFileType.ALL_F32,
                "f16": gguf.LlamaFileType.MOSTLY_F16,
                "bf16": gguf.LlamaFileType.MOSTLY_BF16,
            }[out_type]
        )
        _write_hparams(writer, spec)
        vocab.add_to(writer)
        for key, value in (metadata or {}).items():
            writer.add_string(key, value)
        for gguf_name, stored, transform in tensors:
            if isinstance(stored, np.ndarray):  # computed (rope tables): small, F32
                writer.add_tensor(gguf_name, stored)
                continue
            tensor, raw_dtype = _lazy(stored, transform, out_type)
            writer.add_tensor(gguf_name, tensor, raw_dtype=raw_dtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file(progress=progress)
    finally:
        writer.close()
    return spec, vocab
