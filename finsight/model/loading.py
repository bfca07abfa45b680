"""Building the model that trains: the base model loaded (4-bit where asked) and LoRA on it.

Everything that knows about bitsandbytes lives here, so the rest of the package only sees a
``PreTrainedModel`` with LoRA adapters on it. Model references (Hub id, folder, ``.gguf``, ``pypi:``) are
resolved by :mod:`finsight.references`; :func:`load_base_model` is the one place a base model is loaded, for
training (:func:`load_peft_model`) and for ``finsight chat`` alike.
"""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

from finsight import compat
from finsight.checkpoint_files import verify_folder_pickles
from finsight.data.tokenizer import load_chat_tokenizer
from finsight.model.lora_dropout import fuse_lora_dropout
from finsight.model.memory import (
    choose_memory_release,
    recomputed_layer_count,
    return_freed_memory_to_the_os,
)
from finsight.model.precision import ComputeDtype
from finsight.model.settings import AttentionChoice, LoraSettings, MemorySettings, QuantizationSettings
from finsight.references import ModelReferenceError, resolve_model

if TYPE_CHECKING:
    from peft import LoraConfig
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

log = logging.getLogger(__name__)

def torch_dtype(name: ComputeDtype) -> torch.dtype:
    """Map a config string onto a torch dtype."""
    return {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[name]


def quantization_config(settings: QuantizationSettings) -> BitsAndBytesConfig | None:
    """The ``BitsAndBytesConfig`` for 4-bit QLoRA, or ``None`` for plain LoRA on unquantized weights."""
    if not settings.quantized:
        return None
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=settings.kind,
        bnb_4bit_use_double_quant=settings.double_quant,
        bnb_4bit_compute_dtype=torch_dtype(settings.compute_dtype),
        bnb_4bit_quant_storage=getattr(torch, settings.quant_storage),
    )


def choose_attention(requested: AttentionChoice, compute_dtype: ComputeDtype) -> tuple[str, str]:
    """Pick the attention kernel and say why, so the log explains a slower-than-expected run."""
    if requested != "auto":
        return requested, "set in the config"
    if importlib.util.find_spec("flash_attn") is None:
        return "sdpa", "flash-attn is not installed"
    if not torch.cuda.is_available():
        return "sdpa", "flash-attn needs CUDA"
    if compute_dtype not in ("bfloat16", "float16"):
        return "sdpa", f"flash-attn needs bf16 or fp16, compute dtype is {compute_dtype}"
    return "flash_attention_2", "flash-attn is installed, CUDA is present and the dtype suits it"


@dataclass
class LoadedModel:
    """The PEFT model and the facts about it that the start-up summary reports."""

    model: torch.nn.Module
    attention: str
    attention_reason: str
    trainable_parameters: int
    total_parameters: int
    gradient_checkpointing: bool = True
    gradient_checkpointing_reason: str = "set in the config"
    release_freed_memory: bool = False
    release_freed_memory_reason: str = "set in the config"
    recomputed_layers: int | None = None  # with gradient checkpointing: how many decoder layers recompute


def load_base_model(reference: str, settings: QuantizationSettings,
                    on_gpu: bool | None = None) -> tuple[PreTrainedModel, str, str]:
    """The base model of a reference, quantized as asked, and the attention kernel chosen with its reason.

    4-bit weights are placed on the GPU at load time (when there is one) and must never be moved later;
    ``on_gpu=True`` places unquantized weights there too (the chat; in training Lightning moves them).
    """
    attention, reason = choose_attention(settings.attn_implementation, settings.compute_dtype)
    bnb = quantization_config(settings)
    place = (bnb is not None if on_gpu is None else on_gpu) and torch.cuda.is_available()
    folder = resolve_model(reference)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            folder,
            quantization_config=bnb,
            dtype=torch_dtype(settings.compute_dtype),
            attn_implementation=attention,
            device_map={"": torch.cuda.current_device()} if place else None,
            trust_remote_code=False,  # a model folder's own Python code (auto_map) is never run
        )
    except ValueError as error:
        if "trust_remote_code" not in str(error):
            raise
        raise ModelReferenceError(
            f"model {reference!r} needs its own Python code (auto_map in its config.json) for an architecture "
            "transformers does not include; finsight never runs code shipped with a model (trust_remote_code "
            "stays off): use a model of an architecture transformers includes") from None
    if bnb is not None:
        # Every 4-bit model finsight loads keeps the layout it was loaded in: bitsandbytes' CPU packing
        # format would drop the gradients through the base and drift its constants (see the compat function).
        compat.bitsandbytes.keep_4bit_weights_unpacked(model)
    return model, attention, reason


def load_peft_model(
    reference: str,
    quantization: QuantizationSettings,
    lora: LoraSettings,
    memory: MemorySettings,
    *,
    adapter_path: str | None = None,
    micro_batch: tuple[int, int] | None = None,
) -> LoadedModel:
    """Load the base model (4-bit where asked), wrap it with LoRA and prepare it for training.

    ``micro_batch`` (batch size, maximum length) lets ``gradient_checkpointing="auto"`` estimate the
    activation memory of a training step. ``release_freed_memory`` (``auto``: when every layer recomputes
    in float32)
    trades step speed for peak RSS on the CPU, see ``finsight.model.memory.return_freed_memory_to_the_os``.
    ``activation_budget_gib`` (with checkpointing on) recomputes only the layers whose activations would not
    fit in it, see :func:`layers_to_recompute`.
    """
    model, attention, reason = load_base_model(reference, quantization)
    compute_dtype = quantization.compute_dtype
    log.info("Attention: %s (%s)", attention, reason)
    model.config.use_cache = False  # the KV cache is useless in training and conflicts with checkpointing
    recomputed, checkpointing_reason = recomputed_layer_count(
        memory.gradient_checkpointing, memory.activation_budget_gib, model.config, micro_batch,
        torch_dtype(compute_dtype).itemsize)
    layers = model.config.num_hidden_layers
    checkpointing = recomputed > 0
    log.info("Gradient checkpointing: %s (%s)", "on" if checkpointing else "off", checkpointing_reason)
    release, release_reason = choose_memory_release(memory.release_freed_memory, checkpointing, recomputed == layers,
                                                    compute_dtype)
    # Imported here: PEFT is most of a chat's start-up, and a chat served from the generation cache
    # (finsight.inference.cache) needs only this module's loader.
    from peft import PeftModel, get_peft_model

    if release and not return_freed_memory_to_the_os():
        release, release_reason = False, "not available: needs glibc's malloc (Linux)"
    if release:
        log.info("Freed blocks of 1 MiB or more go back to the OS (%s)", release_reason)
    if checkpointing:
        compat.transformers.enable_activation_checkpointing(model, recomputed)
        # With frozen embeddings no input of a checkpointed block needs grad; this makes LoRA inside train.
        model.enable_input_require_grads()
    if adapter_path is not None:
        verify_folder_pickles(adapter_path)  # an adapter_model.bin: data only, or refused naming it
        model = PeftModel.from_pretrained(model, adapter_path, is_trainable=True)
    else:
        model = get_peft_model(model, lora_config(lora))
    fused = fuse_lora_dropout(model)
    if fused:
        log.info("LoRA dropout of %d adapters keeps one-byte masks for backward", fused)
    trainable, total = model.get_nb_trainable_parameters()
    return LoadedModel(model, attention, reason, trainable, total, checkpointing, checkpointing_reason,
                       release, release_reason, recomputed if checkpointing else None)


def lora_config(lora: LoraSettings) -> LoraConfig:
    """PEFT's config for a fresh adapter of these settings (the training run's, and a checkpoint's when merged)."""
    from peft import LoraConfig  # imported on use: a chat served from the cache never needs PEFT

    return LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                      target_modules=list(lora.target_modules), task_type="CAUSAL_LM")


def load_tokenizer(reference: str) -> PreTrainedTokenizerBase:
    """The tokenizer of a model reference, fit for chat training (see ``finsight.data.tokenizer``)."""
    return load_chat_tokenizer(reference)
