"""Reference ONNX models from onnxruntime-genai's own model builder, for comparison with edgeft's
exports: what the builder makes from a Hugging Face checkpoint, what it costs, and how fast the
result runs in the project's onnxruntime-genai runtime.

    python benchmarks/onnx_builder_reference.py --model CHECKPOINT_DIR --out OUT_DIR \\
        [--precision int4 [int8 ...]] [--venv PATH] [--extra-option KEY=VALUE ...]

The builder of onnxruntime-genai 0.18 imports transformers 5 while the project pins transformers
4.57, so it runs in a separate virtual environment, created once at ``--venv`` (default
``~/.cache/edgeft/bench/genai-builder-venv``) and reused while its marker file is there. It
holds the CPU build of torch (``--torch``, refused if pip resolves it to anything but a
``+cpu`` wheel), ``transformers>=5``, the onnxruntime-genai release installed beside this
script, onnx, onnx-ir and onnxruntime; the exact versions go into the results.

For each precision the builder runs once, offline (``-i`` local folder, ``HF_HUB_OFFLINE=1``,
``hf_token=false``), as a child process: wall time includes interpreter start-up and imports,
peak RSS is the child's own (``wait4``). Its log goes to ``OUT_DIR/builder-<precision>.log`` and
the model to ``OUT_DIR/<precision>/``.

The built folder is then opened with onnx (graph only) to count op types and describe how the
weights are stored, loaded by onnxruntime-genai in this interpreter (the project's venv), asked
for 32 greedy tokens on a chat prompt, and timed (:func:`measure_genai`): prefill tokens/s over
a 256-token prompt and decode tokens/s over the next 128 tokens, median of 3, with the
decoder's intra-op threads set to 2 through ``og.Config.overlay``. Everything goes into
``OUT_DIR/builder.json`` under ``builds.<precision>``; other precisions already there are kept
when they were built from the same checkpoint.

Builder 0.18 quirks worth knowing when passing ``--extra-option``: its ``--help`` crashes (a bare
``%`` in the help text); the ``int4_``-prefixed names it calls deprecated aliases (e.g.
``int4_block_size``) are silently ignored, use ``block_size``/``accuracy_level``; on a model with
tied embeddings, ``is_symmetric=false`` or ``matmul_mixed_precision=last_matmul:int8`` with the
default algorithm writes a graph that does not load, add ``algo_config=rtn`` (or
``shared_embeddings=false``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

from gguf_export import machine

DEFAULT_VENV = Path.home() / ".cache" / "edgeft" / "bench" / "genai-builder-venv"
DEFAULT_TORCH = "torch==2.13.0"
VENV_MARKER = "edgeft-builder-venv.json"
BUILDER_MODULE = "onnxruntime_genai.models.builder"
RECORDED_PACKAGES = (
    "torch",
    "transformers",
    "onnxruntime-genai",
    "onnxruntime",
    "onnx",
    "onnx-ir",
    "numpy",
    "safetensors",
    "tokenizers",
    "huggingface-hub",
)
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1"}
CHAT_QUESTION = "How do I keep cut basil fresh?"
FILLER_TEXT = (
    "To make a simple tomato sauce, warm olive oil in a wide pan, add sliced garlic and cook it "
    "gently until it smells sweet but has not browned. Add crushed tomatoes, a pinch of salt and "
    "a few basil leaves, then let the sauce simmer for twenty minutes, stirring now and then, "
    "until it thickens and the oil starts to separate at the edges. "
)


def installed_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _normalize(name: str) -> str:
    return name.lower().replace("_", "-").replace(".", "-")


def _venv_packages(python: Path) -> dict[str, str]:
    code = (
        "import importlib.metadata as m, json; "
        "print(json.dumps({d.metadata['Name'].lower(): d.version for d in m.distributions()}))"
    )
    out = subprocess.run(
        [str(python), "-I", "-c", code], check=True, capture_output=True, text=True
    )
    return dict(sorted((_normalize(k), v) for k, v in json.loads(out.stdout).items()))


def _check_cpu_torch(python: Path, torch_spec: str) -> str:
    """The torch version pip would install for ``torch_spec``; refuses anything but a CPU build."""
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        subprocess.run(
            [
                str(python),
                "-m",
                "pip",
                "install",
                "--dry-run",
                "--quiet",
                "--no-deps",
                "--ignore-installed",
                "--report",
                str(report),
                torch_spec,
            ],
            check=True,
        )
        item = json.loads(report.read_text())["install"][0]
    version = item["metadata"]["version"]
    if "+cpu" not in version:
        raise SystemExit(
            f"pip resolves {torch_spec!r} to torch {version} from "
            f"{item['download_info']['url']}, not a CPU build; pass --torch with a CPU wheel "
            "(a local path, or torch==X+cpu with the CPU wheel index as PIP_EXTRA_INDEX_URL)"
        )
    return version


def ensure_builder_venv(venv: Path, torch_spec: str = DEFAULT_TORCH) -> dict:
    """Create the builder's virtual environment unless its marker says it is complete; return
    the marker: interpreter, requested specs and every installed package's version."""
    marker = venv / VENV_MARKER
    if marker.is_file():
        return json.loads(marker.read_text())
    python = venv / "bin" / "python"
    if not python.exists():
        venv.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    genai = installed_version("onnxruntime-genai")
    genai_spec = f"onnxruntime-genai=={genai}" if genai else "onnxruntime-genai==0.18.*"
    specs = [torch_spec, "transformers>=5", genai_spec, "onnxruntime", "onnx", "onnx-ir"]
    torch_version = _check_cpu_torch(python, torch_spec)
    print(f"builder venv {venv}: installing {' '.join(specs)} (torch {torch_version})", flush=True)
    subprocess.run([str(python), "-m", "pip", "install", "--quiet", *specs], check=True)
    packages = _venv_packages(python)
    cuda = [name for name in packages if name.startswith("nvidia-")]
    if cuda or "+cpu" not in packages.get("torch", ""):
        raise SystemExit(f"{venv} holds a CUDA build of torch ({packages.get('torch')}, {cuda})")
    info = {
        "python": subprocess.run(
            [str(python), "-I", "-c", "import sys; print(sys.version.split()[0])"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip(),
        "specs": specs,
        "packages": packages,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    marker.write_text(json.dumps(info, indent=2) + "\n")
    return info


def builder_command(
    python: Path, model: Path, target: Path, precision: str, cache: Path, extra: list[str]
) -> list[str]:
    return [
        str(python),
        "-m",
        BUILDER_MODULE,
        "-i",
        str(model),
        "-o",
        str(target),
        "-p",
        precision,
        "-e",
        "cpu",
        "-c",
        str(cache),
        "--extra_options",
        "hf_token=false",
        *extra,
    ]


def run_builder(
    python: Path, model: Path, out: Path, precision: str, extra: list[str] | None = None
) -> dict:
    """Run the builder once in a child process; wall time, peak RSS, what it wrote."""
    target = out / precision
    cache = out / f".builder-cache-{precision}"
    log = out / f"builder-{precision}.log"
    for stale in (target, cache):
        if stale.exists():
            shutil.rmtree(stale)
    cmd = builder_command(python, model, target, precision, cache, list(extra or []))
    env = {**os.environ, **OFFLINE_ENV}
    with log.open("w") as sink:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=sink, stderr=subprocess.STDOUT, env=env, cwd=out)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    shutil.rmtree(cache, ignore_errors=True)
    if proc.returncode != 0:
        tail = log.read_text(errors="replace")[-3000:]
        raise SystemExit(f"the builder failed ({proc.returncode}), see {log}:\n{tail}")
    files = sorted(p for p in target.rglob("*") if p.is_file())
    return {
        "command": cmd,
        "env": OFFLINE_ENV,
        "log": str(log),
        "wall_s": round(wall, 2),
        "peak_rss_mb": round(usage.ru_maxrss / 1024, 1),
        "folder": str(target),
        "folder_bytes": sum(p.stat().st_size for p in files),
        "files": [{"name": str(p.relative_to(target)), "bytes": p.stat().st_size} for p in files],
        "genai_config": json.loads((target / "genai_config.json").read_text()),
    }


def _source_initializer(name: str, producers: dict, initializers: dict) -> str | None:
    """The initializer a tensor comes from through Reshape/Transpose/Cast nodes, if any."""
    while name not in initializers:
        node = producers.get(name)
        if node is None or node.op_type not in ("Reshape", "Transpose", "Cast"):
            return None
        name = node.input[0]
    return name


def describe_graph(folder: Path, filename: str = "model.onnx") -> dict:
    """Op types and weight storage of a built model, read without its external data."""
    import onnx
    from onnx import helper

    model = onnx.load(str(folder / filename), load_external_data=False)
    graph = model.graph
    initializers = {t.name: t for t in graph.initializer}
    producers = {out: node for node in graph.node for out in node.output}
    ops: dict[str, int] = {}
    for node in graph.node:
        key = node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}.{node.op_type}"
        ops[key] = ops.get(key, 0) + 1

    def attrs(node) -> dict:
        return {a.name: helper.get_attribute_value(a) for a in node.attribute}

    def tensor_bytes(tensor) -> int:
        count = 1
        for dim in tensor.dims:
            count *= dim
        return count * helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize

    by_dtype: dict[str, int] = {}
    for tensor in graph.initializer:
        dtype = onnx.TensorProto.DataType.Name(tensor.data_type)
        by_dtype[dtype] = by_dtype.get(dtype, 0) + tensor_bytes(tensor)

    matmuls = [n for n in graph.node if n.op_type == "MatMulNBits"]
    lm_head = next((n for n in matmuls if n.name.startswith("/lm_head/")), None)
    float_lm_head = next(
        (n for n in graph.node if n.op_type == "MatMul" and n.name.startswith("/lm_head/")), None
    )
    nbits = {}
    for node in matmuls:
        a = attrs(node)
        has_zero_points = len(node.input) > 3 and node.input[3] != ""
        sig = (a["bits"], a["block_size"], a.get("accuracy_level", 0), not has_zero_points)
        nbits[sig] = nbits.get(sig, 0) + 1
    weights = {
        "matmul_nbits": [
            {"bits": b, "block_size": bs, "accuracy_level": acc, "symmetric": sym, "count": c}
            for (b, bs, acc, sym), c in sorted(nbits.items())
        ],
        "initializer_bytes_by_dtype": by_dtype,
    }
    if lm_head is not None:
        a = attrs(lm_head)
        weights["lm_head"] = {
            "op": "MatMulNBits",
            "bits": a["bits"],
            "block_size": a["block_size"],
            "weight": lm_head.input[1],
        }
    elif float_lm_head is not None:
        src = _source_initializer(float_lm_head.input[1], producers, initializers)
        weights["lm_head"] = {
            "op": "MatMul",
            "weight": src,
            "dtype": onnx.TensorProto.DataType.Name(initializers[src].data_type) if src else None,
        }
    embed = next(
        (
            n
            for n in graph.node
            if n.name.startswith("/model/embed_tokens/")
            and n.op_type in ("Gather", "GatherBlockQuantized")
        ),
        None,
    )
    if embed is not None:
        src = _source_initializer(embed.input[0], producers, initializers)
        entry = {"op": embed.op_type, "weight": src}
        if embed.op_type == "GatherBlockQuantized":
            a = attrs(embed)
            entry.update(
                bits=a["bits"],
                block_size=a["block_size"],
                symmetric=len(embed.input) < 4 or embed.input[3] == "",
            )
        elif src:
            entry["dtype"] = onnx.TensorProto.DataType.Name(initializers[src].data_type)
        head_weight = weights.get("lm_head", {}).get("weight")
        entry["tied_to_lm_head"] = src is not None and src == head_weight
        weights["embedding"] = entry
    return {
        "opsets": {imp.domain or "ai.onnx": imp.version for imp in model.opset_import},
        "ops": dict(sorted(ops.items(), key=lambda kv: (-kv[1], kv[0]))),
        "inputs": [i.name for i in graph.input],
        "outputs": [o.name for o in graph.output],
        "weights": weights,
    }


def _load_genai(folder: Path, threads: int):
    import onnxruntime_genai as og

    config = og.Config(str(folder))
    overlay = {"model": {"decoder": {"session_options": {"intra_op_num_threads": threads}}}}
    config.overlay(json.dumps(overlay))
    model = og.Model(config)
    return og, model, og.Tokenizer(model)


def chat_check(folder: Path, threads: int = 2, max_new_tokens: int = 32) -> dict:
    """Greedy reply to one chat turn, rendered by onnxruntime-genai's own chat template."""
    import numpy as np

    og, model, tokenizer = _load_genai(folder, threads)
    messages = json.dumps([{"role": "user", "content": CHAT_QUESTION}])
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    ids = tokenizer.encode(prompt)
    params = og.GeneratorParams(model)
    params.set_search_options(do_sample=False, max_length=len(ids) + max_new_tokens)
    generator = og.Generator(model, params)
    generator.append_tokens(ids)
    tokens: list[int] = []
    while not generator.is_done():
        generator.generate_next_token()
        tokens.append(int(generator.get_next_tokens()[0]))
    return {
        "prompt": prompt,
        "prompt_tokens": len(ids),
        "tokens": tokens,
        "stopped_at_eos": bool(tokens) and tokens[-1] in {int(t) for t in tokenizer.eos_token_ids},
        "text": tokenizer.decode(np.asarray(tokens, dtype=np.int32)),
    }


def measure_genai(
    folder: str | Path,
    prompt_tokens: int = 256,
    new_tokens: int = 128,
    threads: int = 2,
    repeats: int = 3,
) -> dict:
    """Prefill and decode speed of an onnxruntime-genai folder on the CPU, greedy, batch 1.

    Prefill: ``append_tokens`` of a ``prompt_tokens``-long prompt on a fresh generator. Decode:
    ``new_tokens`` further ``generate_next_token`` calls after the first token (which comes
    from the prefill's logits), each one forward pass over the previous token; end tokens are
    held off with ``min_length``. One short warm-up run first; medians over ``repeats``. The
    1-minute load average before and after is recorded: other work on the machine skews both.
    """
    import numpy as np

    folder = Path(folder)
    start = time.perf_counter()
    og, model, tokenizer = _load_genai(folder, threads)
    load_s = time.perf_counter() - start
    text = FILLER_TEXT
    ids = tokenizer.encode(text)
    while len(ids) < prompt_tokens:
        text += FILLER_TEXT
        ids = tokenizer.encode(text)
    prompt = np.asarray(ids[:prompt_tokens], dtype=np.int32)

    def run(prompt_ids, n_new: int) -> tuple[float, float]:
        total = len(prompt_ids) + 1 + n_new
        params = og.GeneratorParams(model)
        params.set_search_options(do_sample=False, max_length=total, min_length=total)
        generator = og.Generator(model, params)
        t0 = time.perf_counter()
        generator.append_tokens(prompt_ids)
        t1 = time.perf_counter()
        generator.generate_next_token()
        t2 = time.perf_counter()
        for _ in range(n_new):
            if generator.is_done():
                raise RuntimeError(f"{folder}: generation stopped before {n_new} new tokens")
            generator.generate_next_token()
        t3 = time.perf_counter()
        return len(prompt_ids) / (t1 - t0), n_new / (t3 - t2)

    run(prompt[:16], 8)
    load_before = os.getloadavg()[0]
    runs = [run(prompt, new_tokens) for _ in range(repeats)]
    return {
        "threads": threads,
        "prompt_tokens": prompt_tokens,
        "new_tokens": new_tokens,
        "repeats": repeats,
        "load_s": round(load_s, 3),
        "process_threads": len(os.listdir("/proc/self/task")),
        "loadavg_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "prefill_tok_s": round(statistics.median(r[0] for r in runs), 1),
        "decode_tok_s": round(statistics.median(r[1] for r in runs), 1),
        "runs": [{"prefill_tok_s": round(p, 1), "decode_tok_s": round(d, 1)} for p, d in runs],
    }


def runtime_versions() -> dict:
    names = ("onnxruntime-genai", "onnxruntime", "onnx", "transformers", "numpy")
    return {"python": platform.python_version(), **{n: installed_version(n) for n in names}}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, required=True, help="Hugging Face checkpoint folder")
    parser.add_argument("--out", type=Path, required=True, help="results folder")
    parser.add_argument(
        "--precision",
        nargs="+",
        default=["int4"],
        choices=["int4", "int8", "fp32"],
        help="builder precisions to build (default: int4)",
    )
    parser.add_argument("--venv", type=Path, default=DEFAULT_VENV, help="builder venv")
    parser.add_argument("--torch", default=DEFAULT_TORCH, help="pip spec of the CPU torch build")
    parser.add_argument(
        "--extra-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="passed to the builder's --extra_options (repeatable)",
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prompt-tokens", type=int, default=256)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-measure", action="store_true", help="build and describe only")
    args = parser.parse_args(argv)

    model = args.model.resolve()
    if not (model / "config.json").is_file():
        raise SystemExit(f"{model} is not a Hugging Face checkpoint folder (no config.json)")
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    venv_info = ensure_builder_venv(args.venv.expanduser().resolve(), args.torch)
    python = args.venv.expanduser().resolve() / "bin" / "python"

    results_path = out / "builder.json"
    results = json.loads(results_path.read_text()) if results_path.is_file() else {}
    if results.get("model") != str(model):
        results = {}
    results.update(
        machine=machine(),
        model=str(model),
        versions={
            "builder_venv": {
                "path": str(python.parent.parent),
                "python": venv_info["python"],
                **{n: venv_info["packages"].get(n) for n in RECORDED_PACKAGES},
            },
            "builder_venv_freeze": venv_info["packages"],
            "runtime": runtime_versions(),
        },
    )
    builds = results.setdefault("builds", {})
    for precision in args.precision:
        print(f"[{precision}] building {model} -> {out / precision}", flush=True)
        build = run_builder(python, model, out, precision, args.extra_option)
        build["graph"] = describe_graph(Path(build["folder"]))
        print(
            f"[{precision}] {build['wall_s']} s, peak RSS {build['peak_rss_mb']} MB, "
            f"{build['folder_bytes'] / 1e6:.1f} MB; ops {build['graph']['ops']}",
            flush=True,
        )
        if not args.no_measure:
            chat = chat_check(Path(build["folder"]), args.threads)
            print(f"[{precision}] chat reply: {chat['text']!r}", flush=True)
            speed = measure_genai(
                build["folder"], args.prompt_tokens, args.new_tokens, args.threads, args.repeats
            )
            print(
                f"[{precision}] {args.threads} threads: prefill {speed['prefill_tok_s']} tok/s "
                f"({args.prompt_tokens} tokens), decode {speed['decode_tok_s']} tok/s "
                f"({args.new_tokens} tokens), median of {args.repeats}",
                flush=True,
            )
            build["runtime"] = {"chat": chat, "speed": speed}
        builds[precision] = build
        results_path.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {results_path}")


if __name__ == "__main__":
    main()
