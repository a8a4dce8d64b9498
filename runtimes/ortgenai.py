"""The onnxruntime-genai runtime: an ONNX export folder with its ``genai_config.json``, run on
the CPU by onnxruntime-genai's own generator loop.

Tokenization and chat rendering use onnxruntime-genai's tokenizer, not the Hugging Face one,
so any drift between the two shows up in the measured ids instead of being papered over.

What onnxruntime-genai 0.18 offers, and how this module uses it:

* threads: ``og.Config.overlay`` sets the decoder's session options (``intra_op_num_threads``)
  before the model loads; nothing is written to the folder.
* chat: ``og.Tokenizer.apply_chat_template`` renders the folder's chat template
  (``chat_template.jinja`` or tokenizer_config.json) and ``encode`` tokenizes the result.
* logits: after ``append_tokens``, ``get_output("logits")`` returns the graph's raw logits,
  every position for optimum graphs; ``get_logits`` would give the last position only.
* a generator that has produced an end token, or reached ``max_length``, is done: it cannot
  decode past it (0.18 fails inside the graph if asked to), so :meth:`decode_one` refuses.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from edgeft.errors import EdgeftError, ModelError
from edgeft.formats import GENAI_CONFIG
from edgeft.session import ADAPTERS, BATCH, MIN_NEW_TOKENS, chat_messages, generate

# A prompt is fed in pieces, as llama.cpp's batches feed it. onnxruntime-genai computes logits
# for every position of a piece (llama.cpp only for the last), so a piece's logits are bounded
# in bytes: smaller pieces lower the peak memory at the same prefill speed
# (benchmarks/README.md#onnx-int4-memory-at-the-same-context-as-llamacpp-cpu-2-threads); a 128k
# vocabulary's 512 logit rows alone are 262 MB.
PREFILL_LOGITS_BYTES = 32 << 20
PREFILL_CHUNK_RANGE = (64, 512)


def prefill_chunk(vocab_size: int) -> int:
    """Tokens per prefill piece: the largest power of two whose fp32 logits fit
    :data:`PREFILL_LOGITS_BYTES`, within :data:`PREFILL_CHUNK_RANGE`."""
    low, high = PREFILL_CHUNK_RANGE
    rows = max(1, PREFILL_LOGITS_BYTES // (4 * max(1, vocab_size)))
    return min(high, max(low, 1 << (rows.bit_length() - 1)))


class GenaiSession:
    """An onnxruntime-genai model and tokenizer; one generator holds the current sequence.

    ``min_new_tokens`` keeps the end tokens masked for that many steps after a prefill
    (onnxruntime-genai's ``min_length``), for timing a fixed number of decode steps: it
    cannot decode past an end token.
    """

    capabilities = frozenset({BATCH, ADAPTERS, MIN_NEW_TOKENS})

    def __init__(
        self,
        model,
        tokenizer,
        path: Path,
        eos_token_ids,
        n_ctx: int,
        vocab_size: int,
        *,
        model_file: str = "model.onnx",
        bos_token_id: int | None = None,
    ) -> None:
        self.bos_token_id = bos_token_id
        self.min_new_tokens = 0
        self.model_file = model_file
        self.prefill_chunk = prefill_chunk(vocab_size)
        self.model = model
        self.tokenizer = tokenizer
        self.path = path
        self.eos_token_ids = frozenset(eos_token_ids)
        self.n_ctx = n_ctx
        self._generator = None
        self._last: int | None = None
        self._adapters = None  # og.Adapters, made at the first adapter
        self.adapter: Path | None = None

    def set_adapter(self, adapter: Path | None) -> None:
        """Apply an ``.onnx_adapter`` file to the following generators (onnxruntime-genai's
        ``set_active_adapter``), or none. A file is read once and kept loaded, so switching
        back to it costs no read; a prefilled sequence is dropped.

        Raises:
            ModelError: the graph cannot take the file (see ``check_adapter``).
        """
        import onnxruntime_genai as og

        from edgeft.formats import check_adapter

        self.close()
        if adapter is None:
            self.adapter = None
            return
        adapter = Path(adapter).resolve()
        if self._adapters is None or str(adapter) not in self._loaded:
            check_adapter(adapter, self.path / self.model_file)
            if self._adapters is None:
                self._adapters, self._loaded = og.Adapters(self.model), set()
            self._adapters.load(str(adapter), str(adapter))
            self._loaded.add(str(adapter))
        self.adapter = adapter

    def tokenize(self, text: str, *, chat: bool = False, context: Sequence[dict] = ()) -> list[int]:
        """Token ids from onnxruntime-genai's tokenizer; with ``chat``, its own rendering of
        the chat template: the ``context`` turns, the user turn and the generation prompt."""
        if chat:
            messages = json.dumps(chat_messages(text, context))
            try:
                text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
            except RuntimeError as exc:
                raise ModelError(
                    f"onnxruntime-genai cannot render the chat template of {self.path} ({exc}); "
                    "export a model that has a chat template"
                ) from exc
        return self.tokenizer.encode(text).tolist()

    def detokenize(self, token_ids: Sequence[int]) -> str:
        """Text of ``token_ids``; onnxruntime-genai's decode skips special tokens."""
        return self.tokenizer.decode(np.asarray(list(token_ids), dtype=np.int32))

    def logits(self, token_ids: Sequence[int]) -> np.ndarray:
        """Logits at every position, [n, vocab] float32, from a fresh generator (an empty KV
        cache). A prefilled sequence is left as it was."""
        ids = self._checked(token_ids)
        generator = self._generator_for(ids)
        logits = generator.get_output("logits")
        if logits.ndim != 3 or logits.shape[1] != len(ids):
            raise NotImplementedError(
                f"{self.path} returns logits of shape {list(logits.shape)}, not one row per "
                "token; its graph keeps only the last position, use the onnxruntime runtime"
            )
        return logits[0].astype(np.float32, copy=False)

    def prefill(self, token_ids: Sequence[int]) -> None:
        """Start a new generator on the prompt, fed :func:`prefill_chunk` tokens at a time;
        the next :meth:`decode_one` continues it."""
        self._generator = self._last = None
        self._generator = self._generator_for(self._checked(token_ids), chunk=self.prefill_chunk)

    def decode_one(self) -> int:
        """Greedy next token, extending the sequence by one position.

        onnxruntime-genai picks from the logits it already has and runs the model on the
        picked token at the next call, so each call costs one forward, like the other runtimes.
        """
        generator = self._generator
        if generator is None:
            raise RuntimeError("decode_one() before prefill()")
        if generator.is_done():
            if self._last in self.eos_token_ids:
                raise EdgeftError(
                    f"onnxruntime-genai ended the sequence at end token {self._last}; it "
                    "cannot decode past it: stop at eos_token_ids"
                )
            raise EdgeftError(
                f"the {self.n_ctx}-token context of {self.path} is full; "
                "send a shorter prompt or generate fewer tokens"
            )
        generator.generate_next_token()
        self._last = int(generator.get_next_tokens()[0])
        return self._last

    def generate_batch(
        self, prompts: Sequence[Sequence[int]], max_new_tokens: int
    ) -> list[list[int]]:
        """Greedy generation for each prompt in turn, each cut at its first end-of-turn token:
        the same interface as the torch session's batched generation."""
        return [generate(self, prompt, max_new_tokens) for prompt in prompts]

    def close(self) -> None:
        self._generator = self._last = None

    def _checked(self, token_ids: Sequence[int]) -> list[int]:
        ids = [int(t) for t in token_ids]
        if not ids:
            raise ValueError("no tokens to evaluate")
        if len(ids) >= self.n_ctx:
            raise EdgeftError(
                f"{len(ids)} tokens leave no room in the {self.n_ctx}-token context of "
                f"{self.path}; send a shorter prompt"
            )
        return ids

    def _generator_for(self, ids: list[int], chunk: int | None = None):
        """A greedy generator that has run ``ids`` (logits computed, nothing picked yet), in
        ``chunk``-token pieces when given (the logits are then the last piece's)."""
        import onnxruntime_genai as og

        params = og.GeneratorParams(self.model)
        params.set_search_options(
            do_sample=False,
            num_beams=1,
            max_length=self.n_ctx,
            min_length=min(len(ids) + self.min_new_tokens, self.n_ctx),
        )
        generator = og.Generator(self.model, params)
        if self.adapter is not None:
            generator.set_active_adapter(self._adapters, str(self.adapter))
        ids = np.asarray(ids, dtype=np.int32)
        step = chunk or len(ids)
        for start in range(0, len(ids), step):
            generator.append_tokens(ids[start : start + step])
        return generator


class GenaiRuntime:
    name = "onnxruntime-genai"

    def available(self) -> bool:
        try:
            import onnxruntime_genai  # noqa: F401
        except ImportError:
            return False
        return True

    def load(self, artifact: Path, *, threads: int, adapter: Path | None = None) -> GenaiSession:
        """Load an ONNX export folder (or a file inside it) that holds ``genai_config.json``,
        with ``threads`` intra-op threads on the CPU; with ``adapter``, that ``.onnx_adapter``
        file applied (a base exported with ``--adapter``).

        Raises:
            ModelError: the folder or its genai_config.json is missing or unreadable, or
                onnxruntime-genai cannot load the model it names.
        """
        import onnxruntime_genai as og

        artifact = Path(artifact)
        if not artifact.exists():
            raise ModelError(
                f"{artifact} not found; pass an ONNX export folder holding {GENAI_CONFIG}"
            )
        folder = artifact if artifact.is_dir() else artifact.parent
        source = folder / GENAI_CONFIG
        if not source.is_file():
            raise ModelError(
                f"{folder} has no {GENAI_CONFIG}; write it with "
                "edgeft.export.onnx.genai.write_genai_config"
            )
        try:
            genai = json.loads(source.read_text(encoding="utf-8"))
            eos = genai["model"]["eos_token_id"]
            bos = genai["model"].get("bos_token_id")
            n_ctx = int(genai["search"].get("max_length") or genai["model"]["context_length"])
            vocab_size = int(genai["model"].get("vocab_size") or 0)  # 0: the largest pieces
            model_file = str(genai["model"]["decoder"].get("filename") or "model.onnx")
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as exc:
            raise ModelError(
                f"{source} is not a usable genai config ({exc!r}); write it again"
            ) from exc
        _check_model_files(folder, source, genai)
        options = {"intra_op_num_threads": threads, "inter_op_num_threads": 1}
        try:
            config = og.Config(str(folder))
            config.overlay(json.dumps({"model": {"decoder": {"session_options": options}}}))
            model = og.Model(config)
            tokenizer = og.Tokenizer(model)
        except RuntimeError as exc:
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise ModelError(
                f"onnxruntime-genai cannot load {folder} ({reason}); check its "
                f"{GENAI_CONFIG} and model files"
            ) from exc
        eos = eos if isinstance(eos, list) else [eos]
        session = GenaiSession(
            model,
            tokenizer,
            folder,
            [int(e) for e in eos],
            n_ctx,
            vocab_size,
            model_file=model_file,
            bos_token_id=bos if isinstance(bos, int) else None,
        )
        if adapter is not None:
            session.set_adapter(adapter)
        return session


def _check_model_files(folder: Path, source: Path, genai: dict) -> None:
    """Every model file genai_config.json names, and the external data of each ONNX one, must
    lie inside the folder: checked before onnxruntime-genai opens any of them.

    Raises:
        ModelError: a file outside the folder or missing.
    """
    from edgeft.formats import external_data_path, genai_model_files
    from edgeft.runtimes.onnxrt import checked_graph

    model = genai.get("model")
    for name in genai_model_files(model if isinstance(model, dict) else {}, source):
        path = external_data_path(folder, name, source, "a model 'filename'")
        if path.suffix == ".onnx":
            checked_graph(path, GenaiRuntime.name)


RUNTIME = GenaiRuntime()
