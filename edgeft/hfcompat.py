"""Where transformers 4.57 and 5.x differ, in one place each.

edgeft reads model configs as plain dicts in the 4.x layout (``rope_theta`` and ``rope_scaling``
at the top level, ``rope_local_base_freq`` for Gemma 3's sliding layers, ``torch_dtype``);
transformers 5 saves ``rope_parameters`` (one dict, or one per layer type) and ``dtype``.
:func:`model_config` reads either into the one layout the rest of edgeft reads.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from edgeft.errors import ModelError

# rope_parameters keys that were top-level config keys in transformers 4.x
_TOP_LEVEL_ROPE = ("rope_theta", "partial_rotary_factor")
# Gemma 3's layer types: the full-attention layers' rope is the model's, the sliding ones'
# base frequency was ``rope_local_base_freq``
_FULL, _SLIDING = "full_attention", "sliding_attention"


def _rope_scaling(parameters: Mapping) -> dict | None:
    scaling = {k: v for k, v in parameters.items() if k not in _TOP_LEVEL_ROPE}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    return None if kind == "default" and len(scaling) <= 1 else scaling


def legacy_layout(config: Mapping[str, Any]) -> dict:
    """``config`` with transformers 5's keys also given their 4.x names (both are kept: a dict
    read with either version's keys reads the same)."""
    out = dict(config)
    if out.get("dtype") is not None and out.get("torch_dtype") is None:
        out["torch_dtype"] = out["dtype"]
    parameters = out.get("rope_parameters")
    if not isinstance(parameters, Mapping):
        return out
    if _FULL in parameters or _SLIDING in parameters:
        full = parameters.get(_FULL) or {}
        sliding = parameters.get(_SLIDING)
        if isinstance(sliding, Mapping) and "rope_theta" in sliding:
            out.setdefault("rope_local_base_freq", sliding["rope_theta"])
        parameters = full
    # a key given in the 4.x layout (an edited config) wins over rope_parameters
    for key in _TOP_LEVEL_ROPE:
        if key in parameters:
            out.setdefault(key, parameters[key])
    out.setdefault("rope_scaling", _rope_scaling(parameters))
    return out


def model_config(source: str | Path | Mapping | Any) -> dict:
    """A model's config as a dict in the one layout edgeft reads (:func:`legacy_layout`), from
    a checkpoint folder, its ``config.json``, a transformers config object or a dict.

    Raises:
        ModelError: the file is missing or not a JSON object.
    """
    if isinstance(source, Mapping):
        return legacy_layout(source)
    if hasattr(source, "to_dict"):  # a transformers PretrainedConfig
        return legacy_layout(source.to_dict())
    path = Path(source)
    if path.is_dir():
        path = path / "config.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelError(f"{path} not found; pass a Hugging Face checkpoint folder") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelError(f"{path}: not a readable config ({exc})") from None
    if not isinstance(data, dict):
        raise ModelError(f"{path}: not a JSON object")
    return legacy_layout(data)


def chat_ids(tokenizer, messages: list[dict], *, add_generation_prompt: bool = True) -> list[int]:
    """Token ids of ``messages`` rendered by the tokenizer's chat template (transformers 5
    returns a BatchEncoding where 4.x returned the ids)."""
    ids = tokenizer.apply_chat_template(
        messages, add_generation_prompt=add_generation_prompt, tokenize=True, return_dict=False
    )
    return list(ids)


def dequantized_from_gguf(model):
    """``model`` loaded with ``from_pretrained(gguf_file=...)`` as the plain fp32 model it is:
    transformers 5 keeps a GGUF quantizer on it (its weights already dequantized) and then
    refuses to save it; 4.x leaves none."""
    config = getattr(model.config, "quantization_config", None)
    method = getattr(config, "quant_method", None)
    if str(getattr(method, "value", method)) == "gguf":
        model.hf_quantizer = None
        del model.config.quantization_config
    return model


def transformers_major() -> int:
    """The installed transformers' major version (4 or 5)."""
    from importlib import metadata

    return int(metadata.version("transformers").split(".")[0])


def training_arguments(**kwargs):
    """``transformers.TrainingArguments`` from 4.x argument names: transformers 5 takes the
    warmup ratio as a float ``warmup_steps`` and length grouping as a sampling strategy."""
    import inspect

    import transformers

    accepted = inspect.signature(transformers.TrainingArguments.__init__).parameters
    if "warmup_ratio" not in accepted and "warmup_ratio" in kwargs:
        ratio = kwargs.pop("warmup_ratio")
        if ratio:
            kwargs["warmup_steps"] = float(ratio)
    if "group_by_length" not in accepted and kwargs.pop("group_by_length", False):
        kwargs["train_sampling_strategy"] = "group_by_length"
    return transformers.TrainingArguments(**kwargs)
