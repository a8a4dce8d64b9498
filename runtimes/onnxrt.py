"""The onnxruntime runtime: an ONNX export folder run on the CPU by onnxruntime itself.

The graph is a decoder with a KV cache (``past_key_values.{i}.key/value`` in,
``present.{i}.key/value`` out): optimum-onnx's trace, whose present cache is the past one with
the new positions concatenated, or edgeft's fused graph, whose GroupQueryAttention writes the
new positions into the past buffer itself when present and past are the same memory. For the
latter the session keeps one preallocated buffer per cache tensor, as onnxruntime-genai does
with ``past_present_share_buffer``, so a decode step copies nothing but one position.
Tokenization and chat rendering use the Hugging Face tokenizer saved beside it, exactly as the
torch runtime does, so both see the same token ids.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from edgeft.architectures import attention_shape
from edgeft.errors import EdgeftError, ModelError
from edgeft.formats import ONNX_MODEL_FILE
from edgeft.runtimes.hf import HFTokenizing, eos_token_ids, load_tokenizer, read_json
from edgeft.session import ADAPTERS, BATCH, generate

MODEL_FILE = ONNX_MODEL_FILE

_CACHE_INPUT = re.compile(r"past_key_values\.(\d+)\.(key|value)")
_NUMPY_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int8)": np.int8}
# Positions a shared cache buffer holds at first; it doubles when full, up to the context.
_MIN_CAPACITY = 256


class OnnxSession(HFTokenizing):
    """An onnxruntime InferenceSession holding one sequence's KV cache as OrtValues.

    Each step binds the previous step's present outputs as this step's past inputs through
    IO binding, so the cache stays in onnxruntime's buffers: numpy only sees the token ids,
    the attention mask and one row of logits per step.

    With ``share_buffer`` (a GroupQueryAttention graph) prefill and decode instead bind one
    [1, kv_heads, capacity, head_dim] buffer per cache tensor as both the past input and the
    present output; the attention mask's length tells the graph how many positions are valid.
    """

    capabilities = frozenset({BATCH, ADAPTERS})

    def __init__(
        self,
        session,
        tokenizer,
        path: Path,
        eos_token_ids,
        n_ctx: int | None,
        *,
        share_buffer: bool = False,
    ) -> None:
        self.session = session
        self.tokenizer = tokenizer
        self.path = path
        self.eos_token_ids = frozenset(eos_token_ids)
        self.n_ctx = n_ctx
        inputs = {i.name: i for i in session.get_inputs()}
        outputs = {o.name: o for o in session.get_outputs()}
        # past input → present output, per layer and kind, in the graph's input order
        self._cache = {}
        for name in inputs:
            match = _CACHE_INPUT.fullmatch(name)
            if match:
                present = f"present.{match[1]}.{match[2]}"
                if present not in outputs:
                    raise ModelError(f"{path} has {name} but no {present} output; export it again")
                self._cache[name] = present
        self._layout = {name: _cache_layout(inputs[name], path) for name in self._cache}
        self._empty_past = {name: _ortvalue(_zeros(*self._layout[name], 0)) for name in self._cache}
        self._has_positions = "position_ids" in inputs
        logits = outputs.get("logits")
        # dtype and vocab size of the logits, which the shared mode writes into numpy directly
        self._logits_layout = (
            (_NUMPY_TYPES[logits.type], logits.shape[-1])
            if logits is not None
            and logits.type in _NUMPY_TYPES
            and isinstance(logits.shape[-1], int)
            else None
        )
        self.share_buffer = share_buffer and self._logits_layout is not None
        # shared mode: past input → the buffer bound as its past and present, and the binding
        # that holds them across steps
        self._buffers: dict[str, np.ndarray] = {}
        self._binding = None
        self._past: dict | None = None
        self._n_past = 0
        self._next_token: int | None = None
        self._adapter_values: dict = {}  # LoRA input → OrtValue of the active adapter
        self._adapter_files: dict[Path, tuple] = {}  # file → (its reader, its values)
        self.adapter: Path | None = None

    def set_adapter(self, adapter: Path | None) -> None:
        """Apply an ``.onnx_adapter`` file (:mod:`edgeft.export.onnx.lora`) to the following
        runs, or none; the KV cache of a prefilled sequence is dropped.

        Its tensors are bound as the graph's LoRA inputs: onnxruntime 1.32 applies a
        ``RunOptions`` active adapter to ``run`` but not to ``run_with_iobinding``, which
        this session uses.

        Raises:
            ModelError: the graph cannot take the file (see ``check_adapter``).
        """
        import onnxruntime as ort

        from edgeft.formats import check_adapter

        self.close()
        if adapter is None:
            self._adapter_values, self.adapter = {}, None
            return
        adapter = Path(adapter)
        if adapter not in self._adapter_files:  # each file is checked and read once
            check_adapter(adapter, self.path)
            reader = ort.AdapterFormat.read_adapter(str(adapter))
            # the reader holds the memory its values may point into: it stays with them
            self._adapter_files[adapter] = (reader, dict(reader.get_parameters()))
        self._adapter_values, self.adapter = self._adapter_files[adapter][1], adapter

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
        if self.share_buffer:
            last = self._run_shared(ids, 0)[0, -1]
        else:
            logits, self._past = self._run(ids, self._empty_past, 0)
            last = logits.numpy()[0, -1]
        self._n_past = len(ids)
        self._next_token = int(np.argmax(last))

    def decode_one(self) -> int:
        """Greedy next token, extending the KV cache by one position."""
        if self._next_token is None:
            raise RuntimeError("decode_one() before prefill()")
        token = self._next_token
        self._checked([token], self._n_past)
        if self.share_buffer:
            last = self._run_shared([token], self._n_past)[0, -1]
        else:
            logits, self._past = self._run([token], self._past, self._n_past)
            last = logits.numpy()[0, -1]
        self._n_past += 1
        self._next_token = int(np.argmax(last))
        return token

    def generate_batch(
        self, prompts: Sequence[Sequence[int]], max_new_tokens: int
    ) -> list[list[int]]:
        """Greedy generation for each prompt in turn, each cut at its first end-of-turn token:
        the same interface as the torch session's batched generation."""
        return [generate(self, prompt, max_new_tokens) for prompt in prompts]

    def close(self) -> None:
        self._past = self._next_token = None
        self._buffers, self._binding = {}, None
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
        binding = self.session.io_binding()
        feeds = self._token_feeds(ids, n_past)  # bound by reference: alive until the run ends
        for name, array in feeds.items():
            binding.bind_ortvalue_input(name, _ortvalue(array))
        for name, value in (*past.items(), *self._adapter_values.items()):
            binding.bind_ortvalue_input(name, value)
        binding.bind_output("logits", "cpu")
        for present in self._cache.values():
            binding.bind_output(present, "cpu")
        self.session.run_with_iobinding(binding)
        logits, *presents = binding.get_outputs()
        return logits, dict(zip(self._cache, presents, strict=True))

    def _run_shared(self, ids: list[int], n_past: int) -> np.ndarray:
        """One forward of ``ids`` after the ``n_past`` positions already in the shared buffers,
        which it extends in place: the logits [1, len(ids), vocab], written by onnxruntime into
        a numpy array.

        GroupQueryAttention takes past and present to share memory when their data pointers
        are equal; it then writes only the new positions, at ``n_past`` (``seqlens_k`` + 1 −
        ``len(ids)``, from the mask), and attends to the first ``n_past + len(ids)``. The
        present output has the past buffer's length, so binding the same OrtValue fits. The
        cache stays bound from step to step; each step rebinds the tokens, mask and logits."""
        self._reserve(n_past + len(ids), n_past)
        binding = self._binding
        feeds = self._token_feeds(ids, n_past)  # bound by reference: alive until the run ends
        for name, array in feeds.items():
            binding.bind_ortvalue_input(name, _ortvalue(array))
        dtype, vocab = self._logits_layout
        logits = np.empty((1, len(ids), vocab), dtype=dtype)
        binding.bind_ortvalue_output("logits", _ortvalue(logits))
        self.session.run_with_iobinding(binding)
        return logits

    def _token_feeds(self, ids: list[int], n_past: int) -> dict[str, np.ndarray]:
        """The token ids, an all-ones attention mask over the ``n_past + len(ids)`` positions
        and, for graphs that take them, the positions."""
        total = n_past + len(ids)
        feeds = {
            "input_ids": np.array([ids], dtype=np.int64),
            "attention_mask": np.ones((1, total), dtype=np.int64),
        }
        if self._has_positions:
            feeds["position_ids"] = np.arange(n_past, total, dtype=np.int64)[None]
        return feeds

    def _reserve(self, total: int, n_past: int) -> None:
        """Make the shared buffers hold ``total`` positions, keeping the first ``n_past``.

        They start at 256 positions and double, up to the context length, rather than being
        allocated at the full context up front: at 8k positions a fp32 cache of even a 135M
        model takes ~380 MB."""
        capacity = next(iter(self._buffers.values())).shape[2] if self._buffers else 0
        if total <= capacity:
            return
        grown = max(total, 2 * capacity, _MIN_CAPACITY)
        if self.n_ctx is not None:
            grown = max(total, min(grown, self.n_ctx))
        buffers = {}
        binding = self.session.io_binding()
        for name, layout in self._layout.items():
            buffers[name] = _zeros(*layout, grown)
            if n_past:
                buffers[name][:, :, :n_past] = self._buffers[name][:, :, :n_past]
            value = _ortvalue(buffers[name])
            binding.bind_ortvalue_input(name, value)
            binding.bind_ortvalue_output(self._cache[name], value)
        for name, value in self._adapter_values.items():
            binding.bind_ortvalue_input(name, value)
        self._buffers, self._binding = buffers, binding


def _cache_layout(arg, path: Path) -> tuple:
    """dtype, kv_heads and head_dim of a cache input: its own dtype (fp16 graphs have fp16
    caches), a symbolic head size read from config.json."""
    dtype = _NUMPY_TYPES.get(arg.type)
    heads, head_dim = arg.shape[1], arg.shape[3]
    if not isinstance(head_dim, int) and (path.parent / "config.json").is_file():
        config = read_json(path.parent / "config.json")
        head_dim = attention_shape(config).head_dim
    if dtype is None or not isinstance(heads, int) or not isinstance(head_dim, int):
        raise ModelError(
            f"{path} has cache input {arg.name} of {arg.type} {arg.shape}; edgeft runs float "
            "caches shaped [batch, kv_heads, past, head_dim]: export it with optimum"
        )
    return dtype, heads, head_dim


def _zeros(dtype, heads: int, head_dim: int, length: int) -> np.ndarray:
    return np.zeros((1, heads, length, head_dim), dtype=dtype)


def _ortvalue(array: np.ndarray):
    """An OrtValue over ``array``'s own memory. The Python OrtValue keeps the array alive; a
    binding it is bound to does not."""
    from onnxruntime import OrtValue

    return OrtValue.ortvalue_from_numpy(array)


def _shares_buffer(model: Path, proto=None) -> bool:
    """Whether the graph's attention is GroupQueryAttention, which can write each step's
    positions into a preallocated past buffer. The graph is read without its weights' external
    data (or ``proto``, already read so); without the onnx package, genai_config.json's
    ``past_present_share_buffer`` answers when it describes this graph."""
    if proto is not None:
        return any(node.op_type == "GroupQueryAttention" for node in proto.graph.node)
    try:
        import onnx
    except ImportError:
        try:
            genai = read_json(model.parent / "genai_config.json")
        except ModelError:
            return False
        if genai.get("model", {}).get("decoder", {}).get("filename") != model.name:
            return False
        return bool(genai.get("search", {}).get("past_present_share_buffer"))
    from google.protobuf.message import DecodeError

    try:
        graph = onnx.load(str(model), load_external_data=False).graph
    except (DecodeError, OSError, ValueError):  # e.g. an ORT-format file: run it unshared
        return False
    return any(node.op_type == "GroupQueryAttention" for node in graph.node)


def checked_graph(model: Path, runtime: str):
    """``model`` read without its external data, every external-data location checked to be a
    file inside its folder, before a runtime lets onnxruntime read it; None when it is not a
    protobuf graph at all (onnxruntime then refuses it with its own message).

    Raises:
        ModelError: an initializer's external data points outside the folder or is missing,
            or the onnx package (needed for the check) is not installed.
    """
    try:
        import onnx
        from google.protobuf.message import DecodeError
    except ImportError as exc:
        raise ModelError(
            f"the {runtime} runtime checks where a model's external data lies with the onnx "
            "package: pip install 'edgeft[onnx]'"
        ) from exc
    from edgeft.formats import check_external_data

    try:
        proto = onnx.load(str(model), load_external_data=False)
    except (DecodeError, OSError, ValueError):
        return None
    check_external_data(model.parent, model.name, proto)
    return proto


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

    def load(self, artifact: Path, *, threads: int, adapter: Path | None = None) -> OnnxSession:
        """Load an ONNX export folder (or the ``model.onnx`` inside it) for CPU inference,
        with the Hugging Face tokenizer saved beside the graph; with ``adapter``, that
        ``.onnx_adapter`` file applied (a base exported with ``--adapter``).

        Raises:
            ModelError: the folder, graph or tokenizer is missing or unreadable, or the graph
                was exported without a KV cache.
        """
        import onnxruntime as ort
        from onnxruntime.capi import onnxruntime_pybind11_state as state

        model = _model_path(Path(artifact))
        folder = model.parent
        proto = checked_graph(model, self.name)
        share_buffer = _shares_buffer(model, proto)
        del proto  # the graph's inline weights: not held while onnxruntime loads its own copy
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
        tokenizer = load_tokenizer(folder)
        n_ctx = read_json(folder / "config.json").get("max_position_embeddings")
        loaded = OnnxSession(
            session,
            tokenizer,
            model,
            eos_token_ids(folder, tokenizer),
            n_ctx,
            share_buffer=share_buffer,
        )
        if adapter is not None:
            loaded.set_adapter(adapter)
        return loaded


RUNTIME = OnnxRuntime()
