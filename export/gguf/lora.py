"""``edgeft export gguf-lora``: a LoRA adapter as a GGUF that llama.cpp applies at load time.

An app ships the base GGUF once and swaps small adapter files. llama.cpp adds
``scale · B·A`` to each weight, with ``scale = adapter.lora.alpha / rank``; the same reordering
of q/k rows the converter applies to the base is applied to B. The file records the sha256 of
the base weights the adapter was trained on, and :func:`check_base` refuses any other base.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgeft import __version__
from edgeft._io import atomic_dir, sha256_file
from edgeft.architectures import uniform_context
from edgeft.errors import EdgeftError, ModelError, ParityError
from edgeft.export.gguf.convert import convert_checkpoint, permute_rotary, read_model_spec
from edgeft.export.gguf.export import FULL_PRECISION_TOLERANCE, measure_file
from edgeft.fidelity import Reference, default_eval_text
from edgeft.formats import BASE_SHA_KEY, SOURCE_SHA_KEY, check_base
from edgeft.gguf_file import FULL_PRECISION_FILE_TYPES, gguf_metadata
from edgeft.options import DEFAULT_THREADS
from edgeft.parity import Parity
from edgeft.provenance import make_record, write_record

LORA_TYPES = ("f32", "f16")


@dataclass
class LoraExport:
    """What ``export_gguf_lora`` wrote and measured."""

    out: Path
    file: Path
    modules: int
    alpha: float
    parity: Parity
    perplexity: float
    reference_perplexity: float
    greedy_first_divergence: int | None
    base_gguf: str
    gated: bool


def _gguf_name(names, module: str) -> str:
    name = names.get_name(f"{module}.weight", try_suffixes=(".weight",))
    if name is None:
        raise ModelError(f"adapter module {module} has no llama.cpp tensor; it cannot be exported")
    return name


def _write_lora(path: Path, spec, config: dict, lora: dict, lora_type: str, meta: dict) -> float:
    """Write the adapter tensors; return the ``adapter.lora.alpha`` written."""
    import gguf

    from edgeft.merge import lora_scale

    arch = next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == spec.architecture.gguf_arch)
    names = gguf.get_tensor_name_map(arch, spec.n_layer)
    scales = {m: lora_scale(config, a.shape[0]) for m, (a, _) in lora.items()}
    # llama.cpp computes scale = alpha / rank per tensor. One alpha fits every module unless
    # ranks and rsLoRA make scale·rank differ; then each scale is folded into B and alpha = 0
    # (llama.cpp then applies B·A as is).
    alphas = {round(scales[m] * a.shape[0], 6) for m, (a, _) in lora.items()}
    alpha = alphas.pop() if len(alphas) == 1 else 0.0
    dtype = np.float32 if lora_type == "f32" else np.float16

    writer = gguf.GGUFWriter(path, spec.architecture.gguf_arch)
    try:
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
        for key, value in meta.items():
            writer.add_string(key, value)
        for module in sorted(lora):
            a, b = (t.float().numpy() for t in lora[module])
            if config.get("fan_in_fan_out"):
                raise ModelError(f"adapter module {module}: fan_in_fan_out LoRA is not supported")
            if alpha == 0.0:
                b = b * scales[module]
            if spec.architecture.permute_qk and module.endswith("q_proj"):
                b = permute_rotary(b, spec.n_head)
            elif spec.architecture.permute_qk and module.endswith("k_proj"):
                b = permute_rotary(b, spec.n_head_kv)
            base_name = _gguf_name(names, module)
            a, b = np.ascontiguousarray(a, dtype=dtype), np.ascontiguousarray(b, dtype=dtype)
            if not (np.isfinite(a).all() and np.isfinite(b).all()):
                raise ModelError(
                    f"adapter module {module}: lora_A/lora_B have non-finite values in "
                    f"{lora_type} (NaN, inf or overflow); the adapter is corrupt"
                )
            writer.add_tensor(f"{base_name}.lora_a", a)
            writer.add_tensor(f"{base_name}.lora_b", b)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()
    return alpha


def export_gguf_lora(
    adapter: Path,
    out: Path,
    *,
    base_gguf: Path | None = None,
    base: str | None = None,
    lora_type: str = "f16",
    eval_text: str | None = None,
    threads: int = DEFAULT_THREADS,
    force: bool = False,
    progress=None,
) -> LoraExport:
    """Write an ``edgeft train`` adapter as a llama.cpp LoRA GGUF and measure it.

    The reference is the adapter over the full-precision base in PyTorch (unmerged), which is
    what llama.cpp computes: LoRA over the base weights as they are in the base GGUF.

    Args:
        base_gguf: the base GGUF apps will ship; it must come from the adapter's base model.
            Without it, the base is converted to F32 for the check and not kept.
        base: the base model location if it moved (as in ``edgeft merge --base``).
        lora_type: ``f16`` (default, half the size) or ``f32``.

    Raises:
        ModelError: an adapter llama.cpp cannot apply, or a base that is not the adapter's.
        ParityError: base + adapter in llama.cpp differs from PyTorch beyond tolerance
            (full-precision bases only).
    """
    from edgeft.merge import check_base_weights, read_adapter, recorded_base
    from edgeft.runtimes.pytorch import load_over_full_precision

    say = progress or (lambda message: None)
    if lora_type not in LORA_TYPES:
        raise EdgeftError(f"--type must be one of {', '.join(LORA_TYPES)}; got {lora_type!r}")
    adapter, out = Path(adapter), Path(out)
    record, config, lora = read_adapter(adapter)
    base_model = recorded_base(record, base)
    check_base_weights(base_model, record, adapter)
    spec = read_model_spec(base_model.path)
    adapter_sha = sha256_file(adapter / "adapter_model.safetensors")
    meta = {
        "general.name": f"{adapter.name} (LoRA over {Path(base_model.name).name})",
        "edgeft.version": __version__,
        BASE_SHA_KEY: base_model.weights_sha256,
        "edgeft.adapter.sha256": adapter_sha,
        "edgeft.train.method": record.settings.method,
    }
    with atomic_dir(out, force) as work:
        lora_file = work / f"lora-{lora_type}.gguf"
        start = time.perf_counter()
        say(f"writing {len(lora)} LoRA modules to {lora_file.name}")
        alpha = _write_lora(lora_file, spec, config, lora, lora_type, meta)
        seconds = time.perf_counter() - start
        lora_meta = gguf_metadata(lora_file)

        if base_gguf is None:
            say("converting the base to F32 for the check (not kept)")
            base_file = work / ".base-f32.gguf"
            convert_checkpoint(
                base_model.path,
                base_file,
                "f32",
                metadata={SOURCE_SHA_KEY: base_model.weights_sha256},
            )
        else:
            base_file = Path(base_gguf)
        base_meta = gguf_metadata(base_file)
        check_base(lora_meta, base_meta, lora_file, base_file)
        base_type = FULL_PRECISION_FILE_TYPES.get(base_meta.get("general.file_type", -1))

        say("measuring base + adapter in llama.cpp against PyTorch")
        reference = Reference(
            load_over_full_precision(adapter, base_model.path, record, threads=threads),
            eval_text or default_eval_text(),
            uniform_context(spec.config),
        )
        measured = measure_file(base_file, reference, threads, lora_path=lora_file)
        parity, ppl = measured.parity, measured.perplexity
        diverged = measured.greedy_first_divergence
        if base_gguf is None:
            base_file.unlink()
        gated = base_type is not None
        if gated:
            coarse = max((base_type, lora_type), key=lambda t: FULL_PRECISION_TOLERANCE[t][0])
            max_kl, min_top1 = FULL_PRECISION_TOLERANCE[coarse]
            if not (parity.mean_kl <= max_kl and measured.top1_off_ties >= min_top1):
                raise ParityError(
                    f"base + {lora_file.name} in llama.cpp differs from the adapter in PyTorch: "
                    f"{parity.summary()}, {measured.top1_off_ties:.2%} off near-ties (tolerance "
                    f"for {coarse}: mean KL ≤ {max_kl}, top-1 off near-ties ≥ {min_top1:.0%}); "
                    "nothing was written"
                )
        write_record(
            work,
            make_record(
                "export-gguf-lora",
                inputs={
                    "adapter": {"path": adapter.resolve(), "sha256": adapter_sha},
                    "base": {
                        "name": base_model.name,
                        "path": base_model.path,
                        "weights_sha256": base_model.weights_sha256,
                    },
                    "base_gguf": str(base_gguf) if base_gguf else None,
                },
                settings={"type": lora_type, "threads": threads, "gguf_metadata": meta},
                results={
                    "file": lora_file.name,
                    "bytes": lora_file.stat().st_size,
                    "sha256": sha256_file(lora_file),
                    "seconds": round(seconds, 3),
                    "modules": len(lora),
                    "alpha": alpha,
                    "reference": "adapter over the full-precision base in PyTorch fp32",
                    "base_checked": str(base_gguf) if base_gguf else "base converted to F32",
                    "parity": parity.as_dict(),
                    "perplexity": ppl,
                    "reference_perplexity": reference.perplexity,
                    "greedy_first_divergence": diverged,
                    "top1_off_ties": measured.top1_off_ties,
                    "gated": gated,
                },
            ),
        )
    return LoraExport(
        out=out,
        file=out / lora_file.name,
        modules=len(lora),
        alpha=alpha,
        parity=parity,
        perplexity=ppl,
        reference_perplexity=reference.perplexity,
        greedy_first_divergence=diverged,
        base_gguf=str(base_gguf) if base_gguf else "base converted to F32 (not kept)",
        gated=gated,
    )
