"""QLoRA vs LoRA on a GPU: training tokens/s and peak GPU memory for SmolLM2-135M, bf16.

Usage: python benchmarks/gpu_qlora.py MODEL_DIR OUT.json [--steps N] [--batch-size B]

MODEL_DIR needs config.json and tokenizer files; without safetensors weights the model is
initialised at random from the config (speed and memory depend on shapes, not on values).
Data: the shipped cooking set.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import shutil
import tempfile
from pathlib import Path

import torch

from edgeft.train import TrainSettings, train

ROOT = Path(__file__).resolve().parents[1]


def ensure_weights(model_dir: Path) -> tuple[Path, str]:
    if any(model_dir.glob("*.safetensors")):
        return model_dir, "checkpoint"
    from transformers import AutoConfig, AutoModelForCausalLM

    work = Path(tempfile.mkdtemp()) / "model"
    shutil.copytree(model_dir, work)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(work), dtype=torch.float32)
    model.save_pretrained(work, safe_serialization=True)
    return work, "random init from config"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args()
    model_dir, weights = ensure_weights(args.model)
    data = ROOT / "edgeft" / "assets" / "cooking" / "train.jsonl"
    rows = {}
    for method in ("qlora", "lora"):
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        settings = TrainSettings(
            method=method,
            compute_dtype="bf16",
            rank=16,
            alpha=32,
            learning_rate=1e-3,
            max_steps=args.steps,
            batch_size=args.batch_size,
            max_length=256,
            logging_steps=10_000,
            save_steps=10_000,
            eval_fraction=0.05,
        )
        result = train(
            str(model_dir), data, Path(tempfile.mkdtemp()) / method, settings, progress=False
        )
        rows[method] = {
            "train_tokens_per_s": round(result.train_tokens_per_s, 1),
            "seconds": round(result.seconds, 2),
            "steps": result.steps,
            "peak_gpu_memory_mib": round(torch.cuda.max_memory_allocated() / 2**20, 1),
            "train_loss": round(result.train_loss, 4),
        }
        print(method, rows[method], flush=True)
    report = {
        "gpu": torch.cuda.get_device_name(0),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "model": "SmolLM2-135M-Instruct config (" + weights + ")",
        "settings": {
            "compute_dtype": "bf16",
            "batch_size": args.batch_size,
            "steps": args.steps,
            "max_length": 256,
            "rank": 16,
            "target_modules": "all-linear",
            "data": "edgeft cooking train.jsonl",
        },
        "results": rows,
    }
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
