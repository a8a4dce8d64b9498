"""The torch reference runtime: a Hugging Face checkpoint in fp32 on the CPU."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from edgeft.errors import ModelError
from edgeft.options import DEFAULT_THREADS
from edgeft.provenance import TrainRecord
from edgeft.runtimes.hf import HFTokenizing
from edgeft.session import BATCH


class TorchSession(HFTokenizing):
    """A Hugging Face causal LM with an explicit KV cache (a streamed one too: only forward
    passes, see :func:`edgeft.streaming.streamed_model`)."""

    streamed = False  # weights read layer by layer on every forward pass
    capabilities: frozenset[str] = frozenset()

    def __init__(self, model, tokenizer) -> None:
        self.model = model
        self.tokenizer = tokenizer
        eos = model.generation_config.eos_token_id
        eos = eos if isinstance(eos, list) else [eos]
        self.eos_token_ids = frozenset(
            int(e) for e in [*eos, tokenizer.eos_token_id] if e is not None
        )
        self.n_ctx = getattr(model.config, "max_position_embeddings", None)
        self._past = None
        self._next_logits = None

    def logits(self, token_ids: Sequence[int]) -> np.ndarray:
        import torch

        with torch.inference_mode():
            ids = torch.tensor([list(token_ids)], dtype=torch.long)
            return self.model(input_ids=ids).logits[0].float().numpy()

    def prefill(self, token_ids: Sequence[int]) -> None:
        import torch
        from transformers import DynamicCache

        with torch.inference_mode():
            ids = torch.tensor([list(token_ids)], dtype=torch.long)
            result = self.model(input_ids=ids, past_key_values=DynamicCache(), use_cache=True)
        self._past, self._next_logits = result.past_key_values, result.logits[0, -1]

    def decode_one(self) -> int:
        import torch

        if self._past is None:
            raise RuntimeError("decode_one() before prefill()")
        token = int(self._next_logits.argmax())
        with torch.inference_mode():
            result = self.model(
                input_ids=torch.tensor([[token]]), past_key_values=self._past, use_cache=True
            )
        self._past, self._next_logits = result.past_key_values, result.logits[0, -1]
        return token

    def close(self) -> None:
        """Drop the cache and the model: a closed session cannot be used again, and its
        weights go back (:func:`edgeft.isolate.free_memory` after it returns them now)."""
        self._past = self._next_logits = self.model = None


class StreamedTorchSession(TorchSession):
    """A model streamed from disk (:func:`edgeft.streaming.streamed_model`)."""

    streamed = True


class LoadedTorchSession(TorchSession):
    """A fully loaded model: also batched generation through ``generate``."""

    capabilities = frozenset({BATCH})

    def generate_batch(
        self, prompts: Sequence[Sequence[int]], max_new_tokens: int
    ) -> list[list[int]]:
        """Greedy generation for several prompts at once (left-padded), each cut at its first
        end-of-turn token. Same tokens as :func:`edgeft.runtimes.generate` up to float noise
        from padding, at a fraction of the per-token overhead on a CPU."""
        import torch

        pad = self.tokenizer.pad_token_id
        pad = pad if pad is not None else next(iter(self.eos_token_ids))
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, prompt in enumerate(prompts):
            ids[i, width - len(prompt) :] = torch.tensor(list(prompt))
            mask[i, width - len(prompt) :] = 1
        with torch.inference_mode():
            out = self.model.generate(
                input_ids=ids,
                attention_mask=mask,
                do_sample=False,
                max_new_tokens=max_new_tokens,
                pad_token_id=pad,
                eos_token_id=sorted(self.eos_token_ids),
                temperature=None,
                top_p=None,
                top_k=None,
            )
        replies = []
        for row in out[:, width:].tolist():
            cut = next((j for j, t in enumerate(row) if t in self.eos_token_ids), len(row))
            replies.append(row[:cut])
        return replies


def load_over_full_precision(
    adapter: Path, base: Path, record: TrainRecord, *, threads: int = DEFAULT_THREADS
) -> LoadedTorchSession:
    """A torch session of the adapter, unmerged, over the full-precision (fp32) base at
    ``base``: what a runtime applying LoRA over a full-precision base file computes, the
    reference of the adapter exports (GGUF and ONNX)."""
    import torch
    from peft import PeftModel
    from transformers import AutoTokenizer

    from edgeft.train import load_base_model

    torch.set_num_threads(threads)
    settings = record.settings.model_dump()
    model = load_base_model(base, settings, torch.float32, quantized=False, device="cpu")
    model = PeftModel.from_pretrained(model, adapter, is_trainable=False).eval()
    tokenizer = AutoTokenizer.from_pretrained(adapter, trust_remote_code=False)
    return LoadedTorchSession(model, tokenizer)


class TorchRuntime:
    name = "torch"

    def available(self) -> bool:
        try:
            import torch  # noqa: F401
            import transformers  # noqa: F401
        except ImportError:
            return False
        return True

    def load(self, artifact: Path, *, threads: int) -> TorchSession:
        """Load a Hugging Face checkpoint directory (safetensors only, no remote code), or an
        ``edgeft train`` adapter directory as trained (the adapter on its 4-bit base).

        A checkpoint whose fp32 weights would take more than a quarter of this machine's
        memory is streamed layer by layer (:func:`edgeft.streaming.should_stream`): the same
        logits, memory bounded by one layer, every forward pass reading the weights again."""
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        artifact = Path(artifact)
        torch.set_num_threads(threads)
        if (artifact / "adapter_config.json").is_file():
            from edgeft.merge import load_as_trained

            model, tokenizer = load_as_trained(artifact)
            return LoadedTorchSession(model, tokenizer)
        if not (artifact / "config.json").is_file():
            raise ModelError(
                f"{artifact} is not a Hugging Face checkpoint (no config.json) or an edgeft "
                "adapter (no adapter_config.json)"
            )
        if not any(artifact.glob("*.safetensors")):
            from edgeft.models import pickled_weights

            pickled = ", ".join(p.name for p in pickled_weights(artifact)[:3])
            found = f"only pickled weights ({pickled})" if pickled else "no *.safetensors weights"
            raise ModelError(
                f"{artifact} has {found}; edgeft does not unpickle: convert the checkpoint "
                "to safetensors (save_pretrained(..., safe_serialization=True))"
            )
        from edgeft.streaming import should_stream, streamed_model

        if should_stream(artifact):  # larger than memory comfortably holds: layer by layer
            session = StreamedTorchSession
            model = streamed_model(artifact)
        else:
            session = LoadedTorchSession
            model = AutoModelForCausalLM.from_pretrained(
                artifact, dtype=torch.float32, use_safetensors=True, trust_remote_code=False
            ).eval()
        return session(model, AutoTokenizer.from_pretrained(artifact, trust_remote_code=False))


RUNTIME = TorchRuntime()
