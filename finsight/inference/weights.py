"""Where a generation model's weights are: a base model alone, or with an adapter folder or a training checkpoint.

``finsight chat``, ``finsight export`` and the benchmarks name the trained weights in one of three ways; each
becomes one :class:`TrainedWeights`, checked when it is made (a missing ``adapter_config.json``, a damaged
checkpoint, a checkpoint that names no base model are one ``FinSightError`` each), holding the base
reference, the quantization settings the adapter was trained over, and where the adapter is. From there the
generation model is built one way (:func:`finsight.inference.generation_model.get_generation_model`),
whatever the weights came in. Nothing here imports PEFT or bitsandbytes: a chat served from the cache never
needs them.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from finsight import compat
from finsight.checkpoint_files import CheckpointContentError, read_checkpoint, verify_folder_pickles
from finsight.errors import FinSightError
from finsight.model.loading import lora_config
from finsight.model.settings import LoraSettings, QuantizationSettings
from finsight.references import file_sha256

if TYPE_CHECKING:
    from peft import PeftConfig


class WeightsSourceError(FinSightError, ValueError):
    """An adapter folder or model reference that cannot be used; the message says why.

    Fix: pass an adapter folder that `finsight fit` or `finsight export` wrote (`adapter_config.json` beside
    `adapter_model.safetensors`), a `.ckpt` file, or a model reference whose base is available.
    """


ADAPTER_RUN_SETTINGS = "finsight_run.json"
"""In an adapter folder finsight wrote: the run's settings chat and export need (its system prompt)."""


@dataclass(frozen=True, eq=False)
class TrainedWeights:
    """A base model and, optionally, the adapter trained on it, with the settings its base was quantized with.

    Exactly one of ``adapter`` (a PEFT folder) and ``checkpoint`` (a ``finsight fit`` checkpoint), or neither
    (the base model alone). A checkpoint's hyper-parameters and adapter tensors are read once, when it is opened.
    """

    reference: str
    settings: QuantizationSettings
    adapter: Path | None = None
    checkpoint: Path | None = None
    hyper_parameters: Mapping[str, Any] = field(default_factory=dict)
    checkpoint_state: Mapping[str, torch.Tensor] = field(default_factory=dict)
    run_settings: Mapping[str, Any] = field(default_factory=dict)
    """What the checkpoint's run trained on besides the model (``data.system_prompt``, ...), where it recorded it."""

    @classmethod
    def of_adapter(cls, folder: str | Path, settings: QuantizationSettings,
                   model_name: str | None = None) -> TrainedWeights:
        """An adapter folder and its base: ``model_name``, else the one recorded in ``adapter_config.json``."""
        config_file = Path(folder).expanduser() / "adapter_config.json"
        if not config_file.is_file():
            raise WeightsSourceError(f"adapter folder {str(folder)!r} has no adapter_config.json (expected a PEFT "
                                     "adapter folder such as <log_dir>/adapter written by finsight fit)")
        verify_folder_pickles(config_file.parent)  # an adapter_model.bin: data only, or refused naming it
        if model_name is None:
            model_name = json.loads(config_file.read_text()).get("base_model_name_or_path")
            if not model_name:
                raise WeightsSourceError(f"{config_file} does not name its base model; give --model_name")
        settings_file = config_file.parent / ADAPTER_RUN_SETTINGS
        run_settings = json.loads(settings_file.read_text()) if settings_file.is_file() else {}
        return cls(model_name, settings, adapter=config_file.parent, run_settings=run_settings)

    @classmethod
    def of_checkpoint(cls, path: str | Path, overrides: Mapping[str, Any] | None = None,
                      model_name: str | None = None) -> TrainedWeights:
        """A training checkpoint (a file, or a DeepSpeed folder): verified, its adapter read.

        The base and its quantization are the checkpoint's hyper-parameters with ``overrides`` (flat keys:
        ``compute_dtype``, ``attn_implementation``, ``quantization``) on top.
        """
        path = Path(path).expanduser()
        checkpoint = read_checkpoint(path)
        state, hyper_parameters = checkpoint.get("state_dict"), checkpoint.get("hyper_parameters")
        if not state or hyper_parameters is None:
            raise CheckpointContentError(f"{path} is not a finsight training checkpoint (no adapter weights "
                                         "or no hyper_parameters)")
        hyper_parameters = dict(hyper_parameters)
        reference = model_name or hyper_parameters.get("model_name")
        if not reference:
            raise CheckpointContentError(f"checkpoint {path} names no base model (hyper_parameters.model_name); "
                                         "give the model reference")
        settings = QuantizationSettings.from_hparams({**hyper_parameters, **(overrides or {})})
        # finsight's resume check records the run's data settings in the callbacks' state.
        run_settings = next((value["run_settings"] for value in (checkpoint.get("callbacks") or {}).values()
                             if isinstance(value, dict) and isinstance(value.get("run_settings"), dict)), {})
        return cls(str(reference), settings, checkpoint=path, hyper_parameters=hyper_parameters,
                   checkpoint_state=state, run_settings=run_settings)

    @classmethod
    def of_base(cls, model_name: str, settings: QuantizationSettings) -> TrainedWeights:
        """The base model alone, quantized and dequantized as training would (to compare with the tuned one)."""
        return cls(model_name, settings)

    @property
    def has_adapter(self) -> bool:
        return self.adapter is not None or self.checkpoint is not None

    @property
    def described(self) -> str:
        """One line naming the weights (the chat's greeting)."""
        if self.adapter is not None:
            return f"{self.reference} + adapter {self.adapter}"
        if self.checkpoint is not None:
            return f"{self.reference} + checkpoint {self.checkpoint}"
        return f"{self.reference} (base model, no adapter)"

    def cache_facts(self) -> dict[str, object]:
        """What the merged weights depend on besides the base files and the settings (the cache key's part).

        An adapter folder: its files' bytes. A checkpoint: its hyper-parameters (LoRA rank and alpha are not
        in the tensors) and a digest of its adapter tensors (the optimizer state beside them is never read).
        """
        if self.adapter is not None:
            return {"adapter": sorted((item.name, file_sha256(item)) for item in self.adapter.iterdir()
                                      if item.is_file() and item.name.startswith("adapter_"))}
        if self.checkpoint is None:
            return {}
        digest = hashlib.sha256()
        for name in sorted(self.checkpoint_state):
            digest.update(name.encode())
            digest.update(self.checkpoint_state[name].detach().reshape(-1).contiguous().view(torch.uint8).numpy())
        hyper_parameters = json.loads(json.dumps(dict(self.hyper_parameters), sort_keys=True, default=str))
        return {"checkpoint": {"hyper_parameters": hyper_parameters, "adapter_sha256": digest.hexdigest()}}

    def lora(self) -> tuple[PeftConfig, dict[str, torch.Tensor]] | None:
        """The adapter as PEFT takes it: its config and its tensors under PEFT's saved names; None without one.

        PEFT is imported here, only when an adapter is actually merged.
        """
        from peft import PeftConfig, load_peft_weights

        if self.adapter is not None:
            return PeftConfig.from_pretrained(str(self.adapter)), load_peft_weights(str(self.adapter), device="cpu")
        if self.checkpoint is None:
            return None
        # A run started from an adapter folder trained that folder's LoRA layout; a fresh run its own settings.
        started_from = self.hyper_parameters.get("adapter_path")
        config = (PeftConfig.from_pretrained(started_from) if started_from
                  else lora_config(LoraSettings.from_hparams(self.hyper_parameters)))
        return config, compat.peft.adapter_state_of_module(self.checkpoint_state, module_attribute="model")
