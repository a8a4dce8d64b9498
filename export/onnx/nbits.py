"""The int8 and int4 folders' weights, quantized as the fused graph is written.

Each weight matrix becomes a ``MatMulNBits`` the moment the graph builder reads it, and goes
straight to the folder's data file: no fp32 graph is built first and the model is never held
whole, so the export's memory is bounded by one matrix (and, with GPTQ, by one decoder layer of
:class:`~edgeft.export.onnx.gptq.Calibration`). Round to nearest uses onnxruntime's own block
quantizer, the one its ``MatMulNBitsQuantizer`` pass runs; GPTQ's codes come from the
calibration, layer by layer, in the order the builder asks for them.

What the folder holds is the same as the graph passes of :mod:`edgeft.export.onnx.quantize`
make from an fp32 graph (those remain for optimum's trace): the bits and block layout of each
module, q|k|v packed into one matmul for GroupQueryAttention where they share a format, and a
tied embedding table that reads the output projection's codes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from edgeft.export.onnx.graph import FloatMatmuls
from edgeft.export.onnx.quantize import (
    QuantSettings,
    _pack_nibbles,
    gather_block_quantized,
    implied_zero_points,
    matrix_layout,
    planned_bits,
    table_codes,
)


@dataclass(frozen=True)
class Layout:
    """How one matrix is stored: bits, values per block, and whether without zero points."""

    bits: int
    block_size: int
    symmetric: bool


@dataclass
class Blocks:
    """A quantized ``[N, K]`` matrix in MatMulNBits' layout."""

    codes: np.ndarray  # [N, K / block, block * bits / 8] uint8
    scales: np.ndarray  # [N, K / block] float32
    zero_points: np.ndarray | None  # [N, ceil(K / block * bits / 8)] uint8; None: symmetric
    layout: Layout
    k: int

    @property
    def n(self) -> int:
        return self.codes.shape[0]


def round_to_nearest(weight: np.ndarray, layout: Layout) -> Blocks:
    """``weight`` ``[N, K]`` (rows are outputs) quantized by onnxruntime's block quantizer."""
    from onnxruntime.capi._pybind_state import quantize_matmul_4bits, quantize_matmul_8bits

    n, k = weight.shape
    block = layout.block_size
    k_blocks = -(-k // block)
    per_byte = 8 // layout.bits
    columns = np.ascontiguousarray(weight.T, dtype=np.float32)  # [K, N], as MatMul holds it
    if k_blocks * block != k:
        columns = np.pad(columns, ((0, k_blocks * block - k), (0, 0)))
    codes = np.zeros((n, k_blocks, -(-block // per_byte)), np.uint8)
    scales = np.zeros((n, k_blocks), np.float32)
    zero = np.zeros((n, -(-k_blocks // per_byte)), np.uint8)
    quantize = quantize_matmul_4bits if layout.bits == 4 else quantize_matmul_8bits
    quantize(codes, columns, scales, zero, block, n, k, layout.symmetric)
    return Blocks(codes, scales, None if layout.symmetric else zero, layout, k)


def from_codes(result: tuple, layout: Layout) -> Blocks:
    """GPTQ's ``(codes [N, K], scales, zero points)`` in MatMulNBits' layout."""
    codes, scales, zero = result
    n, k = codes.shape
    blocks = codes.reshape(n, k // layout.block_size, layout.block_size)
    return Blocks(
        _pack_nibbles(blocks), scales, None if layout.symmetric else _pack_nibbles(zero), layout, k
    )


class QuantizedMatmuls(FloatMatmuls):
    """How the ``int8`` or ``int4`` folder holds its weights (for
    :func:`~edgeft.export.onnx.graph.build_fused_graph`).

    Args:
        quant: ``int8`` (every matrix at 8 bits, ``settings.block_size``) or ``int4`` (mixed:
            bits by module kind, :func:`mixed_block_size`, :func:`mixed_symmetric`).
        calibration: a :class:`~edgeft.export.onnx.gptq.Calibration` whose 4-bit codes replace
            round to nearest (int4), asked layer by layer in order.
        kv_scales: per-layer int8 KV-cache scales
            (:func:`~edgeft.export.onnx.gptq.kv_cache_scales`), for ``settings.kv_cache``
            ``int8``.
    """

    def __init__(
        self, quant: str, settings: QuantSettings, calibration=None, kv_scales=None
    ) -> None:
        self.quant = quant
        self.settings = settings
        self.calibration = calibration
        self.kv_scales = kv_scales  # for an int8 KV cache
        self._layer: tuple[int, dict] | None = None
        self._shared: tuple[str, Layout] | None = None  # the tied table's codes, by the head

    def bits(self, module: str) -> int:
        """Bits of ``module`` (``model.layers.0.mlp.up_proj``, ``lm_head``); 0 keeps fp32."""
        return planned_bits(_kind(module), self.quant, self.settings)

    def layout(self, module: str) -> Layout:
        mixed = self.quant == "int4"
        return Layout(*matrix_layout(self.bits(module), _kind(module), self.settings, mixed=mixed))

    def plan(self, modules) -> dict[str, int]:
        """Bits by module for :class:`~edgeft.export.onnx.gptq.Calibration`."""
        return {module: self.bits(module) for module in modules}

    # -- what the graph builder calls ----------------------------------------------------------

    def linear(self, g, module: str, weight, x: str, name: str) -> str:
        blocks = self._blocks(module, weight)
        return self._matmul(
            g, blocks, f"{module}.weight", x, f"{name}/MatMul_Q{blocks.layout.bits}"
        )

    def packed_qkv(self, g, modules: list, x: str, name: str) -> str | None:
        """One MatMulNBits for q|k|v when they share a layout, or q's and one for k|v joined
        by a Concat when only k and v do (fewer operators a decode step than three matmuls:
        benchmarks/README.md#choosing-the-int4-recipe); None when k and v differ."""
        layouts = [self.layout(module) for module, _ in modules]
        if layouts[1] != layouts[2] or not all(layout.bits for layout in layouts):
            return None
        (q, q_weight), k, v = modules
        prefix = q.rsplit(".", 1)[0]
        if layouts[0] == layouts[1]:
            stacked = _stack([self._blocks(m, w) for m, w in modules])
            return self._matmul(
                g, stacked, f"{prefix}.qkv_proj.weight", x, f"{name}/qkv_proj/MatMul_Q"
            )
        query = self.linear(g, q, q_weight, x, f"{name}/q_proj")
        kv = _stack([self._blocks(m, w) for m, w in (k, v)])
        kv_out = self._matmul(g, kv, f"{prefix}.kv_proj.weight", x, f"{name}/kv_proj/MatMul_Q")
        (joined,) = g.node(
            "Concat", [query, kv_out], [f"{name}/qkv"], name=f"{name}/qkv/Concat", axis=-1
        )
        return joined

    def embedding(self, g, table, shape: tuple, ids: str, tied: bool) -> str:
        """GatherBlockQuantized over the table at the folder's embedding precision; a tied
        table at the output projection's precision reads the projection's codes (one copy
        in the file, and the table is not read here), reshaped to rows."""
        precision = self.settings.embedding_precision(self.quant)
        bits = 8 if precision == "int8" else 4
        rows, cols = shape
        head = self.layout("lm_head")
        shared = tied and head.bits == bits and cols % head.block_size == 0
        if precision == "fp32" or (not shared and cols % self.settings.block_size):
            return super().embedding(g, table, shape, ids, tied)
        if shared:
            name = "model.embed_tokens.weight"
            self._shared = (name, head)
            codes = f"{name}_shared_q{bits}"
            reshaped = g.weight(f"{codes}_shape", np.array([rows, -1], np.int64))
            g.node("Reshape", [f"{name}_q{bits}", reshaped], [codes], name=codes)
            scales, zero = f"{name}_scales", f"{name}_zero_points"
            block = head.block_size
            if head.symmetric:
                fill = implied_zero_points(rows, cols, bits, block)
                zero = g.weight(f"{codes}_zero_points", fill)
        else:
            block = self.settings.block_size
            quantized, scale_values, zero_values = table_codes(table(), bits, block)
            codes = g.weight(f"model.embed_tokens.weight_q{bits}", quantized)
            scales = g.weight(f"{codes}_scales", scale_values)
            zero = g.weight(f"{codes}_zero_points", zero_values)
        name = f"/model/embed_tokens/Gather_q{bits}"
        hidden = f"{name}/output_0"
        g.nodes.append(
            gather_block_quantized([codes, ids, scales, zero], [hidden], name, bits, block)
        )
        return hidden

    def head(self, g, module: str, weight, x: str, output: str) -> str:
        layout = self.layout("lm_head")
        if not layout.bits:
            return super().head(g, module, weight, x, output)
        found = self.calibration.head() if self.calibration is not None else {}
        if "lm_head" in found:
            blocks = from_codes(found["lm_head"], layout)
        else:
            blocks = round_to_nearest(weight(), layout)
        if self._shared is not None and self._shared[1] != layout:
            raise AssertionError("the shared table's layout changed")
        return self._matmul(
            g, blocks, f"{module}.weight", x, f"/lm_head/MatMul_Q{layout.bits}", output=output
        )

    def finish(self, model) -> None:
        """The calibration's tuned norm weights (if any) into the graph, and the KV cache in
        the settings' type."""
        from edgeft.export.onnx.quantize import set_kv_cache

        if self.calibration is not None:
            from edgeft.export.onnx.gptq import set_norm_weights

            norms = self.calibration.tuned_norms()
            set_norm_weights(model, norms, self.calibration.architecture.norm_offset)
        set_kv_cache(model, self.settings.kv_cache_type(self.quant), self.kv_scales)

    # -- helpers -----------------------------------------------------------------------------

    def _blocks(self, module: str, weight) -> Blocks:
        layout = self.layout(module)
        result = self._calibrated(module)
        if result is not None:
            return from_codes(result, layout)
        return round_to_nearest(weight(), layout)

    def _calibrated(self, module: str):
        if self.calibration is None:
            return None
        match = re.match(r"model\.layers\.(\d+)\.", module)
        if match is None:
            return None
        index = int(match[1])
        if self._layer is None or self._layer[0] != index:
            self._layer = (index, self.calibration.layer(index))
        return self._layer[1].get(module)

    def _matmul(self, g, blocks: Blocks, weight: str, x: str, name: str, output=None) -> str:
        layout = blocks.layout
        inputs = [
            x,
            g.weight(f"{weight}_q{layout.bits}", blocks.codes),
            g.weight(f"{weight}_scales", blocks.scales),
        ]
        if blocks.zero_points is not None:
            inputs.append(g.weight(f"{weight}_zero_points", blocks.zero_points))
        attrs = dict(K=blocks.k, N=blocks.n, bits=layout.bits, block_size=layout.block_size)
        if self.settings.accuracy_level:
            attrs["accuracy_level"] = self.settings.accuracy_level
        (y,) = g.node(
            "MatMulNBits",
            inputs,
            [output] if output else 1,
            name=name,
            domain="com.microsoft",
            **attrs,
        )
        return y


def _kind(module: str) -> str:
    return "lm_head" if module in ("lm_head", "model.embed_tokens") else module.rsplit(".", 1)[-1]


def _stack(parts: list[Blocks]) -> Blocks:
    """Matrices of one layout and input side by side: their rows stacked."""
    zero = [p.zero_points for p in parts]
    return Blocks(
        np.concatenate([p.codes for p in parts]),
        np.concatenate([p.scales for p in parts]),
        None if zero[0] is None else np.concatenate(zero),
        parts[0].layout,
        parts[0].k,
    )
