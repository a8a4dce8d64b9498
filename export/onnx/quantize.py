"""Precision passes over an optimum-exported decoder graph: fp16, weight-only int8/int4
(``MatMulNBits``), dynamic int8, and quantized embedding tables (``GatherBlockQuantized``).

Weight-only quantization keeps activations in float and stores each weight matrix in blocks of
``block_size`` values along the input dimension, with one float scale (and, unless symmetric,
one zero point) per block. Which matrices get 8 bits and which 4 is a per-module choice: in
small models the vocabulary-sized lm_head and embedding table are a large share of the file and
of the error, and some projections are more sensitive than others.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field

import numpy as np

from edgeft.architectures import PROJECTIONS
from edgeft.errors import EdgeftError

ONNX_TYPES = ("fp32", "fp16", "int8", "int8-dynamic", "int4")
PRECISIONS = ("fp32", "int8", "int4")
KV_CACHE_TYPES = ("fp16", "fp32", "int8")
BLOCK_SIZES = (16, 32, 64, 128)
# MatMulNBits accuracy_level: the precision its CPU kernel computes in. 0 (unset) and 1 keep
# fp32 activations; 4 quantizes activations to int8 per block (faster, less accurate).
ACCURACY_LEVELS = (0, 1, 2, 3, 4)
ALGORITHMS = ("gptq", "rtn")
MAX_NORM_EPOCHS = 8
MIXED_INT8_BLOCK = 64
MIN_SAMPLED_TOKENS = 64
MAX_SAMPLED_TOKENS = 1 << 20
# The graph's projections, by their short name: fused checkpoints (Phi-3's qkv_proj) are split
# into these by the graph builder, so every architecture's graph has the same kinds.
MODULE_KINDS = tuple(path.split(".")[1] for path in PROJECTIONS)


@dataclass(frozen=True)
class QuantSettings:
    """How the int8 and int4 folders are quantized.

    Attributes:
        block_size: values per scale along the input dimension (16, 32, 64 or 128).
        symmetric: the int4 folder's 4-bit matrices without zero points (the default):
            smaller and faster to decode; GPTQ tries scales that round each row best.
            ``False`` stores a zero point per block (more exact for skewed blocks, slower).
            The int4 folder's 8-bit matrices never have zero points, the int8 folder's
            always do (:func:`matrix_layout`).
        accuracy_level: MatMulNBits compute precision (see :data:`ACCURACY_LEVELS`). 4 is the
            default: onnxruntime's CPU kernels for 8-bit weights are fast only there, and it
            costs little accuracy (benchmarks/README.md#choosing-the-int4-recipe).
        lm_head: lm_head precision in the int4 folder (the int8 folder keeps int8).
        embeddings: embedding-table precision in the int8 and int4 folders; ``None`` follows
            the folder's lm_head, so a tied table is stored once for both.
        int8_modules: projections kept at 8 bits in the int4 folder. ``v_proj``, ``k_proj``
            and ``down_proj`` cost the most accuracy per byte at 4 bits in SmolLM2 (measured
            one kind at a time, the rest at 8 bits); the attention ones are also small.
            ``q_proj`` goes with them so that q|k|v share a format and run as one matmul:
            at 2 threads decode time follows the number of operators more than the bytes
            (an 8-bit weight costs about as much time as a 4-bit one, which must be unpacked).
        algorithm: how the int4 folder's 4-bit matrices are rounded: ``gptq`` (calibrated on
            text, see :mod:`edgeft.export.onnx.gptq`) or ``rtn`` (round to nearest).
        module_blocks: ``(kind, block size)`` pairs for matrices in the int4 folder that do
            not use the uniform layout (:func:`mixed_block_size`); kinds as in
            ``int8_modules``, plus ``lm_head``. A speed knob: at 2 threads onnxruntime's
            kernels spend much of their time per block, so larger blocks decode faster and
            cost accuracy. The default, gate and up in 4-bit blocks of 64 and down_proj in
            8-bit blocks of 128, symmetric, is the fastest int4 recipe that kept the held-out
            KL under llama.cpp Q4_K_M's; o_proj stays in 32, where 64 costs more than gate and
            up together (benchmarks/README.md#choosing-the-int4-recipe).
        norm_epochs: passes over the calibration text that tune the int4 folder's RMSNorm
            weights after GPTQ, by distillation from the checkpoint
            (:func:`edgeft.export.onnx.gptq.tune_norms`); 0 leaves them as trained.
        sampled_tokens: tokens of text sampled from the checkpoint that GPTQ and norm tuning
            also calibrate on, after the fine-tuning data or ``--calibration`` (0: that data
            alone, the default; without data the calibration is sampled text anyway). Data
            from one domain fits the int4 weights and norms to it; samples keep the model's
            other text in view. Off by default: sampling costs minutes of export and did not
            lower the held-out KL (benchmarks/README.md#choosing-the-int4-recipe).
        kv_cache: the KV cache's type in the int8 and int4 folders (fused graph); ``None``
            (the default) picks it by folder (:meth:`kv_cache_type`). ``int8``:
            GroupQueryAttention stores K and V in int8 with per-layer, per-channel scales
            measured on the calibration text (:func:`~edgeft.export.onnx.gptq.kv_cache_scales`)
            and computes attention in fp32: a quarter of the fp32 cache, for a lower peak
            RSS and faster decode deep in the context at a small cost in KL. ``fp32`` keeps
            the cache as the graph computes it. ``fp16`` declares the cache fp16: on x86 it
            cost more memory and decode time than it saved; it is there for devices whose
            runtime handles it natively
            (benchmarks/README.md#onnx-int4-memory-at-the-same-context-as-llamacpp-cpu-2-threads).
    """

    block_size: int = field(
        default=32, metadata={"choices": BLOCK_SIZES, "help": "weights per scale"}
    )
    symmetric: bool = field(
        default=True,
        metadata={
            "help": "the int4 folder's 4-bit matrices without zero points: smaller, faster to "
            "decode; --no-symmetric stores a zero point per block"
        },
    )
    accuracy_level: int = field(
        default=4,
        metadata={
            "choices": ACCURACY_LEVELS,
            "help": "MatMulNBits compute precision: 0/1 fp32, 4 int8 activations",
        },
    )
    lm_head: str = field(
        default="int4",
        metadata={"choices": PRECISIONS, "help": "lm_head precision in the int4 folder"},
    )
    embeddings: str | None = field(
        default=None,
        metadata={
            "choices": PRECISIONS,
            "help": "embedding table precision in the int8/int4 folders (default: the folder's "
            "lm_head precision, so a tied table is stored once)",
        },
    )
    int8_modules: tuple[str, ...] = field(
        default=("q_proj", "k_proj", "v_proj", "down_proj"),
        metadata={
            "metavar": "MODULE,...",
            "help": "projections kept at 8 bits in the int4 folder, from: "
            f"{', '.join(MODULE_KINDS)} ('' for none)",
        },
    )
    algorithm: str = field(
        default="gptq",
        metadata={
            "choices": ALGORITHMS,
            "help": "rounding of the int4 folder's 4-bit weights: gptq (calibrated) or rtn",
        },
    )
    module_blocks: tuple[tuple[str, int], ...] = field(
        default=(("gate_proj", 64), ("up_proj", 64), ("down_proj", 128)),
        metadata={
            "metavar": "MODULE=SIZE",
            "help": "block sizes in the int4 folder that differ from the uniform layout "
            f"(--block-size for 4-bit matrices, {MIXED_INT8_BLOCK} for 8-bit ones): larger "
            "blocks decode faster and are less accurate; modules as for --int8-modules, plus "
            "lm_head ('' for the uniform layout)",
        },
    )
    norm_epochs: int = field(
        default=1,
        metadata={
            "help": "passes over the calibration text that tune the int4 folder's RMSNorm "
            "weights after GPTQ, matching the checkpoint's next-token distribution (0 to skip)"
        },
    )
    sampled_tokens: int = field(
        default=0,
        metadata={
            "help": "tokens of text sampled from the model that GPTQ and norm tuning also "
            "calibrate on, after the fine-tuning data or --calibration, so that the int4 "
            "folder fits that one domain less (0: none; e.g. 16384)"
        },
    )
    kv_cache: str | None = field(
        default=None,
        metadata={
            "choices": KV_CACHE_TYPES,
            "help": "KV cache type of the int8 and int4 folders (default: int8 in the int4 "
            "folder, fp32 in the int8 one): int8 is a quarter of fp32 (per-channel scales "
            "measured on the calibration text); fp16 halves it but onnxruntime's x86 kernels "
            "ran it slower and larger",
        },
    )

    def embedding_precision(self, quant: str) -> str:
        """The embedding table's precision in the ``quant`` folder."""
        if self.embeddings is not None:
            return self.embeddings
        return "int8" if quant == "int8" else self.lm_head

    def kv_cache_type(self, quant: str) -> str:
        """The KV cache's type in the ``quant`` folder: ``kv_cache`` where set, else int8 in
        the int4 folder, whose memory on a phone is the point, and fp32 in the int8 one,
        whose accuracy is: an int8 cache took the int8 folder's mean KL past llama.cpp Q8_0's
        (benchmarks/README.md#onnx-export-vs-onnxruntime-genais-builder-and-llamacpp-cpu-2-threads)."""
        if self.kv_cache is not None:
            return self.kv_cache
        return "int8" if quant == "int4" else "fp32"

    def check(self) -> None:
        """Raise :class:`EdgeftError` on any value outside its choices."""
        if self.block_size not in BLOCK_SIZES:
            raise EdgeftError(
                f"--block-size must be one of {', '.join(map(str, BLOCK_SIZES))}; "
                f"got {self.block_size}"
            )
        if self.accuracy_level not in ACCURACY_LEVELS:
            raise EdgeftError(f"--accuracy-level must be one of 0-4; got {self.accuracy_level}")
        for name, value in (("--lm-head", self.lm_head), ("--embeddings", self.embeddings)):
            if value is not None and value not in PRECISIONS:
                raise EdgeftError(f"{name} must be one of {', '.join(PRECISIONS)}; got {value!r}")
        if self.algorithm not in ALGORITHMS:
            raise EdgeftError(
                f"--algorithm must be one of {', '.join(ALGORITHMS)}; got {self.algorithm!r}"
            )
        if self.kv_cache is not None and self.kv_cache not in KV_CACHE_TYPES:
            raise EdgeftError(
                f"--kv-cache must be one of {', '.join(KV_CACHE_TYPES)}; got {self.kv_cache!r}"
            )
        if not 0 <= self.norm_epochs <= MAX_NORM_EPOCHS:
            raise EdgeftError(
                f"--norm-epochs must be between 0 and {MAX_NORM_EPOCHS}; got {self.norm_epochs}"
            )
        if self.sampled_tokens and not MIN_SAMPLED_TOKENS <= self.sampled_tokens <= (
            MAX_SAMPLED_TOKENS
        ):
            raise EdgeftError(
                f"--sampled-tokens must be 0 or between {MIN_SAMPLED_TOKENS} and "
                f"{MAX_SAMPLED_TOKENS}; got {self.sampled_tokens}"
            )
        unknown = [m for m in self.int8_modules if m not in MODULE_KINDS]
        if unknown:
            raise EdgeftError(
                f"--int8-modules: unknown module {', '.join(unknown)}; choose from "
                f"{', '.join(MODULE_KINDS)}"
            )
        for kind, size in self.module_blocks:
            if kind not in (*MODULE_KINDS, "lm_head"):
                raise EdgeftError(
                    f"--module-blocks: unknown module {kind!r}; choose from "
                    f"{', '.join(MODULE_KINDS)}, lm_head"
                )
            if size not in BLOCK_SIZES:
                raise EdgeftError(
                    f"--module-blocks: {kind}={size}: the block size must be one of "
                    f"{', '.join(map(str, BLOCK_SIZES))}"
                )


def module_kind(node_name: str) -> str | None:
    """``/model/layers.3/mlp/down_proj/MatMul`` → ``down_proj``; lm_head → ``lm_head``."""
    if "lm_head" in node_name:
        return "lm_head"
    match = re.search(r"/(\w+_proj)/", node_name)
    return match.group(1) if match else None


def weight_matmuls(model) -> list:
    """MatMul nodes whose second input is a weight initializer."""
    weights = {init.name for init in model.graph.initializer}
    return [n for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in weights]


def bits_plan(model, quant: str, settings: QuantSettings) -> dict[str, int]:
    """Bits for every weight MatMul of ``model`` in the ``int8`` or ``int4`` folder."""
    return {
        node.name: planned_bits(module_kind(node.name), quant, settings)
        for node in weight_matmuls(model)
    }


def planned_bits(kind: str | None, quant: str, settings: QuantSettings) -> int:
    """Bits of a matrix of module ``kind`` (``down_proj``, ``lm_head``) in the ``int8`` or
    ``int4`` folder; 0 keeps it in float."""
    if quant == "int8":
        return 8
    if kind == "lm_head":
        return {"fp32": 0, "int8": 8, "int4": 4}[settings.lm_head]
    return 8 if kind in settings.int8_modules else 4


def matrix_layout(
    bits: int, kind: str | None, settings: QuantSettings, *, mixed: bool
) -> tuple[int, int, bool]:
    """``(bits, block size, symmetric)`` of a ``bits`` matrix of module ``kind``: the
    settings' block size with zero points (the int8 folder), or with ``mixed`` (the int4
    folder) :func:`mixed_block_size` and :func:`mixed_symmetric`."""
    if not mixed:
        return bits, settings.block_size, False
    return bits, mixed_block_size(bits, settings, kind), mixed_symmetric(bits, settings)


def mixed_block_size(bits: int, settings: QuantSettings, kind: str | None = None) -> int:
    """Block size of a ``bits`` matrix of module ``kind`` in the int4 folder: ``module_blocks``
    for its kind where set, else ``block_size`` for the 4-bit ones and blocks of 64 for the
    8-bit ones, whose fp32 scales cost half as much as 32's (0.08 instead of 0.16 bytes a
    weight) for no measurable error at 8 bits; that buys room for more 8-bit matrices.

    Larger 8-bit blocks run faster (onnxruntime's int8 kernel spends much of its time per
    block) but cost accuracy through the activations, which accuracy level 4 quantizes in the
    weight's blocks too; down_proj in blocks of 128 is part of the default recipe
    (:class:`QuantSettings` ``module_blocks``, benchmarks/README.md#choosing-the-int4-recipe)."""
    blocks = dict(settings.module_blocks)
    if kind in blocks:
        return blocks[kind]
    if bits == 8:
        return max(settings.block_size, MIXED_INT8_BLOCK)
    return settings.block_size


def mixed_symmetric(bits: int, settings: QuantSettings) -> bool:
    """Whether a ``bits`` matrix in the int4 folder goes without zero points: the 8-bit ones
    always (a zero point per block buys nothing measurable at 8 bits, and costs 0.7 MB in
    SmolLM2-135M); the 4-bit ones as ``--symmetric`` says."""
    return bits == 8 or settings.symmetric


def quantize_weights(model, plan: dict[str, int], settings: QuantSettings, *, mixed: bool = False):
    """Replace each planned MatMul by a MatMulNBits of its bits (0 = leave in float); with
    ``mixed`` (the int4 folder) matrices use :func:`mixed_block_size` and
    :func:`mixed_symmetric`."""
    from onnxruntime.quantization import matmul_nbits_quantizer as mnb

    logging.getLogger(mnb.__name__).setLevel(logging.WARNING)

    def layout(name: str) -> tuple[int, int, bool]:
        return matrix_layout(plan[name], module_kind(name), settings, mixed=mixed)

    groups: dict[tuple[int, int, bool], set[str]] = {}
    for name, bits in plan.items():
        if bits:
            groups.setdefault(layout(name), set()).add(name)
    for (bits, block_size, symmetric), chosen in sorted(groups.items()):
        config = mnb.DefaultWeightOnlyQuantConfig(
            block_size=block_size,
            is_symmetric=symmetric,
            accuracy_level=settings.accuracy_level or None,
            bits=bits,
        )
        others = [n.name for n in weight_matmuls(model) if n.name not in chosen]
        quantizer = mnb.MatMulNBitsQuantizer(model, nodes_to_exclude=others, algo_config=config)
        quantizer.process()
        model = quantizer.model.model
    return model


def _block_quantize(weight: np.ndarray, bits: int, block: int, *, symmetric: bool = False):
    """Per-block quantization of each row: (codes, scales, zero points). Symmetric blocks have
    the implied zero point 2^(bits-1) that MatMulNBits assumes without one."""
    rows, cols = weight.shape
    blocks = weight.reshape(rows, cols // block, block)
    top = (1 << bits) - 1
    if symmetric:
        middle = 1 << (bits - 1)
        scales = np.abs(blocks).max(axis=-1) / (middle - 1)
        scales[scales == 0] = 1.0
        zero = np.full(scales.shape, middle, np.float64)
    else:
        low = np.minimum(blocks.min(axis=-1), 0.0)
        high = np.maximum(blocks.max(axis=-1), 0.0)
        scales = (high - low) / top
        scales[scales == 0] = 1.0
        zero = np.clip(np.round(-low / scales), 0, top)
    codes = np.clip(np.round(blocks / scales[..., None]) + zero[..., None], 0, top)
    return (
        codes.astype(np.uint8).reshape(rows, cols),
        scales.astype(np.float32),
        zero.astype(np.uint8),
    )


def _pack_nibbles(codes: np.ndarray) -> np.ndarray:
    """Two 4-bit values per byte along the last axis, the first in the low nibble."""
    if codes.shape[-1] % 2:
        codes = np.concatenate([codes, np.zeros((*codes.shape[:-1], 1), np.uint8)], axis=-1)
    return (codes[..., 0::2] | (codes[..., 1::2] << 4)).astype(np.uint8)


def fold_transposed_weights(model) -> None:
    """Turn ``Transpose(initializer)`` into a transposed initializer (in place).

    optimum writes a tied lm_head as ``MatMul(x, Transpose(embed_tokens.weight))``; with the
    transpose folded the lm_head has a constant weight the quantizer can see.
    """
    from onnx import numpy_helper

    weights = {init.name: init for init in model.graph.initializer}
    for node in list(model.graph.node):
        if node.op_type != "Transpose" or node.input[0] not in weights:
            continue
        perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), None)
        table = numpy_helper.to_array(weights[node.input[0]])
        if table.ndim != 2 or perm not in (None, [1, 0]):
            continue
        name = f"{node.input[0]}_transposed"
        model.graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(table.T), name))
        for consumer in model.graph.node:
            for i, value in enumerate(consumer.input):
                if value == node.output[0]:
                    consumer.input[i] = name
        model.graph.node.remove(node)
    _drop_unused_initializers(model)


def ensure_contrib_opset(model) -> None:
    """Declare onnxruntime's ``com.microsoft`` operator domain, once."""
    from onnx import helper

    if not any(op.domain == "com.microsoft" for op in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))


def _drop_unused_initializers(model) -> None:
    used = {value for node in model.graph.node for value in node.input}
    used |= {output.name for output in model.graph.output}
    for init in [i for i in model.graph.initializer if i.name not in used]:
        model.graph.initializer.remove(init)


def _tied_lm_head(model, table: str, bits: int):
    """The MatMulNBits lm_head quantized from ``table`` with ``bits``, and its block size."""
    for node in model.graph.node:
        attrs = {a.name: a.i for a in node.attribute}
        if (
            node.op_type == "MatMulNBits"
            and node.input[1].startswith(f"{table}_transposed")
            and attrs.get("bits") == bits
        ):
            return node, attrs["block_size"]
    return None, None


def table_codes(table: np.ndarray, bits: int, block: int):
    """``(codes, scales, zero points)`` of an embedding table for GatherBlockQuantized, in
    blocks of ``block`` along each row, 4-bit codes and zero points packed two a byte."""
    quantized, scales, zero = _block_quantize(table, bits, block)
    if bits == 4:
        quantized, zero = _pack_nibbles(quantized), _pack_nibbles(zero)
    return quantized, scales, zero


def implied_zero_points(rows: int, cols: int, bits: int, block: int) -> np.ndarray:
    """A symmetric matrix's zero points, 2^(bits-1), which MatMulNBits implies and
    GatherBlockQuantized must be given: for a table that shares a symmetric head's codes."""
    fill = np.full((rows, cols // block), 1 << (bits - 1), np.uint8)
    return _pack_nibbles(fill) if bits == 4 else fill


def gather_block_quantized(inputs: list[str], outputs: list[str], name: str, bits: int, block: int):
    """The GatherBlockQuantized node over a table quantized along its rows."""
    from onnx import helper

    return helper.make_node(
        "GatherBlockQuantized",
        inputs,
        outputs,
        name=name,
        domain="com.microsoft",
        gather_axis=0,
        quantize_axis=1,
        block_size=block,
        bits=bits,
    )


def quantize_embeddings(model, bits: int, block_size: int) -> int:
    """Replace the embedding Gather by a GatherBlockQuantized of ``bits`` (in place).

    A tied table whose lm_head was quantized with the same bits shares the lm_head's codes,
    scales and zero points, in the lm_head's blocks (one copy on disk; the layouts agree row
    by row); any other table is quantized in blocks of ``block_size``.

    Returns:
        The number of tables quantized (0 when the rows do not split into whole blocks).
    """
    from onnx import helper, numpy_helper

    weights = {init.name: init for init in model.graph.initializer}
    done = 0
    for index, node in enumerate(list(model.graph.node)):
        table = weights.get(node.input[0]) if node.op_type == "Gather" else None
        if table is None or len(table.dims) != 2 or "embed" not in table.name:
            continue
        lm_head, block = _tied_lm_head(model, table.name, bits)
        if lm_head is None:
            block = block_size
        if table.dims[1] % block:
            continue
        if lm_head is not None:
            codes, scales = f"{table.name}_shared_q{bits}", lm_head.input[2]
            if len(lm_head.input) > 3 and lm_head.input[3]:
                zero = lm_head.input[3]
            else:
                zero = f"{codes}_zero_points"
                fill = implied_zero_points(table.dims[0], table.dims[1], bits, block)
                model.graph.initializer.append(numpy_helper.from_array(fill, zero))
            shape = f"{codes}_shape"
            model.graph.initializer.append(
                numpy_helper.from_array(np.array([table.dims[0], -1], np.int64), shape)
            )
            model.graph.node.insert(
                index,
                helper.make_node("Reshape", [lm_head.input[1], shape], [codes], name=codes),
            )
            index += 1
        else:
            quantized, scale_values, zero_values = table_codes(
                numpy_helper.to_array(table), bits, block
            )
            codes = f"{table.name}_q{bits}"
            scales, zero = f"{codes}_scales", f"{codes}_zero_points"
            model.graph.initializer.extend(
                [
                    numpy_helper.from_array(quantized, codes),
                    numpy_helper.from_array(scale_values, scales),
                    numpy_helper.from_array(zero_values, zero),
                ]
            )
        replacement = gather_block_quantized(
            [codes, node.input[1], scales, zero],
            list(node.output),
            f"{node.name}_q{bits}",
            bits,
            block,
        )
        model.graph.node.remove(node)
        model.graph.node.insert(index, replacement)
        done += 1
    if done:
        ensure_contrib_opset(model)
    _drop_unused_initializers(model)
    return done


def set_kv_cache(model, kind: str, scales: dict[int, tuple] | None = None) -> None:
    """The graph's KV cache in ``kind`` (:meth:`QuantSettings.kv_cache_type`): fp32 as built,
    :func:`half_kv_cache` or :func:`int8_kv_cache` (with its ``scales``)."""
    if kind == "fp16":
        half_kv_cache(model)
    elif kind == "int8":
        int8_kv_cache(model, scales)


def half_kv_cache(model) -> bool:
    """Declare the graph's KV cache (``past_key_values.*`` in, ``present.*`` out) fp16 where
    GroupQueryAttention alone reads and writes it: the operator then keeps the cache in fp16
    and computes attention in the graph's fp32. Returns False, changing nothing, for a graph
    whose cache other operators touch (optimum's trace concatenates it)."""
    from onnx import TensorProto

    if not _attention_owns_cache(model):
        return False
    for value in [*model.graph.input, *model.graph.output]:
        if value.name.startswith(("past_key_values.", "present.")):
            value.type.tensor_type.elem_type = TensorProto.FLOAT16
    return True


def int8_kv_cache(model, scales: dict[int, tuple]) -> bool:
    """Declare the graph's KV cache int8 where GroupQueryAttention alone reads and writes it:
    each layer's attention quantizes its keys and values per channel with ``scales``
    (``{layer: (k_scale, v_scale)}``, :func:`~edgeft.export.onnx.gptq.kv_cache_scales`) as it
    writes them and computes attention in fp32. A quarter of the fp32 cache, half of
    llama.cpp's F16 one. Returns False, changing nothing, for a graph whose cache other
    operators touch (optimum's trace)."""
    from onnx import TensorProto, helper, numpy_helper

    if not _attention_owns_cache(model):
        return False
    for value in [*model.graph.input, *model.graph.output]:
        if value.name.startswith(("past_key_values.", "present.")):
            value.type.tensor_type.elem_type = TensorProto.INT8
    attention = [n for n in model.graph.node if n.op_type == "GroupQueryAttention"]
    for index, node in enumerate(attention):
        k_scale, v_scale = scales[index]
        names = (
            f"/model/layers.{index}/kv_cache/k_scale",
            f"/model/layers.{index}/kv_cache/v_scale",
        )
        model.graph.initializer.extend(
            numpy_helper.from_array(np.ascontiguousarray(array, np.float32), name)
            for array, name in zip((k_scale, v_scale), names, strict=True)
        )
        while len(node.input) < 14:
            node.input.append("")
        node.input[12], node.input[13] = names
        node.attribute.extend(
            [
                helper.make_attribute("k_quant_type", "PER_CHANNEL"),
                helper.make_attribute("v_quant_type", "PER_CHANNEL"),
                helper.make_attribute("kv_cache_bit_width", 8),
            ]
        )
    return True


def _attention_owns_cache(model) -> bool:
    """Whether GroupQueryAttention alone reads the ``past_key_values.*`` inputs and writes the
    ``present.*`` outputs."""
    readers: dict[str, set[str]] = {}
    writers: dict[str, str] = {}
    for node in model.graph.node:
        for name in node.input:
            readers.setdefault(name, set()).add(node.op_type)
        for name in node.output:
            writers[name] = node.op_type
    past = [v for v in model.graph.input if v.name.startswith("past_key_values.")]
    present = [v for v in model.graph.output if v.name.startswith("present.")]
    attention = "GroupQueryAttention"
    if not past or any(readers.get(v.name) != {attention} for v in past):
        return False
    return all(writers.get(v.name) == attention for v in present)


def to_fp16(model):
    """Weights and compute in fp16; graph inputs and outputs (cache, logits) stay fp32."""
    from onnx import TensorProto, helper
    from onnxruntime.transformers.float16 import convert_float_to_float16

    # The RoPE tables are computed in fp32 (Range has no fp16) and cast once where
    # GroupQueryAttention reads them; onnxruntime folds all of it into constants at load.
    rope = [n.name for g in graphs(model.graph) for n in g.node if n.name.startswith("/rope")]
    model = convert_float_to_float16(
        model, keep_io_types=True, disable_shape_infer=True, node_block_list=rope
    )
    casts: dict[str, str] = {}
    for node in list(model.graph.node):
        if node.op_type != "GroupQueryAttention":
            continue
        for slot in (7, 8):  # cos_cache, sin_cache
            if len(node.input) <= slot or not node.input[slot]:
                continue
            table = node.input[slot]
            if table not in casts:
                casts[table] = f"{table}_fp16"
                nodes = list(model.graph.node)
                producer = next(i for i, n in enumerate(nodes) if table in n.output)
                model.graph.node.insert(
                    producer + 1,
                    helper.make_node(
                        "Cast",
                        [table],
                        [casts[table]],
                        name=f"{table}/Cast",
                        to=TensorProto.FLOAT16,
                    ),
                )
            node.input[slot] = casts[table]
    return model


def graphs(graph):
    """``graph`` and every subgraph inside it (``If`` branches), depth first."""
    yield graph
    for node in graph.node:
        for attribute in node.attribute:
            if attribute.HasField("g"):
                yield from graphs(attribute.g)


def dynamic_int8(source, destination) -> None:
    """onnxruntime's dynamic quantization: int8 per-channel weights, activations quantized
    at run time (fast on CPUs with int8 dot products, lossy on small models)."""
    from onnx import TensorProto
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(
        str(source),
        str(destination),
        per_channel=True,
        weight_type=QuantType.QInt8,
        op_types_to_quantize=["MatMul"],
        # Shape inference stops at contrib operators (GroupQueryAttention); their outputs are
        # float.
        extra_options={"MatMulConstBOnly": True, "DefaultTensorType": TensorProto.FLOAT},
    )


def _stack_matmuls(model, nodes: list, name: str, weights: dict):
    """One MatMulNBits computing the outputs of ``nodes`` (same input and format) side by
    side: the rows of B, scales and zero points stacked. None when the formats differ."""
    from onnx import helper, numpy_helper

    formats = {
        (n.input[0], tuple(sorted((a.name, a.i) for a in n.attribute if a.name != "N")))
        for n in nodes
    }
    parts = [list(n.input[1:]) for n in nodes]
    if (
        len(formats) != 1
        or len({len(x) for x in parts}) != 1
        or not all(p in weights for x in parts for p in x)
    ):
        return None
    arrays = [[numpy_helper.to_array(weights[p]) for p in x] for x in parts]
    count = len(arrays[0])
    model.graph.initializer.extend(
        numpy_helper.from_array(np.concatenate([a[i] for a in arrays], axis=0), f"{name}_{i}")
        for i in range(count)
    )
    attrs = {a.name: a.i for a in nodes[0].attribute}
    attrs["N"] = sum(a[0].shape[0] for a in arrays)
    return helper.make_node(
        "MatMulNBits",
        [nodes[0].input[0], *(f"{name}_{i}" for i in range(count))],
        [f"{name}/output_0"],
        name=name,
        domain="com.microsoft",
        **attrs,
    )


def pack_qkv(model) -> int:
    """Give each GroupQueryAttention one packed q|k|v input (in place).

    GroupQueryAttention reads packed QKV natively, which saves operators at every decode step
    (benchmarks/README.md#choosing-the-int4-recipe). When q, k and v share a format they become one
    MatMulNBits; when only k and v do (k and v kept at 8 bits, q at 4), k|v become one and a
    Concat joins q to it. Returns the number of layers packed.
    """
    from onnx import helper

    weights = {init.name: init for init in model.graph.initializer}
    producers = {out: node for node in model.graph.node for out in node.output}
    packed = 0
    for attention in [n for n in model.graph.node if n.op_type == "GroupQueryAttention"]:
        q, k, v = (producers.get(name) for name in attention.input[:3])
        if any(p is None or p.op_type != "MatMulNBits" for p in (q, k, v)):
            continue
        base = attention.name.replace("GroupQueryAttention", "")
        index = list(model.graph.node).index(q)
        qkv = _stack_matmuls(model, [q, k, v], f"{base}qkv_proj/MatMul_Q", weights)
        if qkv is not None:
            new, packed_output = [qkv], qkv.output[0]
            removed = [q, k, v]
        else:
            kv = _stack_matmuls(model, [k, v], f"{base}kv_proj/MatMul_Q", weights)
            if kv is None:
                continue
            packed_output = f"{base}qkv"
            new = [
                kv,
                helper.make_node(
                    "Concat",
                    [q.output[0], kv.output[0]],
                    [packed_output],
                    name=f"{base}qkv/Concat",
                    axis=-1,
                ),
            ]
            removed = [k, v]
        for node in removed:
            model.graph.node.remove(node)
        index = min(index, list(model.graph.node).index(attention))
        for offset, node in enumerate(new):
            model.graph.node.insert(index + offset + (0 if q in removed else 1), node)
        attention.input[0], attention.input[1], attention.input[2] = packed_output, "", ""
        packed += 1
    _drop_unused_initializers(model)
    return packed
