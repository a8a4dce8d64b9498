"""What edgeft knows about each Hugging Face architecture, in one table.

Every stage that depends on the architecture reads its entry here:

- the GGUF converter: llama.cpp's architecture name, the tensor transforms (q/k rows reordered
  for llama.cpp's interleaved rotary, norm weights shifted by Gemma's ``1 + w``), the rope
  tables llama.cpp reads (``rope_freqs`` for Llama 3, LongRoPE's factors) and which sliding
  windows and rope-free layers llama.cpp can express;
- the fused ONNX graph: norms (plain or ``1 + w``, two or four a layer), per-head q/k norms,
  the MLP activation, fused ``qkv_proj`` / ``gate_up_proj``, embedding scale, final logit
  soft-cap, query scaling, and each layer's rotary and window (:func:`layer_attention`);
- onnxruntime-genai's model type, the quantizers' projection names and GPTQ's layer walk
  (:func:`projections`), and everything that needs the attention shape (:func:`attention_shape`).

Rotary embeddings are computed here once (:func:`inverse_frequencies`) for every rope kind the
table accepts, as transformers computes them. Adding an architecture is adding an entry; a quirk
is a field an entry switches on, never an ``if arch ==`` in a stage.
"""

from __future__ import annotations

import math
from collections.abc import Container, Mapping
from dataclasses import dataclass

import numpy as np

from edgeft.errors import ModelError

# Rope kinds: "default" (no rope_scaling), "linear" (positions divided by a factor), "llama3"
# (Llama 3.1+: low frequencies divided, a smooth band between), "longrope" (Phi-3: per-frequency
# short and long factors and an attention factor).
ROPE_KINDS = ("default", "linear", "llama3", "longrope")


@dataclass(frozen=True)
class Fused:
    """One weight in the checkpoint that holds several projections stacked by rows: Phi-3's
    ``self_attn.qkv_proj`` is q, k and v; its ``mlp.gate_up_proj`` is gate then up."""

    module: str  # "self_attn.qkv_proj"
    parts: tuple[str, ...]  # ("q_proj", "k_proj", "v_proj"), in row order


@dataclass(frozen=True)
class Architecture:
    """One Hugging Face architecture, as the stages need it.

    Attributes:
        name: the ``architectures`` entry of ``config.json``.
        model_type: the ``model_type`` of ``config.json``.
        gguf_arch: llama.cpp's architecture name.
        genai_type: onnxruntime-genai's model type.
        permute_qk: llama.cpp's graph for ``gguf_arch`` rotates interleaved pairs, Hugging Face
            rotates the two halves of each head; the rows of q and k are reordered to match.
        qk_norm: an RMSNorm over each head of q and of k, before rotary (Qwen3, Gemma 3).
        norm_offset: RMSNorm multiplies by ``norm_offset + w`` (Gemma: 1).
        sandwich_norms: four norms a layer: after attention and before and after the MLP
            (``post_attention_layernorm`` normalizes the attention output, not the residual).
        embed_scale: embeddings are multiplied by √hidden_size (Gemma).
        fused: projections stored stacked in one weight (Phi-3).
        rope_kinds: the rope kinds (:data:`ROPE_KINDS`) this architecture's checkpoints use.
        gguf_windows: llama.cpp applies this architecture's sliding windows, layer by layer.
            When false, a window is noted and not written: llama.cpp attends to the whole
            context, identical up to the window.
        gguf_no_rope_every: llama.cpp skips rotary on every n-th layer, fixed in its code
            (SmolLM3: 4); a checkpoint with another pattern is refused.
        gguf_query_scale: llama.cpp scales queries by 1/√head_dim for this architecture; another
            ``query_pre_attn_scalar`` is folded into the q norm's weight.
        fused_graph: edgeft's fused ONNX graph builds it.
    """

    name: str
    model_type: str
    gguf_arch: str
    genai_type: str
    permute_qk: bool = False
    qk_norm: bool = False
    norm_offset: float = 0.0
    sandwich_norms: bool = False
    embed_scale: bool = False
    fused: tuple[Fused, ...] = ()
    rope_kinds: tuple[str, ...] = ("default", "linear")
    gguf_windows: bool = False
    gguf_no_rope_every: int | None = None
    gguf_query_scale: bool = False
    fused_graph: bool = True


ARCHITECTURES: dict[str, Architecture] = {
    a.name: a
    for a in (
        Architecture(
            "LlamaForCausalLM",
            "llama",
            "llama",
            "llama",
            permute_qk=True,
            rope_kinds=("default", "linear", "llama3"),
        ),
        Architecture("MistralForCausalLM", "mistral", "llama", "mistral", permute_qk=True),
        Architecture("Qwen2ForCausalLM", "qwen2", "qwen2", "qwen2"),
        Architecture("Qwen3ForCausalLM", "qwen3", "qwen3", "qwen3", qk_norm=True),
        Architecture(
            "Gemma3ForCausalLM",
            "gemma3_text",
            "gemma3",
            "gemma3_text",
            qk_norm=True,
            norm_offset=1.0,
            sandwich_norms=True,
            embed_scale=True,
            gguf_windows=True,
            gguf_query_scale=True,
        ),
        Architecture(
            "Phi3ForCausalLM",
            "phi3",
            "phi3",
            "phi3",
            fused=(
                Fused("self_attn.qkv_proj", ("q_proj", "k_proj", "v_proj")),
                Fused("mlp.gate_up_proj", ("gate_proj", "up_proj")),
            ),
            rope_kinds=("default", "longrope"),
        ),
        Architecture(
            "SmolLM3ForCausalLM",
            "smollm3",
            "smollm3",
            "smollm3",
            permute_qk=True,
            gguf_no_rope_every=4,
        ),
    )
}

# The projections of a decoder layer, by module path under ``model.layers.{i}``, in the order
# the graph runs them. A fused checkpoint stores some of them stacked (Architecture.fused).
PROJECTIONS = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
)


def supported(*, fused_graph: bool = False) -> tuple[str, ...]:
    """Architecture names in the table (only those the fused ONNX graph builds, if asked)."""
    return tuple(a.name for a in ARCHITECTURES.values() if a.fused_graph or not fused_graph)


def architecture_of(config: Mapping, path="config.json", *, target: str = "export") -> Architecture:
    """The table entry for a ``config.json``.

    Raises:
        ModelError: no architecture in the config is in the table (the message lists them).
    """
    names = config.get("architectures") or []
    for name in names:
        if name in ARCHITECTURES:
            return ARCHITECTURES[name]
    raise ModelError(
        f"{path}: architecture {', '.join(names) or config.get('model_type')!r} is not supported "
        f"for {target}; supported: {', '.join(ARCHITECTURES)}"
    )


def module_names(architecture: Architecture) -> tuple[str, ...]:
    """The linear modules of a layer as the checkpoint names them (``qkv_proj`` where fused),
    short names (``q_proj``), the names LoRA targets and the quantizers' module kinds use."""
    names = []
    for path in PROJECTIONS:
        fused = next((f for f in architecture.fused if path.split(".")[1] in f.parts), None)
        short = (fused.module if fused else path).split(".")[1]
        if short not in names:
            names.append(short)
    return tuple(names)


def check_lora_targets(config: Mapping, targets) -> None:
    """LoRA target names a checkpoint of this architecture has; a projection that is fused
    in it (Phi-3's ``q_proj`` inside ``qkv_proj``) is named with its fused module.

    Raises:
        ModelError: a target is a part of a fused module (the message names the module to
            target instead).
    """
    names = config.get("architectures") or []
    architecture = next((ARCHITECTURES[n] for n in names if n in ARCHITECTURES), None)
    if architecture is None or targets == "all-linear":
        return
    for target in targets:
        for fused in architecture.fused:
            if target in fused.parts:
                module = fused.module.split(".")[1]
                raise ModelError(
                    f"--target-modules {target}: {architecture.name} stores "
                    f"{', '.join(fused.parts)} as one module, {module}; target {module} "
                    f"(modules: {', '.join(module_names(architecture))})"
                )


@dataclass(frozen=True)
class AttentionShape:
    heads: int
    kv_heads: int
    head_dim: int

    def rows(self, part: str, intermediate: int) -> int:
        """Output rows of projection ``part`` (``q_proj``...) in a layer: how a fused weight
        splits."""
        return {
            "q_proj": self.heads * self.head_dim,
            "k_proj": self.kv_heads * self.head_dim,
            "v_proj": self.kv_heads * self.head_dim,
            "gate_proj": intermediate,
            "up_proj": intermediate,
        }[part]


def attention_shape(config: Mapping) -> AttentionShape:
    """Query heads, KV heads and head size of a ``config.json``: ``head_dim`` where the config
    gives it (it need not be hidden/heads), else hidden/heads; KV heads default to the query
    heads (multi-head attention).

    Raises:
        KeyError, TypeError, ValueError, ZeroDivisionError: the config lacks or garbles them.
    """
    heads = int(config["num_attention_heads"])
    return AttentionShape(
        heads=heads,
        kv_heads=int(config.get("num_key_value_heads") or heads),
        head_dim=int(config.get("head_dim") or int(config["hidden_size"]) // heads),
    )


def tied_embeddings(config: Mapping) -> bool:
    """The lm_head is the embedding table: transformers' default when ``config.json`` does not
    say (it leaves out values equal to the default)."""
    return bool(config.get("tie_word_embeddings", True))


def head_is_table(config: Mapping, stored: Container[str], where: object) -> bool:
    """Whether the output projection is the embedding table (tied), checked against the
    weights ``stored`` in checkpoint ``where``: an untied config needs its own
    ``lm_head.weight``."""
    if tied_embeddings(config):
        return True
    if "lm_head.weight" in stored:
        return False
    raise ModelError(
        f"{where}: lm_head.weight is missing and the config does not tie the embeddings "
        "(tie_word_embeddings is false): the checkpoint is incomplete; save it again with its "
        "output projection"
    )


def split_fused(architecture: Architecture, config: Mapping, module: str) -> dict[str, slice]:
    """The rows of each part of fused ``module`` (``self_attn.qkv_proj``), in row order."""
    fused = next(f for f in architecture.fused if f.module == module)
    shape = attention_shape(config)
    parts, row = {}, 0
    for part in fused.parts:
        rows = shape.rows(part, int(config["intermediate_size"]))
        parts[part] = slice(row, row + rows)
        row += rows
    return parts


def activation(config: Mapping, path="config.json") -> str:
    """The MLP activation: ``"silu"`` or ``"gelu_tanh"``.

    Raises:
        ModelError: another activation.
    """
    name = config.get("hidden_activation") or config.get("hidden_act") or "silu"
    kinds = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu_tanh"}
    if name not in kinds:
        raise ModelError(
            f"{path}: activation {name!r} is not supported; supported: {', '.join(kinds)}"
        )
    return kinds[name]


def rope_kind(scaling: Mapping | None) -> str:
    if not scaling:
        return "default"
    return str(scaling.get("rope_type", scaling.get("type")) or "default")


def rotary_dim(config: Mapping) -> int:
    """How many dimensions of each head are rotated (all unless ``partial_rotary_factor``)."""
    return int(attention_shape(config).head_dim * float(config.get("partial_rotary_factor", 1.0)))


@dataclass(frozen=True)
class LayerAttention:
    """How one layer attends: with rotary or not, over a sliding window or not, and the rope
    base and scaling of its rotary (Gemma 3's sliding layers have their own base)."""

    rope: bool
    window: int | None
    rope_theta: float
    rope_scaling: Mapping | None


def layer_attention(
    architecture: Architecture, config: Mapping, path="config.json"
) -> list[LayerAttention]:
    """Each layer's attention, from ``layer_types`` (or the older ``sliding_window`` /
    ``use_sliding_window`` for all layers), ``no_rope_layers`` and ``rope_local_base_freq``.

    Raises:
        ModelError: a rope kind outside the architecture's entry, or an inconsistent config
            (the message names the field).
    """
    n_layers = int(config["num_hidden_layers"])
    scaling = config.get("rope_scaling") or None
    kind = rope_kind(scaling)
    if kind not in architecture.rope_kinds:
        raise ModelError(
            f"{path}: rope_scaling {kind!r} is not supported for {architecture.name}; "
            f"supported: {', '.join(architecture.rope_kinds)}"
        )
    if config.get("attn_logit_softcapping"):
        raise ModelError(
            f"{path}: attn_logit_softcapping {config['attn_logit_softcapping']!r} is not "
            "supported (Gemma 2's attention soft-cap)"
        )
    window = config.get("sliding_window")
    types = config.get("layer_types")
    if types is None:  # configs written before layer_types: Qwen2's first max_window_layers
        # layers attend to everything (as transformers derives layer_types from them)
        first = int(config.get("max_window_layers") or 0)
        types = [
            "sliding_attention"
            if window and config.get("use_sliding_window", True) and i >= first
            else "full_attention"
            for i in range(n_layers)
        ]
    no_rope = config.get("no_rope_layers") or [1] * n_layers
    if len(types) != n_layers or len(no_rope) != n_layers:
        raise ModelError(f"{path}: layer_types or no_rope_layers do not have one entry a layer")
    theta = float(config.get("rope_theta", 10000.0))
    local_theta = float(config.get("rope_local_base_freq") or theta)
    layers = []
    for kind_i, rope in zip(types, no_rope, strict=True):
        sliding = kind_i == "sliding_attention" and bool(window)
        layers.append(
            LayerAttention(
                rope=bool(rope),
                window=int(window) if sliding else None,
                # Gemma 3's sliding layers use their own base, without the global scaling.
                rope_theta=local_theta if sliding and "rope_local_base_freq" in config else theta,
                rope_scaling=None if sliding and "rope_local_base_freq" in config else scaling,
            )
        )
    return layers


def inverse_frequencies(
    config: Mapping, theta: float, scaling: Mapping | None, *, long: bool = False
) -> tuple[np.ndarray, float]:
    """RoPE's inverse frequencies ``[rotary_dim / 2]`` (fp32, as transformers computes them)
    and the attention factor that multiplies cos and sin (1 except for LongRoPE).

    ``long`` picks LongRoPE's long factors, which transformers uses once a sequence is longer
    than ``original_max_position_embeddings``.
    """
    dim = rotary_dim(config)
    base = np.float32(theta) ** (np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / dim)
    inv_freq = (1.0 / base).astype(np.float32)
    kind = rope_kind(scaling)
    factor = 1.0
    if kind == "linear":
        inv_freq = inv_freq / np.float32(scaling["factor"])
    elif kind == "llama3":
        factor = float(scaling["factor"])
        low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
        old = float(scaling["original_max_position_embeddings"])
        wavelen = 2 * math.pi / inv_freq
        scaled = np.where(wavelen > old / low, inv_freq / factor, inv_freq)
        smooth = (old / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < old / high) & ~(wavelen > old / low)
        inv_freq = np.where(medium, smoothed, scaled).astype(np.float32)
        factor = 1.0
    elif kind == "longrope":
        ext = np.asarray(scaling["long_factor" if long else "short_factor"], np.float32)
        if ext.shape != (dim // 2,):
            raise ModelError(
                f"rope_scaling {'long' if long else 'short'}_factor has {ext.size} entries; "
                f"the rotary dimension {dim} needs {dim // 2}"
            )
        inv_freq = (1.0 / (ext * base)).astype(np.float32)
        factor = longrope_attention_factor(config)
    elif kind != "default":
        raise ModelError(
            f"rope_scaling {kind!r} is not supported; supported: {', '.join(ROPE_KINDS)}"
        )
    return inv_freq, factor


def longrope_attention_factor(config: Mapping) -> float:
    """LongRoPE's cos/sin multiplier: given, or √(1 + ln s / ln n₀) for the context extension
    s = max_position_embeddings / original_max_position_embeddings (n₀)."""
    scaling = config.get("rope_scaling") or {}
    if scaling.get("attention_factor") is not None:
        return float(scaling["attention_factor"])
    original = config.get("original_max_position_embeddings")
    factor = (
        config["max_position_embeddings"] / original if original else scaling.get("factor", 1.0)
    )
    original = original or config["max_position_embeddings"]
    return 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))


def longrope_threshold(config: Mapping) -> int:
    """Sequence length past which LongRoPE switches to its long factors."""
    return int(config.get("original_max_position_embeddings") or config["max_position_embeddings"])


def uniform_context(config: Mapping) -> int | None:
    """The longest context over which every runtime computes this checkpoint alike. LongRoPE
    switches to its long factors by sequence length in transformers and onnxruntime, by context
    size in llama.cpp (rounded up to a multiple of 256): the two agree up to
    ``original_max_position_embeddings`` (4096 in Phi-3 and Phi-4-mini)."""
    if rope_kind(config.get("rope_scaling")) == "longrope":
        return longrope_threshold(config)
    return config.get("max_position_embeddings")
