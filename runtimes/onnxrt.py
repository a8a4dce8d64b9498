"""The onnxruntime runtime: an ONNX export folder run on the CPU by onnxruntime itself.

The graph is optimum-onnx's decoder with a KV cache (``past_key_values.{i}.key/value`` in,
``present.{i}.key/value`` out). Tokenization and chat rendering use the Hugging Face tokenizer
saved beside it, exactly as the torch runtime does, so both see the same token ids.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from edgeft.errors import EdgeftError, ModelError
from edgeft.runtimes import generate

MODEL_FILE = "model.onnx"

_CACHE_INPUT = re.compile(r"past_key_values\.(\d+)\.(key|value)")
_NUMPY_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}


class OnnxSession:
    """An onnxruntime InferenceSession holding one sequence's KV cache as OrtValues.

    Each step binds the previous step's present outputs as this step's past inputs through
    IO binding, so the cache stays in onnxruntime's buffers: numpy only sees the token ids,
    the attention mask and one row of logits per step.
    """

    def __init__(self, session, tokenizer, path: Path, eos_token_ids, n_ctx: int | None) -> None:
        self.session = session
        self.tokenizer = tokenizer
        self.path = path
        self.eos_token_ids = frozenset(eos_token_ids)
        self.n_ctx = n_ctx
        inputs = {i.name: i for i in session.get_inputs()}
        outputs = {o.name for o in session.get_outputs()}
        # past input → present output, per layer and kind, in the graph's input order
        self._cache = {}
        for name in inputs:
            match = _CACHE_INPUT.fullmatch(name)
            if match:
                present = f"present.{match[1]}.{match[2]}"
                if present not in outputs:
                    raise ModelError(f"{path} has {name} but no {present} output; export it again")
                self._cache[name] = present
        self._empty_past = {name: _empty_cache(inputs[name], path) for name in self._cache}
        self._has_positions = "position_ids" in inputs
        self._past: dict | None = None
        self._n_past = 0
        self._next_token: int | None = None

    def tokenize(self, text: str, *, chat: bool = False) -> list[int]:
        if chat:
            return list(
                self.tokenizer.apply_chat_template(
                    [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True
                )
            )
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def detokenize(self, token_ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(token_ids), skip_special_tokens=True)

    def logits(self, token_ids: Sequence[int]) -> np.ndarray:
        """Logits at every position, [n, vocab] float32, from an empty KV cache. A prefilled
        cache is left as it was."""
        ids = self._checked(token_ids, 0)
        logits, _ = self._run(ids, self._empty_past, 0)
        return logits.numpy()[0].astype(np.float32, copy=False)

    def prefill(self, token_ids: Sequence[int]) -> None:
        """Run the prompt on an empty KV cache; the next :meth:`decode_one` continues it."""
        ids = self._checked(token_ids, 0)
        self._past = self._next_token = None
        logits, self._past = self._run(ids, self._empty_past, 0)
        self._n_past = len(ids)
        self._next_token = int(np.argmax(logits.numpy()[0, -1]))

    def decode_one(self) -> int:
        """Greedy next token, extending the KV cache by one position."""
        if self._next_token is None:
            raise RuntimeError("decode_one() before prefill()")
        token = self._next_token
        self._checked([token], self._n_past)
        logits, self._past = self._run([token], self._past, self._n_past)
        self._n_past += 1
        self._next_token = int(np.argmax(logits.numpy()[0, -1]))
        return token

    def generate_batch(
        self, prompts: Sequence[Sequence[int]], max_new_tokens: int
    ) -> list[list[int]]:
        """Greedy generation for each prompt in turn, each cut at its first end-of-turn token:
        the same interface as the torch session's batched generation."""
        return [generate(self, prompt, max_new_tokens) for prompt in prompts]

    def close(self) -> None:
        self._past = self._next_token = None
        self._n_past = 0

    def _checked(self, token_ids: Sequence[int], n_past: int) -> list[int]:
        ids = [int(t) for t in token_ids]
        if not ids:
            raise ValueError("no tokens to evaluate")
        if self.n_ctx is not None and n_past + len(ids) > self.n_ctx:
            if n_past:
                raise EdgeftError(
                    f"the {self.n_ctx}-token context of {self.path} is full; "
                    "send a shorter prompt or generate fewer tokens"
                )
            raise EdgeftError(
                f"{len(ids)} tokens exceed the {self.n_ctx}-token context of {self.path}; "
                "send a shorter prompt"
            )
        return ids

    def _run(self, ids: list[int], past: dict, n_past: int) -> tuple:
        """One forward of ``ids`` after ``n_past`` cached positions: the logits OrtValue
        [1, len(ids), vocab] and the present OrtValues, keyed by the past inputs they feed."""
        from onnxruntime import OrtValue

        total = n_past + len(ids)
        binding = self.session.io_binding()
        feeds = {
            "input_ids": np.array([ids], dtype=np.int64),
            "attention_mask": np.ones((1, total), dtype=np.int64),
        }
        if self._has_positions:
            feeds["position_ids"] = np.arange(n_past, total, dtype=np.int64)[None]
        for name, array in feeds.items():
            binding.bind_ortvalue_input(name, OrtValue.ortvalue_from_numpy(array))
        for name, value in past.items():
            binding.bind_ortvalue_input(name, value)
        binding.bind_output("logits", "cpu")
        for present in self._cache.values():
            binding.bind_output(present, "cpu")
        self.session.run_with_iobinding(binding)
        logits, *presents = binding.get_outputs()
        return logits, dict(zip(self._cache, presents, strict=True))


def _empty_cache(arg, path: Path):
    """A [1, kv_heads, 0, head_dim] OrtValue in the cache input's own dtype (fp16 graphs have
    fp16 caches). A symbolic head size is read from config.json."""
    from onnxruntime import OrtValue

    dtype = _NUMPY_TYPES.get(arg.type)
    heads, head_dim = arg.shape[1], arg.shape[3]
    if not isinstance(head_dim, int) and (path.parent / "config.json").is_file():
        config = _read_json(path.parent / "config.json")
        head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    if dtype is None or not isinstance(heads, int) or not isinstance(head_dim, int):
        raise ModelError(
            f"{path} has cache input {arg.name} of {arg.type} {arg.shape}; edgeft runs float "
            "caches shaped [batch, kv_heads, past, head_dim]: export it with optimum"
        )
    return OrtValue.ortvalue_from_numpy(np.zeros((1, heads, 0, head_dim), dtype=dtype))


def _eos_token_ids(folder: Path, tokenizer) -> list[int]:
    """generation_config.json's eos ids (config.json's without it) plus the tokenizer's eos:
    what the torch runtime stops at."""
    source = folder / "generation_config.json"
    if not source.is_file():
        source = folder / "config.json"
    eos = _read_json(source).get("eos_token_id")
    eos = eos if isinstance(eos, list) else [eos]
    return [int(e) for e in [*eos, tokenizer.eos_token_id] if e is not None]


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelError(f"{path} is not valid JSON ({exc}); export the folder again") from exc


def _model_path(artifact: Path) -> Path:
    """``model.onnx`` of an export folder, or the ``.onnx`` file passed itself."""
    if not artifact.exists():
        raise ModelError(f"{artifact} not found; pass an ONNX export folder holding {MODEL_FILE}")
    model = artifact if artifact.is_file() else artifact / MODEL_FILE
    if not model.is_file():
        raise ModelError(
            f"{artifact} has no {MODEL_FILE}; pass a folder written by edgeft's ONNX export"
        )
    return model


class OnnxRuntime:
    name = "onnxruntime"

    def available(self) -> bool:
        try:
            import onnxruntime  # noqa: F401
            import transformers  # noqa: F401
        except ImportError:
            return False
        return True

    def load(self, artifact: Path, *, threads: int) -> OnnxSession:
        """Load an ONNX export folder (or the ``model.onnx`` inside it) for CPU inference,
        with the Hugging Face tokenizer saved beside the graph.

        Raises:
            ModelError: the folder, graph or tokenizer is missing or unreadable, or the graph
                was exported without a KV cache.
        """
        import onnxruntime as ort
        from onnxruntime.capi import onnxruntime_pybind11_state as state
        from transformers import AutoTokenizer

        model = _model_path(Path(artifact))
        folder = model.parent
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3  # errors only
        load_errors = (
            state.Fail,
            state.InvalidArgument,
            state.InvalidGraph,
            state.InvalidProtobuf,
            state.NoSuchFile,
            state.NotImplemented,
            state.RuntimeException,
        )
        try:
            session = ort.InferenceSession(
                str(model), sess_options=options, providers=["CPUExecutionProvider"]
            )
        except load_errors as exc:
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise ModelError(
                f"onnxruntime cannot load {model} ({reason}); export it again with edgeft"
            ) from exc
        if not any(_CACHE_INPUT.fullmatch(i.name) for i in session.get_inputs()):
            raise ModelError(
                f"{model} was exported without a KV cache (no past_key_values inputs); export it "
                "with task text-generation-with-past"
            )
        if not (folder / "tokenizer_config.json").is_file():
            raise ModelError(
                f"{folder} has no tokenizer_config.json; export the folder again with its tokenizer"
            )
        try:
            tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
        except (OSError, ValueError) as exc:
            raise ModelError(
                f"cannot load the tokenizer saved in {folder} ({exc}); export the folder again"
            ) from exc
        n_ctx = _read_json(folder / "config.json").get("max_position_embeddings")
        return OnnxSession(session, tokenizer, model, _eos_token_ids(folder, tokenizer), n_ctx)


RUNTIME = OnnxRuntime()
