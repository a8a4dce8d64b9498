"""Safe reading everywhere edgeft reads files: no unpickling unless asked (and then only with
``weights_only``), no remote code, GGUF headers bounds-checked before gguf or llama.cpp read
them, ONNX external data kept inside the model folder, chat templates rendered in a sandbox,
and non-finite weights refused by every export, naming the tensor, with nothing written."""

import json
import pickle
import re
import shutil
import struct
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import CORPUS, FAST_TRAIN, facts_rows, write_jsonl

from edgeft.errors import ModelError

SHORT_EVAL = " ".join(CORPUS[:3])
ROOT = Path(__file__).resolve().parents[1]


class _Payload:
    """Unpickling this creates ``marker``: code runs on load."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def _one_line(error: Exception, *names) -> None:
    text = str(error)
    assert "\n" not in text
    for name in names:
        assert str(name) in text


def _copy_without_weights(source: Path, out: Path) -> Path:
    out.mkdir(parents=True)
    for path in source.iterdir():
        if path.is_file() and path.suffix != ".safetensors":
            shutil.copy2(path, out / path.name)
    return out


# --- pickles ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pickled_llama(tiny_llama, tmp_path_factory) -> Path:
    """``tiny_llama`` with its weights saved only as a pickle (pytorch_model.bin)."""
    import torch
    from transformers import AutoModelForCausalLM

    out = _copy_without_weights(tiny_llama, tmp_path_factory.mktemp("pickled") / "llama")
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    model.save_pretrained(out, safe_serialization=False)
    assert (out / "pytorch_model.bin").is_file() and not list(out.glob("*.safetensors"))
    return out


PICKLE_REFUSAL = (
    r"has only pickled weights \(pytorch_model.bin\); edgeft never unpickles unless asked: "
    r"convert them to safetensors, or pass --allow-pickle to load them with "
    r"torch.load\(weights_only=True\)"
)


def test_a_pickled_only_base_is_refused(pickled_llama, tmp_path, capsys):
    from edgeft.cli import main
    from edgeft.export.gguf import export_gguf
    from edgeft.models import resolve_base
    from edgeft.runtimes import get_runtime

    with pytest.raises(ModelError, match=PICKLE_REFUSAL) as info:
        resolve_base(str(pickled_llama))
    _one_line(info.value, pickled_llama)

    data = write_jsonl(tmp_path / "facts.jsonl", facts_rows())
    out = tmp_path / "adapter"
    args = ["train", "--base", pickled_llama, "--data", data, "--out", out, "-q"]
    assert main([str(a) for a in args]) == 2
    err = capsys.readouterr().err
    assert "--allow-pickle" in err and len(err.strip().splitlines()) == 1
    assert not out.exists() and not (tmp_path / "adapter.partial").exists()

    with pytest.raises(ModelError, match=r"only pickled weights \(pytorch_model.bin\)"):
        get_runtime("torch").load(pickled_llama, threads=1)
    with pytest.raises(ModelError, match="never unpickles"):
        export_gguf(pickled_llama, tmp_path / "gguf", "f32")
    assert not (tmp_path / "gguf").exists()


def test_allow_pickle_reads_tensors_with_weights_only(pickled_llama, tiny_llama):
    import torch
    from safetensors.torch import load_file

    from edgeft._io import sha256_files
    from edgeft.models import resolve_base
    from edgeft.train import load_base_model

    base = resolve_base(str(pickled_llama), allow_pickle=True)
    assert base.weights_sha256 == sha256_files([pickled_llama / "pytorch_model.bin"])
    model = load_base_model(
        base.path, {}, torch.float32, quantized=False, device="cpu", allow_pickle=True
    )
    expected = load_file(tiny_llama / "model.safetensors")
    state = model.state_dict()
    for name, tensor in expected.items():
        torch.testing.assert_close(state[name], tensor, rtol=0, atol=0)


@pytest.mark.parametrize("writer", ["pickle", "torch.save"])
def test_allow_pickle_still_refuses_code(writer, tiny_llama, tmp_path):
    import torch

    from edgeft.train import load_base_model

    folder = _copy_without_weights(tiny_llama, tmp_path / "evil")
    marker = tmp_path / "pwned"
    if writer == "pickle":
        (folder / "pytorch_model.bin").write_bytes(pickle.dumps(_Payload(marker)))
    else:
        torch.save({"model.embed_tokens.weight": _Payload(marker)}, folder / "pytorch_model.bin")
    with pytest.raises(ModelError, match="cannot load base model") as info:
        load_base_model(folder, {}, torch.float32, quantized=False, device="cpu", allow_pickle=True)
    _one_line(info.value)
    assert not marker.exists()  # weights_only=True refused the payload instead of running it


def test_train_and_merge_a_pickled_base_with_allow_pickle(pickled_llama, tmp_path):
    from edgeft.merge import merge
    from edgeft.train import TrainSettings, train

    data = write_jsonl(tmp_path / "facts.jsonl", facts_rows())
    settings = TrainSettings(method="lora", **{**FAST_TRAIN, "max_steps": 2})
    result = train(
        str(pickled_llama), data, tmp_path / "a", settings, progress=False, allow_pickle=True
    )
    record = json.loads((result.out / "edgeft.json").read_text())
    assert record["settings"]["allow_pickle"] is True
    with pytest.raises(ModelError, match=PICKLE_REFUSAL):
        merge(result.out, tmp_path / "m")
    merged = merge(result.out, tmp_path / "m", allow_pickle=True)
    assert merged.gated and list((tmp_path / "m").glob("*.safetensors"))


def test_no_code_path_trusts_remote_code():
    """trust_remote_code is never anything but False (edgeft has no option to enable it)."""
    pattern = re.compile(r"""trust_remote_code["']?\s*[=:](?!\s*False\b)""")
    offenders = [
        f"{path.relative_to(ROOT)}:{number}"
        for folder in ("edgeft", "export", "runtimes", "devices")
        for path in sorted((ROOT / folder).rglob("*.py"))
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
        if pattern.search(line)
    ]
    assert offenders == []
    assert "--trust-remote-code" not in (ROOT / "edgeft" / "cli.py").read_text(encoding="utf-8")


# --- GGUF -------------------------------------------------------------------------------------


def _crafted_gguf(path: Path) -> Path:
    """49 bytes: one metadata array claiming 2^40 strings."""
    key = b"tokenizer.ggml.tokens"
    path.write_bytes(
        b"GGUF"
        + struct.pack("<IQQ", 3, 0, 1)
        + struct.pack("<Q", len(key))
        + key
        + struct.pack("<IIQ", 9, 8, 1 << 40)
    )
    return path


def test_crafted_gguf_is_refused_before_gguf_or_llama_cpp_read_it(tmp_path):
    from edgeft.export.gguf import export_gguf
    from edgeft.models import convert_gguf_checkpoint, tokenizer_from_gguf
    from edgeft.runtimes import get_runtime

    crafted = _crafted_gguf(tmp_path / "crafted.gguf")
    calls = [
        (lambda: get_runtime("llama.cpp").load(crafted, threads=1), "cannot read .*claims"),
        (lambda: tokenizer_from_gguf(crafted), "claims 1099511627776 strings"),
        (lambda: convert_gguf_checkpoint(crafted, tmp_path / "hf"), "claims"),
        (lambda: export_gguf(crafted, tmp_path / "q", "q8_0"), "claims"),
    ]
    for call, message in calls:
        start = time.perf_counter()
        with pytest.raises(ModelError, match=message) as info:
            call()
        assert time.perf_counter() - start < 5
        _one_line(info.value, crafted)
    assert not (tmp_path / "hf").exists() and not (tmp_path / "q").exists()


# --- ONNX external data -----------------------------------------------------------------------


def _escaping_onnx(folder: Path, location: str) -> Path:
    """A folder whose model.onnx reads initializer ``w`` from ``location``, with a genai config."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper
    from onnx.external_data_helper import set_external_data

    folder.mkdir(parents=True)
    weight = numpy_helper.from_array(np.ones((4, 4), np.float32), "w")
    set_external_data(weight, location=location, offset=0, length=64)
    weight.data_location = TensorProto.EXTERNAL
    weight.ClearField("raw_data")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["logits"])],
        "escape",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 4])],
        initializer=[weight],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    (folder / "model.onnx").write_bytes(model.SerializeToString())  # onnx refuses to save it
    assert onnx.load(str(folder / "model.onnx"), load_external_data=False).graph.initializer
    genai = {
        "model": {
            "type": "llama",
            "context_length": 16,
            "eos_token_id": 2,
            "decoder": {"filename": "model.onnx"},
        },
        "search": {"max_length": 16},
    }
    (folder / "genai_config.json").write_text(json.dumps(genai))
    return folder


@pytest.mark.parametrize("location", ["../outside.bin", "ABSOLUTE", "a/../../outside.bin"])
@pytest.mark.parametrize("runtime", ["onnxruntime", "onnxruntime-genai"])
def test_runtimes_refuse_external_data_outside_the_folder(runtime, location, tmp_path):
    from edgeft.runtimes import get_runtime

    outside = tmp_path / "outside.bin"
    outside.write_bytes(np.full(16, 7, np.float32).tobytes())  # exists: refused for where it is
    location = str(outside) if location == "ABSOLUTE" else location
    folder = _escaping_onnx(tmp_path / "model", location)
    with pytest.raises(ModelError, match="external data of tensor w points to .* outside") as info:
        get_runtime(runtime).load(folder, threads=1)
    _one_line(info.value, folder / "model.onnx")


def test_genai_refuses_model_files_outside_the_folder(tmp_path):
    from edgeft.runtimes import get_runtime

    outside = _escaping_onnx(tmp_path / "elsewhere", "model.onnx.data")
    (outside / "model.onnx.data").write_bytes(np.zeros(16, np.float32).tobytes())
    folder = tmp_path / "model"
    folder.mkdir()
    genai = json.loads((outside / "genai_config.json").read_text())
    genai["model"]["decoder"]["filename"] = "../elsewhere/model.onnx"
    (folder / "genai_config.json").write_text(json.dumps(genai))
    with pytest.raises(ModelError, match="a model 'filename' points to '../elsewhere/model.onnx'"):
        get_runtime("onnxruntime-genai").load(folder, threads=1)


# --- chat templates ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "template",
    [
        "{{ ''.__class__.__mro__[1].__subclasses__() }}",
        "{{ messages.append({'role': 'system', 'content': 'x'}) }}",
        "{{ raise_exception.__globals__['os'] }}",
    ],
)
def test_chat_templates_render_in_a_sandbox(template, tiny_tokenizer_dir):
    from jinja2.exceptions import SecurityError
    from transformers import AutoTokenizer

    from edgeft.runtimes.llamacpp import _sandboxed_template

    messages = [{"role": "user", "content": "hi"}]
    with pytest.raises(SecurityError):
        _sandboxed_template(template).render(messages=messages, add_generation_prompt=True)
    tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    with pytest.raises(SecurityError):
        tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False)


# --- non-finite weights -----------------------------------------------------------------------

BAD_TENSOR = "model.layers.1.mlp.down_proj.weight"


def _with_value(source: Path, out: Path, value: float) -> Path:
    from safetensors.numpy import load_file, save_file

    shutil.copytree(source, out)
    tensors = load_file(out / "model.safetensors")
    tensors[BAD_TENSOR][3, 5] = value
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_non_finite_weights_fail_the_gguf_export(value, tiny_llama, tmp_path):
    from edgeft.export.gguf import export_gguf

    model = _with_value(tiny_llama, tmp_path / "bad", value)
    out = tmp_path / "gguf"
    with pytest.raises(ModelError, match=f"tensor {BAD_TENSOR} has non-finite values") as info:
        export_gguf(model, out, "f16,q8_0", eval_text=SHORT_EVAL)
    _one_line(info.value)
    assert not out.exists() and not (tmp_path / "gguf.partial").exists()


def test_weights_beyond_f16_fail_the_f16_gguf(tiny_llama, tmp_path):
    from edgeft.export.gguf import export_gguf

    model = _with_value(tiny_llama, tmp_path / "big", 1e6)
    with pytest.raises(ModelError, match=f"tensor {BAD_TENSOR} overflows F16"):
        export_gguf(model, tmp_path / "gguf", "f16", eval_text=SHORT_EVAL)
    assert not (tmp_path / "gguf").exists()


@pytest.mark.parametrize("graph", ["fused", "optimum"])
def test_non_finite_weights_fail_the_onnx_export(graph, tiny_llama, tmp_path):
    from edgeft.export.onnx import export_onnx

    model = _with_value(tiny_llama, tmp_path / "bad", np.nan)
    out = tmp_path / "onnx"
    with pytest.raises(ModelError, match=f"tensor {BAD_TENSOR} has non-finite values"):
        export_onnx(model, out, "fp32,int4", graph=graph, eval_text=SHORT_EVAL)
    assert not out.exists() and not (tmp_path / "onnx.partial").exists()


def test_onnx_precision_passes_check_every_float_initializer(tmp_path):
    from onnx import TensorProto, helper, numpy_helper

    from edgeft.export.onnx.export import check_finite_initializers

    scales = np.ones(4, np.float16)
    scales[2] = np.inf
    graph = helper.make_graph(
        [],
        "g",
        [],
        [],
        initializer=[
            numpy_helper.from_array(np.zeros(4, np.uint8), "codes"),
            numpy_helper.from_array(scales, "blk.scales"),
        ],
    )
    model = helper.make_model(graph)
    with pytest.raises(ModelError, match="tensor blk.scales has non-finite values .* to int4"):
        check_finite_initializers(model, tmp_path / "int4")
    model.graph.initializer[1].CopyFrom(numpy_helper.from_array(np.ones(4, np.float16), "ok"))
    check_finite_initializers(model, tmp_path / "int4")
    assert model.graph.initializer[1].data_type == TensorProto.FLOAT16


def _patched_gguf(tiny_llama, path: Path, value: float) -> Path:
    """An F32 GGUF of ``tiny_llama`` with one weight of blk.0.ffn_down set to ``value``."""
    from edgeft.export.gguf.convert import convert_checkpoint
    from edgeft.gguf_file import read_gguf

    convert_checkpoint(tiny_llama, path, "f32")
    info = read_gguf(path)
    tensor = next(t for t in info.tensors if t.name == "blk.0.ffn_down.weight")
    with open(path, "r+b") as f:
        f.seek(info.data_offset + tensor.offset + 4 * 7)
        f.write(struct.pack("<f", value))
    return path


def test_a_non_finite_gguf_source_is_not_quantized(tiny_llama, tmp_path):
    from edgeft.export.gguf import export_gguf

    source = _patched_gguf(tiny_llama, tmp_path / "nan.gguf", float("nan"))
    with pytest.raises(ModelError, match="tensor blk.0.ffn_down.weight has non-finite values"):
        export_gguf(source, tmp_path / "q", "q8_0", eval_text=SHORT_EVAL)
    assert not (tmp_path / "q").exists()


def test_llama_cpp_quantizer_overflow_names_the_tensor(tiny_llama, tmp_path):
    """Finite but huge weights give an inf q8_0 block scale (fp16): llama.cpp's validation of
    what it wrote fails the quantization, and the error names the tensor it was on."""
    from edgeft.export.gguf.quantize import quantize

    source = _patched_gguf(tiny_llama, tmp_path / "huge.gguf", 1e30)
    with pytest.raises(ModelError, match="at tensor blk.0.ffn_down.weight: .*validat") as info:
        quantize(source, tmp_path / "q8.gguf", "q8_0", threads=1)
    _one_line(info.value, source)


def test_a_crafted_safetensors_checkpoint_is_refused(tiny_llama, tmp_path):
    from edgeft.export.gguf import export_gguf

    model = _copy_without_weights(tiny_llama, tmp_path / "crafted")
    entry = {"dtype": "F32", "shape": [4], "data_offsets": "x"}
    header = json.dumps({"model.embed_tokens.weight": entry}).encode()
    (model / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header)
    with pytest.raises(ModelError, match="data_offsets 'x' are not") as info:
        export_gguf(model, tmp_path / "out", "f32")
    _one_line(info.value, model / "model.safetensors")
    assert not (tmp_path / "out").exists()
