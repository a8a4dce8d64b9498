"""``edgeft inspect`` on tiny GGUF, ONNX and safetensors files built here, and on crafted or
damaged ones: each is described from its header, or refused with one line naming the file and
the field, quickly and without loading tensors or unpickling anything."""

import json
import pickle
import struct
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import CORPUS

from edgeft.errors import ModelError
from edgeft.inspect import inspect_file, render_inspection


def _cli(capsys, *args) -> tuple[int, str, str]:
    from edgeft.cli import main

    code = main(["inspect", *map(str, args)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _refused(path: Path, message: str) -> ModelError:
    """inspect_file refuses ``path`` with ``message``, on one line naming it, within 5 s."""
    start = time.perf_counter()
    with pytest.raises(ModelError, match=message) as info:
        inspect_file(path)
    assert time.perf_counter() - start < 5
    assert str(path) in str(info.value) and "\n" not in str(info.value)
    return info.value


# --- GGUF -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gguf_file(tiny_llama, tmp_path_factory) -> Path:
    from edgeft.export.gguf import export_gguf

    out = tmp_path_factory.mktemp("inspect-gguf") / "gguf"
    export_gguf(tiny_llama, out, "q8_0", eval_text=" ".join(CORPUS[:3]))
    return out / "model-q8_0.gguf"


def test_gguf(gguf_file, tiny_llama, tiny_tokenizer_dir, capsys):
    from transformers import AutoTokenizer

    info = inspect_file(gguf_file)
    assert (info["format"], info["version"], info["architecture"]) == ("gguf", 3, "llama")
    assert info["file_type"] == "q8_0" and info["type"] == "model"
    # the same weights as the checkpoint (tied lm_head written once in both)
    weights = inspect_file(tiny_llama / "model.safetensors")
    assert info["parameter_count"] == weights["parameter_count"]
    assert info["tensor_count"] == weights["tensor_count"]
    # 2 layers x 7 projections and the embedding table; norms stay f32
    assert info["tensor_types"] == {"q8_0": 15, "f32": 5}
    assert info["context_length"] == 256
    assert info["hyperparameters"]["block_count"] == 2
    tokenizer = info["tokenizer"]
    assert tokenizer["vocab_size"] == len(AutoTokenizer.from_pretrained(tiny_tokenizer_dir))
    assert (tokenizer["model"], tokenizer["eos_token_id"]) == ("gpt2", 2)
    assert tokenizer["has_chat_template"] is True and tokenizer["merges"] > 0
    assert info["edgeft"]["edgeft.version"] and info["edgeft"]["edgeft.source.sha256"]
    assert info["general"]["general.architecture"] == "llama"

    text = render_inspection(info)
    assert "GGUF v3" in text and "q8_0" in text and "chat template: yes" in text
    code, out, _ = _cli(capsys, gguf_file, "--json")
    assert code == 0 and json.loads(out)["tensor_types"] == info["tensor_types"]


def _header(n_tensors=0, n_kv=1) -> bytes:
    return b"GGUF" + struct.pack("<IQQ", 3, n_tensors, n_kv)


def _key(name: str, kind: int) -> bytes:
    return struct.pack("<Q", len(name)) + name.encode() + struct.pack("<I", kind)


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("truncated", None, "past the end"),
        (
            "huge string",
            _header() + _key("general.name", 8) + struct.pack("<Q", 1 << 62) + b"abc",
            "value of general.name runs past the end",
        ),
        (
            # 49 bytes: an array claiming 2^40 strings
            "string array",
            _header() + _key("t", 9) + struct.pack("<IQ", 8, 1 << 40),
            "value of t claims 1099511627776 strings",
        ),
        (
            "tensor offset",
            _header(n_tensors=1, n_kv=0)
            + struct.pack("<Q", 1)
            + b"w"
            + struct.pack("<IQIQ", 1, 32, 0, 1 << 40),
            "tensor w lies past the end",
        ),
    ],
)
def test_damaged_gguf(name, content, message, gguf_file, tmp_path, capsys):
    path = tmp_path / "bad.gguf"
    path.write_bytes(gguf_file.read_bytes()[:-100] if content is None else content)
    _refused(path, message)
    code, out, err = _cli(capsys, path)
    assert code == 2 and out == "" and len(err.strip().splitlines()) == 1


# --- safetensors ------------------------------------------------------------------------------


def test_safetensors(tmp_path, capsys):
    from safetensors.numpy import save_file

    path = tmp_path / "w.safetensors"
    tensors = {
        "a": np.zeros((2, 3), np.float32),
        "b": np.ones(4, np.float16),
        "c": np.arange(5, dtype=np.int64),
    }
    save_file(tensors, str(path), metadata={"format": "pt", "note": "tiny"})
    info = inspect_file(path)
    assert info["format"] == "safetensors"
    assert (info["tensor_count"], info["parameter_count"]) == (3, 15)
    assert info["dtypes"] == {"F32": 1, "F16": 1, "I64": 1}
    assert info["metadata"] == {"format": "pt", "note": "tiny"}
    assert info["bytes"] == path.stat().st_size
    assert "15 parameters" in render_inspection(info)
    code, out, _ = _cli(capsys, path)
    assert code == 0 and "safetensors" in out


def _safetensors(header: dict | bytes, data: bytes = b"", length: int | None = None) -> bytes:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw) if length is None else length) + raw + data


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"\x01\x02", "fewer than the 8-byte header length"),
        (_safetensors({}, length=1 << 40), "header length 1099511627776 runs past the end"),
        (_safetensors(b"{not json"), "header is not valid JSON"),
        (_safetensors(b"[" * 100_000 + b"]" * 100_000), "header is not valid JSON"),
        (
            _safetensors({"w": {"dtype": "F32", "shape": [1000], "data_offsets": [0, 4000]}}),
            "tensor 'w': data_offsets \\[0, 4000\\] lie past the end of the file",
        ),
        (
            _safetensors(
                {"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 8]}}, b"\x00" * 8
            ),
            "tensor 'w': data_offsets span 8 bytes but F32 \\[4\\] needs 16",
        ),
        (
            _safetensors({"w": {"dtype": "PICKLE", "shape": [1], "data_offsets": [0, 1]}}, b"x"),
            "dtype 'PICKLE' is not a safetensors dtype",
        ),
        (
            _safetensors(
                {
                    "a": {"dtype": "U8", "shape": [4], "data_offsets": [0, 4]},
                    "b": {"dtype": "U8", "shape": [4], "data_offsets": [2, 6]},
                },
                b"\x00" * 6,
            ),
            "tensors 'a' and 'b' overlap",
        ),
        (_safetensors({"__metadata__": {"a": 1}}), "__metadata__ must map strings to strings"),
    ],
)
def test_damaged_safetensors(content, message, tmp_path, capsys):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(content)
    _refused(path, message)
    code, _, err = _cli(capsys, path)
    assert code == 2 and len(err.strip().splitlines()) == 1


# --- ONNX -------------------------------------------------------------------------------------


def _onnx_model():
    """A small graph: MatMul over an 8x16 weight, an int4 MatMulNBits, a Gather."""
    from onnx import TensorProto, helper, numpy_helper

    weight = numpy_helper.from_array(np.ones((8, 16), np.float32), "w")
    packed = numpy_helper.from_array(np.zeros((16, 1, 16), np.uint8), "q")
    scales = numpy_helper.from_array(np.ones(16, np.float32), "s")
    table = numpy_helper.from_array(np.zeros((10, 8), np.float32), "table")
    nodes = [
        helper.make_node("Gather", ["table", "ids"], ["x"]),
        helper.make_node("MatMul", ["x", "w"], ["h"]),
        helper.make_node(
            "MatMulNBits",
            ["h", "q", "s"],
            ["y"],
            domain="com.microsoft",
            bits=4,
            block_size=32,
            K=16,
            N=16,
        ),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", "seq"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "seq", 16])],
        initializer=[weight, packed, scales, table],
    )
    return helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)],
    )


def _onnx_folder(folder: Path, *, external: bool) -> Path:
    import onnx

    folder.mkdir(parents=True, exist_ok=True)
    onnx.save_model(
        _onnx_model(),
        str(folder / "model.onnx"),
        save_as_external_data=external,
        all_tensors_to_one_file=True,
        location="model.onnx.data",
        size_threshold=100,
    )
    genai = {
        "model": {
            "type": "llama",
            "context_length": 256,
            "eos_token_id": [2],
            "decoder": {"filename": "model.onnx", "num_hidden_layers": 2, "head_size": 16},
        },
        "search": {"max_length": 256, "past_present_share_buffer": True},
    }
    (folder / "genai_config.json").write_text(json.dumps(genai))
    return folder


def test_onnx(tmp_path, capsys):
    folder = _onnx_folder(tmp_path / "onnx", external=True)
    info = inspect_file(folder)
    assert info == inspect_file(folder / "model.onnx")
    assert info["format"] == "onnx"
    assert info["opsets"] == {"ai.onnx": 17, "com.microsoft": 1}
    assert info["inputs"] == [{"name": "ids", "type": "INT64", "shape": ["batch", "seq"]}]
    assert info["outputs"][0]["shape"] == ["batch", "seq", 16]
    assert info["nodes"] == {"Gather": 1, "MatMul": 1, "MatMulNBits": 1}
    assert info["initializer_count"] == 4
    assert info["initializers"]["FLOAT"] == {
        "count": 3,
        "bytes": 4 * (128 + 16 + 80),
        "elements": 224,
    }
    assert info["initializers"]["UINT8"]["bytes"] == 256
    assert info["quantization"] == [{"op": "MatMulNBits", "bits": 4, "block_size": 32, "count": 1}]
    # w (512 B), q (256 B) and table (320 B) are above the 100-byte threshold; s is not
    data = info["external_data"]["model.onnx.data"]
    assert (data["tensors"], data["used"]) == (3, 512 + 256 + 320)
    assert data["bytes"] >= data["used"]
    genai = info["genai_config"]
    assert genai["decoder"] == "model.onnx" and genai["files"] == ["model.onnx"]
    assert genai["past_present_share_buffer"] is True

    inline = inspect_file(_onnx_folder(tmp_path / "inline", external=False))
    assert inline["external_data"] == {} and inline["initializers"] == info["initializers"]
    text = render_inspection(info)
    assert "MatMulNBits 4-bit block 32" in text and "model.onnx.data" in text
    code, out, _ = _cli(capsys, folder, "--json")
    assert code == 0 and json.loads(out)["nodes"]["MatMulNBits"] == 1


def _point_outside(folder: Path, location: str) -> None:
    """Make initializer ``w`` of folder/model.onnx read its bytes from ``location``."""
    import onnx
    from onnx.external_data_helper import set_external_data

    model = _onnx_model()
    weight = next(t for t in model.graph.initializer if t.name == "w")
    set_external_data(weight, location=location, offset=0, length=512)
    weight.data_location = onnx.TensorProto.EXTERNAL
    weight.ClearField("raw_data")
    # written as bytes: onnx.save_model itself refuses such a location
    (folder / "model.onnx").write_bytes(model.SerializeToString())


@pytest.mark.parametrize("location", ["../secret.bin", "SECRET_ABSOLUTE", "sub/../../secret.bin"])
def test_onnx_external_data_outside_the_folder(location, tmp_path, capsys):
    secret = tmp_path / "secret.bin"
    secret.write_bytes(b"\x00" * 512)  # it exists: refused for where it is, not as missing
    folder = _onnx_folder(tmp_path / "onnx", external=False)
    location = str(secret) if location == "SECRET_ABSOLUTE" else location
    _point_outside(folder, location)
    _refused(
        folder / "model.onnx",
        "the external data of initializer 'w' points to .* outside the folder",
    )
    code, _, err = _cli(capsys, folder)
    assert code == 2 and len(err.strip().splitlines()) == 1


def test_onnx_damage(tmp_path):
    folder = _onnx_folder(tmp_path / "onnx", external=True)
    data = folder / "model.onnx.data"
    data.write_bytes(data.read_bytes()[:100])
    _refused(folder / "model.onnx", "runs past the end of model.onnx.data")
    (folder / "model.onnx").write_bytes(b"\xff\xff\xff garbage")
    _refused(folder / "model.onnx", "not a readable ONNX graph")

    genai = _onnx_folder(tmp_path / "genai", external=False)
    config = json.loads((genai / "genai_config.json").read_text())
    config["model"]["decoder"]["filename"] = "../model.onnx"
    (genai / "genai_config.json").write_text(json.dumps(config))
    with pytest.raises(ModelError, match="genai_config.json: a model 'filename' points to"):
        inspect_file(genai)


# --- refusals ---------------------------------------------------------------------------------


class _Payload:
    """Unpickling this creates ``marker``: code runs on load."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.mark.parametrize("suffix", [".bin", ".pt", ".pth", ".ckpt", ".pkl"])
def test_pickles_are_refused_unopened(suffix, tmp_path, capsys):
    proof = tmp_path / "proof"
    pickle.loads(pickle.dumps(_Payload(proof)))
    assert proof.exists()  # the payload does run code when unpickled

    marker = tmp_path / "pwned"
    path = tmp_path / f"model{suffix}"
    path.write_bytes(pickle.dumps(_Payload(marker)))
    _refused(path, "pickled checkpoint: edgeft does not unpickle files; convert it to safetensors")
    code, _, err = _cli(capsys, path)
    assert code == 2 and "does not unpickle" in err
    assert not marker.exists()


def test_unknown_and_missing(tmp_path, capsys):
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    _refused(
        text,
        r"cannot inspect '.txt' files; supported: GGUF file \(\.gguf\), ONNX folder .*, "
        r"safetensors file \(\.safetensors\)",
    )
    _refused(tmp_path, "a folder without model.onnx")
    _refused(tmp_path / "missing.gguf", "no such file or folder")
    code, _, err = _cli(capsys, tmp_path / "missing.gguf")
    assert code == 2 and "missing.gguf" in err
