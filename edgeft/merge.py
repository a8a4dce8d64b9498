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

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from edgeft._io import atomic_dir, check_output, sha256_file, write_json
from edgeft.errors import EdgeftError, ModelError, ParityError
from edgeft.models import DEFAULT_MODEL, resolve_base
from edgeft.parity import Parity, compare_logits, model_logits
from edgeft.provenance import make_record, read_record
from edgeft.train import load_base_model, read_parity_rows

MergeBase = Literal["original", "dequantized"]
OutDType = Literal["fp32", "bf16", "fp16"]

# Tolerances on mean KL(as-trained || merged), in nats, by the coarser of the dtype the
# as-trained model computes in and the dtype the merged weights are saved in. fp32: the only
# difference is summation order (W x + s·B(A x) vs (W + s·BA) x), measured ~1e-9 on the tests'
# tiny models and ~1e-7 on SmolLM2-135M; 1e-5 leaves room for larger models. bf16/fp16 round
# every weight to 8/11 mantissa bits, which costs ~1e-3 nats on small models.
KL_TOLERANCE = {"fp32": 1e-5, "fp16": 5e-3, "bf16": 2e-2}
TOP1_TOLERANCE = {"fp32": 0.99, "fp16": 0.95, "bf16": 0.90}


@dataclass
class MergeResult:
    """What ``merge`` wrote and measured."""

    out: Path
    merge_base: MergeBase
    dtype: OutDType
    parity: Parity
    gated: bool  # whether a parity miss fails this merge (LoRA, or QLoRA into dequantized)
    modules: int


# edgeft's dtype names → torch's (as recorded in edgeft.json's resolved_compute_dtype).
_TORCH_DTYPE_NAMES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def _torch_dtype(name: str):
    import torch

    return getattr(torch, _TORCH_DTYPE_NAMES[name])


def read_adapter(adapter_dir: Path) -> tuple[dict, dict, dict]:
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


def _check_fit(model, lora: dict, source: str) -> None:
    """Raise unless every LoRA pair matches a Linear layer of the base with the right shape."""
    import torch

    modules = dict(model.named_modules())
    for name, (a, b) in lora.items():
        module = modules.get(name)
        if module is None:
            raise ModelError(
                f"adapter module {name} does not exist in base model {source}; "
                "the adapter was trained on another architecture"
            )
        weight = getattr(module, "weight", None)
        if not isinstance(weight, torch.Tensor) or weight.ndim != 2:
            raise ModelError(f"adapter module {name} is not a Linear layer in {source}")
        rows, cols = (
            weight.shape
            if not isinstance(module, torch.nn.Linear)
            else (module.out_features, module.in_features)
        )
        if b.shape[0] != rows or a.shape[1] != cols or a.shape[0] != b.shape[1]:
            raise ModelError(
                f"adapter tensor {name}.lora_A/B shapes {tuple(a.shape)}/{tuple(b.shape)} do not "
                f"fit the base layer {rows}x{cols} in {source}; the adapter was trained on "
                "another model size"
            )


def _dequantized_weights(quantized_model, names) -> dict:
    """fp32 copies of the 4-bit weights the adapter was trained against."""
    import bitsandbytes.functional as bnbf
    import torch

    modules = dict(quantized_model.named_modules())
    out = {}
    for name in names:
        module = modules[name]
        weight = module.weight
        quant_state = getattr(weight, "quant_state", None)
        if quant_state is None:  # a layer bitsandbytes kept in full precision
            out[name] = weight.detach().float().cpu()
        else:
            out[name] = bnbf.dequantize_4bit(weight.data, quant_state).float().cpu()
        if out[name].shape != (module.out_features, module.in_features):
            raise ModelError(f"dequantized {name} has shape {tuple(out[name].shape)}")
    return {k: v.to(torch.float32) for k, v in out.items()}


def _as_trained_model(adapter: Path, base_path: Path, trained: dict, allow_pickle: bool = False):
    """The adapter on the same base as in training (4-bit for QLoRA), in eval mode."""
    import torch
    from peft import PeftModel

    dtype = getattr(torch, trained.get("resolved_compute_dtype", "float32"))
    base = load_base_model(
        base_path,
        trained,
        dtype,
        quantized=trained["method"] == "qlora",
        allow_pickle=allow_pickle,
    )
    return PeftModel.from_pretrained(base, adapter, is_trainable=False).eval()


def recorded_base(record: dict, base: str | None = None, *, allow_pickle: bool = False):
    """The base model an adapter's ``edgeft.json`` names: its recorded folder if still there,
    else its recorded name; ``base`` instead where the user says it moved. Resolved, not yet
    checked (see :func:`check_base_weights`)."""
    recorded = record["inputs"]["base"]
    if base is None:
        recorded_path = Path(recorded["path"])
        base = str(recorded_path) if recorded_path.is_dir() else recorded["name"]
    return resolve_base(base if base != DEFAULT_MODEL else None, allow_pickle=allow_pickle)


def check_base_weights(base_model, record: dict, adapter: Path, *, hint: bool = True) -> None:
    """Raise unless ``base_model``'s weights hash to what the adapter was trained on.

    Raises:
        ModelError: the weights differ; with ``hint``, the message points to ``--base``.
    """
    recorded = record["inputs"]["base"]["weights_sha256"]
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
    model = _as_trained_model(adapter, base_model.path, record["settings"])
    return model, AutoTokenizer.from_pretrained(adapter, trust_remote_code=False)


def merge(
    adapter: Path,
    out: Path,
    *,
    merge_base: MergeBase | None = None,
    dtype: OutDType = "fp32",
    base: str | None = None,
    force: bool = False,
    allow_pickle: bool = False,
) -> MergeResult:
    """Merge a LoRA/QLoRA adapter into full-precision weights and save a plain checkpoint.

    Args:
        adapter: output directory of ``edgeft train``.
        out: output directory (a Hugging Face checkpoint + ``edgeft.json``).
        merge_base: ``dequantized`` (QLoRA default) or ``original``; LoRA adapters always merge
            into the original weights.
        dtype: dtype of the saved weights.
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
    import torch
    from transformers import AutoTokenizer, GenerationConfig

    if dtype not in KL_TOLERANCE:
        raise EdgeftError(f"--dtype must be one of fp32, bf16, fp16; got {dtype!r}")
    out = Path(out)
    check_output(out, force)
    adapter = Path(adapter)
    record, config, lora = read_adapter(adapter)
    trained = record["settings"]
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

    recorded = record["inputs"]["base"]
    base_model = recorded_base(record, base, allow_pickle=allow_pickle)
    rows = read_parity_rows(adapter)
    if not rows:
        raise ModelError(f"{adapter} has no parity rows; re-run 'edgeft train'")

    train_dtype_name = trained.get("resolved_compute_dtype", "float32")
    tokenizer = AutoTokenizer.from_pretrained(adapter, trust_remote_code=False)
    # The merge itself runs in fp32 on the CPU: exact, and no GPU memory needed.
    full = load_base_model(
        base_model.path,
        trained,
        torch.float32,
        quantized=False,
        device="cpu",
        allow_pickle=allow_pickle,
    )
    # Most specific message first: architecture, then shapes, then the exact weights.
    model_type = recorded.get("model_type")
    if model_type and full.config.model_type != model_type:
        raise ModelError(
            f"adapter {adapter} was trained on a {model_type!r} model but base "
            f"{base_model.path} is {full.config.model_type!r}"
        )
    _check_fit(full, lora, str(base_model.path))
    check_base_weights(base_model, record, adapter)

    as_trained = _as_trained_model(adapter, base_model.path, trained, allow_pickle)
    reference = model_logits(as_trained, rows)
    if merge_base == "dequantized":
        start = _dequantized_weights(as_trained.get_base_model(), lora)
    else:
        modules = dict(full.named_modules())
        start = {name: modules[name].weight.detach().float() for name in lora}
    del as_trained

    scales = {name: lora_scale(config, a.shape[0]) for name, (a, _) in lora.items()}
    modules = dict(full.named_modules())
    with torch.no_grad():
        for name, (a, b) in lora.items():
            delta = (b.float() @ a.float()) * scales[name]
            if config.get("fan_in_fan_out"):
                delta = delta.T
            merged = start[name] + delta
            if not torch.isfinite(merged).all():
                raise EdgeftError(
                    f"merged weight {name} has non-finite values; the adapter "
                    "or base weights are corrupt"
                )
            modules[name].weight.copy_(merged)
    full = full.to(_torch_dtype(dtype))
    candidate = model_logits(full.float(), rows)
    parity = compare_logits(reference, candidate)
    full = full.to(_torch_dtype(dtype))

    trained_in = next(k for k, v in _TORCH_DTYPE_NAMES.items() if v == train_dtype_name)
    coarse = max((trained_in, dtype), key=lambda d: KL_TOLERANCE[d])
    gated = method == "lora" or merge_base == "dequantized"
    within = (
        parity.mean_kl <= KL_TOLERANCE[coarse] and parity.top1_agreement >= TOP1_TOLERANCE[coarse]
    )
    if gated and not within:
        raise ParityError(
            f"merged model differs from the as-trained model: {parity.summary()} "
            f"(tolerance: mean KL ≤ {KL_TOLERANCE[coarse]}, top-1 ≥ "
            f"{TOP1_TOLERANCE[coarse]:.0%} for {coarse})"
        )

    # Keep the base's generation settings (some models stop on several ids); make sure the
    # tokenizer's end-of-turn token stops generation and padding has an id.
    generation = full.generation_config or GenerationConfig()
    stop = generation.eos_token_id
    stop = list(stop) if isinstance(stop, (list, tuple)) else [stop] if stop is not None else []
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in stop:
        stop.append(tokenizer.eos_token_id)
    generation.eos_token_id = stop[0] if len(stop) == 1 else stop
    if generation.pad_token_id is None:
        generation.pad_token_id = tokenizer.pad_token_id
    with atomic_dir(out, force=force) as work:
        full.config.pad_token_id = generation.pad_token_id
        full.generation_config = generation
        full.save_pretrained(work, safe_serialization=True)
        tokenizer.save_pretrained(work)
        write_json(
            work / "edgeft.json",
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
                        "results": record.get("results", {}),
                    },
                },
                settings={
                    "merge_base": merge_base,
                    "dtype": dtype,
                    "lora_scale": sorted(set(scales.values())),
                    "modules": len(lora),
                },
                results={
                    "parity_vs_as_trained": parity.as_dict(),
                    "gated": gated,
                    "within_tolerance": within,
                    "tolerance": {
                        "mean_kl": KL_TOLERANCE[coarse],
                        "top1_agreement": TOP1_TOLERANCE[coarse],
                    },
                },
            ),
        )
    return MergeResult(
        out=out, merge_base=merge_base, dtype=dtype, parity=parity, gated=gated, modules=len(lora)
    )
