"""Hugging Face tokenizers as the torch and onnxruntime runtimes use them: the same rules for
plain and chat text, so the two runtimes' ids for one question are the same."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from edgeft.errors import ModelError
from edgeft.hfcompat import chat_ids
from edgeft.session import chat_messages


class HFTokenizing:
    """``tokenize``/``detokenize`` of the session protocol over ``self.tokenizer``."""

    tokenizer: object

    @property
    def bos_token_id(self) -> int | None:
        return self.tokenizer.bos_token_id

    def tokenize(self, text: str, *, chat: bool = False, context: Sequence[dict] = ()) -> list[int]:
        if chat:
            return chat_ids(self.tokenizer, chat_messages(text, context))
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def detokenize(self, token_ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(token_ids), skip_special_tokens=True)


def load_tokenizer(folder: Path):
    """The tokenizer saved in an export folder (no remote code).

    Raises:
        ModelError: it is missing or cannot be loaded.
    """
    from transformers import AutoTokenizer

    if not (folder / "tokenizer_config.json").is_file():
        raise ModelError(
            f"{folder} has no tokenizer_config.json; export the folder again with its tokenizer"
        )
    try:
        return AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
    except (OSError, ValueError) as exc:
        raise ModelError(
            f"cannot load the tokenizer saved in {folder} ({exc}); export the folder again"
        ) from exc


def read_json(path: Path, *, required: bool = False) -> dict:
    """A folder's JSON file; ``{}`` when absent and not ``required``.

    Raises:
        ModelError: required and absent, or not valid JSON.
    """
    if not path.is_file():
        if required:
            raise ModelError(f"{path} not found; export the checkpoint to ONNX again")
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelError(f"{path} is not valid JSON ({exc}); export the folder again") from exc


def eos_token_ids(folder: Path, tokenizer) -> list[int]:
    """What generation stops at: generation_config.json's eos ids (config.json's without
    them), then the tokenizer's eos, without repeats."""
    eos = read_json(folder / "generation_config.json").get("eos_token_id")
    if eos is None:
        eos = read_json(folder / "config.json").get("eos_token_id")
    eos = eos if isinstance(eos, list) else [eos]
    return list(dict.fromkeys(int(e) for e in [*eos, tokenizer.eos_token_id] if e is not None))
