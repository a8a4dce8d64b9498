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

import contextlib
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from edgeft.architectures import architecture_of, split_fused
from edgeft.errors import EdgeftError

# Calibration tokens: on SmolLM2's cooking set, 16k instead of 4k lowers the int4 folder's mean
# KL by about a tenth (benchmarks/README.md).
CALIBRATION_MAX_TOKENS = 16384
CHUNK_TOKENS = 512
DAMPING = 0.01
# A tied lm_head is also the embedding table: the same codes are read back row by row as
# token embeddings, where GPTQ's shifting of error between columns does not cancel. Stronger
# damping keeps each row closer to round-to-nearest (SmolLM2's int4 recipe with q, k, v at 4
# bits, simulated in PyTorch: mean KL 0.136 → 0.125 at 0.1, 0.134 at 1.0).
TIED_HEAD_DAMPING = 0.1
COLUMN_BLOCK = 128


class _Captured(Exception):
    """Raised by the hook that records the first decoder layer's inputs, to stop the forward."""


def _calibration_ids(
    model_dir: Path, texts: Sequence[str], limit: int = CALIBRATION_MAX_TOKENS
) -> list[list[int]]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=False)
    ids: list[int] = []
    for text in texts:
        ids += tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) >= limit:
            break
    ids = ids[:limit]
    if len(ids) < 64:
        raise EdgeftError(f"the calibration text has {len(ids)} tokens; give at least 64")
    return [ids[i : i + CHUNK_TOKENS] for i in range(0, len(ids), CHUNK_TOKENS)]


# Without calibration data, GPTQ calibrates on text sampled from the checkpoint itself: on the
# demo's SmolLM2 (no provenance), 16k sampled tokens gave int4 mean KL 0.094 on the cooking
# text and 0.167 on the held-out answers, against 0.164 and 0.188 for a 1k-token shipped
# mixed-domain text and 0.232 and 0.204 for round-to-nearest (benchmarks/README.md).
SAMPLE_BATCH = 16
SAMPLE_SEED = 0


def sampled_texts(model_dir: Path, tokens: int = CALIBRATION_MAX_TOKENS) -> list[str] | None:
    """About ``tokens`` tokens sampled from the checkpoint (top-k 50, top-p 0.95, a fixed
    seed), in sequences of up to :data:`CHUNK_TOKENS`; ``None`` when the tokenizer has no token
    to start from."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=False)
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if start is None:
        return None
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.float32, use_safetensors=True, trust_remote_code=False
    ).eval()
    context = getattr(model.config, "max_position_embeddings", None) or CHUNK_TOKENS + 1
    length = min(CHUNK_TOKENS, context - 1)
    sequences = -(-tokens // length)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else start
    texts: list[str] = []
    with torch.random.fork_rng(), torch.inference_mode():
        torch.manual_seed(SAMPLE_SEED)
        for first in range(0, sequences, SAMPLE_BATCH):
            prompt = torch.full((min(SAMPLE_BATCH, sequences - first), 1), start)
            out = model.generate(
                prompt,
                attention_mask=torch.ones_like(prompt),
                do_sample=True,
                top_p=0.95,
                temperature=1.0,
                top_k=50,
                max_new_tokens=length,
                min_new_tokens=length,
                pad_token_id=pad,
            )
            texts += tokenizer.batch_decode(out[:, 1:], skip_special_tokens=True)
    return texts


def calibrated_weights(
    model_dir: Path,
    texts: Sequence[str],
    bits: dict[str, int],
    settings,
    sampled: Sequence[str] = (),
) -> tuple[dict[str, tuple], dict[str, np.ndarray]]:
    """Quantize a checkpoint's Linear weights layer by layer on calibration text.

    Each decoder layer sees the activations of the layers before it *as quantized*, so later
    layers compensate for earlier rounding (sequential GPTQ). Modules planned at 4 bits get
    GPTQ; those at 8 bits are rounded to nearest (their error is small) so later layers see
    them as they will be.

    Args:
        bits: module name (``model.layers.0.self_attn.q_proj``, ``lm_head``) → 4 or 8.
        settings: the :class:`~edgeft.export.onnx.quantize.QuantSettings` (block sizes).
        sampled: text sampled from the checkpoint (:func:`sampled_texts`), calibrated on
            after ``texts`` (which are capped at :data:`CALIBRATION_MAX_TOKENS` tokens), up to
            ``settings.sampled_tokens`` tokens.

    Returns:
        ``{module: (codes [N, K] uint8, scales, zero points)}`` for the 4-bit modules, and
        the RMSNorm weights by parameter name as :func:`tune_norms` left them (empty with
        ``settings.norm_epochs`` 0).
    """
    import torch
    from transformers import AutoModelForCausalLM

    from edgeft.export.onnx.quantize import _block_quantize, mixed_block_size, mixed_symmetric

    def block_size(name: str, bits: int = 4) -> int:
        """The block size of module ``name`` (``model.layers.0.mlp.up_proj``) at ``bits``."""
        return mixed_block_size(bits, settings, name.rsplit(".", 1)[-1])

    chunks = _calibration_ids(model_dir, texts)
    if sampled:
        chunks += _calibration_ids(model_dir, sampled, settings.sampled_tokens)
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.float32, use_safetensors=True, trust_remote_code=False
    ).eval()
    architecture = architecture_of(model.config.to_dict(), model_dir / "config.json")
    layers = model.model.layers
    tied = model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    # Each layer's keyword arguments (masks, rotary tables) for each chunk: they differ by layer
    # where layers differ (sliding or full attention, their own rotary base).
    inputs: list[torch.Tensor] = []
    layer_kwargs: list[list[dict]] = [[] for _ in layers]

    def capture(index):
        def record(_module, args, kwargs):
            hidden = args[0] if args else kwargs.pop("hidden_states")
            kwargs.pop("hidden_states", None)
            layer_kwargs[index].append(kwargs)
            if index == 0:
                inputs.append(hidden)
            if index == len(layers) - 1:
                raise _Captured

        return record

    handles = [
        layer.register_forward_pre_hook(capture(i), with_kwargs=True)
        for i, layer in enumerate(layers)
    ]
    with torch.inference_mode():
        for chunk in chunks:
            with contextlib.suppress(_Captured):
                model(input_ids=torch.tensor([chunk]), use_cache=False)
    for handle in handles:
        handle.remove()

    def dequantized(codes, scales, zero):
        rows, cols = codes.shape
        block = cols // scales.shape[1]
        blocks = codes.reshape(rows, cols // block, block).astype(np.float32)
        return torch.tensor(((blocks - zero[..., None]) * scales[..., None]).reshape(rows, cols))

    results: dict[str, tuple] = {}

    def quantize_modules(modules: dict, run) -> None:
        """Collect H for ``modules`` over ``run()``, then quantize them in place.

        ``modules``: name → (Linear, [(part name, rows)]): a fused weight (Phi-3's qkv_proj)
        is quantized part by part with the one Hessian of its input (GPTQ treats rows
        independently), each part at its own bits, as the graph holds them."""
        sums = {name: 0 for name in modules}
        counts = dict.fromkeys(modules, 0)

        def hook(name):
            def record(_module, args, _output):
                x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
                sums[name] = sums[name] + x.T @ x
                counts[name] += x.shape[0]

            return record

        handles = [m.register_forward_hook(hook(n)) for n, (m, _) in modules.items()]
        with torch.inference_mode():
            run()
        for h in handles:
            h.remove()
        for name, (module, parts) in modules.items():
            weight = module.weight.detach().numpy()
            quantized = []
            hessian = (sums[name] / counts[name]).float() if counts[name] else None
            for part, rows in parts:
                rows_weight = weight[rows]
                if bits[part] == 4 and hessian is not None:
                    damping = TIED_HEAD_DAMPING if part == "lm_head" and tied else DAMPING
                    results[part] = gptq(
                        rows_weight,
                        hessian,
                        4,
                        block_size(part),
                        damping,
                        symmetric=settings.symmetric,
                    )
                    quantized.append(dequantized(*results[part]))
                else:
                    eight = block_size(part, 8)
                    if rows_weight.shape[1] % eight:
                        eight = settings.block_size
                    symmetric = mixed_symmetric(8, settings)
                    quantized.append(
                        dequantized(*_block_quantize(rows_weight, 8, eight, symmetric=symmetric))
                    )
            with torch.no_grad():
                module.weight.copy_(torch.cat(quantized))

    def parts_of(prefix: str, name: str) -> list[tuple[str, slice]]:
        """The graph's modules a torch Linear holds, with their rows."""
        if not any(f.module == name for f in architecture.fused):
            return [(f"{prefix}.{name}", slice(None))]
        group = name.split(".")[0]
        rows = split_fused(architecture, model.config.to_dict(), name)
        return [(f"{prefix}.{group}.{part}", part_rows) for part, part_rows in rows.items()]

    for index, layer in enumerate(layers):
        prefix = f"model.layers.{index}"
        modules = {}
        for name, module in layer.named_modules():
            if not isinstance(module, torch.nn.Linear):
                continue
            parts = parts_of(prefix, name)
            if all(
                part in bits and module.in_features % block_size(part) == 0 for part, _ in parts
            ):
                modules[f"{prefix}.{name}"] = (module, parts)

        def run_layer(layer=layer, inputs=inputs, kwargs=layer_kwargs[index]):
            return [layer(hidden, **k) for hidden, k in zip(inputs, kwargs, strict=True)]

        quantize_modules(modules, run_layer)
        with torch.inference_mode():
            outputs = run_layer()
        inputs = [out[0] if isinstance(out, tuple) else out for out in outputs]
    if "lm_head" in bits and model.lm_head.in_features % block_size("lm_head") == 0:
        head = {"lm_head": (model.lm_head, [("lm_head", slice(None))])}

        def run_head():
            return [model.lm_head(model.model.norm(hidden)) for hidden in inputs]

        quantize_modules(head, run_head)
    epochs = settings.norm_epochs
    return results, tune_norms(model_dir, model, chunks, epochs) if epochs else {}


# Adam's step for the RMSNorm weights, decayed to 0 over the passes (cosine). On SmolLM2-135M's
# int4 folder, one pass over 16k calibration tokens moved the 61 weight vectors by 0.5% of
# their mean size (4% at most).
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
    calibration text's KL further but raised the held-out text's. On SmolLM2-135M's int4
    folder, calibrated on its fine-tuning data, one pass took mean KL on held-out cooking
    answers from 0.082 to 0.068, and on a prose cooking text from 0.099 to 0.103
    (benchmarks/README.md).

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

    w = torch.tensor(weight, dtype=torch.float32).clone()
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
    """``/model/layers.3/mlp/down_proj/MatMul`` → ``model.layers.3.mlp.down_proj``."""
    if node_name.startswith("/lm_head/"):
        return "lm_head"
    match = re.fullmatch(r"/model/layers\.(\d+)/(self_attn|mlp)/(\w+_proj)/MatMul", node_name)
    return f"model.layers.{match[1]}.{match[2]}.{match[3]}" if match else None


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
