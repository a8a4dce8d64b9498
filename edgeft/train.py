"""``edgeft train``: QLoRA (4-bit NF4/FP4 base through bitsandbytes) or LoRA fine-tuning with
the Hugging Face Trainer, so ``accelerate launch`` spreads it over several GPUs unchanged.

Output: a PEFT adapter directory (``adapter_config.json``, ``adapter_model.safetensors``), the
tokenizer, a few tokenized eval rows for the merge stage's parity check, and ``edgeft.json``.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

from edgeft._io import atomic_dir, check_output, partial_dir, sha256_file, write_json
from edgeft.architectures import check_lora_targets
from edgeft.data import DataReport, collate, load_examples, split_examples
from edgeft.errors import EdgeftError, ModelError
from edgeft.hfcompat import model_config, training_arguments
from edgeft.models import BaseModel, resolve_base
from edgeft.provenance import make_record, write_record

PARITY_ROWS_FILE = "parity_rows.json"
_PARITY_ROWS = 8  # eval rows kept for the merge stage's parity check: enough for stable KL


@dataclass
class TrainSettings:
    """Every training choice; validated once and saved in ``edgeft.json``."""

    method: Literal["qlora", "lora"] = field(
        default="qlora", metadata={"help": "qlora: 4-bit base; lora: full-precision base"}
    )
    quant_type: Literal["nf4", "fp4"] = field(
        default="nf4", metadata={"help": "4-bit data type of the QLoRA base"}
    )
    # quantizes the block scales too: ~0.4 bit/param saved, same loss
    double_quant: bool = field(
        default=True,
        metadata={"help": "quantize the QLoRA base's 4-bit block scales too"},
    )
    # fp32 on the CPU: no fast bf16 there
    compute_dtype: Literal["auto", "bf16", "fp16", "fp32"] = field(
        default="auto",
        metadata={"help": "auto: bf16 on a GPU that has it, fp16 on an older GPU, fp32 on CPU"},
    )
    rank: int = field(default=16, metadata={"help": "LoRA rank of the adapter's matrices"})
    # scale alpha/rank = 2, the common QLoRA setting
    alpha: float = field(
        default=32, metadata={"help": "LoRA alpha: the adapter's update is scaled by alpha/rank"}
    )
    dropout: float = field(default=0.05, metadata={"help": "dropout on the adapter's input"})
    # "all-linear": every Linear layer but lm_head, as in the QLoRA paper
    target_modules: list[str] | Literal["all-linear"] = field(
        default="all-linear",
        metadata={
            "help": "'all-linear' (every Linear layer but lm_head) or comma-separated module "
            "names, e.g. q_proj,v_proj"
        },
    )
    learning_rate: float = field(
        default=2e-4, metadata={"flag": "--lr", "help": "peak learning rate"}
    )
    lr_scheduler: str = field(default="cosine", metadata={"help": "transformers scheduler name"})
    warmup_ratio: float = field(
        default=0.03, metadata={"help": "share of the steps that ramp the learning rate up"}
    )
    epochs: float = field(default=1.0, metadata={"help": "passes over the training rows"})
    max_steps: int = field(default=-1, metadata={"help": "> 0 overrides --epochs"})
    batch_size: int = field(default=4, metadata={"help": "rows per step on each device"})
    grad_accum: int = field(
        default=1, metadata={"help": "steps whose gradients add up to one optimizer update"}
    )
    gradient_checkpointing: bool = field(
        default=False,
        metadata={"help": "recompute activations in the backward pass: less memory, slower"},
    )
    # batches of similar length: ~15% less padding on chat data whose rows vary in length
    group_by_length: bool = field(
        default=True,
        metadata={
            "help": "batch rows of similar length together (--no-group-by-length: random order)"
        },
    )
    # NEFTune: noise on input embeddings during training, known to help instruction tuning
    # generalise
    neftune_alpha: float = field(
        default=0.0, metadata={"help": "NEFTune embedding noise during training (0: off)"}
    )
    # a --preserve row's loss is its KL divergence from the base model, a training row's its
    # cross-entropy
    preserve_weight: float = field(
        default=1.0, metadata={"help": "weight of a --preserve row against a --data row"}
    )
    max_length: int = field(
        default=512,
        metadata={"help": "tokens per row; longer rows are truncated and counted"},
    )
    eval_fraction: float = field(
        default=0.05, metadata={"help": "share of --data held out for eval loss"}
    )
    seed: int = field(
        default=42, metadata={"help": "random seed: eval split, adapter init, row order"}
    )
    logging_steps: int = field(default=10, metadata={"help": "steps between logged losses"})
    save_steps: int = field(
        default=200,
        metadata={"help": "checkpoint interval (kept in OUT.partial until training ends)"},
    )
    save_total_limit: int = field(
        default=2,
        metadata={"help": "checkpoints kept in OUT.partial; older ones are deleted"},
    )

    def __post_init__(self) -> None:
        checks = [
            (
                self.method in ("qlora", "lora"),
                f"--method must be qlora or lora, got {self.method!r}",
            ),
            (
                self.quant_type in ("nf4", "fp4"),
                f"--quant-type must be nf4 or fp4, got {self.quant_type!r}",
            ),
            (
                self.compute_dtype in ("auto", "bf16", "fp16", "fp32"),
                f"--compute-dtype must be auto, bf16, fp16 or fp32, got {self.compute_dtype!r}",
            ),
            (self.rank > 0, f"--rank must be positive, got {self.rank}"),
            (self.alpha > 0, f"--alpha must be positive, got {self.alpha}"),
            (0 <= self.dropout < 1, f"--dropout must be in [0, 1), got {self.dropout}"),
            (self.learning_rate > 0, f"--lr must be positive, got {self.learning_rate}"),
            (self.epochs > 0 or self.max_steps > 0, "give --epochs > 0 or --max-steps > 0"),
            (self.batch_size > 0, f"--batch-size must be positive, got {self.batch_size}"),
            (self.grad_accum > 0, f"--grad-accum must be positive, got {self.grad_accum}"),
            (self.neftune_alpha >= 0, f"--neftune-alpha must be >= 0, got {self.neftune_alpha}"),
            (
                self.preserve_weight > 0,
                f"--preserve-weight must be positive, got {self.preserve_weight}",
            ),
            (self.max_length >= 8, f"--max-length must be at least 8, got {self.max_length}"),
            (
                0 <= self.eval_fraction < 1,
                f"--eval-fraction must be in [0, 1), got {self.eval_fraction}",
            ),
            (
                self.target_modules == "all-linear"
                or (isinstance(self.target_modules, list) and self.target_modules),
                "--target-modules must be 'all-linear' or a comma-separated list of module names",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise EdgeftError(message)


@dataclass
class TrainResult:
    """What ``train`` produced and measured."""

    out: Path
    train_loss: float
    eval_loss_before: float | None
    eval_loss: float | None
    steps: int
    seconds: float
    train_tokens_per_s: float
    data: DataReport
    eval_rows: int
    settings: TrainSettings = field(repr=False, default_factory=TrainSettings)
    preserve_rows: int = 0


def resolve_compute_dtype(name: str):
    """Map a ``compute_dtype`` setting to a torch dtype for this machine."""
    import torch

    if name == "auto":
        if torch.cuda.is_available():
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[name]


def sharded_launch() -> str | None:
    """``"fsdp"`` or ``"deepspeed"`` when ``accelerate launch`` shards the model over the
    processes (its config says so through the environment), else None: one whole copy per
    process."""
    for name, variable in (
        ("fsdp", "ACCELERATE_USE_FSDP"),
        ("deepspeed", "ACCELERATE_USE_DEEPSPEED"),
    ):
        if os.environ.get(variable, "false").lower() == "true":
            return name
    return None


def _device_map():
    """One whole model copy per process: data parallel under ``accelerate launch``; none when
    FSDP or DeepSpeed place the shards themselves."""
    import torch

    if sharded_launch():
        return None
    if torch.cuda.is_available():
        from accelerate import PartialState

        return {"": PartialState().local_process_index}
    return {"": "cpu"}


def bnb_config(settings: dict, compute_dtype):
    """The bitsandbytes 4-bit config of a QLoRA run (also used by merge to rebuild it).

    Under FSDP the packed 4-bit weights are stored in the compute dtype (``quant_storage``):
    FSDP shards a layer's tensors as one flat buffer of a single dtype. The stored bits, and
    what they dequantize to, are the same either way.
    """
    import torch
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=settings["quant_type"],
        bnb_4bit_use_double_quant=settings["double_quant"],
        bnb_4bit_compute_dtype=compute_dtype,
        bnb_4bit_quant_storage=compute_dtype if sharded_launch() == "fsdp" else torch.uint8,
    )


def load_base_model(
    path: Path,
    settings: dict,
    compute_dtype,
    *,
    quantized: bool,
    device: str | None = None,
    allow_pickle: bool = False,
):
    """Load the base model as training sees it: 4-bit for QLoRA, ``compute_dtype`` for LoRA.

    Weights are read from safetensors only and remote code never runs. With ``allow_pickle``
    a checkpoint that has only pickled weights (``pytorch_model.bin``) is read too, through
    transformers' ``torch.load(..., weights_only=True)`` (its default, left as is), which
    refuses pickles that hold anything but tensors and plain containers.

    Args:
        device: ``"cpu"`` or ``"cuda"``; default: this process's GPU if there is one.
        allow_pickle: read pickled weights when the folder has no safetensors.
    """
    from transformers import AutoModelForCausalLM

    pickled_only = allow_pickle and not any(Path(path).glob("*.safetensors"))
    kwargs = {
        "dtype": compute_dtype,
        "use_safetensors": not pickled_only,
        "trust_remote_code": False,
        "device_map": {"": device} if device else _device_map(),
    }
    if quantized:
        kwargs["quantization_config"] = bnb_config(settings, compute_dtype)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot load base model {path}: {exc}".splitlines()[0]) from exc
    if quantized:
        disable_bnb_cpu_repacking(model)
    return model


def preserve_loss(logits, labels, attention_mask, preserve, base_logits, weight: float):
    """The loss of a batch mixing training rows and ``preserve`` rows (see :func:`train`).

    Training rows: next-token cross-entropy, the mean over their labelled tokens (what the
    Trainer computes for a batch without preserve rows). Preserve rows: KL(base ‖ model) over
    the vocabulary, the mean over their real positions (``base_logits``: the base model's logits
    of those rows only). The two means are weighted by their share of the batch's rows, a
    preserve row counting ``weight`` times.
    """
    import torch.nn.functional as F

    from edgeft.data import IGNORE_INDEX

    logits = logits.float()
    task = ~preserve
    n_task, n_preserve = int(task.sum()), int(preserve.sum())
    total = logits.new_zeros(())
    if n_task:
        total = total + n_task * F.cross_entropy(
            logits[task, :-1].flatten(0, 1), labels[task, 1:].flatten(), ignore_index=IGNORE_INDEX
        )
    if n_preserve:
        mask = attention_mask[preserve].bool()
        own = F.log_softmax(logits[preserve][mask], dim=-1)
        base = F.log_softmax(base_logits.float()[mask], dim=-1)
        kl = (base.exp() * (base - own)).sum(-1).mean()
        total = total + weight * n_preserve * kl
    return total / (n_task + weight * n_preserve)


def preserving_trainer(weight: float):
    """A ``transformers.Trainer`` whose batches mix training rows and ``preserve`` rows (see
    :func:`train` and :func:`preserve_loss`). The base model's logits come from the same model
    with its adapters disabled, in eval mode (no dropout, no NEFTune noise), without gradients.
    """
    import torch
    import transformers

    class PreservingTrainer(transformers.Trainer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            # the loss below is a mean per batch: let the Trainer scale it for accumulation
            self.model_accepts_loss_kwargs = False

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            preserve = inputs.pop("preserve")
            labels = inputs.pop("labels")
            outputs = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
            base_logits = None
            if preserve.any():
                peft_model = self.accelerator.unwrap_model(model)
                training = peft_model.training
                peft_model.eval()
                try:
                    # through the wrapped model: DDP and FSDP see every forward
                    with torch.no_grad(), peft_model.disable_adapter():
                        base_logits = model(
                            input_ids=inputs["input_ids"][preserve],
                            attention_mask=inputs["attention_mask"][preserve],
                        ).logits
                finally:
                    peft_model.train(training)
            loss = preserve_loss(
                outputs.logits, labels, inputs["attention_mask"], preserve, base_logits, weight
            )
            return (loss, outputs) if return_outputs else loss

    return PreservingTrainer


def _input_file(path: Path | None) -> dict | None:
    """A data file as the train record names it: where it is and its sha256."""
    return None if path is None else {"path": Path(path).resolve(), "sha256": sha256_file(path)}


def disable_bnb_cpu_repacking(model) -> None:
    """Stop bitsandbytes repacking 4-bit weights for CPU inference.

    On CPUs with AVX512-BF16, bitsandbytes 0.50 repacks a Linear4bit's weight the first time
    it runs in eval mode (an eval loss before training is enough), and from then on its
    forward has no autograd: gradients stop flowing through the frozen layers and LoRA learns
    only near the output, silently. The repacked layout also breaks dequantization for merge.
    """
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def train(
    base: str | None,
    data: Path,
    out: Path,
    settings: TrainSettings | None = None,
    *,
    eval_data: Path | None = None,
    preserve: Path | None = None,
    skip_bad_rows: bool = False,
    resume: bool = False,
    force: bool = False,
    progress: bool = True,
    allow_pickle: bool = False,
) -> TrainResult:
    """Fine-tune ``base`` on a JSONL dataset and write a PEFT adapter directory to ``out``.

    Args:
        base: base model (see :func:`edgeft.models.resolve_base`); ``None`` is the default model.
        data: JSONL training data (chat, prompt/completion or alpaca rows).
        out: output directory; it appears only when training finishes.
        settings: training settings; defaults when ``None``.
        eval_data: held-out JSONL; without it ``settings.eval_fraction`` of ``data`` is held out.
        preserve: JSONL rows (same formats as ``data``) on which the model is held to the base
            model it starts from: mixed into the training rows, each is trained on its KL
            divergence from the base's next-token distribution at every position (the base's
            whole distribution, not one reply), weighted by ``settings.preserve_weight``.
            Rows of what the model should go on doing (general requests, prose) keep it from
            forgetting them while it learns ``data``.
        skip_bad_rows: drop bad rows with a counted warning instead of failing.
        resume: continue from the last checkpoint in ``<out>.partial``.
        force: replace an existing ``out``.
        progress: show progress bars.
        allow_pickle: accept a base whose only weights are pickled (``pytorch_model.bin``),
            read with ``torch.load(weights_only=True)``; off by default.

    Returns:
        A :class:`TrainResult`.

    Raises:
        DataError: a bad row (before any training starts).
        ModelError: the base model cannot be loaded.
        OutputExistsError: ``out`` exists and ``force`` is false.
    """
    import torch
    import transformers
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    settings = settings or TrainSettings()
    out = Path(out)
    check_output(out, force)
    checkpoints = partial_dir(out) / "checkpoints"
    if resume and not any(checkpoints.glob("checkpoint-*")):
        raise EdgeftError(f"nothing to resume: no checkpoint under {checkpoints}")
    transformers.set_seed(settings.seed)
    base_model: BaseModel = resolve_base(base, allow_pickle=allow_pickle)

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base_model.path, trust_remote_code=False)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token  # padding is masked from the loss
    # Every row is validated before the model is loaded: a bad line fails in seconds.
    examples, report = load_examples(
        data, tokenizer, max_length=settings.max_length, skip_bad_rows=skip_bad_rows
    )
    if eval_data is not None:
        train_rows = examples
        eval_rows, _ = load_examples(
            eval_data, tokenizer, max_length=settings.max_length, skip_bad_rows=skip_bad_rows
        )
    else:
        train_rows, eval_rows = split_examples(examples, settings.eval_fraction, settings.seed)
    preserve_rows = []
    if preserve is not None:
        preserve_rows, _ = load_examples(
            preserve, tokenizer, max_length=settings.max_length, skip_bad_rows=skip_bad_rows
        )

    compute_dtype = resolve_compute_dtype(settings.compute_dtype)
    quantized = settings.method == "qlora"
    model = load_base_model(
        base_model.path,
        asdict(settings),
        compute_dtype,
        quantized=quantized,
        allow_pickle=allow_pickle,
    )
    # torch warns (and has announced an error) when checkpointing leaves use_reentrant unset;
    # True is what both calls did by default
    checkpointing = {"use_reentrant": True}
    if quantized:
        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=settings.gradient_checkpointing,
            gradient_checkpointing_kwargs=checkpointing,
        )
    elif settings.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=checkpointing)
        model.enable_input_require_grads()
    check_lora_targets(model_config(model.config), settings.target_modules)
    lora = LoraConfig(
        r=settings.rank,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=settings.target_modules,
        bias="none",
        task_type="CAUSAL_LM",
    )
    try:
        model = get_peft_model(model, lora)
    except ValueError as exc:
        raise ModelError(f"--target-modules {settings.target_modules}: {exc}") from exc
    model.peft_config["default"].base_model_name_or_path = str(base_model.path)

    on_gpu = torch.cuda.is_available()
    # Under `accelerate launch` every rank runs this function; only rank 0 owns the output.
    main_process = is_main_process()
    output_dir = (
        atomic_dir(out, force=force, resume=resume, keep_on_error=True)
        if main_process
        else contextlib.nullcontext(partial_dir(out))
    )
    with output_dir as work:
        args = training_arguments(
            output_dir=str(work / "checkpoints"),
            per_device_train_batch_size=settings.batch_size,
            per_device_eval_batch_size=settings.batch_size,
            gradient_accumulation_steps=settings.grad_accum,
            learning_rate=settings.learning_rate,
            lr_scheduler_type=settings.lr_scheduler,
            warmup_ratio=settings.warmup_ratio,
            num_train_epochs=settings.epochs,
            max_steps=settings.max_steps,
            logging_steps=settings.logging_steps,
            save_steps=settings.save_steps,
            save_total_limit=settings.save_total_limit,
            eval_strategy="no",
            seed=settings.seed,
            data_seed=settings.seed,
            bf16=on_gpu and compute_dtype == torch.bfloat16,
            fp16=on_gpu and compute_dtype == torch.float16,
            use_cpu=not on_gpu,
            report_to=[],
            disable_tqdm=not progress,
            remove_unused_columns=False,
            label_names=["labels"],
            dataloader_num_workers=0,
            gradient_checkpointing=False,  # set up above, per method
            group_by_length=settings.group_by_length,
            neftune_noise_alpha=settings.neftune_alpha or None,
            ddp_find_unused_parameters=False,
        )

        def dataset(examples, held: bool = False) -> list[dict]:
            """Trainer rows; with preserve rows in the run, every row says whether it is one."""
            flag = {"preserve": held} if preserve_rows else {}
            return [{"input_ids": e.input_ids, "labels": e.labels, **flag} for e in examples]

        rows = dataset(train_rows) + dataset(preserve_rows, held=True)
        trainer_class = (
            preserving_trainer(settings.preserve_weight) if preserve_rows else transformers.Trainer
        )
        trainer = trainer_class(
            model=model,
            args=args,
            train_dataset=rows,
            eval_dataset=dataset(eval_rows) or None,
            data_collator=lambda batch: collate(batch, tokenizer.pad_token_id),
        )
        eval_before = None
        if eval_rows and not resume:
            eval_before = trainer.evaluate()["eval_loss"]
            # accelerate marks a model it prepared for inference as prepared for good, and
            # train() would then not wrap it for data parallelism: under `accelerate launch`
            # every rank would train alone (caught by _rank_report). Unmark it.
            model.__dict__.pop("_is_accelerate_prepared", None)
        start = time.perf_counter()
        output = trainer.train(resume_from_checkpoint=True if resume else None)
        seconds = time.perf_counter() - start
        eval_after = trainer.evaluate()["eval_loss"] if eval_rows else None
        ranks = _rank_report(model, float(output.training_loss))
        train_loss = sum(r["train_loss"] for r in ranks) / len(ranks)  # every rank's rows
        if not math.isfinite(train_loss):
            raise EdgeftError(f"training loss is {train_loss}; lower --lr or check the data")
        rows_seen = output.global_step * trainer.args.train_batch_size * settings.grad_accum
        rows_seen *= trainer.args.world_size
        tokens_seen = sum(len(row["input_ids"]) for row in rows) * rows_seen / len(rows)

        result = TrainResult(
            out=out,
            train_loss=train_loss,
            eval_loss_before=eval_before,
            eval_loss=eval_after,
            steps=output.global_step,
            seconds=seconds,
            train_tokens_per_s=tokens_seen / seconds if seconds else 0.0,
            data=report,
            eval_rows=len(eval_rows),
            settings=settings,
            preserve_rows=len(preserve_rows),
        )
        if sharded_launch():  # every rank takes part in gathering the shards; rank 0 writes
            trainer.save_model(str(work))
            if main_process:  # Trainer pickles its arguments beside the adapter: not ours
                (work / "training_args.bin").unlink(missing_ok=True)
        elif main_process:
            model.save_pretrained(work, safe_serialization=True)
        if main_process:
            tokenizer.save_pretrained(work)
            write_json(
                work / PARITY_ROWS_FILE,
                [e.input_ids for e in (eval_rows or train_rows)[:_PARITY_ROWS]],
            )
            shutil.rmtree(work / "checkpoints", ignore_errors=True)
            record = make_record(
                "train",
                inputs={
                    "base": {
                        "name": base_model.name,
                        "path": base_model.path,
                        "weights_sha256": base_model.weights_sha256,
                        "model_type": model.get_base_model().config.model_type,
                    },
                    "data": _input_file(data),
                    "eval_data": _input_file(eval_data),
                    "preserve": _input_file(preserve),
                },
                settings={
                    **asdict(settings),
                    "resolved_compute_dtype": str(compute_dtype).removeprefix("torch."),
                    "device": "cuda" if on_gpu else "cpu",
                    "world_size": trainer.args.world_size,
                    "sharded": sharded_launch(),
                    "quant_storage": str(
                        bnb_config(asdict(settings), compute_dtype).bnb_4bit_quant_storage
                    ).removeprefix("torch.")
                    if settings.method == "qlora"
                    else None,
                    "allow_pickle": allow_pickle,
                },
                results={
                    "train_loss": train_loss,
                    "ranks": ranks,
                    "eval_loss_before": eval_before,
                    "eval_loss": eval_after,
                    "steps": output.global_step,
                    "seconds": round(seconds, 2),
                    "train_tokens_per_s": round(result.train_tokens_per_s, 1),
                    "train_rows": len(train_rows),
                    "preserve_rows": len(preserve_rows),
                    "eval_rows": len(eval_rows),
                    "data": {
                        "rows": report.rows,
                        "truncated": report.truncated,
                        "skipped": len(report.skipped),
                        "tokens": report.tokens,
                        "label_tokens": report.label_tokens,
                    },
                },
            )
            write_record(work, record)
    _leave_process_group()
    return result


def _leave_process_group() -> None:
    """Under ``accelerate launch``: every rank waits until rank 0 has written the output, then
    all leave the process group together (a rank that exits while another still talks to it
    can abort in the transport's teardown, failing a run that trained)."""
    import torch

    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def _rank_report(model, train_loss: float) -> list[dict]:
    """Each process's training loss and a sha256 of the adapter weights it holds, gathered on
    every rank (one entry without ``accelerate launch``). Data parallel training keeps every
    replica identical; a rank whose adapter differs from rank 0's fails the run here, before
    rank 0's copy is written as the result.

    Raises:
        EdgeftError: the ranks' adapters differ.
    """
    import hashlib

    import torch

    digest = hashlib.sha256()
    for name, param in sorted(model.named_parameters()):
        if param.requires_grad:
            digest.update(name.encode())
            digest.update(param.detach().float().cpu().numpy().tobytes())
    mine = {"train_loss": train_loss, "adapter_sha256": digest.hexdigest()}
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return [{"rank": 0, **mine}]
    if sharded_launch():  # each rank holds a shard: losses only, the digests cannot agree
        mine.pop("adapter_sha256")
    gathered: list = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, mine)
    ranks = [{"rank": i, **r} for i, r in enumerate(gathered)]
    if len({r.get("adapter_sha256") for r in ranks}) > 1:
        raise EdgeftError(
            "data-parallel ranks ended with different adapter weights ("
            + ", ".join(f"rank {r['rank']}: {r['adapter_sha256'][:12]}" for r in ranks)
            + "); the processes did not train in step: check the launch configuration"
        )
    return ranks


def is_main_process() -> bool:
    """Rank 0 under ``accelerate launch`` / torchrun, or a single process."""
    return int(os.environ.get("RANK", "0")) == 0


def read_parity_rows(adapter_dir: Path) -> list[list[int]]:
    """The tokenized eval rows ``train`` kept for the merge stage's parity check."""
    path = Path(adapter_dir) / PARITY_ROWS_FILE
    if not path.is_file():
        return []
    return json.loads(path.read_text(encoding="utf-8"))
