"""``finsight export``: a training checkpoint → a PEFT adapter folder, or a merged Hugging Face model."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


class CheckpointContentError(ValueError):
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


def export(checkpoint: str, output: str, merged: bool = False, model_name: str | None = None) -> Path:
    """Write the adapter of a training checkpoint as a PEFT folder, or merge it into the base model.

    Args:
        checkpoint: A ``.ckpt`` written by ``finsight fit``: a file, or a folder under DeepSpeed.
        output: Folder to write.
        merged: Write an ordinary Hugging Face model (base in bf16 with the LoRA update merged in) that
            ``AutoModelForCausalLM.from_pretrained`` loads with no PEFT. The base is loaded unquantized,
            so the merged weights are the original bf16 weights plus the update, not the 4-bit
            approximation the adapter was trained against (the usual QLoRA merge; outputs differ slightly).
        model_name: Base model reference, when it moved since training (defaults to the checkpoint's).
    """
    overrides: dict[str, Any] = {"gradient_checkpointing": False}
    if model_name:
        overrides["model_name"] = model_name
    if merged:
        overrides.update(quantization="none", compute_dtype="bfloat16")
    module = module_from_checkpoint(checkpoint, **overrides)
    target = Path(output)
    if not merged:
        module.export_adapter(target)
        log.info("Adapter written to %s", target)
        return target
    from finsight.model import load_tokenizer, resolve_model

    model = module.model.merge_and_unload()
    model.config.use_cache = True
    model.save_pretrained(str(target))
    load_tokenizer(resolve_model(module.hparams.model_name)).save_pretrained(str(target))
    log.info("Merged model written to %s", target)
    return target


def export_main(args: list[str]) -> Path:
    """``finsight export --checkpoint X --output Y [--merged true]``."""
    from jsonargparse import auto_cli

    return auto_cli(export, args=args, as_positional=False)
