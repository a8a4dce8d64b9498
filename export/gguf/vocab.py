"""A Hugging Face tokenizer as GGUF ``tokenizer.ggml.*`` metadata, mapped exactly or refused.

llama.cpp does not run the Hugging Face tokenizer: it re-implements a few families and picks the
text-splitting rules by a name (``tokenizer.ggml.pre``). A checkpoint whose rules are written down
under the wrong name tokenizes differently after export, and the model answers badly without
any error. This module reads ``tokenizer.json`` with the ``tokenizers`` library (no torch import),
recognises the splitting rules from their exact definition, and refuses what it does not know.
:func:`check_token_ids` then proves the mapping on a corpus through llama.cpp itself.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from edgeft.errors import ModelError
from edgeft.fidelity import TOKENIZER_CORPUS
from edgeft.parity import first_divergence

# The splitting rules of each Hugging Face pre-tokenizer llama.cpp re-implements, keyed by a
# canonical description of the tokenizer.json ``pre_tokenizer``: ("bytelevel-regex",) is
# ByteLevel with its built-in GPT-2 regex, ("split", REGEX) a Split(Isolated) on REGEX,
# ("bytelevel",) a ByteLevel that only maps bytes.
_GPT2_REGEX = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"""
_LLAMA3_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# Phi-4-mini (llama.cpp's "gpt-4o"): cased words keep their case run together, digits by three.
_GPT4O_REGEX = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
BPE_PRE_TOKENIZERS: dict[tuple, str] = {
    (("bytelevel-regex",),): "gpt-2",
    (("split", _GPT2_REGEX), ("bytelevel",)): "gpt-2",
    # Every digit on its own, then the GPT-2 rules (SmolLM, StarCoder).
    (("split", r"\p{N}"), ("bytelevel-regex",)): "smollm",
    (("digits",), ("bytelevel-regex",)): "smollm",
    (("split", _LLAMA3_REGEX), ("bytelevel",)): "llama-bpe",
    (("split", _QWEN2_REGEX), ("bytelevel",)): "qwen2",
    (("split", _GPT4O_REGEX), ("bytelevel",)): "gpt-4o",
}

# GGUF token types (llama.cpp's llama_token_type).
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

_BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")
_SPECIAL_KINDS = ("bos", "eos", "unk", "pad")


@dataclass
class GGUFVocab:
    """Everything llama.cpp needs to tokenize like the Hugging Face tokenizer.

    Attributes:
        model: ``"gpt2"`` (byte-level BPE ranked by merges) or ``"llama"`` (SentencePiece-style
            BPE ranked by scores, with byte fallback).
        pre: llama.cpp pre-tokenizer name (``"default"`` for SentencePiece vocabularies).
        tokens, scores, types: one entry per embedding row.
        merges: ``"a b"`` merge rules, for ``gpt2`` vocabularies.
        special_ids: ``bos``/``eos``/``eot``/``unk``/``pad`` → token id.
        add_bos, add_eos: whether the Hugging Face tokenizer adds them to plain text.
        add_space_prefix: SentencePiece only: a space is prepended to the text.
        chat_template: the Jinja chat template, if the checkpoint has one.
        notes: differences that exist but cannot change token ids of NFC text.
    """

    model: str
    pre: str
    tokens: list[str]
    scores: list[float]
    types: list[int]
    merges: list[str] = field(default_factory=list)
    special_ids: dict[str, int] = field(default_factory=dict)
    add_bos: bool = False
    add_eos: bool = False
    add_space_prefix: bool = False
    chat_template: str | None = None
    notes: list[str] = field(default_factory=list)

    def add_to(self, writer) -> None:
        """Write the ``tokenizer.ggml.*`` keys to a ``gguf.GGUFWriter``."""
        writer.add_tokenizer_model(self.model)
        writer.add_tokenizer_pre(self.pre)
        writer.add_token_list(self.tokens)
        if self.model == "llama":  # byte-level BPE ranks by merges and has no scores
            writer.add_token_scores(self.scores)
        writer.add_token_types(self.types)
        if self.merges:
            writer.add_token_merges(self.merges)
        for kind, token_id in self.special_ids.items():
            getattr(
                writer,
                {"unk": "add_unk_token_id", "pad": "add_pad_token_id"}.get(
                    kind, f"add_{kind}_token_id"
                ),
            )(token_id)
        writer.add_add_bos_token(self.add_bos)
        writer.add_add_eos_token(self.add_eos)
        if self.model == "llama":
            writer.add_add_space_prefix(self.add_space_prefix)
        if self.chat_template:
            writer.add_chat_template(self.chat_template)


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelError(f"{path}: cannot read: {exc}") from exc


def _describe_pre_tokenizer(pre: dict | None) -> tuple:
    """Canonical form of a tokenizer.json ``pre_tokenizer`` (see :data:`BPE_PRE_TOKENIZERS`)."""
    if pre is None:
        return ()
    steps = pre["pretokenizers"] if pre.get("type") == "Sequence" else [pre]
    described = []
    for step in steps:
        kind = step.get("type")
        if kind == "ByteLevel":
            if step.get("add_prefix_space"):
                described.append(("bytelevel-prefix-space",))
            else:
                described.append(
                    ("bytelevel-regex",) if step.get("use_regex", True) else ("bytelevel",)
                )
        elif kind == "Split" and step.get("behavior") == "Isolated" and not step.get("invert"):
            pattern = step.get("pattern", {})
            described.append(("split", pattern.get("Regex", re.escape(pattern.get("String", "")))))
        elif kind == "Digits" and step.get("individual_digits"):
            described.append(("digits",))
        else:
            described.append((kind, json.dumps(step, sort_keys=True)))
    return tuple(described)


def _special_token_text(config: dict, kind: str) -> str | None:
    entry = config.get(f"{kind}_token")
    if isinstance(entry, dict):
        entry = entry.get("content")
    return entry if isinstance(entry, str) else None


def _chat_template(model_dir: Path, config: dict) -> str | None:
    template = config.get("chat_template")
    if template is None and (model_dir / "chat_template.jinja").is_file():
        template = (model_dir / "chat_template.jinja").read_text(encoding="utf-8")
    if template is None and (model_dir / "chat_template.json").is_file():
        template = _read_json(model_dir / "chat_template.json").get("chat_template")
    if isinstance(template, list):
        # Named templates: llama.cpp reads the default one from tokenizer.chat_template.
        named = {t.get("name"): t.get("template") for t in template}
        template = named.get("default")
    return template if isinstance(template, str) else None


def _end_of_turn_ids(model_dir: Path, eos_id: int | None) -> list[int]:
    """End-of-turn ids generation stops on besides eos (``generation_config.eos_token_id``)."""
    path = model_dir / "generation_config.json"
    if not path.is_file():
        return []
    eos = _read_json(path).get("eos_token_id")
    eos = eos if isinstance(eos, list) else [eos]
    return [int(e) for e in eos if isinstance(e, int) and e != eos_id]


def read_vocab(model_dir: Path, n_vocab: int) -> GGUFVocab:
    """Map ``model_dir``'s ``tokenizer.json`` to GGUF tokenizer metadata for ``n_vocab`` rows.

    Raises:
        ModelError: no ``tokenizer.json``, a tokenizer family or pre-tokenizer llama.cpp
            cannot reproduce, or more tokens than embedding rows.
    """
    from tokenizers import Tokenizer

    model_dir = Path(model_dir)
    path = model_dir / "tokenizer.json"
    if not path.is_file():
        raise ModelError(
            f"{model_dir} has no tokenizer.json; save the fast tokenizer there with "
            "AutoTokenizer.from_pretrained(...).save_pretrained(...)"
        )
    spec = _read_json(path)
    config = (
        _read_json(model_dir / "tokenizer_config.json")
        if (model_dir / "tokenizer_config.json").is_file()
        else {}
    )
    backend = Tokenizer.from_file(str(path))
    bpe = spec.get("model", {})
    if bpe.get("type") != "BPE":
        raise ModelError(
            f"{path}: tokenizer model {bpe.get('type')!r} is not supported; supported: BPE "
            "(byte-level, or SentencePiece-style with byte fallback)"
        )
    vocab: dict[str, int] = dict(bpe["vocab"])
    added = {t["content"]: t for t in spec.get("added_tokens", [])}
    for content, token in added.items():
        vocab.setdefault(content, token["id"])
    size = max(vocab.values()) + 1
    if size > n_vocab:
        raise ModelError(
            f"{path}: the tokenizer has {size} tokens but the model only {n_vocab} embedding "
            "rows; the tokenizer does not belong to this model"
        )
    merges = [m if isinstance(m, str) else " ".join(m) for m in bpe.get("merges", [])]
    notes: list[str] = []

    if bpe.get("byte_fallback"):
        family, pre = "llama", "default"
        add_space_prefix = _check_sentencepiece(path, spec)
    else:
        family, add_space_prefix = "gpt2", False
        pre = _bpe_pre_tokenizer(path, spec, notes)
        if spec.get("decoder", {}).get("type") != "ByteLevel":
            raise ModelError(f"{path}: a byte-level BPE needs a ByteLevel decoder")

    tokens = [f"[PAD{i}]" for i in range(n_vocab)]
    types = [UNUSED] * n_vocab
    scores = [0.0] * n_vocab
    for text, token_id in vocab.items():
        tokens[token_id] = text
        types[token_id] = NORMAL
    if family == "llama":
        # llama.cpp merges the adjacent pair whose result has the highest score; Hugging Face
        # applies the lowest-ranked merge. A score of minus the first rank producing a token
        # makes the two agree (check_token_ids proves it on a corpus).
        for rank, merge in enumerate(merges):
            left, right = merge.split(" ", 1)
            merged = vocab.get(left + right)
            if merged is not None and scores[merged] == 0.0:
                scores[merged] = -float(rank + 1)
        for text, token_id in vocab.items():
            if _BYTE_TOKEN.fullmatch(text):
                types[token_id] = BYTE
        if bpe.get("unk_token") in vocab:
            types[vocab[bpe["unk_token"]]] = UNKNOWN
    for token in added.values():
        types[token["id"]] = CONTROL if token.get("special") else USER_DEFINED

    special_ids: dict[str, int] = {}
    for kind in _SPECIAL_KINDS:
        text = _special_token_text(config, kind)
        if text is not None:
            if text not in vocab:
                raise ModelError(
                    f"{model_dir / 'tokenizer_config.json'}: {kind}_token {text!r} is not in "
                    "the vocabulary"
                )
            special_ids[kind] = vocab[text]
    eot = _end_of_turn_ids(model_dir, special_ids.get("eos"))
    if eot:
        special_ids["eot"] = eot[0]

    with_specials = backend.encode("a", add_special_tokens=True).ids
    plain = backend.encode("a", add_special_tokens=False).ids
    add_bos = len(with_specials) > len(plain) and with_specials[0] == special_ids.get("bos")
    add_eos = len(with_specials) > len(plain) and with_specials[-1] == special_ids.get("eos")
    return GGUFVocab(
        model=family,
        pre=pre,
        tokens=tokens,
        scores=scores,
        types=types,
        merges=merges if family == "gpt2" else [],
        special_ids=special_ids,
        add_bos=add_bos,
        add_eos=add_eos,
        add_space_prefix=add_space_prefix,
        chat_template=_chat_template(model_dir, config),
        notes=notes,
    )


def _bpe_pre_tokenizer(path: Path, spec: dict, notes: list[str]) -> str:
    normalizer = spec.get("normalizer")
    if normalizer is not None:
        if normalizer.get("type") != "NFC":
            raise ModelError(
                f"{path}: normalizer {normalizer.get('type')!r} has no llama.cpp equivalent "
                "for byte-level BPE"
            )
        notes.append(
            "the Hugging Face tokenizer NFC-normalizes text and llama.cpp does not: "
            "token ids agree on NFC text"
        )
    described = _describe_pre_tokenizer(spec.get("pre_tokenizer"))
    pre = BPE_PRE_TOKENIZERS.get(described)
    if pre is None:
        known = ", ".join(sorted(set(BPE_PRE_TOKENIZERS.values())))
        raise ModelError(
            f"{path}: pre-tokenizer {json.dumps(spec.get('pre_tokenizer'))[:200]} matches none "
            f"llama.cpp reproduces exactly (known: {known}); converting it would change token ids"
        )
    return pre


def _check_sentencepiece(path: Path, spec: dict) -> bool:
    """Validate a SentencePiece-style BPE and return whether a space is prepended."""
    normalizer = spec.get("normalizer") or {}
    norm_steps = normalizer.get("normalizers", [normalizer]) if normalizer else []
    kinds = [step.get("type") for step in norm_steps]
    pre = spec.get("pre_tokenizer")
    if kinds == ["Replace"] and _splits_on_space(pre):
        # Gemma: every space is already '▁' when the pre-tokenizer runs, so its split on " "
        # never applies; no space is prepended.
        pre = None
    if kinds and set(kinds) <= {"Prepend", "Replace"} and pre is None:
        replaces = [s for s in norm_steps if s.get("type") == "Replace"]
        if not any(s.get("content") == "\u2581" for s in replaces):
            raise ModelError(f"{path}: a SentencePiece normalizer must replace ' ' with '\u2581'")
        return "Prepend" in kinds
    if not kinds and pre is not None and pre.get("type") == "Metaspace":
        if pre.get("prepend_scheme", "always") == "first":
            raise ModelError(
                f"{path}: Metaspace with prepend_scheme 'first' (legacy=False) has no llama.cpp "
                "equivalent: llama.cpp prepends a space after every special token; re-save the "
                "tokenizer with legacy=True"
            )
        return pre.get("prepend_scheme", "always") == "always"
    raise ModelError(
        f"{path}: byte-fallback BPE with normalizer {kinds} and pre-tokenizer "
        f"{(pre or {}).get('type')!r} is not a SentencePiece layout llama.cpp reproduces"
    )


def _splits_on_space(pre: dict | None) -> bool:
    return (
        pre is not None
        and pre.get("type") == "Split"
        and pre.get("pattern") == {"String": " "}
        and pre.get("behavior") == "MergedWithPrevious"
        and not pre.get("invert")
    )


def _special_corpus(vocab: GGUFVocab) -> list[str]:
    specials = [t for t, kind in zip(vocab.tokens, vocab.types, strict=True) if kind == CONTROL][:8]
    return [f"{tok}hello{tok} world {tok}\nnext" for tok in specials] + [
        "".join(specials) + " plain text after specials"
    ]


def corpus_for(vocab: GGUFVocab, chat_texts: Iterable[str] = ()) -> list[str]:
    """The fidelity corpus: :data:`~edgeft.fidelity.TOKENIZER_CORPUS`, special tokens in text,
    chat texts."""
    return [*TOKENIZER_CORPUS, *_special_corpus(vocab), *chat_texts]


@dataclass(frozen=True)
class TokenizerCheck:
    """Result of comparing llama.cpp's token ids with the Hugging Face tokenizer's."""

    texts: int
    tokens: int
    mismatches: list[dict]

    def as_dict(self) -> dict:
        return {"texts": self.texts, "tokens": self.tokens, "mismatches": self.mismatches}


def check_token_ids(hf_tokenizer, gguf_path: Path, texts: Sequence[str]) -> TokenizerCheck:
    """Tokenize ``texts`` with the Hugging Face tokenizer and with llama.cpp on ``gguf_path``.

    Plain text is compared without added special tokens (special tokens written in the text
    are matched, as Hugging Face does); the first text is also compared with them (bos/eos).
    """
    import llama_cpp

    from edgeft.gguf_file import read_gguf
    from edgeft.runtimes.llamacpp import quiet_logs

    read_gguf(gguf_path)  # bounds-checked before llama.cpp reads it
    quiet_logs()
    llm = llama_cpp.Llama(str(gguf_path), vocab_only=True, n_ctx=64, verbose=False)
    try:
        mismatches = []
        tokens = 0
        for i, text in enumerate(texts):
            cases = [(False, text)] + ([(True, text)] if i == 0 else [])
            for add_special, sample in cases:
                expected = hf_tokenizer(sample, add_special_tokens=add_special)["input_ids"]
                got = llm.tokenize(sample.encode("utf-8"), add_bos=add_special, special=True)
                tokens += len(expected)
                if list(expected) != list(got):
                    at = first_divergence(list(expected), list(got))
                    mismatches.append(
                        {
                            "text": sample[:80],
                            "special_tokens_added": add_special,
                            "first_difference": at,
                            "hugging_face": list(expected[at : at + 5]),
                            "llama_cpp": list(got[at : at + 5]),
                        }
                    )
    finally:
        llm.close()
    return TokenizerCheck(texts=len(texts), tokens=tokens, mismatches=mismatches)
