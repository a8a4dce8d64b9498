"""A fused decoder graph for the supported architectures, written from the safetensors weights.

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

What differs between architectures (norm kinds, q/k norms, fused projections, activations,
rotary and windows per layer) comes from their entry in :mod:`edgeft.architectures`.

Inputs ``input_ids``, ``attention_mask`` and ``past_key_values.{i}.key/value``; outputs
``logits`` and ``present.{i}.key/value`` — the names optimum uses, so the runtimes and
``genai_config.json`` treat both graphs alike. Positions come from the attention mask, as in
onnxruntime-genai's own models. The fp32 graph is checked against PyTorch like any other.
"""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path

import numpy as np

from edgeft.architectures import (
    Architecture,
    LayerAttention,
    activation,
    architecture_of,
    attention_shape,
    head_is_table,
    inverse_frequencies,
    layer_attention,
    longrope_threshold,
    rope_kind,
    rotary_dim,
    split_fused,
    supported,
)
from edgeft.errors import ModelError
from edgeft.hfcompat import model_config
from edgeft.weights import read_f32, safetensors_index

FUSED_ARCHITECTURES = supported(fused_graph=True)
OPSET = 17
# Initializers from this size up go to the external data file as they are made; smaller ones
# (norm weights, shapes, rotary frequencies) stay in the graph, where they can be replaced.
INLINE_MAX_BYTES = 1 << 16
# Offsets of large tensors in the data file are multiples of this (a memory page on every
# system onnxruntime maps files on), small ones of 64 bytes.
PAGE_ALIGN = 1 << 16
PAGE_ALIGN_FROM = 1 << 20


class ExternalData:
    """The graph's weights file, written tensor by tensor as the graph is built: the model is
    never held whole, in memory or in a protobuf message (which cannot exceed 2 GiB)."""

    def __init__(self, path: Path, *, append: bool = False) -> None:
        self.path = Path(path)
        self._file = open(self.path, "ab" if append else "wb")  # noqa: SIM115  see close()
        self.bytes = self._file.tell()

    def tensor(self, name: str, array: np.ndarray):
        """Append ``array`` and return the ``TensorProto`` that points at it.

        Raises:
            ModelError: a float tensor holds NaN or inf (named).
        """
        from onnx import TensorProto, helper

        if array.dtype.kind == "f" and not np.isfinite(array).all():
            raise ModelError(
                f"tensor {name} has non-finite values (NaN or inf); nothing was written"
            )
        align = PAGE_ALIGN if array.nbytes >= PAGE_ALIGN_FROM else 64
        offset = -(-self.bytes // align) * align
        if offset > self.bytes:
            self._file.write(b"\0" * (offset - self.bytes))
        data = np.ascontiguousarray(array)
        self._file.write(data.tobytes())
        self.bytes = offset + data.nbytes
        tensor = TensorProto(
            name=name, dims=list(data.shape), data_type=helper.np_dtype_to_tensor_dtype(data.dtype)
        )
        for key, value in (
            ("location", self.path.name),
            ("offset", offset),
            ("length", data.nbytes),
        ):
            entry = tensor.external_data.add()
            entry.key, entry.value = key, str(value)
        tensor.data_location = TensorProto.EXTERNAL
        return tensor

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> ExternalData:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _Builder:
    """Collects nodes and initializers; names are unique by construction. With ``data``,
    large initializers are written there as they come."""

    def __init__(self, data: ExternalData | None = None, lora: dict | None = None) -> None:
        self.nodes: list = []
        self.initializers: list = []
        self.data = data
        # module → (in, out) of the projections that take a LoRA pair as graph inputs
        self.lora = lora or {}
        self.lora_used: set[str] = set()
        self._count = 0

    def weight(self, name: str, array: np.ndarray) -> str:
        from onnx import numpy_helper

        if self.data is not None and array.nbytes >= INLINE_MAX_BYTES:
            self.initializers.append(self.data.tensor(name, array))
        else:
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
    standard deviation outputs, which only training reads, stay unset: filled, they slow this
    operator, which runs twice a layer, at decode
    (benchmarks/README.md#choosing-the-int4-recipe)."""
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


def _rope_tables(g: _Builder, config: dict, layers: list[LayerAttention]) -> dict:
    """``cos_cache`` / ``sin_cache`` ``[max_positions, rotary_dim / 2]`` for GroupQueryAttention,
    one pair for each distinct rope among the layers; returns rope key → (cos, sin).

    The tables are computed in the graph from the inverse frequencies (in fp32, as transformers
    does): every input is constant, so onnxruntime folds them when it loads the model and the
    file does not carry them (2 MB at 8192 positions). LongRoPE has two pairs, short and long,
    and an ``If`` on the total sequence length picks one, as transformers does each forward.
    """
    from onnx import TensorProto, helper, numpy_helper

    limit = float(config.get("max_position_embeddings", 2048))
    for name, value in (("start", 0.0), ("limit", limit), ("delta", 1.0)):  # Range takes scalars
        g.initializers.append(numpy_helper.from_array(np.array(value, np.float32), f"/rope/{name}"))
    g.weight("/rope/axes", np.array([1], np.int64))
    (positions,) = g.node(
        "Range", ["/rope/start", "/rope/limit", "/rope/delta"], name="/rope/Range"
    )
    (column,) = g.node("Unsqueeze", [positions, "/rope/axes"], name="/rope/Unsqueeze")

    def table(tag: str, inv_freq: np.ndarray, factor: float) -> tuple[str, str]:
        g.weight(f"/rope{tag}/inv_freq", inv_freq[None, :])
        (angles,) = g.node("Mul", [column, f"/rope{tag}/inv_freq"], name=f"/rope{tag}/Mul")
        pair = []
        for op in ("Cos", "Sin"):
            (out,) = g.node(op, [angles], name=f"/rope{tag}/{op}")
            if factor != 1.0:
                scale = g.weight(f"/rope{tag}/{op}/attention_factor", np.array(factor, np.float32))
                (out,) = g.node("Mul", [out, scale], name=f"/rope{tag}/{op}/Scale")
            pair.append(out)
        return pair[0], pair[1]

    half = rotary_dim(config) // 2
    if any(layer.rope for layer in layers) and half % 8:
        raise ModelError(
            f"rotary dimension {2 * half}: onnxruntime's GroupQueryAttention rotates a multiple of "
            "16 dimensions; use --graph optimum"
        )
    tables: dict = {}
    for layer in layers:
        key = _rope_key(layer)
        if not layer.rope or key in tables:
            continue
        tag = f"_{len(tables)}" if tables else ""
        inv_freq, factor = inverse_frequencies(config, layer.rope_theta, layer.rope_scaling)
        if rope_kind(layer.rope_scaling) != "longrope":
            tables[key] = table(tag, inv_freq, factor)
            continue
        short = table(f"{tag}_short", inv_freq, factor)
        long = table(
            f"{tag}_long",
            *inverse_frequencies(config, layer.rope_theta, layer.rope_scaling, long=True),
        )
        threshold = g.weight(
            f"/rope{tag}/threshold", np.array(longrope_threshold(config), np.int32)
        )
        (is_long,) = g.node(
            "Greater", ["total_sequence_length", threshold], name=f"/rope{tag}/Greater"
        )

        def branch(name: str, pair: tuple[str, str]):
            outs = [f"{name}/cos", f"{name}/sin"]
            nodes = [
                helper.make_node("Identity", [src], [dst], name=f"{dst}/Identity")
                for src, dst in zip(pair, outs, strict=True)
            ]
            values = [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outs]
            return helper.make_graph(nodes, name, [], values)

        tables[key] = tuple(
            g.node(
                "If",
                [is_long],
                [f"/rope{tag}/cos_cache", f"/rope{tag}/sin_cache"],
                name=f"/rope{tag}/If",
                then_branch=branch(f"/rope{tag}/long", long),
                else_branch=branch(f"/rope{tag}/short", short),
            )
        )
    return tables


def _rope_key(layer: LayerAttention) -> tuple:
    return (layer.rope_theta, json.dumps(layer.rope_scaling, sort_keys=True))


class FloatMatmuls:
    """How the fp32 graph holds its weights: ``MatMul`` with the weight stored transposed
    ``[in, out]`` (as optimum stores it) and a ``Gather`` on the embedding table. Quantized
    folders write theirs through another such object (:mod:`edgeft.export.onnx.nbits`)."""

    def linear(self, g: _Builder, module: str, weight, x: str, name: str) -> str:
        """``x @ W^T`` for module ``module``; ``weight()`` reads ``W`` ``[out, in]``."""
        w = g.weight(f"{module}.weight_transposed", weight().T)
        (y,) = g.node("MatMul", [x, w], name=f"{name}/MatMul")
        return y

    def packed_qkv(self, g: _Builder, modules: list, x: str, name: str) -> str | None:
        """q|k|v as one packed output for GroupQueryAttention, or None (fp32: separate)."""
        return None

    def embedding(self, g: _Builder, table, shape: tuple, ids: str, tied: bool) -> str:
        """The rows of the embedding table (``table()`` reads it; ``shape`` is its shape)
        for ``ids``."""
        embed = g.weight("model.embed_tokens.weight", table())
        (hidden,) = g.node("Gather", [embed, ids], name="/model/embed_tokens/Gather")
        return hidden

    def head(self, g: _Builder, module: str, weight, x: str, output: str) -> str:
        """The output projection ``module`` (``lm_head``, or the tied table)."""
        w = g.weight(f"{module}.weight_transposed", weight().T)
        (logits,) = g.node("MatMul", [x, w], [output], name="/lm_head/MatMul")
        return logits

    def finish(self, model) -> None:
        """After the graph is built (the quantized folders' norm weights are set here)."""


class _Weights:
    """The checkpoint's tensors as the graph needs them: fp32, fused projections split, norm
    weights with the architecture's offset folded in."""

    def __init__(self, model_dir: Path, architecture: Architecture, config: dict) -> None:
        self.model_dir = model_dir
        self.architecture = architecture
        self.config = config
        self.index = safetensors_index(model_dir)
        self._fused: tuple[str, np.ndarray] | None = None  # the last fused tensor read

    def __contains__(self, name: str) -> bool:
        return name in self.index or self._fused_source(name) is not None

    def __call__(self, name: str) -> np.ndarray:
        if name in self.index:
            data = read_f32(self.index[name])
            if name.endswith("norm.weight") and self.architecture.norm_offset:
                data = data + np.float32(self.architecture.norm_offset)
            return data
        source = self._fused_source(name)
        if source is None:
            raise ModelError(f"{self.model_dir}: tensor {name} is missing")
        stored, module, part = source
        if self._fused is None or self._fused[0] != stored:  # read once for all its parts
            self._fused = (stored, read_f32(self.index[stored]))
        return self._fused[1][split_fused(self.architecture, self.config, module)[part]]

    def _fused_source(self, name: str) -> tuple[str, str, str] | None:
        """(stored fused tensor, fused module, part) for a split projection's name:
        ``…self_attn.k_proj.weight`` → (``…self_attn.qkv_proj.weight``, ``self_attn.qkv_proj``,
        ``k_proj``)."""
        for fused in self.architecture.fused:
            group = fused.module.split(".")[0]
            for part in fused.parts:
                marker = f".{group}.{part}."
                stored = name.replace(marker, f".{fused.module}.")
                if marker in name and stored in self.index:
                    return stored, fused.module, part
        return None


def build_fused_graph(
    model_dir: Path,
    *,
    matmuls=None,
    data: Path | None = None,
    lora: dict[str, tuple[int, int]] | None = None,
    progress: bool = False,
):
    """The fused decoder of ``model_dir`` as an ``onnx.ModelProto``, its weights read one
    tensor at a time.

    Args:
        matmuls: how weights are stored (:class:`FloatMatmuls`, the fp32 graph, by default).
        data: write large initializers to this file as they are made (the returned graph
            points at it: save it next to it); without it they are held in the graph.
        lora: projections (``model.layers.0.self_attn.q_proj`` → (in, out)) that also take a
            LoRA pair as graph inputs: ``y = x·Wᵀ + (x·A)·B`` with ``{module}.lora_A``
            ``[in, rank]`` and ``{module}.lora_B`` ``[rank, out]`` (the scale folded into B),
            the rank a dynamic dimension. Each input defaults to an empty (rank 0) initializer,
            so the graph without an adapter computes the base exactly; onnxruntime's
            ``RunOptions.add_active_adapter`` and onnxruntime-genai's ``set_active_adapter``
            feed an ``.onnx_adapter`` file's pairs by name (:mod:`edgeft.export.onnx.lora`).
        progress: show a progress bar over the decoder layers.

    Raises:
        ModelError: an architecture or config this graph does not cover, or a non-finite
            weight.
    """
    from onnx import TensorProto, helper

    model_dir = Path(model_dir)
    path = model_dir / "config.json"
    config = model_config(path)
    architecture = architecture_of(config, path, target="the fused ONNX graph")
    if not architecture.fused_graph:
        raise ModelError(
            f"{model_dir}: the fused graph covers {', '.join(FUSED_ARCHITECTURES)}; "
            "use --graph optimum"
        )
    act = activation(config, path)
    layers = layer_attention(architecture, config, path)
    tensor = _Weights(model_dir, architecture, config)
    n_layers = config["num_hidden_layers"]
    shape = attention_shape(config)
    n_kv, head_dim = shape.kv_heads, shape.head_dim

    matmuls = matmuls or FloatMatmuls()
    sink = ExternalData(data) if data is not None else None
    try:
        g = _Builder(sink, lora)
        _build(g, config, architecture, act, layers, tensor, matmuls, progress)
    finally:
        if sink is not None:
            sink.close()
    if lora:
        missing = sorted(set(lora) - g.lora_used)
        if missing:
            raise ModelError(f"{model_dir}: no projection {missing[0]} to take a LoRA pair")
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
    inputs += lora_inputs(lora or {})
    graph = helper.make_graph(
        g.nodes, "edgeft-decoder", inputs, outputs, g.initializers + lora_defaults(lora or {})
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid("com.microsoft", 1)],
        producer_name="edgeft",
    )
    matmuls.finish(model)
    return model


def _build(g: _Builder, config, architecture, act, layers, tensor, matmuls, progress) -> None:
    """Nodes and initializers of the fused decoder into ``g``."""
    from onnx import TensorProto

    shape = attention_shape(config)
    n_heads, n_kv, head_dim = shape.heads, shape.kv_heads, shape.head_dim
    eps = float(config.get("rms_norm_eps", 1e-6))
    tied = head_is_table(config, tensor, tensor.model_dir)
    scale = float(config.get("query_pre_attn_scalar") or head_dim) ** -0.5
    ropes = _rope_tables(g, config, layers)

    # Sequence bookkeeping for GroupQueryAttention, from the attention mask.
    g.weight("/axes_1", np.array([1], np.int64))
    g.weight("/one", np.array(1, np.int64))
    (mask_sum,) = g.node("ReduceSum", ["attention_mask", "/axes_1"], keepdims=0)
    (last,) = g.node("Sub", [mask_sum, "/one"])
    (seqlens_k,) = g.node("Cast", [last], ["seqlens_k"], to=TensorProto.INT32)
    (mask_shape,) = g.node("Shape", ["attention_mask"])
    (total,) = g.node("Gather", [mask_shape, "/one"], axis=0)
    g.node("Cast", [total], ["total_sequence_length"], to=TensorProto.INT32)

    table = partial(tensor, "model.embed_tokens.weight")
    shape = tuple(tensor.index["model.embed_tokens.weight"].shape)
    hidden_states = matmuls.embedding(g, table, shape, "input_ids", tied)
    if architecture.embed_scale:
        factor = g.weight("/model/embed_scale", np.array(config["hidden_size"] ** 0.5, np.float32))
        (hidden_states,) = g.node("Mul", [hidden_states, factor], name="/model/embed_scale/Mul")
    residual = None
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(layers), desc="writing the graph", unit="layer")
    for i, layer in enumerate(layers):
        prefix, name = f"model.layers.{i}", f"/model/layers.{i}"

        norm = partial(_norm, g, tensor, prefix, name, eps=eps)
        linear = partial(_layer_linear, g, tensor, matmuls, prefix, name)
        if residual is None:
            x, residual = norm(hidden_states, "input_layernorm"), hidden_states
        else:
            weight = g.weight(
                f"{prefix}.input_layernorm.weight", tensor(f"{prefix}.input_layernorm.weight")
            )
            x, residual = _skip_norm(
                g, hidden_states, residual, weight, f"{name}/input_layernorm", eps
            )
        kinds = ("q_proj", "k_proj", "v_proj")
        packed = None
        biased = any(f"{prefix}.self_attn.{kind}.bias" in tensor for kind in kinds)
        adapted = any(f"{prefix}.self_attn.{kind}" in g.lora for kind in kinds)
        # GroupQueryAttention reads q|k|v packed; a LoRA pair needs each projection's output
        if not architecture.qk_norm and not biased and not adapted:
            modules = [
                (f"{prefix}.self_attn.{kind}", partial(tensor, f"{prefix}.self_attn.{kind}.weight"))
                for kind in kinds
            ]
            packed = matmuls.packed_qkv(g, modules, x, f"{name}/self_attn")
        if packed is not None:
            q, k, v = packed, "", ""
        else:
            q, k, v = (linear(f"self_attn.{kind}", x) for kind in kinds)
        if architecture.qk_norm:
            q = _head_norm(g, tensor, f"{prefix}.self_attn.q_norm", q, n_heads, head_dim, eps)
            k = _head_norm(g, tensor, f"{prefix}.self_attn.k_norm", k, n_kv, head_dim, eps)
        attention = dict(
            num_heads=n_heads,
            kv_num_heads=n_kv,
            scale=scale,
            do_rotary=int(layer.rope),
            rotary_interleaved=0,
        )
        if layer.window and layer.window < config.get("max_position_embeddings", 0):
            attention["local_window_size"] = int(layer.window)
        cos, sin = ropes[_rope_key(layer)] if layer.rope else ("", "")
        attn, key, value = g.node(
            "GroupQueryAttention",
            [
                q,
                k,
                v,
                f"past_key_values.{i}.key",
                f"past_key_values.{i}.value",
                seqlens_k,
                "total_sequence_length",
                cos,
                sin,
            ],
            [f"{name}/attn/output", f"present.{i}.key", f"present.{i}.value"],
            name=f"{name}/self_attn/GroupQueryAttention",
            domain="com.microsoft",
            **attention,
        )
        attn_out = linear("self_attn.o_proj", attn)
        if architecture.sandwich_norms:
            attn_out = norm(attn_out, "post_attention_layernorm")
            mlp_norm = "pre_feedforward_layernorm"
        else:
            mlp_norm = "post_attention_layernorm"
        weight = g.weight(f"{prefix}.{mlp_norm}.weight", tensor(f"{prefix}.{mlp_norm}.weight"))
        x, residual = _skip_norm(g, attn_out, residual, weight, f"{name}/{mlp_norm}", eps)
        gate, up = linear("mlp.gate_proj", x), linear("mlp.up_proj", x)
        if act == "silu":
            (sig,) = g.node("Sigmoid", [gate])
            (gate,) = g.node("Mul", [gate, sig])
        else:  # gelu_tanh: FastGelu is the tanh approximation
            (gate,) = g.node("FastGelu", [gate], domain="com.microsoft")
        (act_out,) = g.node("Mul", [gate, up])
        hidden_states = linear("mlp.down_proj", act_out)
        if architecture.sandwich_norms:
            hidden_states = norm(hidden_states, "post_feedforward_layernorm")
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    final = g.weight("model.norm.weight", tensor("model.norm.weight"))
    x, _ = _skip_norm(g, hidden_states, residual, final, "/model/norm", eps, keep_sum=False)
    head = "model.embed_tokens" if tied else "lm_head"
    cap = config.get("final_logit_softcapping")
    logits = matmuls.head(
        g, head, partial(tensor, f"{head}.weight"), x, "/lm_head/output_0" if cap else "logits"
    )
    if cap:  # logits = cap · tanh(logits / cap)
        cap_value = g.weight("/lm_head/softcap", np.array(cap, np.float32))
        (scaled,) = g.node("Div", [logits, cap_value], name="/lm_head/softcap/Div")
        (squashed,) = g.node("Tanh", [scaled], name="/lm_head/softcap/Tanh")
        g.node("Mul", [squashed, cap_value], ["logits"], name="/lm_head/softcap/Mul")


def _norm(g: _Builder, tensor, prefix: str, name: str, x: str, kind: str, *, eps: float) -> str:
    """RMSNorm ``{prefix}.{kind}`` of ``x``, on its own (not fused with a residual add)."""
    weight = g.weight(f"{prefix}.{kind}.weight", tensor(f"{prefix}.{kind}.weight"))
    (y,) = g.node(
        "SimplifiedLayerNormalization", [x, weight], name=f"{name}/{kind}", axis=-1, epsilon=eps
    )
    return y


def _layer_linear(g: _Builder, tensor, matmuls, prefix: str, name: str, module: str, x: str) -> str:
    """Projection ``{prefix}.{module}`` (``self_attn.q_proj``) of ``x``, its node named
    ``{name}/q_proj/MatMul`` as the quantizers expect."""
    return _linear(g, tensor, matmuls, f"{prefix}.{module}", x, f"{name}/{module.split('.')[1]}")


def _head_norm(g: _Builder, tensor, prefix: str, x: str, heads: int, head_dim: int, eps) -> str:
    """RMSNorm over each head of ``x`` ``[batch, seq, heads * head_dim]`` (Qwen3's and Gemma
    3's q_norm / k_norm), before GroupQueryAttention's rotary."""
    name = "/" + prefix.replace("model.layers.", "model/layers.").replace(".self_attn.", "/")
    weight = g.weight(f"{prefix}.weight", tensor(f"{prefix}.weight"))
    split = g.weight(f"{name}/heads_shape", np.array([0, 0, heads, head_dim], np.int64))
    merge = g.weight(f"{name}/merged_shape", np.array([0, 0, heads * head_dim], np.int64))
    (heads_x,) = g.node("Reshape", [x, split], name=f"{name}/Reshape")
    (normed,) = g.node(
        "SimplifiedLayerNormalization", [heads_x, weight], name=name, axis=-1, epsilon=eps
    )
    (y,) = g.node("Reshape", [normed, merge], name=f"{name}/Reshape_1")
    return y


def _linear(g: _Builder, tensor: _Weights, matmuls, prefix: str, x: str, name: str) -> str:
    """``x @ W^T (+ b)``, the weight as ``matmuls`` stores it."""
    y = matmuls.linear(g, prefix, partial(tensor, f"{prefix}.weight"), x, name)
    if f"{prefix}.bias" in tensor:
        bias = g.weight(f"{prefix}.bias", tensor(f"{prefix}.bias"))
        (y,) = g.node("Add", [y, bias], name=f"{name}/Add")
    if prefix in g.lora:
        g.lora_used.add(prefix)
        a, b = lora_names(prefix)
        (down,) = g.node("MatMul", [x, a], name=f"{name}/lora_A/MatMul")
        (delta,) = g.node("MatMul", [down, b], name=f"{name}/lora_B/MatMul")
        (y,) = g.node("Add", [y, delta], name=f"{name}/lora/Add")
    return y


def lora_names(module: str) -> tuple[str, str]:
    """The graph inputs of ``module``'s LoRA pair."""
    return f"{module}.lora_A", f"{module}.lora_B"


def lora_defaults(lora: dict[str, tuple[int, int]]) -> list:
    """Rank-0 initializers under the LoRA inputs' names: what onnxruntime uses for an input
    that is not fed (no adapter active), making ``(x·A)·B`` an exact zero."""
    from onnx import numpy_helper

    defaults = []
    for module, (n_in, n_out) in sorted(lora.items()):
        a, b = lora_names(module)
        defaults.append(numpy_helper.from_array(np.zeros((n_in, 0), np.float32), a))
        defaults.append(numpy_helper.from_array(np.zeros((0, n_out), np.float32), b))
    return defaults


def lora_inputs(lora: dict[str, tuple[int, int]]) -> list:
    """The LoRA graph inputs: ``lora_A`` ``[in, rank]`` and ``lora_B`` ``[rank, out]``, float,
    the rank dynamic (onnxruntime-genai makes the inputs of an adapter that is not active
    empty by zeroing the smaller of the last two dimensions, which is the rank)."""
    from onnx import TensorProto, helper

    inputs = []
    for module, (n_in, n_out) in sorted(lora.items()):
        a, b = lora_names(module)
        inputs.append(helper.make_tensor_value_info(a, TensorProto.FLOAT, [n_in, "lora_rank"]))
        inputs.append(helper.make_tensor_value_info(b, TensorProto.FLOAT, ["lora_rank", n_out]))
    return inputs
