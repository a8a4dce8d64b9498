"""What edgeft knows about each Hugging Face architecture, in one table.

Every stage that depends on the architecture reads its entry here: the GGUF converter (llama.cpp's
architecture name, whether q/k rows are reordered for llama.cpp's rotary), the ONNX export (is
the fused graph built for it), the onnxruntime-genai config (its model type), and everything that
needs the attention shape (:func:`attention_shape`: head_dim and KV heads, computed once).
Adding an architecture is adding an entry; a quirk is a field an entry switches on, never an
``if arch ==`` in a stage.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass


@dataclass(frozen=True)
class Architecture:
    """One Hugging Face architecture, as the stages need it.

    Attributes:
        name: the ``architectures`` entry of ``config.json``.
        model_type: the ``model_type`` of ``config.json``.
        gguf_arch: llama.cpp's architecture name.
        permute_qk: llama.cpp's ``llama`` graph rotates interleaved pairs, Hugging Face rotates
            the two halves of each head; the rows of q and k are reordered to match.
        genai_type: onnxruntime-genai's model type (its generic decoder runs all of these).
        fused_graph: edgeft's fused ONNX graph (GroupQueryAttention, skip norms) builds it.
    """

    name: str
    model_type: str
    gguf_arch: str
    permute_qk: bool
    genai_type: str
    fused_graph: bool = True


ARCHITECTURES: dict[str, Architecture] = {
    a.name: a
    for a in (
        Architecture("LlamaForCausalLM", "llama", "llama", permute_qk=True, genai_type="llama"),
        Architecture(
            "MistralForCausalLM", "mistral", "llama", permute_qk=True, genai_type="mistral"
        ),
        Architecture("Qwen2ForCausalLM", "qwen2", "qwen2", permute_qk=False, genai_type="qwen2"),
    )
}


def supported(*, fused_graph: bool = False) -> tuple[str, ...]:
    """Architecture names in the table (only those the fused ONNX graph builds, if asked)."""
    return tuple(a.name for a in ARCHITECTURES.values() if a.fused_graph or not fused_graph)


@dataclass(frozen=True)
class AttentionShape:
    heads: int
    kv_heads: int
    head_dim: int


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
