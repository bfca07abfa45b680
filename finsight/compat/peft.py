"""PEFT's LoRA module layout finsight reads and rewrites (checked on 0.18 and 0.21).

LoRA dropout is fused into the ``A`` projection (``finsight.model.lora_dropout``), which replaces entries of a
``LoraLayer``'s ``lora_A`` and ``lora_dropout`` dicts; generation renames a PEFT model's base weights back to
the transformers model's names. Both follow how PEFT lays out its modules, not a documented API.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from torch import nn

DISTRIBUTION = "peft"
TESTED = ">=0.18,<0.22"


@dataclass(frozen=True)
class LoraAdapterParts:
    """One adapter of one LoRA layer: its ``A`` projection and the dropout PEFT applies before it."""

    layer: Any
    name: str

    @property
    def lora_a(self) -> nn.Module | None:
        return self.layer.lora_A[self.name] if self.name in self.layer.lora_A else None

    @property
    def dropout(self) -> nn.Module:
        return self.layer.lora_dropout[self.name]

    @property
    def has_variant(self) -> bool:
        """DoRA and other variants read the dropout module themselves: their parts must stay PEFT's."""
        return self.name in getattr(self.layer, "lora_variant", {})

    def replace(self, lora_a: nn.Module, dropout: nn.Module) -> None:
        """Put new modules in place of this adapter's ``A`` projection and dropout."""
        self.layer.lora_A[self.name] = lora_a
        self.layer.lora_dropout[self.name] = dropout


def lora_adapters(model: nn.Module) -> Iterator[LoraAdapterParts]:
    """Every adapter of every LoRA layer in ``model`` (one per adapter name per layer)."""
    from peft.tuners.lora import LoraLayer

    for layer in model.modules():
        if isinstance(layer, LoraLayer):
            for name in list(layer.lora_dropout.keys()):
                yield LoraAdapterParts(layer, name)


def is_lora_tensor(name: str) -> bool:
    """Whether a PEFT model's state-dict key is a LoRA tensor (``lora_A``, ``lora_B``, ...), not a base weight."""
    return "lora_" in name


def base_weight_name(name: str) -> str:
    """A PEFT-wrapped layer's weight under the transformers model's own name (PEFT adds ``.base_layer.``)."""
    return name.replace(".base_layer.", ".")


def adapter_state_of_module(state: Mapping[str, torch.Tensor], module_attribute: str,
                            adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """A module's adapter tensors (a training checkpoint's ``state_dict``) under the names PEFT saves them with.

    The checkpoint names them ``<module_attribute>.base_model.model.<layer>.lora_A.<adapter_name>.weight``;
    ``save_pretrained`` and ``set_peft_model_state_dict`` use the same name without the attribute and without
    the adapter's name, which PEFT inserts itself when loading.
    """
    prefix, infix = f"{module_attribute}.", f".{adapter_name}."
    return {name.removeprefix(prefix).replace(infix, "."): tensor for name, tensor in state.items()
            if name.startswith(prefix) and is_lora_tensor(name)}


# PEFT reads transformers' deprecated ``is_gradient_checkpointing`` while wrapping a model (transformers 5.23+).
KNOWN_WARNINGS: tuple[tuple[str, str, type[Warning]], ...] = (
    (r"`is_gradient_checkpointing` is deprecated", r"transformers\.modeling_utils", FutureWarning),
)
LOG_FILTERS: tuple = ()
