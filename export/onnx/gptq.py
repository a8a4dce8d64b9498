"""Calibrated 4-bit weights (GPTQ) written as onnxruntime ``MatMulNBits`` nodes.

Round-to-nearest treats every weight alike. GPTQ quantizes a weight matrix one input column at
a time and spreads each column's rounding error over the columns not yet quantized, weighted by
how the layer's inputs co-vary (H = XᵀX over calibration tokens), so the layer's *outputs* stay
close on real activations. The block layout is the one MatMulNBits reads: per row, blocks of
``block_size`` input values with a float scale and a 4-bit zero point each.

With every matrix rounded, :func:`tune_norms` then fits the RMSNorm weights, which stay in
float, to the checkpoint's next-token distribution on the same calibration text.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from edgeft.architectures import architecture_of, split_fused
from edgeft.calibration import calibration_budget, calibration_ids
from edgeft.errors import EdgeftError
from edgeft.hfcompat import model_config
from edgeft.isolate import free_memory, trim_memory

DAMPING = 0.01
# A tied lm_head is also the embedding table: the same codes are read back row by row as
# token embeddings, where GPTQ's shifting of error between columns does not cancel. Stronger
# damping keeps each row closer to round-to-nearest (benchmarks/README.md#choosing-the-int4-recipe).
TIED_HEAD_DAMPING = 0.1
COLUMN_BLOCK = 128


class Calibration:
    """Sequential GPTQ over a checkpoint, one decoder layer at a time and in order.

    Each decoder layer sees the activations of the layers before it *as quantized*, so later
    layers compensate for earlier rounding. Modules planned at 4 bits get GPTQ; those at 8
    bits are rounded to nearest (their error is small) so later layers see them as they will
    be. Calibration tokens shrink with the model's size (:func:`calibration_budget`). A model
    that fits with room for norm tuning (:data:`~edgeft.streaming.CALIBRATION_RESIDENT_SHARE`)
    is loaded whole, and its norm weights can then be tuned (:meth:`tuned_norms`); a larger
    one is streamed: one layer's fp32 weights are held at a time.

    Args:
        bits: module name (``model.layers.0.self_attn.q_proj``, ``lm_head``) → 4 or 8.
        settings: the :class:`~edgeft.export.onnx.quantize.QuantSettings` (block sizes).
        sampled: text sampled from the checkpoint
            (:func:`~edgeft.calibration.sampled_texts`), calibrated on after ``texts`` (which
            are capped at the token budget), up to ``settings.sampled_tokens`` tokens.
        resident: load the model whole (default: unless it should stream).
    """

    def __init__(
        self,
        model_dir: Path,
        texts: Sequence[str],
        bits: dict[str, int],
        settings,
        sampled: Sequence[str] = (),
        *,
        resident: bool | None = None,
    ) -> None:
        import torch
        from transformers import AutoModelForCausalLM

        from edgeft.streaming import (
            CALIBRATION_RESIDENT_SHARE,
            decoder_inputs,
            should_stream,
            streamed_model,
        )

        self.model_dir = Path(model_dir)
        self.bits = bits
        self.settings = settings
        if resident is None:
            resident = not should_stream(self.model_dir, CALIBRATION_RESIDENT_SHARE)
        self.resident = resident
        from edgeft.weights import checkpoint_params

        self.tokens = calibration_budget(checkpoint_params(self.model_dir))
        self.chunks = calibration_ids(self.model_dir, texts, self.tokens)
        if sampled:
            self.chunks += calibration_ids(self.model_dir, sampled, settings.sampled_tokens)
        if self.resident:
            self.model = AutoModelForCausalLM.from_pretrained(
                self.model_dir, dtype=torch.float32, use_safetensors=True, trust_remote_code=False
            ).eval()
        else:
            self.model = streamed_model(self.model_dir)
        config = model_config(self.model.config)
        self.config = config
        self.architecture = architecture_of(config, self.model_dir / "config.json")
        self.layers = self.model.model.layers
        self.inputs, self.layer_kwargs = decoder_inputs(self.model, self.chunks)
        self.done = 0
        self.results: dict[str, tuple] = {}  # every layer's, when run() collects them
        self._keep_results = False

    @property
    def calibrated_tokens(self) -> int:
        return sum(len(chunk) for chunk in self.chunks)

    def _block_size(self, name: str, bits: int = 4) -> int:
        """The block size of module ``name`` (``model.layers.0.mlp.up_proj``) at ``bits``."""
        from edgeft.export.onnx.quantize import mixed_block_size

        return mixed_block_size(bits, self.settings, name.rsplit(".", 1)[-1])

    def _parts(self, prefix: str, name: str) -> list[tuple[str, slice]]:
        """The graph's modules a torch Linear holds, with their rows (Phi-3's qkv_proj is q,
        k and v)."""
        if not any(f.module == name for f in self.architecture.fused):
            return [(f"{prefix}.{name}", slice(None))]
        group = name.split(".")[0]
        rows = split_fused(self.architecture, self.config, name)
        return [(f"{prefix}.{group}.{part}", part_rows) for part, part_rows in rows.items()]

    def layer(self, index: int) -> dict[str, tuple]:
        """Quantize decoder layer ``index`` (layers go in order) and return its 4-bit modules'
        ``(codes [N, K] uint8, scales, zero points)`` by graph module name."""
        import torch

        from edgeft.streaming import held

        if index != self.done:
            raise EdgeftError(f"GPTQ quantizes layers in order: layer {self.done} is next")
        prefix = f"model.layers.{index}"
        with held(self.layers[index]) as layer:
            modules = {}
            for name, module in layer.named_modules():
                if not isinstance(module, torch.nn.Linear):
                    continue
                parts = self._parts(prefix, name)
                if all(
                    part in self.bits and module.in_features % self._block_size(part) == 0
                    for part, _ in parts
                ):
                    modules[f"{prefix}.{name}"] = (module, parts)
            kwargs = self.layer_kwargs[index]

            def run_layer():
                return [layer(x, **k) for x, k in zip(self.inputs, kwargs, strict=True)]

            found = self._quantize(modules, run_layer)
            with torch.inference_mode():
                outputs = run_layer()
        self.inputs = [out[0] if isinstance(out, tuple) else out for out in outputs]
        self.layer_kwargs[index] = []
        self.done += 1
        trim_memory()
        return found

    def head(self) -> dict[str, tuple]:
        """Quantize the output projection (after every layer) when it is planned at 4 bits."""
        import torch

        from edgeft.streaming import held

        if self.done != len(self.layers):
            raise EdgeftError("GPTQ quantizes the output projection after every layer")
        head = self.model.lm_head
        if "lm_head" not in self.bits or head.in_features % self._block_size("lm_head"):
            return {}
        norm = self.model.model.norm
        if not self.resident:  # a stand-in Linear holding the stored (or tied) table
            head = torch.nn.Linear(head.in_features, head.out_features, bias=False, device="meta")
            head.weight = torch.nn.Parameter(torch.from_numpy(self._stored_head()), False)
        # H needs the head's inputs only: a tap sees them, and no logits are computed
        tap = _Tap()
        with held(norm):

            def run_head():
                for hidden in self.inputs:
                    tap(norm(hidden))

            modules = {"lm_head": (head, [("lm_head", slice(None))])}
            # streamed, nothing runs the rounded head after: it is not written back
            return self._quantize(modules, run_head, taps={"lm_head": tap}, keep=self.resident)

    def _stored_head(self) -> np.ndarray:
        from edgeft.weights import read_f32, safetensors_index

        index = safetensors_index(self.model_dir)
        return read_f32(index["model.embed_tokens.weight" if self._tied() else "lm_head.weight"])

    def _tied(self) -> bool:
        from edgeft.architectures import head_is_table
        from edgeft.weights import safetensors_index

        return head_is_table(self.config, safetensors_index(self.model_dir), self.model_dir)

    def tuned_norms(self) -> dict[str, np.ndarray]:
        """The RMSNorm weights tuned by :func:`tune_norms` after every matrix is rounded;
        empty without norm epochs or when the model is streamed (tuning backpropagates
        through the whole model, which must then fit)."""
        if not self.settings.norm_epochs or not self.resident:
            return {}
        return tune_norms(self.model_dir, self.model, self.chunks, self.settings.norm_epochs)

    def release(self) -> None:
        """Drop the model and the activations once the folder is written (the export goes on
        to load its reference beside them otherwise)."""
        self.model = self.layers = None
        self.inputs, self.layer_kwargs = [], []
        free_memory()

    def run(self) -> tuple[dict[str, tuple], dict[str, np.ndarray]]:
        """Every layer and the output projection at once.

        Returns:
            ``{module: (codes [N, K] uint8, scales, zero points)}`` for the 4-bit modules, and
            :meth:`tuned_norms`.
        """
        self._keep_results = True
        for index in range(self.done, len(self.layers)):
            self.layer(index)
        self.head()
        return self.results, self.tuned_norms()

    def _quantize(self, modules: dict, run, *, taps=None, keep: bool = True) -> dict[str, tuple]:
        """Collect H = XᵀX for the 4-bit ``modules`` over ``run()``, then quantize them in
        place (the torch weights become what the graph will hold).

        ``modules``: name → (Linear, [(part name, rows)]): a fused weight (Phi-3's qkv_proj)
        is quantized part by part with the one Hessian of its input (GPTQ treats rows
        independently), each part at its own bits, as the graph holds them."""
        import torch

        from edgeft.export.onnx.quantize import _block_quantize, mixed_symmetric

        settings = self.settings
        wanted = {
            n for n, (_, parts) in modules.items() if any(self.bits[p] == 4 for p, _ in parts)
        }
        sums = dict.fromkeys(wanted, 0)
        counts = dict.fromkeys(wanted, 0)

        def hook(name):
            def record(_module, args, _output):
                x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
                sums[name] = sums[name] + x.T @ x
                counts[name] += x.shape[0]

            return record

        taps = taps or {}
        handles = [taps.get(n, modules[n][0]).register_forward_hook(hook(n)) for n in wanted]
        try:
            if wanted:
                with torch.inference_mode():
                    run()
        finally:
            for h in handles:
                h.remove()
        found: dict[str, tuple] = {}
        for name, (module, parts) in modules.items():
            weight = module.weight.detach().numpy()
            quantized = []
            hessian = (sums[name] / counts[name]).float() if counts.get(name) else None
            for part, rows in parts:
                rows_weight = weight[rows]
                if self.bits[part] == 4 and hessian is not None:
                    tied_head = part == "lm_head" and self._tied()
                    found[part] = _gptq_rows(
                        rows_weight,
                        hessian,
                        self._block_size(part),
                        TIED_HEAD_DAMPING if tied_head else DAMPING,
                        settings.symmetric,
                    )
                    if keep:
                        quantized.append(_dequantized(*found[part]))
                elif keep:
                    eight = self._block_size(part, 8)
                    if rows_weight.shape[1] % eight:
                        eight = settings.block_size
                    symmetric = mixed_symmetric(8, settings)
                    quantized.append(
                        _dequantized(*_block_quantize(rows_weight, 8, eight, symmetric=symmetric))
                    )
            if keep:
                with torch.no_grad():
                    module.weight.copy_(torch.cat(quantized))
            del quantized
        if self._keep_results:
            self.results.update(found)
        return found


# GPTQ rounds each row on its own (they share H alone): a matrix is rounded this many rows at a
# time, so a vocabulary-sized head needs a few copies of a slice, not of the whole matrix.
GPTQ_ROWS = 4096


def _gptq_rows(weight: np.ndarray, hessian, block_size: int, damping: float, symmetric: bool):
    """:func:`gptq` at 4 bits over ``weight`` in slices of :data:`GPTQ_ROWS` rows (the same
    codes as all at once)."""
    parts = [
        gptq(weight[start : start + GPTQ_ROWS], hessian, 4, block_size, damping, symmetric)
        for start in range(0, weight.shape[0], GPTQ_ROWS)
    ]
    if len(parts) == 1:
        return parts[0]
    return tuple(np.concatenate([p[i] for p in parts]) for i in range(3))


class _Tap:
    """A module that computes nothing: forward hooks on it see what it is called with."""

    def __init__(self) -> None:
        import torch

        self._module = torch.nn.Identity()

    def register_forward_hook(self, hook):
        return self._module.register_forward_hook(hook)

    def __call__(self, x) -> None:
        self._module(x)


def _dequantized(codes, scales, zero):
    import torch

    rows, cols = codes.shape
    block = cols // scales.shape[1]
    blocks = codes.reshape(rows, cols // block, block).astype(np.float32)
    return torch.tensor(((blocks - zero[..., None]) * scales[..., None]).reshape(rows, cols))


# Adam's step for the RMSNorm weights, decayed to 0 over the passes (cosine): small, so the
# norms move a little from their trained values (benchmarks/README.md#choosing-the-int4-recipe).
NORM_LEARNING_RATE = 5e-4
NORM_SEED = 0


def tune_norms(model_dir: Path, quantized, chunks: list[list[int]], epochs: int):
    """Tune the RMSNorm weights of ``quantized`` (the checkpoint with its matrices as the int4
    folder will hold them) so that its next-token distribution on ``chunks`` comes closer to
    the checkpoint's: the mean KL divergence, with every other weight fixed.

    Rounding leaves each layer's outputs a little off in scale, channel by channel; the norm
    weights scale every channel that enters a layer, stay in float in the folder's graph and
    are few (61 vectors in SmolLM2-135M), so they can absorb some of that without fitting the
    calibration text itself: tuning every block's scale too (2.9M values) lowered the
    calibration text's KL further but raised the held-out text's
    (benchmarks/README.md#choosing-the-int4-recipe).

    Returns:
        ``{parameter name: float32 weight}`` for every ``*norm.weight``.
    """
    import torch
    from transformers import AutoModelForCausalLM

    teacher = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.float32, use_safetensors=True, trust_remote_code=False
    ).eval()
    norms = {n: p for n, p in quantized.named_parameters() if n.endswith("norm.weight")}
    for parameter in quantized.parameters():
        parameter.requires_grad_(False)
    for parameter in norms.values():
        parameter.requires_grad_(True)
    optimizer = torch.optim.Adam(norms.values(), lr=NORM_LEARNING_RATE)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs * len(chunks))
    order = np.random.default_rng(NORM_SEED)
    for _ in range(epochs):
        for index in order.permutation(len(chunks)):
            ids = torch.tensor([chunks[index]])
            with torch.no_grad():
                target = torch.log_softmax(teacher(input_ids=ids, use_cache=False).logits[0], -1)
            logits = quantized(input_ids=ids, use_cache=False).logits[0]
            loss = torch.nn.functional.kl_div(
                torch.log_softmax(logits, -1), target, log_target=True, reduction="batchmean"
            )
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
    return {name: p.detach().numpy().astype(np.float32) for name, p in norms.items()}


def set_norm_weights(model, norms: dict[str, np.ndarray], offset: float = 0.0) -> None:
    """Replace the RMSNorm weight initializers of an ONNX ``model`` by ``norms`` (in place),
    plus the architecture's ``norm_offset`` (Gemma's ``1 + w``), which the graph holds folded.

    Raises:
        EdgeftError: a norm weight the graph does not hold under its PyTorch name.
    """
    from onnx import numpy_helper

    initializers = {init.name: init for init in model.graph.initializer}
    for name, weight in norms.items():
        init = initializers.get(name)
        if init is None or tuple(init.dims) != weight.shape:
            raise EdgeftError(
                f"the ONNX graph has no initializer {name} of shape {list(weight.shape)} for "
                "the tuned norm weights; export with --graph fused or --norm-epochs 0"
            )
        init.CopyFrom(numpy_helper.from_array(weight + np.float32(offset), name))


# Fractions of each block's range tried as the quantization range: clipping the extremes a
# little often lowers the block's squared error (as llama.cpp's k-quant scale search does).
RANGE_SHRINK = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75)


def _group_params(w, bits: int, importance=None, symmetric: bool = False):
    """Per row of ``w``: the scale and integer zero point, among a few clipped ranges, with
    the least rounding error (squared, weighted per column by ``importance``: the mean squared
    input of that column, so errors on busy inputs count more). Symmetric rows keep the zero
    point 2^(bits-1) that MatMulNBits implies without one, and also try scales that put the
    row's extreme on the lowest code (a negative scale for a positive extreme), which uses all
    2^bits codes."""
    import torch

    top = (1 << bits) - 1
    middle = 1 << (bits - 1)
    low = torch.clamp(w.min(dim=1).values, max=0)
    high = torch.clamp(w.max(dim=1).values, min=0)
    peak = torch.maximum(-low, high)
    # The value of largest magnitude, with its sign: a symmetric scale of -extreme / 2^(bits-1)
    # maps it to the lowest code, so all 2^bits codes are used (as onnxruntime's own quantizer
    # and llama.cpp's Q4_0 round).
    extreme = torch.where(high >= -low, high, low)
    candidates = [(shrink, False) for shrink in RANGE_SHRINK]
    if symmetric:
        candidates += [(shrink, True) for shrink in RANGE_SHRINK]
    best_scale = best_zero = best_error = None
    for shrink, signed in candidates:
        if symmetric:
            scale = -extreme * shrink / middle if signed else peak * shrink / (middle - 1)
            scale[scale == 0] = 1.0
            zero = torch.full_like(scale, middle)
        else:
            scale = (high - low) * shrink / top
            scale[scale == 0] = 1.0
            zero = torch.clamp(torch.round(-low * shrink / scale), 0, top)
        q = torch.clamp(torch.round(w / scale[:, None]) + zero[:, None], 0, top)
        squared = ((q - zero[:, None]) * scale[:, None] - w) ** 2
        error = (squared * importance[None, :] if importance is not None else squared).sum(dim=1)
        if best_error is None:
            best_scale, best_zero, best_error = scale, zero, error
        else:
            better = error < best_error
            best_scale = torch.where(better, scale, best_scale)
            best_zero = torch.where(better, zero, best_zero)
            best_error = torch.where(better, error, best_error)
    return best_scale, best_zero


def _upper_inverse_cholesky(h):
    """Upper Cholesky factor of H⁻¹ (GPTQ's update rows), with more damping if H is not
    positive definite."""
    import torch

    try:
        return torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    except RuntimeError:
        h = h + 0.1 * torch.mean(torch.diag(h)) * torch.eye(h.shape[0])
        return torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)


def gptq(
    weight: np.ndarray,
    hessian,
    bits: int,
    block_size: int,
    damping: float = DAMPING,
    symmetric: bool = False,
):
    """Quantize ``weight`` [N, K] (rows = outputs) with GPTQ; ``damping`` (a fraction of H's
    mean diagonal added to it) trades the layer's output error for each weight's own.

    Returns:
        ``(codes [N, K] uint8, scales [N, K/block] float32, zero points [N, K/block] uint8)``.
    """
    import torch

    w = torch.tensor(weight, dtype=torch.float32)  # a copy
    rows, cols = w.shape
    top = (1 << bits) - 1
    h = hessian.clone().float()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    h += damping * torch.mean(torch.diag(h)) * torch.eye(cols)
    groups = cols // block_size
    # Static groups: each block's scale and zero point come from the original weights, so
    # columns can be visited in any order: the most active inputs first (act order), while
    # the error of the rest can still be compensated.
    scales = torch.zeros(rows, groups)
    zeros = torch.zeros(rows, groups)
    busy = torch.diag(h)
    for g in range(groups):
        columns = slice(g * block_size, (g + 1) * block_size)
        scales[:, g], zeros[:, g] = _group_params(w[:, columns], bits, busy[columns], symmetric)
    order = torch.argsort(torch.diag(h), descending=True)
    w, h = w[:, order], h[order][:, order]
    group_of = order // block_size
    inverse = _upper_inverse_cholesky(h)
    codes = torch.zeros_like(w, dtype=torch.uint8)
    for start in range(0, cols, COLUMN_BLOCK):
        end = min(start + COLUMN_BLOCK, cols)
        block = w[:, start:end].clone()
        errors = torch.zeros_like(block)
        inv = inverse[start:end, start:end]
        for i in range(end - start):
            g = group_of[start + i]
            q = torch.clamp(torch.round(block[:, i] / scales[:, g]) + zeros[:, g], 0, top)
            codes[:, start + i] = q.to(torch.uint8)
            restored = (q - zeros[:, g]) * scales[:, g]
            error = (block[:, i] - restored) / inv[i, i]
            block[:, i:] -= error[:, None] * inv[i, i:][None, :]
            errors[:, i] = error
        w[:, end:] -= errors @ inverse[start:end, end:]
    codes = codes[:, torch.argsort(order)]
    return codes.numpy(), scales.numpy().astype(np.float32), zeros.numpy().astype(np.uint8)


def _torch_module_name(node_name: str) -> str | None:
    """``/model/layers.3/mlp/down_proj/MatMul`` (optimum's trace) or
    ``/model/layers.3/down_proj/MatMul`` (the fused graph) → ``model.layers.3.mlp.down_proj``."""
    from edgeft.architectures import PROJECTIONS

    if node_name.startswith("/lm_head/"):
        return "lm_head"
    match = re.fullmatch(r"/model/layers\.(\d+)/(?:self_attn/|mlp/)?(\w+_proj)/MatMul", node_name)
    paths = {path.split(".")[1]: path for path in PROJECTIONS}
    if match is None or match[2] not in paths:
        return None
    return f"model.layers.{match[1]}.{paths[match[2]]}"


def module_bits(plan: dict[str, int]) -> dict[str, int]:
    """A graph bits plan (node name → bits) keyed by PyTorch module name."""
    return {
        module: bits
        for node, bits in plan.items()
        if bits and (module := _torch_module_name(node)) is not None
    }


def gptq_matmuls(model, results: dict, accuracy_level: int, symmetric: bool = False) -> int:
    """Replace each weight MatMul whose module has GPTQ ``results`` by a 4-bit MatMulNBits
    holding those codes (block size as in the results), in place; ``symmetric`` results are
    written without zero points (MatMulNBits implies 8). Returns how many were replaced."""
    from onnx import helper

    from edgeft.export.onnx.quantize import (
        _drop_unused_initializers,
        _pack_nibbles,
        ensure_contrib_opset,
    )

    done = 0
    for index, node in enumerate(list(model.graph.node)):
        module = _torch_module_name(node.name) if node.op_type == "MatMul" else None
        if module not in results:
            continue
        codes, scales, zero = results[module]
        rows, cols = codes.shape
        block_size = cols // scales.shape[1]
        base = f"{node.input[1]}_gptq4"
        blocks = codes.reshape(rows, cols // block_size, block_size)
        from onnx import numpy_helper

        inputs = [node.input[0], base, f"{base}_scales"]
        model.graph.initializer.extend(
            [
                numpy_helper.from_array(_pack_nibbles(blocks), base),
                numpy_helper.from_array(scales, f"{base}_scales"),
            ]
        )
        if not symmetric:
            inputs.append(f"{base}_zero_points")
            model.graph.initializer.append(
                numpy_helper.from_array(_pack_nibbles(zero), f"{base}_zero_points")
            )
        attrs = dict(K=cols, N=rows, bits=4, block_size=block_size)
        if accuracy_level:
            attrs["accuracy_level"] = accuracy_level
        replacement = helper.make_node(
            "MatMulNBits",
            inputs,
            list(node.output),
            name=node.name,
            domain="com.microsoft",
            **attrs,
        )
        model.graph.node.remove(node)
        model.graph.node.insert(index, replacement)
        done += 1
    if done:
        ensure_contrib_opset(model)
    _drop_unused_initializers(model)
    return done


# KV-cache ranges: tokens of calibration text run through the checkpoint, and the margin over
# the largest magnitude seen that the int8 scale leaves for other text (clipping a key costs
# more than a coarser step).
KV_CALIBRATION_TOKENS = 4096
KV_RANGE_MARGIN = 1.25


def kv_cache_scales(model_dir: Path, texts: Sequence[str]) -> dict[int, tuple]:
    """Per-layer, per-channel scales for an int8 KV cache: ``{layer: (k_scale, v_scale)}``,
    each ``[1, kv_heads, 1, head_dim]`` float32 as GroupQueryAttention reads them.

    Keys are measured as the cache holds them, after their norm (Qwen3, Gemma 3) and rotary
    embedding: a rotated channel is bounded by the norm of the pair it rotates with, at every
    position. Runs the checkpoint layer by layer over the text (streamed when it should
    stream), so its memory is bounded like :class:`Calibration`'s.
    """
    import torch
    from transformers import AutoModelForCausalLM

    from edgeft.architectures import attention_shape, layer_attention, rotary_dim
    from edgeft.streaming import decoder_inputs, held, should_stream, streamed_model

    model_dir = Path(model_dir)
    chunks = calibration_ids(model_dir, texts, KV_CALIBRATION_TOKENS)
    if should_stream(model_dir):
        model = streamed_model(model_dir)
    else:
        model = AutoModelForCausalLM.from_pretrained(
            model_dir, dtype=torch.float32, use_safetensors=True, trust_remote_code=False
        ).eval()
    config = model_config(model.config)
    shape = attention_shape(config)
    rotated = rotary_dim(config)
    architecture = architecture_of(config, model_dir / "config.json")
    ropes = [
        layer.rope for layer in layer_attention(architecture, config, model_dir / "config.json")
    ]
    inputs, layer_kwargs = decoder_inputs(model, chunks)
    scales: dict[int, tuple] = {}
    for index, layer in enumerate(model.model.layers):
        peaks = {"k": torch.zeros(shape.kv_heads, shape.head_dim), "v": None}
        peaks["v"] = peaks["k"].clone()
        attention = layer.self_attn

        def record(kind, peaks=peaks, columns=slice(None)):
            def hook(_module, _args, output):
                values = output.detach()[..., columns]
                values = values.reshape(-1, shape.kv_heads, shape.head_dim).abs()
                peaks[kind] = torch.maximum(peaks[kind], values.amax(dim=0))

            return hook

        if hasattr(attention, "qkv_proj"):  # Phi-3: k and v are rows of one projection
            rows = split_fused(architecture, config, "self_attn.qkv_proj")
            sources = {"k": (attention.qkv_proj, rows["k_proj"])}
            sources["v"] = (attention.qkv_proj, rows["v_proj"])
        else:
            sources = {"k": (attention.k_proj, slice(None)), "v": (attention.v_proj, slice(None))}
        if getattr(attention, "k_norm", None) is not None:  # keys as normed (Qwen3, Gemma 3)
            sources["k"] = (attention.k_norm, slice(None))
        handles = [
            module.register_forward_hook(record(kind, columns=columns))
            for kind, (module, columns) in sources.items()
        ]
        with held(layer), torch.inference_mode():
            outputs = [layer(x, **k) for x, k in zip(inputs, layer_kwargs[index], strict=True)]
        for handle in handles:
            handle.remove()
        inputs = [out[0] if isinstance(out, tuple) else out for out in outputs]
        key = peaks["k"]
        if ropes[index] and rotated:  # a rotated pair (i, i + rotated/2) shares its norm
            half = rotated // 2
            pair = torch.sqrt(key[:, :half] ** 2 + key[:, half:rotated] ** 2)
            key = key.clone()
            key[:, :half] = pair
            key[:, half:rotated] = pair
        scales[index] = tuple(
            _int8_scale(peak).reshape(1, shape.kv_heads, 1, shape.head_dim)
            for peak in (key, peaks["v"])
        )
    return scales


def _int8_scale(peak) -> np.ndarray:
    scale = (peak.numpy().astype(np.float32) * KV_RANGE_MARGIN) / 127
    scale[scale == 0] = 1.0
    return scale
