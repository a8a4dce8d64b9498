"""Memory bounded by a layer: the streamed model, the sharded writer and the streaming merge."""

import json

import numpy as np
import pytest
from conftest import (
    CORPUS,
    FAMILIES,
    FAST_TRAIN,
    facts_rows,
    family_model,
    family_tokenizer,
    write_jsonl,
)
from numerics import FP32_ORDER, assert_logits_close, assert_parity_within

from edgeft.parity import ParityAccumulator, compare_logits, model_logits
from edgeft.streaming import batch_logits, row_batches, streamed_model
from edgeft.weights import ShardedWriter, encode, safetensors_index

ROWS = [[1, 5, 9, 20, 33, 2, 7], [3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 40, 41], [9, 8]]


def _loaded(folder):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_streamed_model_computes_what_the_loaded_model_does(family, tmp_path):
    """transformers' own modules, weights read per layer: the loaded model's logits, alone
    and in a right-padded batch (whose padding only reorders the sums)."""
    folder = family_model(family, family_tokenizer(family, tmp_path / "tok"), tmp_path / "m")
    loaded, streamed = _loaded(folder), streamed_model(folder)
    expected = [model_logits(loaded, [row]).numpy() for row in ROWS]
    longest = max(range(len(ROWS)), key=lambda i: len(ROWS[i]))
    alone = batch_logits(streamed, ROWS, [longest])[0].numpy()
    np.testing.assert_array_equal(alone, expected[longest])
    for i, logits in zip([0, 1, 2], batch_logits(streamed, ROWS, [0, 1, 2]), strict=True):
        assert_logits_close(logits.numpy(), expected[i], FP32_ORDER)


def test_streamed_model_holds_one_layer_at_a_time(tiny_llama):
    import torch

    model = streamed_model(tiny_llama)
    layers = model.model.layers
    held = []

    def count(module, args):
        held.append(
            sum(
                p.numel()
                for layer in layers
                for p in layer.parameters()
                if p.device != torch.device("meta")
            )
        )

    for layer in layers:  # the MLP runs inside its layer's forward
        layer.mlp.register_forward_hook(lambda m, a, o: count(m, a))
    batch_logits(model, ROWS, [0])
    per_layer = sum(p.numel() for p in layers[0].parameters())
    assert held == [per_layer] * len(layers)  # while a layer runs, only its weights are real
    assert all(p.device == torch.device("meta") for p in model.parameters())  # all dropped after


def test_streamed_model_refuses_a_checkpoint_that_lacks_a_weight(tiny_llama, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    from edgeft.errors import ModelError

    folder = tmp_path / "m"
    shutil.copytree(tiny_llama, folder)
    tensors = load_file(folder / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, folder / "model.safetensors")
    with pytest.raises(ModelError, match="model.layers.1.mlp.up_proj.weight is missing"):
        streamed_model(folder)


def test_an_untied_checkpoint_without_its_head_is_refused_by_every_reader(
    tiny_tokenizer_dir, tmp_path
):
    """Streaming, the ONNX graph, GPTQ and the GGUF converter agree on which tensor is the
    output projection: an untied config without lm_head.weight is an incomplete checkpoint
    (transformers would draw a random head), not a tied one."""
    from conftest import tiny_model
    from safetensors.torch import load_file, save_file

    from edgeft.errors import ModelError
    from edgeft.export.gguf.convert import gguf_tensors, read_model_spec
    from edgeft.export.onnx.graph import build_fused_graph

    folder = tiny_model("llama", tiny_tokenizer_dir, tmp_path / "m", tie_word_embeddings=False)
    tensors = load_file(folder / "model.safetensors")
    del tensors["lm_head.weight"]
    save_file(tensors, folder / "model.safetensors")
    missing = "lm_head.weight is missing and the config does not tie"
    with pytest.raises(ModelError, match=missing):
        streamed_model(folder)
    with pytest.raises(ModelError, match=missing):
        build_fused_graph(folder)
    with pytest.raises(ModelError, match=missing):
        list(gguf_tensors(read_model_spec(folder), safetensors_index(folder)))


def test_row_batches_keep_logits_within_the_budget(monkeypatch):
    import edgeft.streaming as streaming

    monkeypatch.setattr(streaming, "LOGITS_BUDGET_BYTES", 12 * 100 * 4 * 2)
    batches = row_batches(ROWS, vocab=100)
    assert sorted(i for b in batches for i in b) == [0, 1, 2]
    for batch in batches:
        width = max(len(ROWS[i]) for i in batch)
        assert len(batch) == 1 or len(batch) * width * 100 * 4 <= 12 * 100 * 4 * 2


def test_parity_in_pieces_equals_parity_at_once():
    rng = np.random.default_rng(0)
    ref, cand = rng.normal(size=(150, 40)), rng.normal(size=(150, 40))
    whole = compare_logits(ref, cand)
    pieces = ParityAccumulator()
    for start in (0, 7, 100):
        stop = {0: 7, 7: 100, 100: 150}[start]
        pieces.add(ref[start:stop], cand[start:stop])
    assert pieces.result().positions == whole.positions == 150
    assert pieces.result().mean_kl == pytest.approx(whole.mean_kl, rel=1e-12)
    assert pieces.result().top1_agreement == whole.top1_agreement
    assert pieces.result().max_abs_diff == whole.max_abs_diff


def test_bf16_encoding_rounds_as_torch_does():
    import torch

    values = np.random.default_rng(1).normal(size=4096).astype(np.float32) * 10.0
    values[:4] = [0.0, -0.0, 1e-40, 3.0e38]
    expected = torch.from_numpy(values).to(torch.bfloat16).view(torch.int16).numpy()
    np.testing.assert_array_equal(encode(values, "BF16").view(np.int16), expected)


def test_sharded_writer_splits_and_transformers_loads_it(tiny_llama, tmp_path):
    """The tiny checkpoint rewritten in 4 KB shards: an index, every tensor where it says, and
    transformers loads the folder to the same logits."""
    import shutil

    from edgeft.weights import read_raw

    index = safetensors_index(tiny_llama)
    out = tmp_path / "sharded"
    out.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        if (tiny_llama / name).is_file():
            shutil.copy(tiny_llama / name, out / name)
    writer = ShardedWriter(
        out, [(t.name, t.dtype, t.shape) for t in index.values()], max_shard_bytes=4096
    )
    for stored in index.values():
        writer.write(stored.name, read_raw(stored))
    files = writer.close()
    assert len(files) > 1 and all(f.is_file() for f in files)
    weight_map = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    assert set(weight_map) == set(index)
    rewritten = safetensors_index(out)
    for name, stored in index.items():
        assert rewritten[name].file.name == weight_map[name]
        np.testing.assert_array_equal(read_raw(rewritten[name]), read_raw(stored))
    row = [ROWS[1]]
    np.testing.assert_array_equal(
        model_logits(_loaded(out), row).numpy(), model_logits(_loaded(tiny_llama), row).numpy()
    )


def test_sharded_writer_refuses_what_was_not_declared(tmp_path):
    writer = ShardedWriter(tmp_path, [("a", "F32", (2,)), ("b", "BF16", (3,))])
    with pytest.raises(ValueError, match="'b' written where 'a' was declared"):
        writer.write("b", np.zeros(3, dtype="<u2"))
    with pytest.raises(ValueError, match="was declared"):
        writer.write("a", np.zeros(3, dtype=np.float32))
    writer.write("a", np.zeros(2, dtype=np.float32))
    with pytest.raises(ValueError, match="1 declared tensors were not written"):
        writer.close()


@pytest.fixture(scope="module")
def lora_adapter(tiny_llama, tmp_path_factory):
    from edgeft.train import TrainSettings, train

    tmp = tmp_path_factory.mktemp("lora")
    data = write_jsonl(tmp / "facts.jsonl", facts_rows())
    return train(
        str(tiny_llama),
        data,
        tmp / "adapter",
        TrainSettings(method="lora", **FAST_TRAIN),
        progress=False,
    )


def test_merge_writes_shards_that_transformers_loads(lora_adapter, tmp_path, monkeypatch):
    import edgeft.weights
    from edgeft.merge import merge
    from edgeft.train import read_parity_rows

    monkeypatch.setattr(edgeft.weights, "MAX_SHARD_BYTES", 64 << 10)
    result = merge(lora_adapter.out, tmp_path / "merged")
    shards = sorted((tmp_path / "merged").glob("model-*-of-*.safetensors"))
    assert len(shards) > 1 and (tmp_path / "merged" / "model.safetensors.index.json").is_file()
    rows = read_parity_rows(lora_adapter.out)
    merged = model_logits(_loaded(tmp_path / "merged"), rows).numpy()
    assert_parity_within(result.parity, merged, FP32_ORDER)


def test_nf4_round_trip_is_what_bitsandbytes_trained_against(tiny_llama):
    """merge rebuilds the 4-bit weights from the checkpoint without loading a 4-bit model:
    bit for bit what bitsandbytes holds after loading it for QLoRA."""
    import bitsandbytes.functional as bnbf
    import torch
    from safetensors.torch import load_file

    from edgeft.merge import nf4_round_trip
    from edgeft.train import bnb_config, disable_bnb_cpu_repacking, load_base_model

    settings = {"quant_type": "nf4", "double_quant": True}
    assert bnb_config(settings, torch.float32).bnb_4bit_quant_type == "nf4"
    model = load_base_model(tiny_llama, settings, torch.float32, quantized=True, device="cpu")
    disable_bnb_cpu_repacking(model)
    stored = load_file(tiny_llama / "model.safetensors")
    round_trip = nf4_round_trip(settings, torch.float32)
    checked = 0
    for name, module in model.named_modules():
        state = getattr(getattr(module, "weight", None), "quant_state", None)
        if state is None:
            continue
        held = bnbf.dequantize_4bit(module.weight.data, state).float()
        rebuilt = round_trip(stored[f"{name}.weight"].float())
        assert torch.equal(held, rebuilt), name
        checked += 1
    assert checked == 7 * model.config.num_hidden_layers


def test_streamed_as_trained_model_is_peft_on_the_4bit_base(tiny_llama, tmp_path):
    """The reference merge measures against, streamed, is peft's adapter on bitsandbytes'
    4-bit base (fp32 compute): summation order only."""
    import torch
    from peft import PeftModel
    from safetensors.torch import load_file

    from edgeft.merge import _as_trained_weights, lora_scale, read_adapter
    from edgeft.streaming import LoRA
    from edgeft.train import TrainSettings, disable_bnb_cpu_repacking, load_base_model, train

    data = write_jsonl(tmp_path / "facts.jsonl", facts_rows())
    settings = TrainSettings(method="qlora", **{**FAST_TRAIN, "max_steps": 2})
    adapter = train(str(tiny_llama), data, tmp_path / "a", settings, progress=False).out
    record, config, lora = read_adapter(adapter)
    streamed = streamed_model(
        tiny_llama,
        weights=_as_trained_weights(record.settings.model_dump()),
        lora={
            n: LoRA(a.float(), b.float(), lora_scale(config, a.shape[0]))
            for n, (a, b) in lora.items()
        },
    )
    base = load_base_model(
        tiny_llama, record.settings.model_dump(), torch.float32, quantized=True, device="cpu"
    )
    disable_bnb_cpu_repacking(base)
    trained = PeftModel.from_pretrained(base, adapter).eval()
    expected = model_logits(trained, [ROWS[1]]).numpy()
    assert_logits_close(batch_logits(streamed, ROWS, [1])[0].numpy(), expected, FP32_ORDER)
    with trained.disable_adapter():  # the adapter matters: the check can fail
        without = model_logits(trained, [ROWS[1]]).numpy()
    assert np.abs(without - expected).max() > 100 * FP32_ORDER * np.abs(expected).max()
    assert load_file(adapter / "adapter_model.safetensors")


def test_reference_streams_when_asked_and_measures_the_same(tiny_llama, monkeypatch):
    from edgeft.fidelity import Reference, default_eval_text
    from edgeft.runtimes import get_runtime
    from edgeft.runtimes.pytorch import LoadedTorchSession

    loaded_session = get_runtime("torch").load(tiny_llama, threads=2)
    assert isinstance(loaded_session, LoadedTorchSession)
    loaded = Reference(loaded_session, default_eval_text())
    monkeypatch.setenv("EDGEFT_STREAM", "always")
    session = get_runtime("torch").load(tiny_llama, threads=2)
    assert not hasattr(session, "generate_batch")  # batched generate needs real weights
    streamed = Reference(session, default_eval_text())
    assert streamed.eval_ids == loaded.eval_ids
    np.testing.assert_array_equal(streamed.logits, loaded.logits)
    # each streamed token reads the weights again: its greedy answer is the first 8 tokens
    assert streamed.greedy_tokens == 8 and loaded.greedy_tokens == 32
    assert streamed.greedy == loaded.greedy[:8]


def test_tables_are_copied_in_row_chunks(tiny_llama, tmp_path):
    from edgeft.weights import read_f32, read_raw, row_chunks

    stored = safetensors_index(tiny_llama)["model.embed_tokens.weight"]
    pieces = list(row_chunks(stored, max_bytes=stored.nbytes // 5, raw=True))
    assert len(pieces) >= 5
    np.testing.assert_array_equal(np.concatenate(pieces), read_raw(stored))
    np.testing.assert_array_equal(
        np.concatenate(list(row_chunks(stored, max_bytes=1000))), read_f32(stored)
    )
    writer = ShardedWriter(tmp_path, [(stored.name, stored.dtype, stored.shape)])
    writer.write(stored.name, iter(pieces))
    writer.close()
    copied = safetensors_index(tmp_path)[stored.name]
    np.testing.assert_array_equal(read_raw(copied), read_raw(stored))
    short = ShardedWriter(tmp_path / "x", [(stored.name, stored.dtype, stored.shape)])
    (tmp_path / "x").mkdir()
    with pytest.raises(ValueError, match="values written"):
        short.write(stored.name, iter(pieces[:-1]))


def test_tied_head_is_the_embedding_even_when_a_head_is_stored(tiny_llama, tmp_path):
    """A tied checkpoint that also stores a (different) lm_head.weight: transformers ties the
    head to the embedding and ignores the stored one, and so does the streamed model."""
    import shutil

    from safetensors.torch import load_file, save_file

    folder = tmp_path / "m"
    shutil.copytree(tiny_llama, folder)
    tensors = load_file(folder / "model.safetensors")
    assert "lm_head.weight" not in tensors
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].flip(0).contiguous()
    save_file(tensors, folder / "model.safetensors")
    loaded = model_logits(_loaded(folder), [ROWS[1]]).numpy()
    np.testing.assert_array_equal(loaded, model_logits(_loaded(tiny_llama), [ROWS[1]]).numpy())
    np.testing.assert_array_equal(batch_logits(streamed_model(folder), ROWS, [1])[0], loaded)


def test_gptq_streams_sooner_than_a_reference(tiny_llama, monkeypatch):
    """GPTQ with norm tuning holds about four fp32 copies of the model: between an eighth and
    a quarter of memory, a reference loads the model whole and the calibration streams it
    (and tunes no norms); the calibration gives its model back once the folder is written."""
    from edgeft import streaming
    from edgeft.export.onnx.gptq import Calibration
    from edgeft.export.onnx.quantize import QuantSettings
    from edgeft.weights import checkpoint_params

    monkeypatch.delenv("EDGEFT_STREAM", raising=False)
    fp32 = checkpoint_params(tiny_llama) * 4
    monkeypatch.setattr(streaming, "total_memory_bytes", lambda: 6 * fp32)
    assert not streaming.should_stream(tiny_llama)
    assert streaming.should_stream(tiny_llama, streaming.CALIBRATION_RESIDENT_SHARE)
    text = [" ".join(CORPUS * 4)]
    calibration = Calibration(tiny_llama, text, {}, QuantSettings())
    assert not calibration.resident and calibration.tuned_norms() == {}
    calibration.release()
    assert calibration.model is None and calibration.calibrated_tokens > 0
    monkeypatch.setattr(streaming, "total_memory_bytes", lambda: 10 * fp32)
    assert Calibration(tiny_llama, text, {}, QuantSettings()).resident
