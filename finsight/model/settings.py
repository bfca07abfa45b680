"""The model settings as objects: built once from the flat config keys, passed whole from there on.

The YAML config and every checkpoint's hyper-parameters keep flat keys (``quantization``, ``lora_r``,
``gradient_checkpointing``, ...): that is what users write and what Lightning records. Loading, the generation
model, the generation cache's key and export all need the same groups of them; each group is one frozen
dataclass here, so a setting added to a group reaches every one of those places at once, and a function
cannot be handed two settings that belong to different models.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from finsight.model.memory import GradientCheckpointing, ReleaseFreedMemory
from finsight.model.precision import ComputeDtype

QuantizationKind = Literal["nf4", "fp4", "none"]
AttentionChoice = Literal["auto", "flash_attention_2", "sdpa", "eager"]

DEFAULT_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class QuantizationSettings:
    """How the base model's weights are stored and computed with: what every model built from a run (training,
    the generation model, its cache entry, an export) must agree on to hold the trained numbers."""

    kind: QuantizationKind = "nf4"
    double_quant: bool = True
    compute_dtype: ComputeDtype = "float32"
    attn_implementation: AttentionChoice = "auto"
    quant_storage: ComputeDtype | Literal["uint8"] = "uint8"
    """The dtype the packed 4-bit values are stored in: the same bytes in another container. A float dtype lets
    DeepSpeed ZeRO-3 partition them like any parameter; not part of the run's numbers (``key``, hyper-parameters)."""

    @classmethod
    def from_hparams(cls, hparams: Mapping[str, Any]) -> QuantizationSettings:
        """From the flat keys of a config or a checkpoint's hyper-parameters (missing ones: the defaults).

        ``compute_dtype`` must be resolved already (``auto`` is the module's to resolve, from the Trainer).
        """
        defaults = cls()
        return cls(kind=hparams.get("quantization", defaults.kind),
                   double_quant=bool(hparams.get("double_quant", defaults.double_quant)),
                   compute_dtype=hparams.get("compute_dtype", defaults.compute_dtype),
                   attn_implementation=hparams.get("attn_implementation", defaults.attn_implementation))

    def replace(self, **changes: Any) -> QuantizationSettings:
        """These settings with some changed (``kind="none"``: the same model, unquantized)."""
        return dataclasses.replace(self, **changes)

    @property
    def quantized(self) -> bool:
        return self.kind != "none"

    def key(self) -> dict[str, str | bool]:
        """What changes the weights (the attention kernel does not): the generation cache's part of the key."""
        return {"quantization": self.kind, "double_quant": self.double_quant, "compute_dtype": self.compute_dtype}


NF4 = QuantizationSettings()
"""QLoRA's defaults: NF4 with double quantization, float32 compute, the attention kernel chosen at load."""


@dataclass(frozen=True)
class LoraSettings:
    """The adapter a fresh run trains (an existing adapter folder brings its own)."""

    r: int = 64
    alpha: int = 16
    dropout: float = 0.1
    target_modules: tuple[str, ...] = DEFAULT_TARGET_MODULES

    @classmethod
    def from_hparams(cls, hparams: Mapping[str, Any]) -> LoraSettings:
        """From the flat ``lora_r``, ``lora_alpha``, ``lora_dropout`` and ``target_modules`` keys."""
        defaults = cls()
        return cls(r=int(hparams.get("lora_r", defaults.r)), alpha=int(hparams.get("lora_alpha", defaults.alpha)),
                   dropout=float(hparams.get("lora_dropout", defaults.dropout)),
                   target_modules=tuple(hparams.get("target_modules") or defaults.target_modules))


@dataclass(frozen=True)
class MemorySettings:
    """Training memory against speed: what is recomputed in backward and what goes back to the OS."""

    gradient_checkpointing: GradientCheckpointing = True
    release_freed_memory: ReleaseFreedMemory = "auto"
    activation_budget_gib: float | None = None

    @classmethod
    def from_hparams(cls, hparams: Mapping[str, Any]) -> MemorySettings:
        """From the flat ``gradient_checkpointing``, ``release_freed_memory`` and ``activation_budget_gib`` keys."""
        defaults = cls()
        return cls(gradient_checkpointing=hparams.get("gradient_checkpointing", defaults.gradient_checkpointing),
                   release_freed_memory=hparams.get("release_freed_memory", defaults.release_freed_memory),
                   activation_budget_gib=hparams.get("activation_budget_gib", defaults.activation_budget_gib))
