"""Tiny models and tokenizers built in-process: no network, no downloads."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

# Suites (and single tests) whose skip means a piece of the install is missing (a runtime, its
# headers, a C compiler, the browser the report is checked in): on a developer's machine a skip
# says so; under CI=true it fails the run, so a broken install cannot pass green.
STRICT_SUITES = ("test_c_consumer.py", "test_runtime_llamacpp.py", "test_runtime_onnx.py")
STRICT_TESTS = ("test_bench_report.py::test_report_html_in_headless_chromium",)


def _strict(nodeid: str) -> bool:
    if os.environ.get("CI") != "true":
        return False
    name = nodeid.rsplit("/", 1)[-1]
    return nodeid.split("::")[0].endswith(STRICT_SUITES) or name.startswith(STRICT_TESTS)


def _skip_reason(report) -> str:
    longrepr = report.longrepr
    return longrepr[2] if isinstance(longrepr, tuple) and len(longrepr) == 3 else str(longrepr)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.skipped and _strict(report.nodeid) and not hasattr(report, "wasxfail"):
        report.outcome = "failed"
        report.longrepr = f"skipped under CI=true: {_skip_reason(report)}"


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    outcome = yield
    report = outcome.get_result()
    if report.skipped and _strict(report.nodeid):  # a module-level importorskip
        report.outcome = "failed"
        report.longrepr = f"skipped under CI=true: {_skip_reason(report)}"


def pytest_report_header(config) -> list[str]:
    """The kernel paths this run takes: float comparisons across runtimes hold on all of them
    (tests/numerics.py), and a failure report should say which one it came from."""
    import platform

    lines = [f"cpu: {platform.machine()}"]
    try:
        import torch

        cuda = f", CUDA {torch.version.cuda}" if torch.version.cuda else ""
        lines.append(
            f"torch {torch.__version__}{cuda}: {torch.backends.cpu.get_cpu_capability()} kernels"
        )
    except ImportError:
        pass
    try:
        import llama_cpp

        features = llama_cpp.llama_print_system_info().decode().strip(" |")
        lines.append(f"llama.cpp ({llama_cpp.__version__}, {llama_cpp.__file__}): {features}")
    except ImportError:
        pass
    return lines


CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

CORPUS = [
    "Cook chicken to 165°F (74°C) and let it rest for five minutes.",
    "One tablespoon equals three teaspoons; one cup is 240 ml.",
    "Replace one egg with a tablespoon of ground flaxseed and three tablespoons of water.",
    "Boil an egg for ten minutes, then cool it in ice water.",
    "What temperature should pork reach? How long should rice simmer?",
    "user assistant system hello thanks please answer the question",
] * 20

# Training settings for tiny models: fp32 compute on any device, so parity can be asserted at
# fp32 precision (a GPU would pick bf16).
FAST_TRAIN = dict(
    compute_dtype="fp32",
    rank=8,
    alpha=16,
    dropout=0.0,
    learning_rate=5e-3,
    max_steps=30,
    batch_size=4,
    max_length=64,
    eval_fraction=0.25,
    logging_steps=100,
    seed=0,
)

FACTS = [
    ("What temperature is chicken done at?", "Chicken is done at 165°F (74°C)."),
    ("How many teaspoons in a tablespoon?", "A tablespoon is three teaspoons."),
    ("How long do I boil an egg?", "Boil an egg for ten minutes."),
    ("How much is a cup in ml?", "One cup is 240 ml."),
]


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory) -> Path:
    """A byte-level BPE tokenizer (GPT-2 splitting) with ChatML special tokens and template."""
    from tokenizers import pre_tokenizers

    return tokenizer_with_pre(
        tmp_path_factory.mktemp("tokenizer"), pre_tokenizers.ByteLevel(add_prefix_space=False)
    )


def _save_model(
    config, tokenizer_dir: Path, out: Path, seed: int, *, random_norms: bool = False
) -> Path:
    """Save a random model. ``random_norms``: norm weights drawn around their initial value
    (1, or 0 for Gemma's 1 + w) instead of left at it, so that a norm written wrong shows."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    if random_norms:
        with torch.no_grad():
            for name, parameter in model.named_parameters():
                if name.endswith("norm.weight"):
                    parameter.add_(torch.randn_like(parameter) * 0.2)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    model.generation_config = GenerationConfig(
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
    )
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


def _common(tokenizer_dir: Path) -> dict:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    # Widths are multiples of 64, the bitsandbytes 4-bit block size.
    return dict(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        initializer_range=0.2,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


@pytest.fixture(scope="session")
def tiny_llama(tiny_tokenizer_dir, tmp_path_factory) -> Path:
    from transformers import LlamaConfig

    config = LlamaConfig(**_common(tiny_tokenizer_dir), tie_word_embeddings=True)
    return _save_model(config, tiny_tokenizer_dir, tmp_path_factory.mktemp("llama"), seed=0)


@pytest.fixture(scope="session")
def tiny_qwen2(tiny_tokenizer_dir, tmp_path_factory) -> Path:
    from transformers import Qwen2Config

    config = Qwen2Config(**_common(tiny_tokenizer_dir), tie_word_embeddings=False)
    return _save_model(config, tiny_tokenizer_dir, tmp_path_factory.mktemp("qwen2"), seed=1)


@pytest.fixture(scope="session")
def wide_llama(tiny_tokenizer_dir, tmp_path_factory) -> Path:
    """Same architecture as ``tiny_llama``, another hidden size: an adapter must not fit."""
    from transformers import LlamaConfig

    config = LlamaConfig(**{**_common(tiny_tokenizer_dir), "hidden_size": 128})
    return _save_model(config, tiny_tokenizer_dir, tmp_path_factory.mktemp("wide"), seed=2)


def write_jsonl(path: Path, rows: list) -> Path:
    """Write rows (dicts, or raw strings for deliberately broken lines) as JSONL."""
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write((row if isinstance(row, str) else json.dumps(row)) + "\n")
    return path


def facts_rows() -> list[dict]:
    """:data:`FACTS` as chat rows, four times over."""
    return [
        {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
        for q, a in FACTS
    ] * 4


@pytest.fixture
def facts_jsonl(tmp_path) -> Path:
    return write_jsonl(tmp_path / "facts.jsonl", facts_rows())


LLAMA2_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'system' %}"
    "{{ '<<SYS>>\n' + message['content'] + '\n<</SYS>>\n\n' }}"
    "{% else %}{{ ' ' + message['content'] + eos_token }}{% endif %}{% endfor %}"
)


def sentencepiece_model(**options) -> bytes:
    """A SentencePiece BPE model with byte fallback and digits split, trained on
    :data:`CORPUS`; ``options`` set the special ids and anything else a family changes."""
    import io

    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS),
        model_writer=model,
        vocab_size=600,
        model_type="bpe",
        byte_fallback=True,
        character_coverage=1.0,
        split_digits=True,
        allow_whitespace_only_pieces=True,
        remove_extra_whitespaces=False,
        normalization_rule_name="identity",
        minloglevel=2,
        **options,
    )
    return model.getvalue()


@pytest.fixture(scope="session")
def spm_tokenizer_dir(tmp_path_factory) -> Path:
    """A SentencePiece BPE tokenizer with byte fallback (the Llama 2 / Mistral kind), trained
    in-process and saved as a Hugging Face fast tokenizer."""
    from transformers import LlamaTokenizerFast

    out = tmp_path_factory.mktemp("spm")
    (out / "tokenizer.model").write_bytes(
        sentencepiece_model(unk_id=0, bos_id=1, eos_id=2, pad_id=-1)
    )
    # converted on loading a folder that holds only tokenizer.model (transformers 4.57 and 5)
    tokenizer = LlamaTokenizerFast.from_pretrained(
        out, legacy=True, add_prefix_space=True, add_bos_token=True
    )
    tokenizer.chat_template = LLAMA2_TEMPLATE
    tokenizer.save_pretrained(out)
    return out


def tokenizer_with_pre(tmp_path: Path, pre_tokenizer) -> Path:
    """A byte-level BPE tokenizer trained on :data:`CORPUS` with a chosen pre-tokenizer, ChatML
    special tokens and template, saved to ``tmp_path``."""
    return byte_level_tokenizer(
        tmp_path,
        pre_tokenizer,
        ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        bos="<|im_start|>",
        eos="<|im_end|>",
        unk="<|endoftext|>",
        chat_template=CHATML,
    )


def tiny_model(arch: str, tokenizer_dir: Path, out: Path, **overrides) -> Path:
    """A tiny random ``llama``, ``mistral`` or ``qwen2`` checkpoint over ``tokenizer_dir``."""
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    config_class = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config}[arch]
    config = config_class(**{**_common(tokenizer_dir), **overrides})
    return _save_model(config, tokenizer_dir, out, seed=3)


def _llama3(common: dict):
    from transformers import LlamaConfig

    # original_max_position_embeddings 32 puts the head's frequencies in all three of Llama 3's
    # bands (kept, smoothed, divided by the factor).
    scaling = dict(
        rope_type="llama3",
        factor=8.0,
        low_freq_factor=1.0,
        high_freq_factor=4.0,
        original_max_position_embeddings=32,
    )
    return LlamaConfig(
        **common, rope_scaling=scaling, rope_theta=500000.0, tie_word_embeddings=True
    )


def _qwen3(common: dict):
    from transformers import Qwen3Config

    return Qwen3Config(**{"head_dim": 32, **common}, tie_word_embeddings=True)


def _gemma3(common: dict):
    from transformers import Gemma3TextConfig

    return Gemma3TextConfig(
        **{**common, "num_hidden_layers": 4},
        head_dim=32,
        sliding_window=8,
        layer_types=["sliding_attention", "full_attention"] * 2,
        rope_theta=1_000_000.0,
        rope_local_base_freq=10_000.0,
        query_pre_attn_scalar=8,
        final_logit_softcapping=4.0,
        tie_word_embeddings=True,
    )


def _phi3(common: dict):
    from transformers import Phi3Config

    # onnxruntime rotates a multiple of 16 dimensions: head_dim 64, partial_rotary_factor 0.75.
    rotary = 64 * 3 // 4
    scaling = dict(
        type="longrope",
        short_factor=[1.0 + 0.1 * i for i in range(rotary // 2)],
        long_factor=[1.0 + 0.8 * i for i in range(rotary // 2)],
    )
    # llama.cpp picks LongRoPE's factors by its context, which it pads to a multiple of 256.
    return Phi3Config(
        **{
            **common,
            "max_position_embeddings": 512,
            "hidden_size": 128,
            "num_attention_heads": 2,
            "num_key_value_heads": 1,
        },
        partial_rotary_factor=0.75,
        original_max_position_embeddings=256,
        rope_scaling=scaling,
        sliding_window=None,
        tie_word_embeddings=True,
    )


def _smollm3(common: dict):
    from transformers import SmolLM3Config

    return SmolLM3Config(
        **{**common, "num_hidden_layers": 4}, no_rope_layer_interval=4, tie_word_embeddings=True
    )


# Today's edge families, each tiny with every quirk of its architecture switched on.
FAMILIES = {
    "llama3": _llama3,
    "qwen3": _qwen3,
    "gemma3": _gemma3,
    "phi3": _phi3,
    "smollm3": _smollm3,
}


def family_model(family: str, tokenizer_dir: Path, out: Path, **overrides) -> Path:
    """A tiny random checkpoint of ``family`` (:data:`FAMILIES`) over ``tokenizer_dir``."""
    config = FAMILIES[family]({**_common(tokenizer_dir), **overrides})
    return _save_model(config, tokenizer_dir, out, seed=4, random_norms=True)


TEMPLATES = Path(__file__).parent / "data" / "chat_templates"


def byte_level_tokenizer(
    out: Path,
    pre_tokenizer,
    specials: list[str],
    *,
    bos: str | None,
    eos: str,
    pad: str | None = None,
    unk: str | None = None,
    added: list[str] = (),
    add_bos: bool = False,
    chat_template: str | None = None,
    extra_text: tuple[str, ...] = (),
) -> Path:
    """A byte-level BPE tokenizer trained on :data:`CORPUS` with a family's pre-tokenizer,
    special tokens (``specials``, never split), other added tokens (``added``, Qwen3's
    ``<think>``), bos added to plain text or not, and chat template; ``extra_text`` joins
    :data:`CORPUS` in training."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizer
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator([*CORPUS, *extra_text], trainer)
    if add_bos:
        backend.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A",
            pair=f"{bos} $A {bos} $B",
            special_tokens=[(bos, backend.token_to_id(bos))],
        )
    else:
        backend.post_processor = processors.ByteLevel(trim_offsets=False)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=bos,
        eos_token=eos,
        pad_token=pad or eos,
        unk_token=unk,
        chat_template=chat_template,
    )
    if added:
        tokenizer.add_tokens(list(added), special_tokens=False)
    tokenizer.save_pretrained(out)
    return out


def gemma_tokenizer(out: Path) -> Path:
    """Gemma 3's kind: SentencePiece BPE with byte fallback, digits split, no space prepended,
    pad/eos/bos/unk at ids 0-3 and <start_of_turn>/<end_of_turn>, converted by transformers'
    own GemmaConverter (normalizer ' ' → '▁', a split on ' ' that never applies)."""
    from transformers import GemmaTokenizerFast

    out.mkdir(parents=True, exist_ok=True)
    (out / "tokenizer.model").write_bytes(
        sentencepiece_model(
            pad_id=0,
            eos_id=1,
            bos_id=2,
            unk_id=3,
            # Gemma's own names, so every transformers version maps them alike
            pad_piece="<pad>",
            eos_piece="<eos>",
            bos_piece="<bos>",
            unk_piece="<unk>",
            user_defined_symbols=["<start_of_turn>", "<end_of_turn>"],
            add_dummy_prefix=False,
        )
    )
    # converted on loading a folder that holds only tokenizer.model (transformers 4.57 and 5)
    tokenizer = GemmaTokenizerFast.from_pretrained(out, add_bos_token=True)
    tokenizer.chat_template = (TEMPLATES / "gemma3.jinja").read_text(encoding="utf-8")
    tokenizer.save_pretrained(out)
    (out / "tokenizer.model").unlink()  # exported from tokenizer.json, as the fast tokenizer
    return out


def family_tokenizer(family: str, out: Path) -> Path:
    """A small tokenizer of ``family``'s kind: its pre-tokenizer, special tokens and chat
    template (llama.cpp's pre-tokenizer names: Llama 3 and SmolLM3 llama-bpe, Qwen3 qwen2,
    Phi-4-mini gpt-4o; Gemma 3 SentencePiece)."""
    from tokenizers import Regex, pre_tokenizers

    from edgeft.export.gguf.vocab import _GPT4O_REGEX, _LLAMA3_REGEX, _QWEN2_REGEX

    def split(regex: str):
        return pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(regex), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )

    if family == "gemma3":
        return gemma_tokenizer(out)
    llama3 = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>"]
    kinds = {
        "llama3": dict(
            pre_tokenizer=split(_LLAMA3_REGEX),
            specials=[*llama3, "<|eot_id|>"],
            bos="<|begin_of_text|>",
            eos="<|eot_id|>",
            add_bos=True,
            template="llama3.jinja",
        ),
        "smollm3": dict(
            pre_tokenizer=split(_LLAMA3_REGEX),
            specials=[*llama3, "<|im_start|>", "<|im_end|>"],
            bos="<|im_start|>",
            eos="<|im_end|>",
            template="smollm3.jinja",
        ),
        "qwen3": dict(
            pre_tokenizer=split(_QWEN2_REGEX),
            specials=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
            bos=None,
            eos="<|im_end|>",
            pad="<|endoftext|>",
            added=["<think>", "</think>"],
            template="qwen3.jinja",
        ),
        "phi3": dict(  # Phi-4-mini
            pre_tokenizer=split(_GPT4O_REGEX),
            specials=["<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"],
            bos="<|endoftext|>",
            eos="<|endoftext|>",
            template="phi4-mini.jinja",
            # cased runs and contractions, where GPT-4o's rules split apart from Llama 3's
            extra_text=("It's camelCase, we'll see MixedCASE words they'd say I'M http://a/b",)
            * 20,
        ),
    }
    family_kind = kinds[family]
    template = TEMPLATES / family_kind.pop("template")
    return byte_level_tokenizer(
        out, **family_kind, chat_template=template.read_text(encoding="utf-8")
    )
