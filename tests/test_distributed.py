"""`edgeft train` under `accelerate launch`: two CPU processes in data parallel (DDP on gloo)."""

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

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


ACCELERATE_CONFIGS = Path(__file__).parents[1] / "edgeft" / "assets" / "accelerate"


def _launch(launcher: list[str], base, data, out, method: str, port: int):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    command = [
        sys.executable,  # this interpreter's accelerate and edgeft
        "-m",
        "accelerate.commands.launch",
        *launcher,
        "--main_process_port",
        str(port),
        "-m",
        "edgeft.cli",
        "--quiet",
        "train",
        "--base",
        str(base),
        "--data",
        str(data),
        "--out",
        str(out),
        "--method",
        method,
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
    return run


def test_two_processes_train_one_adapter_in_step(tiny_llama, tmp_path):
    data = write_jsonl(tmp_path / "facts.jsonl", facts_rows())
    out = tmp_path / "adapter"
    # the shipped DDP config; on a machine without GPUs, one process per rank over gloo
    run = _launch(
        ["--config_file", str(ACCELERATE_CONFIGS / "ddp.yaml")],
        tiny_llama,
        data,
        out,
        "lora",
        29517,
    )
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


def test_fsdp_qlora_shards_the_4bit_base_and_saves_the_whole_adapter(tiny_llama, tmp_path):
    """The shipped FSDP-QLoRA config, made to run on CPUs (no rank-0 broadcast, which FSDP
    does only on GPUs): the 4-bit weights stored in the compute dtype, every rank trains its
    shard, and the adapter gathered on rank 0 is whole: it merges within the fp32 gate."""
    import yaml

    from edgeft.merge import merge

    config = yaml.safe_load((ACCELERATE_CONFIGS / "fsdp_qlora.yaml").read_text())
    config.update(use_cpu=True, mixed_precision="no")
    config["fsdp_config"].update(
        fsdp_sync_module_states=False, fsdp_cpu_ram_efficient_loading=False
    )
    cpu_config = tmp_path / "fsdp_cpu.yaml"
    cpu_config.write_text(yaml.safe_dump(config))
    data = write_jsonl(tmp_path / "facts.jsonl", facts_rows())
    out = tmp_path / "adapter"
    _launch(["--config_file", str(cpu_config)], tiny_llama, data, out, "qlora", 29518)
    record = json.loads((out / "edgeft.json").read_text())
    assert record["settings"]["sharded"] == "fsdp"
    assert record["settings"]["quant_storage"] == "float32"  # the compute dtype
    assert [r["rank"] for r in record["results"]["ranks"]] == [0, 1]
    assert record["results"]["eval_loss"] < record["results"]["eval_loss_before"]
    assert not (out / "training_args.bin").exists()  # no pickle beside the adapter
    merged = merge(out, tmp_path / "merged")
    assert merged.gated and merged.modules == 7 * 2  # every linear of both layers
