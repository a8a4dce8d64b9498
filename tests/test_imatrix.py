"""Importance matrices for GGUF quantization: the statistic, llama.cpp's file format, the
quantizer actually weighting by it, and the export's choices and refusals."""

import hashlib
import json
import struct

import numpy as np
import pytest
from conftest import CORPUS

from edgeft.errors import EdgeftError, ModelError
from edgeft.export.gguf import export_gguf
from edgeft.export.gguf.imatrix import (
    Imatrix,
    collect,
    gguf_linear_names,
    read_imatrix,
    write_imatrix,
)
from edgeft.export.gguf.quantize import quantize
from edgeft.gguf_file import gguf_metadata

TEXT = " ".join(CORPUS[:10])  # one chunk of the tiny tokenizer's ids
SHORT_EVAL = " ".join(CORPUS[:6])


@pytest.fixture(scope="module")
def f32_gguf(tiny_llama, tmp_path_factory):
    out = tmp_path_factory.mktemp("imatrix") / "f32"
    export_gguf(tiny_llama, out, "f32", eval_text=SHORT_EVAL)
    return out / "model-f32.gguf"


def _linear_input_squares(model_dir, ids):
    """Sum of squared inputs per column of every decoder Linear, and the token count, from a
    plain forward pass of the whole model: the statistic computed independently."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    name = gguf_linear_names(model_dir)
    sums = {}

    def hook(key):
        def record(_module, args):
            x = args[0].reshape(-1, args[0].shape[-1]).double()
            sums[key] = sums.get(key, 0) + (x * x).sum(0).numpy()

        return record

    for module_name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and ".layers." in module_name:
            module.register_forward_pre_hook(hook(name(module_name)))
    with torch.inference_mode():
        model(input_ids=torch.tensor([ids]))
    return sums


def test_collected_statistic_is_the_mean_square_of_each_linears_input(tiny_llama):
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(tiny_llama)(TEXT, add_special_tokens=False)["input_ids"]
    assert 64 <= len(ids) <= 512  # one chunk
    imatrix = collect(tiny_llama, [TEXT], datasets=["corpus"])
    expected = _linear_input_squares(tiny_llama, ids)
    assert set(imatrix.sums) == set(expected)
    assert "blk.0.attn_q.weight" in expected and "blk.1.ffn_down.weight" in expected
    for name, sums in expected.items():
        np.testing.assert_allclose(imatrix.sums[name], sums, rtol=1e-5)
        assert imatrix.counts[name] == len(ids)
    # attention q/k/v read the same normed input: the same statistic
    np.testing.assert_allclose(
        imatrix.values("blk.0.attn_q.weight"), imatrix.values("blk.0.attn_v.weight"), rtol=1e-6
    )
    assert imatrix.chunks == 1 and imatrix.datasets == ["corpus"]


def test_written_in_llama_cpps_imatrix_format_and_read_back(tmp_path):
    import gguf

    imatrix = Imatrix(
        sums={"blk.0.attn_q.weight": np.arange(1.0, 5.0), "blk.0.ffn_up.weight": np.ones(4)},
        counts={"blk.0.attn_q.weight": 10, "blk.0.ffn_up.weight": 3},
        chunks=2,
        chunk_size=512,
        datasets=["data.jsonl"],
    )
    path = tmp_path / "imatrix.gguf"
    write_imatrix(imatrix, path)
    reader = gguf.GGUFReader(path)  # gguf-py's own reader, as llama.cpp's tools read it
    fields = {f.name: f for f in reader.fields.values()}
    assert "general.architecture" not in fields
    assert bytes(fields["general.type"].parts[-1]).decode() == "imatrix"
    assert int(fields["imatrix.chunk_count"].parts[-1][0]) == 2
    tensors = {t.name: t for t in reader.tensors}
    assert list(tensors["blk.0.attn_q.weight.in_sum2"].shape) == [4, 1]  # ne: columns, matrices
    np.testing.assert_array_equal(tensors["blk.0.attn_q.weight.in_sum2"].data.ravel(), [1, 2, 3, 4])
    assert tensors["blk.0.attn_q.weight.counts"].data.ravel().tolist() == [10.0]
    back = read_imatrix(path)
    assert back.counts == imatrix.counts and back.datasets == ["data.jsonl"]
    np.testing.assert_allclose(back.values("blk.0.attn_q.weight"), [0.1, 0.2, 0.3, 0.4], rtol=1e-6)


def _dat(entries, chunks=3, dataset=b"wiki.txt") -> bytes:
    blob = struct.pack("<i", len(entries))
    for name, calls, values in entries:
        blob += struct.pack("<i", len(name)) + name + struct.pack("<ii", calls, len(values))
        blob += np.asarray(values, dtype="<f4").tobytes()
    return blob + struct.pack("<ii", chunks, len(dataset)) + dataset


def test_legacy_dat_imatrix_is_read_and_a_damaged_one_refused(tmp_path):
    path = tmp_path / "imatrix.dat"
    # stored: mean square × number of calls
    path.write_bytes(_dat([(b"blk.0.attn_k.weight", 4, [4.0, 8.0])]))
    imatrix = read_imatrix(path)
    np.testing.assert_allclose(imatrix.values("blk.0.attn_k.weight"), [1.0, 2.0])
    assert imatrix.chunks == 3 and imatrix.datasets == ["wiki.txt"]
    path.write_bytes(_dat([(b"blk.0.attn_k.weight", 4, [4.0, 8.0])])[:30])
    with pytest.raises(EdgeftError, match=r"imatrix.dat: not an importance matrix.*past the end"):
        read_imatrix(path)
    path.write_bytes(b"hello, this is not an imatrix at all")
    with pytest.raises(EdgeftError, match="not an importance matrix"):
        read_imatrix(path)


def _weighted_errors(f32_gguf, quantized, name, heavy):
    """Squared rounding error of tensor ``name`` on the heavy columns and on the rest."""
    import gguf

    def tensor(path):
        found = next(t for t in gguf.GGUFReader(path).tensors if t.name == name)
        return gguf.quants.dequantize(found.data, found.tensor_type).reshape(-1, found.shape[0])

    error = (tensor(quantized) - tensor(f32_gguf)) ** 2
    return error[:, heavy].mean(), error[:, ~heavy].mean()


def test_llama_cpps_quantizer_weights_its_rounding_by_the_imatrix(f32_gguf, tmp_path):
    import gguf

    weights = {t.name: t.shape for t in gguf.GGUFReader(f32_gguf).tensors}

    # every Q4_0 block of 32 columns: its first 4 count a million times more than the rest
    def heavy_columns(count):
        return (np.arange(count) % 32) < 4

    heavy = heavy_columns(64)  # blk.0.attn_q.weight's
    matrices = [n for n in weights if n.startswith("blk.") and len(weights[n]) == 2]
    imatrix = Imatrix(
        sums={n: np.where(heavy_columns(int(weights[n][0])), 1e6, 1.0) for n in matrices},
        counts=dict.fromkeys(matrices, 1),
        chunks=1,
        chunk_size=512,
    )
    plain, weighted = tmp_path / "plain.gguf", tmp_path / "weighted.gguf"
    quantize(f32_gguf, plain, "q4_0", threads=2)
    quantize(f32_gguf, weighted, "q4_0", threads=2, imatrix=imatrix, metadata={"edgeft.x": 7})
    plain_heavy, plain_rest = _weighted_errors(f32_gguf, plain, "blk.0.attn_q.weight", heavy)
    heavy_error, rest_error = _weighted_errors(f32_gguf, weighted, "blk.0.attn_q.weight", heavy)
    assert heavy_error < 0.5 * plain_heavy  # kept more exactly where it counts...
    assert rest_error > plain_rest  # ...paid for on the columns that do not
    assert gguf_metadata(weighted)["edgeft.x"] == 7


def test_export_computes_the_imatrix_records_it_and_makes_the_low_bit_types(tiny_llama, tmp_path):
    calibration = tmp_path / "calibration.txt"
    calibration.write_text(TEXT)
    out = tmp_path / "gguf"
    result = export_gguf(
        tiny_llama,
        out,
        "q4_0,iq4_xs,q2_k",
        eval_text=SHORT_EVAL,
        imatrix="auto",
        calibration=calibration,
    )
    written = out / "imatrix.gguf"
    sha = hashlib.sha256(written.read_bytes()).hexdigest()
    record = json.loads((out / "edgeft.json").read_text())["settings"]["imatrix"]
    assert record["sha256"] == sha and record["source"] == str(calibration)
    assert record["entries"] == 2 * 7 and result.imatrix == record  # 2 layers of 7 Linears
    for f in result.files:
        meta = gguf_metadata(out / f.file)
        assert meta["edgeft.imatrix.sha256"] == sha
        assert meta["quantize.imatrix.entries_count"] == 14
        assert f.parity.mean_kl < 1.0  # measured in llama.cpp: it loads and runs
    # the written matrix is the one the export computed, and llama-quantize can take it
    assert read_imatrix(written).counts == collect(tiny_llama, [TEXT]).counts
    # a file given back is used as is and named in the record
    again = export_gguf(
        tiny_llama, tmp_path / "again", "q4_0", eval_text=SHORT_EVAL, imatrix=written
    )
    assert again.imatrix["sha256"] == sha and not again.imatrix["computed"]
    assert again.files[0].sha256 == result.files[0].sha256  # the same Q4_0 file, byte for byte


def test_low_bit_types_need_an_imatrix_and_a_foreign_one_is_refused(
    tiny_llama, wide_llama, f32_gguf, tmp_path
):
    with pytest.raises(EdgeftError, match="iq3_m need an importance matrix"):
        export_gguf(tiny_llama, tmp_path / "no", "q4_k_m,iq3_m", imatrix="none")
    assert not (tmp_path / "no").exists()
    # without calibration data or --imatrix, nothing is computed
    plain = export_gguf(tiny_llama, tmp_path / "plain", "q4_0", eval_text=SHORT_EVAL)
    assert plain.imatrix is None and not (tmp_path / "plain" / "imatrix.gguf").exists()
    assert "edgeft.imatrix.sha256" not in gguf_metadata(tmp_path / "plain" / "model-q4_0.gguf")
    small = tmp_path / "small.gguf"
    write_imatrix(collect(tiny_llama, [TEXT]), small)
    with pytest.raises(ModelError, match="has 64 columns, the tensor has 128"):
        export_gguf(wide_llama, tmp_path / "wide", "q4_0", imatrix=small)
    assert not (tmp_path / "wide").exists()
    with pytest.raises(EdgeftError, match="GGUF file: pass the checkpoint"):
        export_gguf(f32_gguf, tmp_path / "re", "q4_0", imatrix="auto")
    with pytest.raises(EdgeftError, match="no such file"):
        export_gguf(tiny_llama, tmp_path / "missing", "q4_0", imatrix=tmp_path / "nope.gguf")


def test_cli_imatrix(tiny_llama, tmp_path, capsys):
    from edgeft.cli import main

    calibration = tmp_path / "calibration.txt"
    calibration.write_text(TEXT)
    args = ["-q", "export", "gguf", "--model", str(tiny_llama), "--quant", "q2_k"]
    assert main([*args, "--out", str(tmp_path / "o"), "--imatrix", "none"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "q2_k need an importance matrix" in err
    assert not (tmp_path / "o").exists()
    assert main([*args, "--out", str(tmp_path / "o"), "--calibration", str(calibration)]) == 0
    assert "importance matrix: imatrix.gguf (" in capsys.readouterr().out
