"""A Hugging Face causal LM whose weights stay on disk: memory bounded by one layer.

:func:`streamed_model` builds the model's modules with empty (``meta``) weights and reads
each decoder layer's weights from the checkpoint into fp32 just before the layer runs, dropping
them after. The embedding reads only the rows looked up, and the output projection runs over
the vocabulary in chunks. A forward pass therefore holds one layer in fp32, the activations and
the logits, whatever the model's size, at the cost of reading the weights again on every pass.

It computes what transformers' own modules compute (the modules are transformers'), so its
logits equal the fully loaded fp32 model's. Weights can be changed on the way in (``weights``:
merge's LoRA deltas, QLoRA's NF4 round trip) and LoRA adapters applied unmerged (``lora``),
which is how merge's parity check measures models larger than memory.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from edgeft.architectures import head_is_table
from edgeft.errors import ModelError
from edgeft.hfcompat import model_config
from edgeft.parity import ParityAccumulator
from edgeft.weights import (
    StoredTensor,
    checkpoint_params,
    read_f32,
    read_row_range,
    read_rows,
    safetensors_index,
)

# Vocabulary rows of the output projection materialized at once (16k × 4096 fp32 = 256 MiB).
HEAD_CHUNK_ROWS = 16384
# Logits held at once when rows are batched ([rows, length, vocab] fp32).
LOGITS_BUDGET_BYTES = 256 << 20
# A checkpoint is measured fully loaded when its fp32 weights take at most this share of
# the machine's memory, and streamed layer by layer above it (EDGEFT_STREAM=always|never
# overrides).
RESIDENT_SHARE = 0.25
# GPTQ with norm tuning holds more than the model: the model being rounded, the checkpoint
# it distils from, and backpropagation's activations over a vocabulary-wide output. A
# Llama-3.2-1B shape (5 GB in fp32) peaked at 18.4 GB loaded whole; the calibration loads a
# model whole only when its fp32 weights take at most this share (about half of memory at
# that ratio).
CALIBRATION_RESIDENT_SHARE = 0.125

# (checkpoint name, module holding it, fp32 values) → the values to use
WeightHook = Callable[[str, object, object], object]


@dataclass(frozen=True)
class LoRA:
    """One adapted Linear: ``y = W x + scale · B (A x)``, as peft computes it unmerged."""

    a: object  # torch.Tensor [r, in]
    b: object  # torch.Tensor [out, r]
    scale: float


def total_memory_bytes() -> int:
    """This machine's physical memory (cgroup limits aside)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # not a POSIX system: assume a small one
        return 8 << 30


def should_stream(model_dir: Path, share: float = RESIDENT_SHARE) -> bool:
    """Whether measuring ``model_dir`` in fp32 should stream its layers: its fp32 weights take
    more than ``share`` of this machine's memory. ``EDGEFT_STREAM=always`` or ``never``
    decides instead."""
    choice = os.environ.get("EDGEFT_STREAM", "auto").lower()
    if choice in ("always", "never"):
        return choice == "always"
    files = list(Path(model_dir).glob("*.safetensors"))
    if not files:
        return False
    return checkpoint_params(model_dir) * 4 > share * total_memory_bytes()


def streamed_model(
    model_dir: Path,
    *,
    weights: WeightHook | None = None,
    lora: Mapping[str, LoRA] | None = None,
):
    """``model_dir``'s causal LM with its weights left on disk until a layer runs.

    Args:
        model_dir: a checkpoint with ``config.json`` and safetensors weights.
        weights: called with each weight's checkpoint name, the module that holds it and its
            fp32 values as it is read;
            returns the values to use (default: as stored). The embedding table and the
            output projection are always used as stored.
        lora: module name → unmerged LoRA applied on top of that Linear's output.

    Returns:
        A transformers model in eval mode. Forward passes work (with a KV cache too);
        ``generate`` and ``.device`` do not (its parameters are on the ``meta`` device).

    Raises:
        ModelError: a weight the model needs is not in the checkpoint, or shapes differ.
    """
    import torch
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    model_dir = Path(model_dir)
    index = safetensors_index(model_dir)
    config = AutoConfig.from_pretrained(model_dir, trust_remote_code=False)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.eval()
    modules = dict(model.named_modules())
    embedding = model.get_input_embeddings()
    head = model.get_output_embeddings()
    embed_name = _stored_name(index, _module_name(modules, embedding) + ".weight", model_dir)
    read = _reader(index, modules, weights)

    for name, module in _units(model, (embedding, head)):
        params = [f"{name}.{p}" if name else p for p, _ in module.named_parameters()]
        for full in params:
            stored = index.get(full)
            if stored is None:
                raise ModelError(f"{model_dir}: weight {full} is missing from the checkpoint")
            expected = tuple(_param(modules, full).shape)
            if tuple(stored.shape) != expected:
                raise ModelError(
                    f"{model_dir}: weight {full} has shape {tuple(stored.shape)}, "
                    f"the config says {expected}"
                )
        materialize, release = _materialize(modules, params, read), _release(modules, params)
        module.register_forward_pre_hook(materialize)
        module.register_forward_hook(release)
        module._edgeft_stream = (materialize, release)

    embedding.register_forward_pre_hook(_sparse_lookup(index[embed_name]))
    embedding.register_forward_hook(_drop_weight(embedding))
    head_name = _module_name(modules, head) + ".weight"
    # Tied, the output projection is the embedding table even where the checkpoint also
    # stores an lm_head.weight (transformers ignores it, and so does the GGUF converter).
    tied = head_is_table(model_config(config), index, model_dir)
    stored_head = index[embed_name] if tied else index[head_name]
    if tuple(stored_head.shape) != tuple(head.weight.shape):
        raise ModelError(f"{model_dir}: output projection {stored_head.name} has the wrong shape")
    head.forward = _chunked_head(head, stored_head)

    for name, adapter in (lora or {}).items():
        target = modules.get(name)
        if not isinstance(target, torch.nn.Linear):
            raise ModelError(f"adapter module {name} is not a Linear layer of {model_dir}")
        target.register_forward_hook(_lora_hook(adapter))
    return model


@contextlib.contextmanager
def layer_progress(model, description: str, enabled: bool = True) -> Iterator[None]:
    """A progress bar over the decoder layers of every forward pass of ``model`` while the
    block runs (a streamed pass over a big model takes minutes)."""
    if not enabled:
        yield
        return
    from tqdm.auto import tqdm

    layers = list(_decoder_layers(model).values())
    bar = tqdm(total=0, desc=description, unit="layer")

    def tick(module, args):
        if bar.n % len(layers) == 0:
            bar.total += len(layers)
            bar.refresh()
        bar.update(1)

    handles = [layer.register_forward_pre_hook(tick) for layer in layers]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
        bar.close()


@contextlib.contextmanager
def held(module) -> Iterator[object]:
    """A streamed decoder layer (or other weight-holding unit) with its weights read once for
    the whole block: calls inside it neither read nor drop them, and changes made to them (a
    quantizer rounding them in place) last until the block ends. A module of a fully loaded
    model is yielded as it is."""
    stream = getattr(module, "_edgeft_stream", None)
    if stream is None:
        yield module
        return
    materialize, release = stream
    materialize(module, ())
    module._edgeft_held = True
    try:
        yield module
    finally:
        module._edgeft_held = False
        release(module, (), None)


class _Captured(Exception):
    """Raised by the last decoder layer's stand-in once every layer's inputs are recorded."""


def decoder_inputs(model, chunks: Sequence[Sequence[int]]) -> tuple[list, list[list[dict]]]:
    """What the decoder layers of ``model`` receive for each chunk of token ids, without
    running them: the first layer's hidden states per chunk, and each layer's keyword
    arguments per chunk (attention masks and rotary tables, which differ between sliding and
    full-attention layers).

    Every layer is swapped for a stand-in that records its call, so no layer's weights are read
    and no layer is computed; the last one stops the forward pass.

    Returns:
        ``(hidden [1, len, hidden] per chunk, kwargs[layer][chunk])``.
    """
    import torch

    _, layers = _layer_list(model)
    first: list = []
    kwargs: list[list[dict]] = [[] for _ in layers]

    class StandIn(torch.nn.Module):
        def __init__(self, index: int, layer) -> None:
            super().__init__()
            self.index = index
            self.attention_type = getattr(layer, "attention_type", None)

        def forward(self, hidden, *args, **kw):
            kw.pop("hidden_states", None)
            kwargs[self.index].append(kw)
            if self.index == 0:
                first.append(hidden)
            if self.index == len(layers) - 1:
                raise _Captured
            return hidden

    originals = list(layers)
    for i, layer in enumerate(originals):
        layers[i] = StandIn(i, layer)
    try:
        with torch.inference_mode():
            for chunk in chunks:
                with contextlib.suppress(_Captured):
                    model(input_ids=torch.tensor([list(chunk)]), use_cache=False)
    finally:
        for i, layer in enumerate(originals):
            layers[i] = layer
    return first, kwargs


def row_batches(rows: Sequence[Sequence[int]], vocab: int) -> list[list[int]]:
    """Row indices grouped so each group's ``[rows, length, vocab]`` fp32 logits fit
    :data:`LOGITS_BUDGET_BYTES` (one row at least), shortest rows first."""
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
    batches: list[list[int]] = []
    for i in order:
        width = len(rows[i])  # the longest so far: rows are sorted
        if batches and (len(batches[-1]) + 1) * width * vocab * 4 <= LOGITS_BUDGET_BYTES:
            batches[-1].append(i)
        else:
            batches.append([i])
    return batches


def batch_logits(model, rows: Sequence[Sequence[int]], batch: Sequence[int]) -> list:
    """``[len, vocab]`` fp32 logits of each row of ``batch``, computed in one right-padded
    forward pass (a streamed model reads its weights once per pass)."""
    import torch

    width = max(len(rows[i]) for i in batch)
    ids = torch.zeros((len(batch), width), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for j, i in enumerate(batch):
        ids[j, : len(rows[i])] = torch.tensor(list(rows[i]))
        mask[j, : len(rows[i])] = 1
    with torch.inference_mode():
        logits = model(input_ids=ids, attention_mask=mask).logits.float()
    return [logits[j, : len(rows[i])] for j, i in enumerate(batch)]


def streamed_parity(
    reference,
    candidate,
    rows: Sequence[Sequence[int]],
    *,
    noise: float = 0.0,
    progress: bool = False,
) -> ParityAccumulator:
    """Parity of ``candidate`` against ``reference`` on ``rows``, one batch of rows at a
    time: two batches' logits are held at once, never all rows'. ``noise``: see
    :func:`edgeft.parity.top1_off_ties`."""
    accumulator = ParityAccumulator(noise)
    vocab = reference.get_output_embeddings().weight.shape[0]
    for batch in row_batches(rows, vocab):
        with layer_progress(reference, "parity: reference", progress):
            expected = batch_logits(reference, rows, batch)
        with layer_progress(candidate, "parity: candidate", progress):
            computed = batch_logits(candidate, rows, batch)
        for ref, cand in zip(expected, computed, strict=True):
            accumulator.add(ref, cand)
    return accumulator


# -- hooks ----------------------------------------------------------------------------------


def _reader(index: Mapping[str, StoredTensor], modules, weights: WeightHook | None):
    import torch

    checked: set[str] = set()  # each weight is checked finite on its first read only

    def read(name: str):
        values = torch.from_numpy(read_f32(index[name], check=name not in checked))
        checked.add(name)
        return weights(name, modules[_split(name)[0]], values) if weights else values

    return read


def _units(model, skip) -> Iterator[tuple[str, object]]:
    """The modules weights are read for together: each decoder layer, and every other module
    that holds weights directly (final norm...), except the embedding and output projection."""

    skipped = {id(m) for m in skip}
    layers = _decoder_layers(model)
    taken = {id(m) for m in layers.values()}
    yield from layers.items()
    for name, module in model.named_modules():
        if id(module) in skipped or id(module) in taken:
            continue
        if any(_inside(name, layer) for layer in layers):
            continue
        if any(True for _ in module.parameters(recurse=False)):
            yield name, module


def _inside(name: str, parent: str) -> bool:
    return name.startswith(parent + ".")


def _layer_list(model) -> tuple[str, object]:
    """The name of ``model``'s decoder layers' ``ModuleList``, and the list."""
    import torch

    for name, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and name.endswith("layers"):
            return name, module
    raise ModelError(f"{type(model).__name__} has no decoder layer list to stream")


def _decoder_layers(model) -> dict[str, object]:
    name, layers = _layer_list(model)
    return {f"{name}.{i}": layer for i, layer in enumerate(layers)}


def _module_name(modules: Mapping[str, object], target) -> str:
    return next(name for name, module in modules.items() if module is target)


def _stored_name(index, name: str, model_dir: Path) -> str:
    if name not in index:
        raise ModelError(f"{model_dir}: weight {name} is missing from the checkpoint")
    return name


def _split(full: str) -> tuple[str, str]:
    module, _, attr = full.rpartition(".")
    return module, attr


def _param(modules, full: str):
    module, attr = _split(full)
    return getattr(modules[module], attr)


def _set(modules, full: str, value) -> None:
    import torch

    module, attr = _split(full)
    modules[module]._parameters[attr] = torch.nn.Parameter(value, requires_grad=False)


def _materialize(modules, params: Sequence[str], read):
    def hook(module, args):
        if getattr(module, "_edgeft_held", False):
            return
        for full in params:
            _set(modules, full, read(full))

    return hook


def _release(modules, params: Sequence[str]):
    import torch

    shapes = {full: tuple(_param(modules, full).shape) for full in params}

    def hook(module, args, output):
        if getattr(module, "_edgeft_held", False):
            return
        for full, shape in shapes.items():
            _set(modules, full, torch.empty(shape, device="meta"))

    return hook


def _sparse_lookup(stored: StoredTensor):
    """Before the embedding runs: a table holding only the looked-up rows, ids remapped."""
    import torch

    def hook(module, args):
        (ids, *rest) = args
        rows, inverse = torch.unique(ids, return_inverse=True)
        values = torch.from_numpy(read_rows(stored, rows.numpy()))
        module._parameters["weight"] = torch.nn.Parameter(values, requires_grad=False)
        # padding_idx only shapes gradients; the small table may not reach it
        module._edgeft_padding_idx, module.padding_idx = module.padding_idx, None
        return (inverse.reshape(ids.shape), *rest)

    return hook


def _drop_weight(embedding):
    import torch

    shape = tuple(embedding.weight.shape)

    def hook(module, args, output):
        module._parameters["weight"] = torch.nn.Parameter(
            torch.empty(shape, device="meta"), requires_grad=False
        )
        module.padding_idx = module._edgeft_padding_idx

    return hook


def _chunked_head(head, stored: StoredTensor):
    """The output projection over the vocabulary in :data:`HEAD_CHUNK_ROWS` row chunks."""
    import torch

    if getattr(head, "bias", None) is not None:
        raise ModelError(f"output projection {stored.name} has a bias; not supported here")

    def forward(hidden):
        parts = []
        for start in range(0, stored.shape[0], HEAD_CHUNK_ROWS):
            chunk = read_row_range(stored, start, start + HEAD_CHUNK_ROWS)
            parts.append(torch.nn.functional.linear(hidden, torch.from_numpy(chunk)))
        return torch.cat(parts, dim=-1)

    return forward


def _lora_hook(adapter: LoRA):
    import torch.nn.functional as F

    def hook(module, args, output):
        (x,) = args[:1]
        return output + adapter.scale * F.linear(F.linear(x, adapter.a), adapter.b)

    return hook
