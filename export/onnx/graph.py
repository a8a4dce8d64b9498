"""A fused decoder graph for the llama family, written from the safetensors weights.

optimum-onnx traces the PyTorch model op by op: hundreds of small nodes a layer, and a KV
cache that is concatenated (copied) at every step. At batch 1 on a CPU that per-op and per-step
overhead, not the matmuls, sets the decode speed of a small model. This graph uses
onnxruntime's fused operators instead:

- ``GroupQueryAttention`` with rotary embedding inside (``do_rotary``), reading past keys and
  values and writing present ones; it can share one preallocated buffer for both, which
  onnxruntime-genai does (``past_present_share_buffer``);
- ``SimplifiedLayerNormalization`` / ``SkipSimplifiedLayerNormalization`` (RMSNorm, fused
  with the residual add);
- plain ``MatMul`` with constant weights, which the quantization passes turn into
  ``MatMulNBits``.

Inputs ``input_ids``, ``attention_mask`` and ``past_key_values.{i}.key/value``; outputs
``logits`` and ``present.{i}.key/value`` — the names optimum uses, so the runtimes and
``genai_config.json`` treat both graphs alike. Positions come from the attention mask, as in
onnxruntime-genai's own models. The fp32 graph is checked against PyTorch like any other.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from edgeft.architectures import attention_shape, supported
from edgeft.errors import ModelError
from edgeft.export.gguf.convert import _read_f32, _safetensors_index

FUSED_ARCHITECTURES = supported(fused_graph=True)
OPSET = 17


def _inverse_frequencies(config: dict, head_dim: int) -> np.ndarray:
    """RoPE's angle per position for each pair of dimensions, ``[1, head_dim / 2]`` (linear
    scaling folded in, as transformers does)."""
    base = float(config.get("rope_theta", 10000.0))
    scaling = config.get("rope_scaling") or {}
    kind = scaling.get("rope_type", scaling.get("type"))
    inv_freq = 1.0 / base ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    if kind == "linear":
        inv_freq = inv_freq / float(scaling["factor"])
    elif kind not in (None, "default"):
        raise ModelError(
            f"rope_scaling {kind!r} is not supported by the fused graph; use --graph optimum"
        )
    return inv_freq.astype(np.float32)[None, :]


class _Builder:
    """Collects nodes and initializers; names are unique by construction."""

    def __init__(self) -> None:
        self.nodes: list = []
        self.initializers: list = []
        self._count = 0

    def weight(self, name: str, array: np.ndarray) -> str:
        from onnx import numpy_helper

        self.initializers.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def node(
        self,
        op: str,
        inputs: list[str],
        outputs: int | list[str] = 1,
        *,
        name=None,
        domain: str = "",
        **attrs,
    ) -> list[str]:
        from onnx import helper

        self._count += 1
        name = name or f"/{op}_{self._count}"
        if isinstance(outputs, int):
            outputs = [f"{name}/output_{i}" for i in range(outputs)]
        self.nodes.append(
            helper.make_node(op, inputs, outputs, name=name, domain=domain or None, **attrs)
        )
        return outputs


def _skip_norm(g: _Builder, x, residual, weight, name: str, eps: float, *, keep_sum=True):
    """RMSNorm(x + residual) fused; returns (normed, x + residual). The mean and inverse
    standard deviation outputs, which only training reads, stay unset: filled, they made this
    operator 40% slower at decode (SmolLM2 runs 60 of them a token)."""
    outputs = [f"{name}/output_0", "", "", f"{name}/output_3" if keep_sum else ""]
    g.node(
        "SkipSimplifiedLayerNormalization",
        [x, residual, weight],
        outputs if keep_sum else outputs[:1],
        name=name,
        domain="com.microsoft",
        epsilon=eps,
    )
    return outputs[0], outputs[3]


def _rope_tables(g: _Builder, config: dict, head_dim: int) -> None:
    """``cos_cache`` and ``sin_cache`` ``[max_positions, head_dim / 2]`` for
    GroupQueryAttention, computed in the graph from the frequencies (in fp32, as transformers
    does). Every input is constant, so onnxruntime folds them into tables when it loads the
    model, and the file does not carry them (2 MB at 8192 positions)."""
    from onnx import numpy_helper

    limit = float(config.get("max_position_embeddings", 2048))
    for name, value in (("start", 0.0), ("limit", limit), ("delta", 1.0)):  # Range takes scalars
        g.initializers.append(numpy_helper.from_array(np.array(value, np.float32), f"/rope/{name}"))
    g.weight("/rope/axes", np.array([1], np.int64))
    g.weight("/rope/inv_freq", _inverse_frequencies(config, head_dim))
    (positions,) = g.node(
        "Range", ["/rope/start", "/rope/limit", "/rope/delta"], name="/rope/Range"
    )
    (column,) = g.node("Unsqueeze", [positions, "/rope/axes"], name="/rope/Unsqueeze")
    (angles,) = g.node("Mul", [column, "/rope/inv_freq"], name="/rope/Mul")
    g.node("Cos", [angles], ["cos_cache"], name="/rope/Cos")
    g.node("Sin", [angles], ["sin_cache"], name="/rope/Sin")


def build_fused_graph(model_dir: Path):
    """The fp32 fused decoder of ``model_dir`` as an ``onnx.ModelProto``.

    Raises:
        ModelError: an architecture or config this graph does not cover.
    """
    from onnx import TensorProto, helper

    model_dir = Path(model_dir)
    config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    architecture = next(
        (a for a in config.get("architectures") or [] if a in FUSED_ARCHITECTURES), None
    )
    if architecture is None:
        raise ModelError(
            f"{model_dir}: the fused graph covers {', '.join(FUSED_ARCHITECTURES)}; "
            "use --graph optimum"
        )
    if config.get("hidden_act", "silu") != "silu":
        raise ModelError(f"{model_dir}: hidden_act {config['hidden_act']!r} is not silu")
    index = _safetensors_index(model_dir)

    def tensor(name: str) -> np.ndarray:
        if name not in index:
            raise ModelError(f"{model_dir}: tensor {name} is missing")
        return _read_f32(index[name])

    n_layers = config["num_hidden_layers"]
    shape = attention_shape(config)
    n_heads, n_kv, head_dim = shape.heads, shape.kv_heads, shape.head_dim
    eps = float(config.get("rms_norm_eps", 1e-6))
    window = config.get("sliding_window") if config.get("use_sliding_window", True) else None
    tied = bool(config.get("tie_word_embeddings", False)) or "lm_head.weight" not in index

    g = _Builder()
    _rope_tables(g, config, head_dim)
    embed = g.weight("model.embed_tokens.weight", tensor("model.embed_tokens.weight"))

    # Sequence bookkeeping for GroupQueryAttention, from the attention mask.
    g.weight("/axes_1", np.array([1], np.int64))
    g.weight("/one", np.array(1, np.int64))
    (mask_sum,) = g.node("ReduceSum", ["attention_mask", "/axes_1"], keepdims=0)
    (last,) = g.node("Sub", [mask_sum, "/one"])
    (seqlens_k,) = g.node("Cast", [last], ["seqlens_k"], to=TensorProto.INT32)
    (mask_shape,) = g.node("Shape", ["attention_mask"])
    (total,) = g.node("Gather", [mask_shape, "/one"], axis=0)
    (total_len,) = g.node("Cast", [total], ["total_sequence_length"], to=TensorProto.INT32)

    (hidden_states,) = g.node("Gather", [embed, "input_ids"], name="/model/embed_tokens/Gather")
    residual = None
    present = []
    for i in range(n_layers):
        prefix = f"model.layers.{i}"
        norm = g.weight(
            f"{prefix}.input_layernorm.weight", tensor(f"{prefix}.input_layernorm.weight")
        )
        if residual is None:
            (x,) = g.node(
                "SimplifiedLayerNormalization",
                [hidden_states, norm],
                name=f"/model/layers.{i}/input_layernorm",
                axis=-1,
                epsilon=eps,
            )
            residual = hidden_states
        else:
            x, residual = _skip_norm(
                g, hidden_states, residual, norm, f"/model/layers.{i}/input_layernorm", eps
            )
        projections = {}
        for kind in ("q_proj", "k_proj", "v_proj"):
            projections[kind] = _linear(
                g,
                tensor,
                index,
                f"{prefix}.self_attn.{kind}",
                x,
                f"/model/layers.{i}/self_attn/{kind}",
            )
        attention = dict(
            num_heads=n_heads,
            kv_num_heads=n_kv,
            scale=float(head_dim**-0.5),
            do_rotary=1,
            rotary_interleaved=0,
        )
        if window and window < config.get("max_position_embeddings", 0):
            attention["local_window_size"] = int(window)
        attn, key, value = g.node(
            "GroupQueryAttention",
            [
                projections["q_proj"],
                projections["k_proj"],
                projections["v_proj"],
                f"past_key_values.{i}.key",
                f"past_key_values.{i}.value",
                seqlens_k,
                total_len,
                "cos_cache",
                "sin_cache",
            ],
            [f"/model/layers.{i}/attn/output", f"present.{i}.key", f"present.{i}.value"],
            name=f"/model/layers.{i}/self_attn/GroupQueryAttention",
            domain="com.microsoft",
            **attention,
        )
        present += [key, value]
        attn_out = _linear(
            g,
            tensor,
            index,
            f"{prefix}.self_attn.o_proj",
            attn,
            f"/model/layers.{i}/self_attn/o_proj",
        )
        post = g.weight(
            f"{prefix}.post_attention_layernorm.weight",
            tensor(f"{prefix}.post_attention_layernorm.weight"),
        )
        x, residual = _skip_norm(
            g, attn_out, residual, post, f"/model/layers.{i}/post_attention_layernorm", eps
        )
        gate = _linear(
            g, tensor, index, f"{prefix}.mlp.gate_proj", x, f"/model/layers.{i}/mlp/gate_proj"
        )
        up = _linear(g, tensor, index, f"{prefix}.mlp.up_proj", x, f"/model/layers.{i}/mlp/up_proj")
        (sig,) = g.node("Sigmoid", [gate])
        (silu,) = g.node("Mul", [gate, sig])
        (act,) = g.node("Mul", [silu, up])
        hidden_states = _linear(
            g, tensor, index, f"{prefix}.mlp.down_proj", act, f"/model/layers.{i}/mlp/down_proj"
        )
    final = g.weight("model.norm.weight", tensor("model.norm.weight"))
    x, _ = _skip_norm(g, hidden_states, residual, final, "/model/norm", eps, keep_sum=False)
    head = (
        g.weight("model.embed_tokens.weight_transposed", tensor("model.embed_tokens.weight").T)
        if tied
        else g.weight("lm_head.weight_transposed", tensor("lm_head.weight").T)
    )
    g.node("MatMul", [x, head], ["logits"], name="/lm_head/MatMul")

    cache = ["batch_size", n_kv, "past_sequence_length", head_dim]
    present_shape = ["batch_size", n_kv, "total_sequence_length", head_dim]
    inputs = [
        helper.make_tensor_value_info(
            "input_ids", TensorProto.INT64, ["batch_size", "sequence_length"]
        ),
        helper.make_tensor_value_info(
            "attention_mask", TensorProto.INT64, ["batch_size", "total_sequence_length"]
        ),
    ]
    outputs = [
        helper.make_tensor_value_info(
            "logits", TensorProto.FLOAT, ["batch_size", "sequence_length", config["vocab_size"]]
        )
    ]
    for i in range(n_layers):
        for kind in ("key", "value"):
            inputs.append(
                helper.make_tensor_value_info(
                    f"past_key_values.{i}.{kind}", TensorProto.FLOAT, cache
                )
            )
            outputs.append(
                helper.make_tensor_value_info(
                    f"present.{i}.{kind}", TensorProto.FLOAT, present_shape
                )
            )
    graph = helper.make_graph(g.nodes, "edgeft-decoder", inputs, outputs, g.initializers)
    return helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid("com.microsoft", 1)],
        producer_name="edgeft",
    )


def _linear(g: _Builder, tensor, index, prefix: str, x: str, name: str) -> str:
    """``x @ W^T (+ b)`` with the weight stored transposed, as optimum stores it."""
    weight = g.weight(f"{prefix}.weight_transposed", tensor(f"{prefix}.weight").T)
    (y,) = g.node("MatMul", [x, weight], name=f"{name}/MatMul")
    if f"{prefix}.bias" in index:
        bias = g.weight(f"{prefix}.bias", tensor(f"{prefix}.bias"))
        (y,) = g.node("Add", [y, bias], name=f"{name}/Add")
    return y
