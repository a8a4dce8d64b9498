"""``edgeft merge``: fold a LoRA adapter into full-precision weights.

Never into 4-bit weights: peft's ``merge_and_unload`` on a bitsandbytes 4-bit model adds the
delta and re-quantizes, losing most of what was learned. Here ``ΔW = scale · B @ A`` is
computed in fp32 and added to either

* ``original``: the base checkpoint's full-precision weights, or
* ``dequantized``: the NF4/FP4 weights the adapter was trained against, dequantized — the merged
  model then reproduces the as-trained model exactly (the default for QLoRA).

Every merge is checked against the as-trained model (the adapter on the very base it was trained
on, 4-bit for QLoRA) on tokenized eval rows kept by ``edgeft train``.
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from edgeft._io import atomic_dir, check_output, sha256_file
from edgeft.errors import EdgeftError, ModelError, ParityError
from edgeft.models import DEFAULT_MODEL, check_not_only_pickled, pickled_weights, resolve_base
from edgeft.parity import Parity
from edgeft.provenance import TrainRecord, make_record, read_record, write_record
from edgeft.streaming import LoRA, streamed_model, streamed_parity
from edgeft.train import load_base_model, read_parity_rows
from edgeft.weights import (
    DTYPE_NAMES,
    ShardedWriter,
    encode,
    read_f32,
    row_chunks,
    safetensors_index,
)

MergeBase = Literal["original", "dequantized"]
OutDType = Literal["fp32", "bf16", "fp16"]

# Tolerances on mean KL(as-trained || merged), in nats, by the coarser of the dtype the
# as-trained model computes in and the dtype the merged weights are saved in. fp32: the only
# difference is summation order (W x + s·B(A x) vs (W + s·BA) x), measured ~1e-9 on the tests'
# tiny models and ~1e-7 on SmolLM2-135M; 1e-5 leaves room for larger models. bf16/fp16 round
# every weight to 8/11 mantissa bits, which costs ~1e-3 nats on small models.
KL_TOLERANCE = {"fp32": 1e-5, "fp16": 5e-3, "bf16": 2e-2}
TOP1_TOLERANCE = {"fp32": 0.99, "fp16": 0.95, "bf16": 0.90}
# Top-1 is gated off near-ties (edgeft.parity.top1_off_ties): rounding every weight to a
# dtype's mantissa moves logits by about that relative step, and where the reference's two
# best tokens are closer than that either answer is correct. A model with nearly flat
# distributions (random weights, an early checkpoint) has many such ties: plain top-1
# agreement fell to 85% on a random-weight SmolLM2-135M merged into bf16, at KL 7e-4.
ROUNDING_NOISE = {"fp32": 2.0**-20, "fp16": 2.0**-11, "bf16": 2.0**-8}


@dataclass
class MergeResult:
    """What ``merge`` wrote and measured."""

    out: Path
    merge_base: MergeBase
    dtype: OutDType
    scale: float
    parity: Parity
    gated: bool  # whether a parity miss fails this merge (LoRA, or QLoRA into dequantized)
    modules: int


# edgeft's dtype names → torch's (as recorded in edgeft.json's resolved_compute_dtype).
_TORCH_DTYPE_NAMES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def _torch_dtype(name: str):
    import torch

    return getattr(torch, _TORCH_DTYPE_NAMES[name])


def read_adapter(adapter_dir: Path) -> tuple[TrainRecord, dict, dict]:
    """Read an ``edgeft train`` output: its record, ``adapter_config.json`` and LoRA tensors.

    Returns:
        ``(record, adapter_config, {module_name: (A, B)})`` with module names as in the base
        model (``model.layers.0.self_attn.q_proj``).

    Raises:
        ModelError: files missing, or an adapter kind this merge does not handle.
    """
    from safetensors.torch import load_file

    adapter_dir = Path(adapter_dir)
    record = read_record(adapter_dir, "train")
    config_path = adapter_dir / "adapter_config.json"
    weights_path = adapter_dir / "adapter_model.safetensors"
    for path in (config_path, weights_path):
        if not path.is_file():
            raise ModelError(f"{path} is missing; pass the output directory of 'edgeft train'")
    config = json.loads(config_path.read_text(encoding="utf-8"))
    if config.get("peft_type") != "LORA":
        raise ModelError(f"{config_path}: peft_type {config.get('peft_type')!r} is not LORA")
    for key in ("use_dora", "modules_to_save", "alpha_pattern"):
        if config.get(key):
            raise ModelError(f"{config_path}: {key} adapters are not supported by edgeft merge")
    tensors = load_file(weights_path)
    pairs: dict[str, dict[str, object]] = {}
    for name, tensor in tensors.items():
        for part in ("lora_A", "lora_B"):
            marker = f".{part}.weight"
            if name.endswith(marker):
                module = name[: -len(marker)].removeprefix("base_model.model.")
                pairs.setdefault(module, {})[part] = tensor
                break
        else:
            raise ModelError(
                f"{weights_path}: unexpected tensor {name!r}; only LoRA A/B "
                "matrices of Linear layers can be merged"
            )
    lora = {}
    for module, parts in pairs.items():
        if set(parts) != {"lora_A", "lora_B"}:
            raise ModelError(f"{weights_path}: module {module} lacks lora_A or lora_B")
        lora[module] = (parts["lora_A"], parts["lora_B"])
    if not lora:
        raise ModelError(f"{weights_path}: no LoRA tensors")
    return record, config, lora


def lora_scale(config: dict, rank: int) -> float:
    """peft's scaling: alpha / r, or alpha / sqrt(r) with rsLoRA."""
    alpha = config["lora_alpha"]
    return alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank


def _check_fit(index: dict, lora: dict, source: str) -> None:
    """Raise unless every LoRA pair matches a 2-D weight of the base with the right shape."""
    for name, (a, b) in lora.items():
        stored = index.get(f"{name}.weight")
        if stored is None:
            raise ModelError(
                f"adapter module {name} does not exist in base model {source}; "
                "the adapter was trained on another architecture"
            )
        if len(stored.shape) != 2:
            raise ModelError(f"adapter module {name} is not a Linear layer in {source}")
        rows, cols = stored.shape
        if b.shape[0] != rows or a.shape[1] != cols or a.shape[0] != b.shape[1]:
            raise ModelError(
                f"adapter tensor {name}.lora_A/B shapes {tuple(a.shape)}/{tuple(b.shape)} do not "
                f"fit the base layer {rows}x{cols} in {source}; the adapter was trained on "
                "another model size"
            )


def nf4_round_trip(settings: dict, compute_dtype):
    """The weights a QLoRA adapter was trained against: ``W`` quantized by bitsandbytes as
    ``edgeft train`` loaded it (``W`` in the compute dtype, 4-bit blocks of 64, the recorded
    quant type and double quantization), dequantized to fp32."""
    import bitsandbytes.functional as bnbf
    import torch

    def round_trip(weight):
        packed, state = bnbf.quantize_4bit(
            weight.to(compute_dtype).contiguous(),
            blocksize=64,
            compress_statistics=settings["double_quant"],
            quant_type=settings["quant_type"],
        )
        return bnbf.dequantize_4bit(packed, state).to(torch.float32)

    return round_trip


def quantized_weights(model_dir: Path) -> frozenset[str]:
    """The weights QLoRA training holds in 4-bit, adapted or not: every Linear's but the output
    projection's (what bitsandbytes quantizes, and what :func:`_as_trained_weights` rounds)."""
    import torch
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_dir, trust_remote_code=False)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    head = model.get_output_embeddings()
    return frozenset(
        f"{name}.weight"
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and module is not head
    )


def _as_trained_weights(trained: dict):
    """How the as-trained model sees each base weight, for :func:`streamed_model`: its Linear
    weights through the NF4/FP4 round trip for QLoRA (every Linear of the decoder layers is
    4-bit there, adapted or not), rounded to the compute dtype for LoRA."""
    import torch

    compute_dtype = getattr(torch, trained["resolved_compute_dtype"])
    if trained["method"] == "qlora":
        round_trip = nf4_round_trip(trained, compute_dtype)

        def qlora(name, module, values):
            return round_trip(values) if isinstance(module, torch.nn.Linear) else values

        return qlora
    if compute_dtype == torch.float32:
        return None
    return lambda name, module, values: values.to(compute_dtype).to(torch.float32)


def _as_trained_model(adapter: Path, base_path: Path, trained: dict, allow_pickle: bool = False):
    """The adapter on the same base as in training (4-bit for QLoRA), in eval mode."""
    import torch
    from peft import PeftModel

    dtype = getattr(torch, trained["resolved_compute_dtype"])
    base = load_base_model(
        base_path,
        trained,
        dtype,
        quantized=trained["method"] == "qlora",
        allow_pickle=allow_pickle,
    )
    return PeftModel.from_pretrained(base, adapter, is_trainable=False).eval()


def recorded_base(record: TrainRecord, base: str | None = None, *, allow_pickle: bool = False):
    """The base model an adapter's ``edgeft.json`` names: its recorded folder if still there,
    else its recorded name; ``base`` instead where the user says it moved. Resolved, not yet
    checked (see :func:`check_base_weights`)."""
    recorded = record.inputs.base
    if base is None:
        recorded_path = Path(recorded.path)
        base = str(recorded_path) if recorded_path.is_dir() else recorded.name
    return resolve_base(base if base != DEFAULT_MODEL else None, allow_pickle=allow_pickle)


def check_base_weights(
    base_model, record: TrainRecord, adapter: Path, *, hint: bool = True
) -> None:
    """Raise unless ``base_model``'s weights hash to what the adapter was trained on.

    Raises:
        ModelError: the weights differ; with ``hint``, the message points to ``--base``.
    """
    recorded = record.inputs.base.weights_sha256
    if base_model.weights_sha256 != recorded:
        raise ModelError(
            f"base model {base_model.path} is not the one adapter {adapter} was trained on "
            f"(weights sha256 {base_model.weights_sha256[:12]} != {recorded[:12]})"
            + ("; pass --base with that model" if hint else "")
        )


def load_as_trained(adapter: Path):
    """The model exactly as ``edgeft train`` left it: the adapter on its recorded base (4-bit
    NF4/FP4 for QLoRA), with the adapter's tokenizer. The base's weights must hash to the
    sha256 recorded at training time.

    Returns:
        ``(model, tokenizer)``.

    Raises:
        ModelError: not an edgeft adapter, or its base is missing or changed.
    """
    from transformers import AutoTokenizer

    adapter = Path(adapter)
    record, _, _ = read_adapter(adapter)
    base_model = recorded_base(record)
    check_base_weights(base_model, record, adapter, hint=False)
    model = _as_trained_model(adapter, base_model.path, record.settings.model_dump())
    return model, AutoTokenizer.from_pretrained(adapter, trust_remote_code=False)


@contextlib.contextmanager
def _safetensors_base(path: Path, out: Path, allow_pickle: bool) -> Iterator[Path]:
    """The base checkpoint as safetensors: itself, or for a pickled base (``--allow-pickle``)
    a temporary copy beside ``out`` converted tensor by tensor from ``torch.load(...,
    weights_only=True, mmap=True)``, which refuses anything but tensors and containers."""
    if any(path.glob("*.safetensors")):
        yield path
        return
    if not allow_pickle:
        check_not_only_pickled(path)
    import torch

    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{out.name}.base.", dir=out.parent) as tmp:
        folder = Path(tmp)
        tensors: dict = {}
        for file in pickled_weights(path):
            tensors.update(torch.load(file, map_location="cpu", weights_only=True, mmap=True))
        layout = []
        for name, tensor in tensors.items():
            dtype = _SAFETENSORS_TORCH.get(str(tensor.dtype))
            if dtype is None:
                raise ModelError(f"{path}: tensor {name} is {tensor.dtype}, not a float weight")
            layout.append((name, dtype, tuple(tensor.shape)))
        writer = ShardedWriter(folder, layout)
        for name, tensor in tensors.items():
            writer.write(name, _storage(tensor.contiguous()))
        writer.close()
        shutil.copy(path / "config.json", folder / "config.json")
        del tensors
        yield folder


_SAFETENSORS_TORCH = {
    f"torch.{v}": k for k, v in {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}.items()
}


def _storage(tensor) -> np.ndarray:
    """A torch tensor's values as the numpy array safetensors stores (BF16 as uint16)."""
    import torch

    if tensor.dtype == torch.bfloat16:
        return tensor.view(torch.int16).numpy().view("<u2")
    return tensor.numpy()


def _write_merged(
    index: dict,
    lora: dict,
    scales: dict,
    folder: Path,
    *,
    dtype: OutDType,
    transpose: bool,
    start,
    progress: bool,
    started: frozenset[str] = frozenset(),
) -> None:
    """Write the merged checkpoint tensor by tensor: ``W' = start(W) + scale · B A`` for each
    adapted Linear (``start``: the NF4 round trip for ``dequantized``, else ``W`` itself),
    ``start(W)`` for the other weights named in ``started`` (the Linears QLoRA held in 4-bit
    without adapting them), every other tensor as stored (converted where ``dtype`` differs).
    One tensor in memory."""
    import torch
    from tqdm.auto import tqdm

    out_dtype = DTYPE_NAMES[dtype]
    adapted = {f"{name}.weight": name for name in lora}
    order = sorted(index.values(), key=lambda t: (t.file.name, t.offset))
    writer = ShardedWriter(folder, [(t.name, out_dtype, t.shape) for t in order])
    for stored in tqdm(order, desc="merging", unit="tensor", disable=not progress):
        module = adapted.get(stored.name)
        rounded = start is not None and (module is not None or stored.name in started)
        if module is None and not rounded:  # copied in row chunks: an 8B model's tables are
            if stored.dtype == out_dtype:  # 1 GB each
                writer.write(stored.name, row_chunks(stored, raw=True))
            else:
                writer.write(stored.name, (encode(c, out_dtype) for c in row_chunks(stored)))
            continue
        weight = torch.from_numpy(read_f32(stored))
        merged = start(weight) if rounded else weight
        if module is not None:
            a, b = lora[module]
            delta = (b.float() @ a.float()) * scales[module]
            merged = merged + (delta.T if transpose else delta)
        if not torch.isfinite(merged).all():
            raise EdgeftError(
                f"merged weight {module or stored.name} has non-finite values; the adapter "
                "or base weights are corrupt"
            )
        writer.write(stored.name, encode(merged.numpy(), out_dtype))
    writer.close()


def _write_configs(work: Path, base_dir: Path, model_config, tokenizer, dtype: OutDType) -> None:
    """config.json and generation_config.json of the merged checkpoint: the base's, with the
    saved dtype, the tokenizer's end-of-turn token among the stop ids and a padding id."""
    import torch
    from transformers import GenerationConfig

    try:
        generation = GenerationConfig.from_pretrained(base_dir)
    except OSError:  # no generation_config.json: from the model config, as transformers does
        generation = GenerationConfig.from_model_config(model_config)
    stop = generation.eos_token_id
    stop = list(stop) if isinstance(stop, (list, tuple)) else [stop] if stop is not None else []
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in stop:
        stop.append(tokenizer.eos_token_id)
    generation.eos_token_id = stop[0] if len(stop) == 1 else stop
    if generation.pad_token_id is None:
        generation.pad_token_id = tokenizer.pad_token_id
    if not getattr(model_config, "architectures", None):  # as save_pretrained names the class
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

        model_config.architectures = [MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_config.model_type]]
    model_config.pad_token_id = generation.pad_token_id
    model_config.dtype = getattr(torch, _TORCH_DTYPE_NAMES[dtype])
    model_config.save_pretrained(work)
    generation.save_pretrained(work)


def merge(
    adapter: Path,
    out: Path,
    *,
    merge_base: MergeBase | None = None,
    dtype: OutDType = "fp32",
    scale: float = 1.0,
    base: str | None = None,
    force: bool = False,
    allow_pickle: bool = False,
    progress: bool = False,
) -> MergeResult:
    """Merge a LoRA/QLoRA adapter into full-precision weights and save a plain checkpoint.

    Args:
        adapter: output directory of ``edgeft train``.
        out: output directory (a Hugging Face checkpoint + ``edgeft.json``).
        merge_base: ``dequantized`` (QLoRA default) or ``original``; LoRA adapters always merge
            into the original weights.
        dtype: dtype of the saved weights.
        scale: multiplies the adapter's delta (``W + scale · alpha/r · B A``): 1 merges the
            model as trained; below 1 moves it toward the base model, keeping more of what the
            base did at the cost of some of what was learned (weight-space interpolation,
            WiSE-FT). The parity check then compares against the adapter at that scale.
        base: override the base model location; its weights must hash to the recorded sha256.
        force: replace an existing ``out``.
        allow_pickle: accept a base whose only weights are pickled (``pytorch_model.bin``),
            read with ``torch.load(weights_only=True)``; off by default.

    Returns:
        A :class:`MergeResult` with the measured parity.

    Raises:
        ModelError: adapter and base do not fit.
        ParityError: LoRA or ``dequantized`` merge beyond tolerance.
        EdgeftError: a merged weight is not finite; bad settings.
    """
    from transformers import AutoConfig, AutoTokenizer

    if dtype not in KL_TOLERANCE:
        raise EdgeftError(f"--dtype must be one of fp32, bf16, fp16; got {dtype!r}")
    if not (math.isfinite(scale) and 0 < scale <= 1):
        raise EdgeftError(
            f"--scale must be in (0, 1]: 1 merges the adapter as trained, less moves the "
            f"model toward the base; got {scale}"
        )
    out = Path(out)
    check_output(out, force)
    adapter = Path(adapter)
    record, config, lora = read_adapter(adapter)
    trained = record.settings.model_dump()
    method = trained["method"]
    if merge_base is None:
        merge_base = "dequantized" if method == "qlora" else "original"
    if merge_base not in ("original", "dequantized"):
        raise EdgeftError(f"--merge-base must be original or dequantized, got {merge_base!r}")
    if method == "lora" and merge_base == "dequantized":
        raise EdgeftError(
            "--merge-base dequantized applies to QLoRA adapters; this adapter was "
            "trained with --method lora on full-precision weights"
        )

    base_model = recorded_base(record, base, allow_pickle=allow_pickle)
    rows = read_parity_rows(adapter)
    if not rows:
        raise ModelError(f"{adapter} has no parity rows; re-run 'edgeft train'")

    train_dtype_name = trained["resolved_compute_dtype"]
    trained_in = next(k for k, v in _TORCH_DTYPE_NAMES.items() if v == train_dtype_name)
    tokenizer = AutoTokenizer.from_pretrained(adapter, trust_remote_code=False)
    model_config = AutoConfig.from_pretrained(base_model.path, trust_remote_code=False)
    # Most specific message first: architecture, then shapes, then the exact weights.
    model_type = record.inputs.base.model_type
    if model_type and model_config.model_type != model_type:
        raise ModelError(
            f"adapter {adapter} was trained on a {model_type!r} model but base "
            f"{base_model.path} is {model_config.model_type!r}"
        )
    with _safetensors_base(base_model.path, out, allow_pickle) as base_dir:
        index = safetensors_index(base_dir)
        _check_fit(index, lora, str(base_model.path))
        check_base_weights(base_model, record, adapter)
        scales = {name: scale * lora_scale(config, a.shape[0]) for name, (a, _) in lora.items()}
        with atomic_dir(out, force=force) as work:
            _write_merged(
                index,
                lora,
                scales,
                work,
                dtype=dtype,
                transpose=bool(config.get("fan_in_fan_out")),
                start=nf4_round_trip(trained, _torch_dtype(trained_in))
                if merge_base == "dequantized"
                else None,
                progress=progress,
                started=quantized_weights(base_dir) if merge_base == "dequantized" else frozenset(),
            )
            shutil.copy(base_dir / "config.json", work / "config.json")
            # The as-trained model (streamed: one layer in memory) against the files written.
            as_trained = streamed_model(
                base_dir,
                weights=_as_trained_weights(trained),
                lora={
                    name: LoRA(a.float(), b.float(), scales[name]) for name, (a, b) in lora.items()
                },
            )
            coarse = max((trained_in, dtype), key=lambda d: KL_TOLERANCE[d])
            measured = streamed_parity(
                as_trained,
                streamed_model(work),
                rows,
                noise=ROUNDING_NOISE[coarse],
                progress=progress,
            )
            parity, off_ties = measured.result(), measured.top1_off_ties()
            gated = method == "lora" or merge_base == "dequantized"
            within = parity.mean_kl <= KL_TOLERANCE[coarse] and off_ties >= TOP1_TOLERANCE[coarse]
            if gated and not within:
                raise ParityError(
                    f"merged model differs from the as-trained model: {parity.summary()}, "
                    f"{off_ties:.2%} off near-ties (tolerance: mean KL ≤ "
                    f"{KL_TOLERANCE[coarse]}, top-1 off near-ties ≥ "
                    f"{TOP1_TOLERANCE[coarse]:.0%} for {coarse}); nothing was written"
                )
            _write_configs(work, base_dir, model_config, tokenizer, dtype)
            tokenizer.save_pretrained(work)
            write_record(
                work,
                make_record(
                    "merge",
                    inputs={
                        "adapter": {
                            "path": adapter.resolve(),
                            "sha256": sha256_file(adapter / "adapter_model.safetensors"),
                        },
                        "base": {
                            "name": base_model.name,
                            "path": base_model.path,
                            "weights_sha256": base_model.weights_sha256,
                        },
                        "train": {
                            "method": method,
                            "settings": trained,
                            "results": record.results,
                        },
                    },
                    settings={
                        "merge_base": merge_base,
                        "dtype": dtype,
                        "scale": scale,
                        "lora_scale": sorted(set(scales.values())),
                        "modules": len(lora),
                    },
                    results={
                        "parity_vs_as_trained": {**parity.as_dict(), "top1_off_ties": off_ties},
                        "gated": gated,
                        "within_tolerance": within,
                        "tolerance": {
                            "mean_kl": KL_TOLERANCE[coarse],
                            "top1_off_ties": TOP1_TOLERANCE[coarse],
                        },
                    },
                ),
            )
    return MergeResult(
        out=out,
        merge_base=merge_base,
        dtype=dtype,
        scale=scale,
        parity=parity,
        gated=gated,
        modules=len(lora),
    )
