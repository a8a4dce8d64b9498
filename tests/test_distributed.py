"""`edgeft train` under `accelerate launch`: two CPU processes in data parallel (DDP on gloo)."""

import hashlib
import json
import os
import subprocess
import sys

from conftest import facts_rows, write_jsonl


def _adapter_sha256(path) -> str:
    """The digest train's rank report computes, from the saved adapter file (peft saves
    ``...lora_A.weight`` for the parameter ``...lora_A.default.weight``)."""
    from safetensors.torch import load_file

    tensors = load_file(path)
    named = {
        key.replace(".lora_A.weight", ".lora_A.default.weight").replace(
            ".lora_B.weight", ".lora_B.default.weight"
        ): value
        for key, value in tensors.items()
    }
    digest = hashlib.sha256()
    for name, value in sorted(named.items()):
        digest.update(name.encode())
        digest.update(value.float().numpy().tobytes())
    return digest.hexdigest()


def test_two_processes_train_one_adapter_in_step(tiny_llama, tmp_path):
    data = write_jsonl(tmp_path / "facts.jsonl", facts_rows())
    out = tmp_path / "adapter"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    command = [
        sys.executable,  # this interpreter's accelerate and edgeft
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",  # on a machine without GPUs: one process per rank, DDP over gloo
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        "29517",
        "-m",
        "edgeft.cli",
        "--quiet",
        "train",
        "--base",
        str(tiny_llama),
        "--data",
        str(data),
        "--out",
        str(out),
        "--method",
        "lora",
        "--compute-dtype",
        "fp32",
        "--max-steps",
        "8",
        "--batch-size",
        "2",
        "--rank",
        "8",
        "--alpha",
        "16",
        "--lr",
        "5e-3",
        "--max-length",
        "256",
    ]
    run = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    # rank 0 reports; rank 1 trains in step and stays quiet
    assert run.stdout.count("adapter written to") == 1, run.stdout
    results = json.loads((out / "edgeft.json").read_text())["results"]
    ranks = results["ranks"]
    assert [r["rank"] for r in ranks] == [0, 1]
    assert ranks[0]["train_loss"] != ranks[1]["train_loss"]  # each rank saw its own rows
    assert ranks[0]["adapter_sha256"] == ranks[1]["adapter_sha256"]  # and they stayed in step
    assert _adapter_sha256(out / "adapter_model.safetensors") == ranks[0]["adapter_sha256"]
    assert results["eval_loss"] < results["eval_loss_before"]  # it learned
    settings = json.loads((out / "edgeft.json").read_text())["settings"]
    assert settings["world_size"] == 2
    assert not (tmp_path / "adapter.partial").exists()
