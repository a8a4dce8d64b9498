"""QLoRA/LoRA training and merging on tiny models: one parity test per hop."""

import json

import pytest
from conftest import FAST_TRAIN as FAST
from numerics import FP32_ORDER, assert_bug_caught, assert_logits_close, assert_parity_within

from edgeft.errors import EdgeftError, ModelError, OutputExistsError
from edgeft.hfcompat import chat_ids
from edgeft.merge import KL_TOLERANCE, merge
from edgeft.parity import model_logits
from edgeft.train import TrainSettings, disable_bnb_cpu_repacking, read_parity_rows, train


def _merged_logits(adapter, merged):
    """The merged checkpoint's fp32 logits on the rows merge's parity check uses: their scale
    is what the check's rounding is relative to."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32)
    return model_logits(model, read_parity_rows(adapter)).numpy()


@pytest.fixture(scope="module")
def qlora_adapter(tiny_llama, tmp_path_factory):
    from conftest import facts_rows, write_jsonl

    tmp = tmp_path_factory.mktemp("qlora")
    data = write_jsonl(tmp / "facts.jsonl", facts_rows())
    result = train(
        str(tiny_llama),
        data,
        tmp / "adapter",
        TrainSettings(method="qlora", **FAST),
        progress=False,
    )
    return result


def test_qlora_training_lowers_the_loss(qlora_adapter):
    assert qlora_adapter.eval_loss < qlora_adapter.eval_loss_before * 0.7
    assert qlora_adapter.steps == 30


def test_adapter_loads_with_plain_peft(qlora_adapter, tiny_llama):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = qlora_adapter.out
    assert {
        "adapter_config.json",
        "adapter_model.safetensors",
        "edgeft.json",
        "tokenizer.json",
    } <= {p.name for p in out.iterdir()}
    assert not (out.parent / f"{out.name}.partial").exists()
    base = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, out)
    names = [n for n, _ in model.named_parameters() if "lora_A" in n]
    # all-linear: q, k, v, o, gate, up, down in each of the 2 layers (never lm_head)
    assert len(names) == 14 and not any("lm_head" in n for n in names)


def test_train_record(qlora_adapter, tiny_llama):
    record = json.loads((qlora_adapter.out / "edgeft.json").read_text())
    assert record["stage"] == "train"
    assert record["inputs"]["base"]["path"] == str(tiny_llama.resolve())
    assert len(record["inputs"]["base"]["weights_sha256"]) == 64
    assert len(record["inputs"]["data"]["sha256"]) == 64
    settings = record["settings"]
    assert settings["method"] == "qlora" and settings["quant_type"] == "nf4"
    assert settings["double_quant"] is True and settings["resolved_compute_dtype"] == "float32"
    assert settings["rank"] == 8 and settings["max_steps"] == 30
    results = record["results"]
    assert results["eval_loss"] == pytest.approx(qlora_adapter.eval_loss)
    assert results["train_rows"] + results["eval_rows"] == 16
    assert record["versions"]["peft"] and record["versions"]["bitsandbytes"]


def test_merge_dequantized_reproduces_the_as_trained_model(qlora_adapter, tmp_path):
    result = merge(qlora_adapter.out, tmp_path / "merged")
    assert result.merge_base == "dequantized" and result.gated
    # fp32 all the way: only summation order differs, far inside the gate.
    assert_parity_within(result.parity, _merged_logits(qlora_adapter.out, result.out), FP32_ORDER)
    record = json.loads((tmp_path / "merged" / "edgeft.json").read_text())
    assert record["results"]["parity_vs_as_trained"]["mean_kl"] == result.parity.mean_kl
    assert record["results"]["within_tolerance"] is True
    generation = json.loads((tmp_path / "merged" / "generation_config.json").read_text())
    assert generation["eos_token_id"] == 2 and generation["pad_token_id"] == 2  # <|im_end|>


def test_merged_checkpoint_is_plain_hf_and_matches_peft_on_dequantized_weights(
    qlora_adapter, tmp_path
):
    """Independent check: reload the saved checkpoint with plain transformers and compare it
    with peft's own adapter on the 4-bit base."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    merge(qlora_adapter.out, tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)
    base4 = AutoModelForCausalLM.from_pretrained(
        json.loads((qlora_adapter.out / "edgeft.json").read_text())["inputs"]["base"]["path"],
        dtype=torch.float32,
        device_map={"": "cpu"},
        quantization_config=BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.float32,
        ),
    )
    # bitsandbytes' repacked CPU inference kernel computes in bf16 (max |Δlogit| ~0.2 here);
    # compare against its exact fp32 dequantize path, which is what training used.
    disable_bnb_cpu_repacking(base4)
    trained = PeftModel.from_pretrained(base4, qlora_adapter.out)
    rows = read_parity_rows(qlora_adapter.out)
    folded = model_logits(merged, rows)
    # x·W + s·(x·A)·B against x·(W + s·A·B), fp32 throughout: summation order only
    assert_logits_close(model_logits(trained, rows), folded, FP32_ORDER)
    # the bugs this comparison guards fail it: an adapter not applied, a scale off by alpha/rank
    with trained.disable_adapter():
        assert_bug_caught(model_logits(trained, rows), folded, FP32_ORDER, "adapter not applied")
    for module in trained.modules():
        if isinstance(getattr(module, "scaling", None), dict):
            module.scaling = {name: 1.0 for name in module.scaling}  # alpha/rank is 2
    bug = "scale 1 instead of alpha/rank 2"
    assert_bug_caught(model_logits(trained, rows), folded, FP32_ORDER, bug)
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json"} <= {
        p.name for p in (tmp_path / "merged").iterdir()
    }


def test_merge_original_adds_the_delta_to_the_full_precision_weights(
    qlora_adapter, tiny_llama, tmp_path
):
    import torch
    from safetensors.torch import load_file

    result = merge(qlora_adapter.out, tmp_path / "orig", merge_base="original")
    assert not result.gated  # reported: the NF4 rounding the adapter saw is gone by design
    assert result.parity.mean_kl > 0
    base = load_file(tiny_llama / "model.safetensors")
    merged = load_file(tmp_path / "orig" / "model.safetensors")
    lora = load_file(qlora_adapter.out / "adapter_model.safetensors")
    name = "model.layers.1.mlp.down_proj"
    a = lora[f"base_model.model.{name}.lora_A.weight"]
    b = lora[f"base_model.model.{name}.lora_B.weight"]
    expected = base[f"{name}.weight"] + (16 / 8) * (b @ a)  # alpha / rank
    torch.testing.assert_close(merged[f"{name}.weight"], expected, rtol=0, atol=1e-6)
    # untouched tensors are copied exactly
    assert torch.equal(merged["model.norm.weight"], base["model.norm.weight"])


def test_merge_at_a_scale_adds_that_share_of_the_delta(qlora_adapter, tmp_path):
    import torch
    from safetensors.torch import load_file

    merge(qlora_adapter.out, tmp_path / "full")
    half = merge(qlora_adapter.out, tmp_path / "half", scale=0.5)
    # gated: the as-trained model it is held to carries the adapter at the same scale
    assert half.gated and half.parity.mean_kl <= KL_TOLERANCE["fp32"]
    lora = load_file(qlora_adapter.out / "adapter_model.safetensors")
    name = "model.layers.0.self_attn.q_proj"
    a = lora[f"base_model.model.{name}.lora_A.weight"]
    b = lora[f"base_model.model.{name}.lora_B.weight"]
    weight = f"{name}.weight"
    at_full = load_file(tmp_path / "full" / "model.safetensors")[weight]
    at_half = load_file(tmp_path / "half" / "model.safetensors")[weight]
    torch.testing.assert_close(at_full - at_half, 0.5 * (16 / 8) * (b @ a), rtol=0, atol=1e-6)
    record = json.loads((tmp_path / "half" / "edgeft.json").read_text())
    assert record["settings"]["scale"] == 0.5
    for bad in (0.0, 1.5, float("nan")):
        with pytest.raises(EdgeftError, match="--scale must be in"):
            merge(qlora_adapter.out, tmp_path / "bad", scale=bad)
    assert not (tmp_path / "bad").exists()


def test_merge_bf16_output(qlora_adapter, tmp_path):
    import torch
    from safetensors import safe_open

    result = merge(qlora_adapter.out, tmp_path / "bf16", dtype="bf16")
    assert result.parity.mean_kl <= KL_TOLERANCE["bf16"]
    with safe_open(tmp_path / "bf16" / "model.safetensors", "pt") as f:
        name = next(k for k in f.keys() if k.endswith("q_proj.weight"))
        assert f.get_tensor(name).dtype == torch.bfloat16


def test_merge_refuses_to_overwrite(qlora_adapter, tmp_path):
    (tmp_path / "taken").mkdir()
    with pytest.raises(OutputExistsError, match="--force"):
        merge(qlora_adapter.out, tmp_path / "taken")


def test_merge_into_a_base_of_another_size_is_an_error(qlora_adapter, wide_llama, tmp_path):
    with pytest.raises(ModelError, match="do not fit the base layer"):
        merge(qlora_adapter.out, tmp_path / "m", base=str(wide_llama))
    assert not (tmp_path / "m").exists()


def test_merge_into_another_architecture_is_an_error(qlora_adapter, tiny_qwen2, tmp_path):
    with pytest.raises(ModelError, match="trained on a 'llama' model but base .* is 'qwen2'"):
        merge(qlora_adapter.out, tmp_path / "m", base=str(tiny_qwen2))


def test_lora_on_qwen2_merges_exactly(tiny_qwen2, facts_jsonl, tmp_path):
    result = train(
        str(tiny_qwen2),
        facts_jsonl,
        tmp_path / "adapter",
        TrainSettings(method="lora", **{**FAST, "max_steps": 10}),
        progress=False,
    )
    assert result.eval_loss < result.eval_loss_before
    merged = merge(result.out, tmp_path / "merged")
    assert merged.merge_base == "original" and merged.gated
    assert_parity_within(merged.parity, _merged_logits(result.out, merged.out), FP32_ORDER)


def test_merge_into_other_weights_of_the_same_shape_is_an_error(
    qlora_adapter, tiny_llama, tmp_path
):
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    other = tmp_path / "other"
    shutil.copytree(tiny_llama, other)
    weights = load_file(other / "model.safetensors")
    name = next(iter(weights))
    weights[name] = weights[name] + torch.ones_like(weights[name])
    save_file(weights, other / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ModelError, match="not the one adapter"):
        merge(qlora_adapter.out, tmp_path / "m", base=str(other))


def test_interrupted_training_resumes_from_its_checkpoint(
    tiny_llama, facts_jsonl, tmp_path, monkeypatch
):
    """Killed during step 6 with a checkpoint at step 4: --resume runs steps 5 and 6 only,
    from the checkpoint's weights, optimizer and data order, and ends on the very adapter an
    uninterrupted run makes (a restart would run six steps; a resume that lost the optimizer
    state would end elsewhere)."""
    import torch
    import transformers
    from safetensors.torch import load_file

    out = tmp_path / "adapter"
    # No eval rows: with them (the Trainer evaluating around training) the resumed adapter
    # ends up to 6e-4 away from the uninterrupted one on this model; without, it is the same.
    settings = TrainSettings(
        method="qlora", **{**FAST, "max_steps": 6, "eval_fraction": 0.0}, save_steps=4
    )
    real_step = transformers.Trainer.training_step
    steps_run = []

    def killed_at_step_6(self, *args, **kwargs):
        if self.state.global_step == 5:  # computing step 6: the run dies here
            raise KeyboardInterrupt
        return real_step(self, *args, **kwargs)

    def counted(self, *args, **kwargs):
        steps_run.append(self.state.global_step)
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(transformers.Trainer, "training_step", killed_at_step_6)
    with pytest.raises(KeyboardInterrupt):
        train(str(tiny_llama), facts_jsonl, out, settings, progress=False)
    assert not out.exists()
    checkpoints = tmp_path / "adapter.partial" / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["checkpoint-4"]

    monkeypatch.setattr(transformers.Trainer, "training_step", counted)
    result = train(str(tiny_llama), facts_jsonl, out, settings, progress=False, resume=True)
    monkeypatch.setattr(transformers.Trainer, "training_step", real_step)
    assert result.steps == 6 and (out / "adapter_model.safetensors").is_file()
    assert not (tmp_path / "adapter.partial").exists()
    assert sorted(set(steps_run)) == [4, 5]

    whole = train(str(tiny_llama), facts_jsonl, tmp_path / "whole", settings, progress=False)
    resumed, uninterrupted = (
        load_file(path / "adapter_model.safetensors") for path in (out, whole.out)
    )
    assert resumed.keys() == uninterrupted.keys()
    for name, tensor in uninterrupted.items():
        torch.testing.assert_close(
            resumed[name], tensor, rtol=1e-5, atol=1e-7, msg=lambda m, name=name: f"{name}: {m}"
        )


def test_resume_without_checkpoint_is_an_error(tiny_llama, facts_jsonl, tmp_path):
    from edgeft.errors import EdgeftError

    with pytest.raises(EdgeftError, match="nothing to resume"):
        train(str(tiny_llama), facts_jsonl, tmp_path / "a", TrainSettings(**FAST), resume=True)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("rank", 0, "--rank must be positive"),
        ("method", "full", "--method must be qlora or lora"),
        ("neftune_alpha", -1.0, "--neftune-alpha must be >= 0"),
        ("eval_fraction", 1.0, "--eval-fraction must be in"),
        ("target_modules", [], "--target-modules must be"),
    ],
)
def test_settings_are_validated_once(field, value, message):
    from edgeft.errors import EdgeftError

    with pytest.raises(EdgeftError, match=message):
        TrainSettings(**{field: value})


@pytest.mark.parametrize("method", ["qlora", "lora"])
def test_gradient_checkpointing_still_learns(method, tiny_llama, facts_jsonl, tmp_path):
    settings = TrainSettings(method=method, gradient_checkpointing=True, **FAST)
    result = train(str(tiny_llama), facts_jsonl, tmp_path / "a", settings, progress=False)
    assert result.eval_loss < result.eval_loss_before * 0.7


def test_preserve_loss_is_the_trainers_loss_plus_weighted_kl():
    import torch
    import torch.nn.functional as F

    from edgeft.train import preserve_loss

    torch.manual_seed(0)
    logits = torch.randn(3, 5, 11)
    labels = torch.randint(0, 11, (3, 5))
    labels[:, :2] = -100  # the prompt
    attention = torch.ones(3, 5, dtype=torch.long)
    attention[2, 4] = 0  # padding
    none = torch.zeros(3, dtype=torch.bool)
    causal = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten())
    assert torch.allclose(preserve_loss(logits, labels, attention, none, None, 2.0), causal)
    preserve = torch.tensor([False, False, True])
    task_ce = F.cross_entropy(logits[:2, :-1].flatten(0, 1), labels[:2, 1:].flatten())
    # a preserve row whose base agrees with the model costs nothing, but counts in the mean
    same = preserve_loss(logits, labels, attention, preserve, logits[2:], 2.0)
    assert torch.allclose(same, 2 * task_ce / (2 + 2.0))
    other = logits[2:] + torch.randn(1, 5, 11)
    base = F.log_softmax(other[0, :4], -1)
    kl = (base.exp() * (base - F.log_softmax(logits[2, :4], -1))).sum(-1).mean()
    mixed = preserve_loss(logits, labels, attention, preserve, other, 2.0)
    assert kl > 0.01
    assert torch.allclose(mixed, (2 * task_ce + 2.0 * kl) / (2 + 2.0))


def test_preserve_rows_hold_the_model_to_the_base(tiny_llama, facts_jsonl, tmp_path):
    import torch
    import torch.nn.functional as F
    from conftest import write_jsonl
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    chats = [
        ("Name a large planet.", "Jupiter is the largest planet of the solar system."),
        ("Say something about rivers.", "Rivers carry water from the hills to the sea."),
        ("What is a verb?", "A verb is a word for an action, such as run or write."),
        ("Give me a colour.", "Blue is the colour of a clear sky."),
    ]
    preserve = write_jsonl(
        tmp_path / "general.jsonl",
        [
            {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
            for q, a in chats
        ],
    )
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    ids = [
        chat_ids(
            tokenizer,
            [{"role": "user", "content": q}, {"role": "assistant", "content": a}],
            add_generation_prompt=False,
        )
        for q, a in chats
    ]

    def drift(adapter) -> float:
        """Mean KL(base ‖ tuned) over the preserve rows' positions."""
        base = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
        tuned = PeftModel.from_pretrained(base, adapter)
        total = []
        with torch.no_grad():
            for row in ids:
                x = torch.tensor([row])
                own = F.log_softmax(tuned(x).logits[0], -1)
                with tuned.disable_adapter():
                    ref = F.log_softmax(tuned(x).logits[0], -1)
                total.append((ref.exp() * (ref - own)).sum(-1).mean())
        return float(torch.stack(total).mean())

    settings = TrainSettings(method="lora", **{**FAST, "max_steps": 20})
    plain = train(str(tiny_llama), facts_jsonl, tmp_path / "plain", settings, progress=False)
    held = train(
        str(tiny_llama),
        facts_jsonl,
        tmp_path / "held",
        TrainSettings(method="lora", preserve_weight=10.0, **{**FAST, "max_steps": 20}),
        preserve=preserve,
        progress=False,
    )
    assert held.eval_loss < held.eval_loss_before * 0.7  # it still learns the data
    assert drift(tmp_path / "held") < 0.5 * drift(tmp_path / "plain")
    record = json.loads((tmp_path / "held" / "edgeft.json").read_text())
    assert record["results"]["preserve_rows"] == 4
    assert len(record["inputs"]["preserve"]["sha256"]) == 64
    assert record["settings"]["preserve_weight"] == 10.0
    assert plain.eval_loss_before == pytest.approx(held.eval_loss_before)  # same eval rows


def test_qlora_on_some_modules_merges_every_4bit_weight_dequantized(
    tiny_llama, facts_jsonl, tmp_path
):
    """QLoRA holds every decoder Linear in 4-bit, adapted or not: the dequantized merge rounds
    the unadapted ones too, or the merged model is not the one that was trained."""
    from safetensors.torch import load_file

    settings = TrainSettings(
        method="qlora", target_modules=["q_proj", "v_proj"], **{**FAST, "max_steps": 6}
    )
    train(str(tiny_llama), facts_jsonl, tmp_path / "adapter", settings, progress=False)
    result = merge(tmp_path / "adapter", tmp_path / "merged")
    assert result.parity.top1_agreement == 1.0
    merged = load_file(tmp_path / "merged" / "model.safetensors")
    base = load_file(tiny_llama / "model.safetensors")
    name = "model.layers.0.mlp.up_proj.weight"  # not adapted, 4-bit in training
    assert not (merged[name] == base[name]).all()
    assert (merged[name] - base[name]).abs().max() < 0.2 * base[name].abs().max()
    norm = "model.layers.0.input_layernorm.weight"  # never 4-bit
    assert (merged[norm] == base[norm]).all()


def test_a_non_finite_adapter_fails_the_merge_and_writes_nothing(qlora_adapter, tmp_path):
    """The merge's own gate: a NaN in one lora_B makes that module's merged weight NaN, and
    the merge refuses, naming the module, before anything lands under the output name."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    broken = tmp_path / "adapter"
    shutil.copytree(qlora_adapter.out, broken)
    weights = broken / "adapter_model.safetensors"
    tensors = load_file(weights)
    name = next(n for n in sorted(tensors) if n.endswith("q_proj.lora_B.weight"))
    tensors[name][0, 0] = torch.nan
    save_file(tensors, str(weights), metadata={"format": "pt"})
    with pytest.raises(EdgeftError, match="q_proj has non-finite values") as info:
        merge(broken, tmp_path / "merged", merge_base="original")
    assert "\n" not in str(info.value)
    assert not (tmp_path / "merged").exists() and not (tmp_path / "merged.partial").exists()


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda r: r["inputs"]["base"].pop("weights_sha256"), r"inputs\.base\.weights_sha256"),
        (lambda r: r["settings"].update(method="dora"), r"settings\.method"),
        (lambda r: r.update(schema_version=2), "newer edgeft"),
        (lambda r: r.update(stage="export-gguf"), "expected the output of 'edgeft train'"),
    ],
    ids=["missing-part", "wrong-value", "newer-schema", "other-stage"],
)
def test_merge_refuses_an_adapter_record_it_cannot_read_whole(
    qlora_adapter, tmp_path, change, message
):
    """An adapter's edgeft.json lacking a part the merge relies on, written by a newer edgeft
    or by another stage is refused in one line naming the file; nothing is written."""
    import shutil

    broken = tmp_path / "adapter"
    shutil.copytree(qlora_adapter.out, broken)
    record = json.loads((broken / "edgeft.json").read_text())
    change(record)
    (broken / "edgeft.json").write_text(json.dumps(record))
    with pytest.raises(ModelError, match=message) as info:
        merge(broken, tmp_path / "merged")
    assert str(broken / "edgeft.json") in str(info.value) and "\n" not in str(info.value)
    assert not (tmp_path / "merged").exists() and not (tmp_path / "merged.partial").exists()
