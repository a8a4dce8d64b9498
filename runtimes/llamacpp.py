"""The llama.cpp runtime: a GGUF file run on the CPU by llama-cpp-python.

Tokenization, chat rendering and detokenization follow the Hugging Face conventions the torch
runtime uses, so the two runtimes see the same token ids for the same question.
"""

from __future__ import annotations

import ctypes
import re
import weakref
from collections.abc import Sequence
from functools import cached_property
from pathlib import Path

import numpy as np

from edgeft.errors import EdgeftError, ModelError
from edgeft.session import ADAPTERS, BATCH, chat_messages, generate

# ggml log levels (ggml.h): only errors are kept, to name the cause in edgeft's one-line errors.
_LOG_ERROR, _LOG_CONT = 4, 5
_log_state: dict = {"callback": None, "level": 0, "errors": [], "tensor": None}
# llama.cpp's quantizer announces each tensor as "[   3/  30]   blk.0.attn_q.weight - [...]".
_QUANT_PROGRESS = re.compile(rb"^\[\s*\d+/\s*\d+\]\s+(\S+)\s+- \[")


def quiet_logs() -> None:
    """Route llama.cpp's log through edgeft: load chatter and warnings are dropped, errors are
    kept for :func:`take_log_errors`. (llama-cpp-python 0.3.36 maps ggml's log levels one off,
    so its own ``verbose=False`` still prints warnings.)"""
    if _log_state["callback"] is not None:
        return
    import llama_cpp

    def log(level: int, text: bytes, _user_data) -> None:
        if level != _LOG_CONT:
            _log_state["level"] = level
        progress = _QUANT_PROGRESS.match(text)
        if progress:  # the tensor being quantized, to name it if quantizing fails
            _log_state["tensor"] = progress[1].decode("utf-8", errors="replace")
        if _log_state["level"] == _LOG_ERROR:
            _log_state["errors"].append(text.decode("utf-8", errors="replace"))
            del _log_state["errors"][:-20]

    _log_state["callback"] = llama_cpp.llama_log_callback(log)
    llama_cpp.llama_log_set(_log_state["callback"], ctypes.c_void_p(0))


def take_log_errors() -> str:
    """llama.cpp's error lines since the last call, joined on one line."""
    text = " ".join(line.strip() for line in _log_state["errors"] if line.strip())
    _log_state["errors"].clear()
    return text


def take_log_tensor() -> str | None:
    """The tensor llama.cpp's quantizer last announced since the last call, if any."""
    tensor, _log_state["tensor"] = _log_state["tensor"], None
    return tensor


# Default context: the model's trained length, capped so that long-context models do not
# allocate a KV cache far larger than any prompt the harness sends.
MAX_DEFAULT_CTX = 4096


class LlamaCppSession:
    """A llama.cpp model and context holding one sequence in its KV cache."""

    capabilities = frozenset({BATCH, ADAPTERS})

    def __init__(self, llm, path: Path) -> None:
        import llama_cpp

        self.llm = llm
        self.path = path
        self.n_ctx = llm.n_ctx()
        self.n_vocab = llm.n_vocab()
        self._vocab = llama_cpp.llama_model_get_vocab(llm.model)
        skipped = (
            llama_cpp.LLAMA_TOKEN_ATTR_CONTROL
            | llama_cpp.LLAMA_TOKEN_ATTR_USER_DEFINED
            | llama_cpp.LLAMA_TOKEN_ATTR_UNKNOWN
        )
        ids = range(self.n_vocab)
        self.eos_token_ids = frozenset(
            i for i in ids if llama_cpp.llama_vocab_is_eog(self._vocab, i)
        )
        # What tokenizer_from_gguf marks special, so what skip_special_tokens drops.
        self._special_ids = frozenset(
            i for i in ids if llama_cpp.llama_vocab_get_attr(self._vocab, i) & skipped
        )
        self._batch = llama_cpp.llama_batch_init(llm.n_batch, 0, 1)
        self._free_batch = weakref.finalize(self, llama_cpp.llama_batch_free, self._batch)
        self._n_past = 0
        self._next_token: int | None = None
        self._adapters: dict[Path, object] = {}  # LoRA GGUF → llama.cpp's loaded adapter

    @property
    def bos_token_id(self) -> int | None:
        bos = self.llm.token_bos()
        return bos if bos >= 0 else None

    def tokenize(self, text: str, *, chat: bool = False, context: Sequence[dict] = ()) -> list[int]:
        """Token ids without an added bos, special tokens in the text matched (like Hugging
        Face ``add_special_tokens=False``); with ``chat``, the GGUF's chat template renders
        the ``context`` turns and ``text`` as a user turn followed by the generation prompt."""
        if chat:
            text = self._render_chat(chat_messages(text, context))
        return self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)

    def detokenize(self, token_ids: Sequence[int]) -> str:
        """Text of ``token_ids`` without special tokens (Hugging Face ``skip_special_tokens``)."""
        import llama_cpp

        ids = [t for t in map(int, token_ids) if t not in self._special_ids]
        tokens = (llama_cpp.llama_token * len(ids))(*ids)

        def detokenize_into(size: int) -> tuple[int, ctypes.Array]:
            buffer = ctypes.create_string_buffer(size)
            n = llama_cpp.llama_detokenize(
                self._vocab, tokens, len(ids), buffer, size, False, False
            )
            return n, buffer

        n, buffer = detokenize_into(8 * len(ids) + 64)
        if n < 0:  # the buffer was too small; -n is the size needed
            n, buffer = detokenize_into(-n)
        return buffer.raw[:n].decode("utf-8", errors="replace")

    def logits(self, token_ids: Sequence[int]) -> np.ndarray:
        """Logits at every position, [n, vocab] float32, from an empty KV cache.

        Only this method asks llama.cpp for an output row per token; prefill and decode ask for
        the last token's row alone. It replaces any prefilled cache: prefill again before
        :meth:`decode_one`.
        """
        ids = self._checked(token_ids)
        self._reset()
        out = np.empty((len(ids), self.n_vocab), dtype=np.float32)
        for start in range(0, len(ids), self.llm.n_batch):
            chunk = ids[start : start + self.llm.n_batch]
            out[start : start + len(chunk)] = self._eval(chunk, every_position=True)
        return out

    def prefill(self, token_ids: Sequence[int]) -> None:
        """Run the prompt on an empty KV cache; the next :meth:`decode_one` continues it."""
        ids = self._checked(token_ids)
        self._reset()
        for start in range(0, len(ids), self.llm.n_batch):
            last = self._eval(ids[start : start + self.llm.n_batch], every_position=False)
        self._next_token = int(np.argmax(last[0]))

    def decode_one(self) -> int:
        """Greedy next token, extending the KV cache by one position."""
        if self._next_token is None:
            raise RuntimeError("decode_one() before prefill()")
        if self._n_past >= self.n_ctx:
            raise EdgeftError(
                f"the {self.n_ctx}-token context of {self.path} is full; "
                "load it with a larger n_ctx or generate fewer tokens"
            )
        token = self._next_token
        self._next_token = int(np.argmax(self._eval([token], every_position=False)[0]))
        return token

    def set_adapter(self, adapter: Path | None) -> None:
        """Apply a LoRA GGUF (``edgeft export gguf-lora``) to the following evaluations
        instead of the current one, or none (``llama_set_adapters_lora``); a file is read
        once and kept with the model, so switching back costs no read. The KV cache is
        cleared: its keys and values came from other weights.

        Raises:
            ModelError: the file is missing, made for another base, or llama.cpp refuses it.
        """
        import ctypes

        import llama_cpp

        self._reset()
        if adapter is None:
            llama_cpp.llama_set_adapters_lora(self.llm.ctx, None, 0, None)
            return
        adapter = Path(adapter).resolve()
        loaded = self._adapters.get(adapter)
        if loaded is None:
            if not adapter.is_file():
                raise ModelError(f"LoRA adapter {adapter} not found; pass a .gguf adapter file")
            _check_lora_base(adapter, self.path)
            loaded = llama_cpp.llama_adapter_lora_init(self.llm.model, str(adapter).encode())
            if not loaded:
                raise _lora_error(adapter, self.path)
            self._adapters[adapter] = loaded  # freed with the model
        handles = (llama_cpp.llama_adapter_lora_p_ctypes * 1)(loaded)
        scales = (ctypes.c_float * 1)(1.0)
        if llama_cpp.llama_set_adapters_lora(self.llm.ctx, handles, 1, scales) != 0:
            raise _lora_error(adapter, self.path)

    def generate_batch(
        self, prompts: Sequence[Sequence[int]], max_new_tokens: int
    ) -> list[list[int]]:
        """Greedy generation for each prompt in turn, each cut at its first end-of-generation
        token: the same interface as the torch session's batched generation."""
        return [generate(self, prompt, max_new_tokens) for prompt in prompts]

    def close(self) -> None:
        """Free the batch, the context and the model; the session is unusable afterwards."""
        self._free_batch()
        self.llm.close()
        self._next_token = None

    def _render_chat(self, messages: list[dict]) -> str:
        import jinja2

        try:
            return self._chat_template.render(
                messages=messages,
                add_generation_prompt=True,
                bos_token=self._token_text(self.llm.token_bos()),
                eos_token=self._token_text(self.llm.token_eos()),
            )
        except jinja2.TemplateError as exc:
            raise ModelError(f"the chat template of {self.path} failed: {exc}") from exc

    @cached_property
    def _chat_template(self):
        """The GGUF's ``tokenizer.chat_template``, compiled the way transformers compiles it."""
        import jinja2

        source = self.llm.metadata.get("tokenizer.chat_template")
        if not source:
            raise ModelError(
                f"{self.path} has no tokenizer.chat_template; chat prompts need a GGUF "
                "exported from a model with a chat template"
            )
        try:
            return _sandboxed_template(source)
        except jinja2.TemplateError as exc:
            raise ModelError(f"the chat template of {self.path} does not compile: {exc}") from exc

    def _token_text(self, token: int) -> str:
        import llama_cpp

        return llama_cpp.llama_vocab_get_text(self._vocab, token).decode() if token >= 0 else ""

    def _checked(self, token_ids: Sequence[int]) -> list[int]:
        ids = [int(t) for t in token_ids]
        if not ids:
            raise ValueError("no tokens to evaluate")
        if len(ids) > self.n_ctx:
            raise EdgeftError(
                f"{len(ids)} tokens do not fit the {self.n_ctx}-token context of {self.path}; "
                "load it with a larger n_ctx"
            )
        return ids

    def _reset(self) -> None:
        import llama_cpp

        llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(self.llm.ctx), True)
        self._n_past = 0
        self._next_token = None

    def _eval(self, chunk: Sequence[int], *, every_position: bool) -> np.ndarray:
        """Append ``chunk`` (at most n_batch tokens) to the KV cache and return llama.cpp's
        logits buffer: [len(chunk), vocab] with ``every_position``, else [1, vocab] for the
        last token. The array views llama.cpp memory that the next decode overwrites."""
        import llama_cpp

        batch = self._batch
        batch.n_tokens = len(chunk)
        for i, token in enumerate(chunk):
            batch.token[i] = token
            batch.pos[i] = self._n_past + i
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = 0
            batch.logits[i] = every_position
        batch.logits[len(chunk) - 1] = True
        status = llama_cpp.llama_decode(self.llm.ctx, batch)
        if status != 0:
            raise RuntimeError(f"llama_decode failed with status {status} on {self.path}")
        self._n_past += len(chunk)
        rows = len(chunk) if every_position else 1
        return np.ctypeslib.as_array(
            llama_cpp.llama_get_logits(self.llm.ctx), shape=(rows, self.n_vocab)
        )


def _sandboxed_template(source: str):
    """Compile a chat template in a sandbox with the globals and filters transformers gives
    templates, so GGUF-embedded templates render exactly as ``apply_chat_template`` does."""
    import json
    from datetime import datetime

    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str):
        raise jinja2.TemplateError(message)

    def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(
            value,
            ensure_ascii=ensure_ascii,
            indent=indent,
            separators=separators,
            sort_keys=sort_keys,
        )

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(source)


def _check_gguf(path: Path) -> None:
    """Refuse a file that is not a GGUF, or whose header does not fit the file, before
    llama.cpp reads it: the header is read by edgeft's bounds-checked reader first."""
    from edgeft.gguf_file import read_gguf

    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as exc:
        raise ModelError(f"cannot read {path} ({exc.strerror}); pass a .gguf model file") from exc
    if magic != b"GGUF":
        raise ModelError(f"{path} is not a GGUF file; pass a .gguf model file")
    try:
        read_gguf(path)
    except ModelError as exc:
        reason = str(exc).removeprefix(f"{path}: ")
        raise ModelError(f"cannot read {path}: {reason}") from None


def _trained_context_length(path: Path) -> int:
    """``<arch>.context_length`` of a GGUF, read by a vocabulary-only load (no weights, no
    context): Llama allocates its KV cache as it is constructed, so n_ctx must be known first."""
    import llama_cpp

    quiet_logs()
    params = llama_cpp.llama_model_default_params()
    params.vocab_only = True
    model = llama_cpp.llama_model_load_from_file(str(path).encode("utf-8"), params)
    if model is None:
        reason = take_log_errors() or "the GGUF is damaged or too new"
        raise ModelError(f"llama.cpp cannot read {path}: {reason}")
    buffer = ctypes.create_string_buffer(256)

    def meta(key: str) -> str | None:
        n = llama_cpp.llama_model_meta_val_str(model, key.encode(), buffer, len(buffer))
        return buffer.value.decode("utf-8") if n >= 0 else None

    try:
        value = meta(f"{meta('general.architecture')}.context_length")
    finally:
        llama_cpp.llama_model_free(model)
    return int(value) if value else MAX_DEFAULT_CTX


def _check_lora_base(lora_path: Path, artifact: Path) -> None:
    """Refuse an edgeft LoRA GGUF over a base other than the one it was trained on (llama.cpp
    itself only checks the architecture and tensor shapes)."""
    from edgeft.formats import check_base
    from edgeft.gguf_file import gguf_metadata

    check_base(gguf_metadata(lora_path), gguf_metadata(artifact), lora_path, artifact)


def _lora_error(lora_path: Path, artifact: Path) -> ModelError:
    return ModelError(
        f"LoRA adapter {lora_path} does not apply to {artifact}; pass a GGUF LoRA adapter "
        "exported from an adapter trained on this base model"
    )


class LlamaCppRuntime:
    name = "llama.cpp"

    def available(self) -> bool:
        try:
            import llama_cpp  # noqa: F401
        except ImportError:
            return False
        return True

    def load(
        self,
        artifact: Path,
        *,
        threads: int,
        lora_path: Path | None = None,
        n_ctx: int | None = None,
        vocab_only: bool = False,
    ) -> LlamaCppSession:
        """Load a GGUF file for CPU inference, optionally with a GGUF LoRA adapter applied.

        ``n_ctx`` defaults to the model's trained context length, at most
        :data:`MAX_DEFAULT_CTX` tokens. ``vocab_only``: the vocabulary and metadata without the
        weights, for tokenizing and chat rendering (an 8B file's weights are 16 GB).

        Raises:
            ModelError: the file is missing or not a GGUF llama.cpp can load, or the adapter
                cannot be applied to it.
        """
        from llama_cpp import Llama

        artifact = Path(artifact)
        _check_gguf(artifact)
        quiet_logs()
        take_log_errors()
        if lora_path is not None and not Path(lora_path).is_file():
            raise ModelError(f"LoRA adapter {lora_path} not found; pass a .gguf adapter file")
        if lora_path is not None:
            _check_lora_base(Path(lora_path), artifact)
        if vocab_only:
            n_ctx = 64
        elif n_ctx is None:
            n_ctx = min(_trained_context_length(artifact), MAX_DEFAULT_CTX)
        try:
            llm = Llama(
                model_path=str(artifact),
                n_ctx=n_ctx,
                n_threads=threads,
                n_threads_batch=threads,
                n_gpu_layers=0,
                lora_path=None if lora_path is None else str(lora_path),
                vocab_only=vocab_only,
                verbose=False,
            )
        except ValueError as exc:  # Llama's model and context failures
            reason = take_log_errors() or str(exc)
            raise ModelError(
                f"llama.cpp cannot load {artifact} with n_ctx={n_ctx} ({reason}); check that "
                "this llama.cpp supports its architecture and that the file is complete"
            ) from exc
        except RuntimeError as exc:  # Llama's LoRA failures
            if lora_path is None:
                raise
            raise _lora_error(lora_path, artifact) from exc
        # llama-cpp-python 0.3.36 types the adapter as a pointer, so an adapter llama.cpp
        # rejected is a NULL pointer, not the None that Llama checks for, and is silently unused.
        if lora_path is not None and not llm._lora_adapter:
            llm.close()
            raise _lora_error(lora_path, artifact)
        return LlamaCppSession(llm, artifact)


RUNTIME = LlamaCppRuntime()
