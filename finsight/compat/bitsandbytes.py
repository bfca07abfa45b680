"""bitsandbytes' 4-bit layer internals finsight reads (checked on 0.50.0 and 0.50.2).

A ``Linear4bit`` layer decides at every forward whether to switch to its CPU packing format (which breaks
training, see :func:`keep_4bit_weights_unpacked`), and serializes its quantization state as extra state-dict
keys beside the weight; generation has to skip those keys when it rebuilds a dense model.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from finsight.compat.noise import DropLinesStartingWith

if TYPE_CHECKING:
    from torch import nn

DISTRIBUTION = "bitsandbytes"
TESTED = ">=0.50,<0.51"


def keep_4bit_weights_unpacked(model: nn.Module) -> int:
    """Switch off bitsandbytes' CPU packing format on every 4-bit layer of ``model``; returns how many.

    On a CPU with AVX512-BF16, bitsandbytes 0.50 (read in 0.50.0 and 0.50.2) converts a ``Linear4bit``
    weight in place into an inference layout the first time the layer runs in eval mode with an input that
    needs no gradient (a validation step, a ``no_grad`` check), and converts it back only when the layer's
    state dict is taken. In that layout ``matmul_4bit`` calls ``gemv_4bit``, which has no autograd formula:
    every later backward silently skips the input gradient through the frozen base projections, so LoRA
    trains on wrong gradients; and the way back re-quantizes the constants from bfloat16, so each cycle
    changes the frozen base. The layer reads its ``support_avx512bf16_for_cpu`` flag (set at construction
    from the CPU detection) at every forward; turning it off keeps the layout finsight loaded, on every CPU.
    It can go once bitsandbytes packs only for models that never train (or gives ``gemv_4bit`` a backward
    and a lossless way back); the oracle test in ``tests/compat/test_cpu_kinds.py`` shows when.
    """
    layers = linear_4bit_layers(model)
    for layer in layers.values():
        layer.support_avx512bf16_for_cpu = False
    return len(layers)


def linear_4bit_layers(model: nn.Module) -> dict[str, Any]:
    """Every bitsandbytes 4-bit linear layer of ``model`` by its module name."""
    import bitsandbytes as bnb

    return {name: module for name, module in model.named_modules() if isinstance(module, bnb.nn.Linear4bit)}


def is_quant_state_key(name: str, layers: dict[str, Any]) -> bool:
    """Whether a state-dict key is a 4-bit layer's serialized quantization state, not a tensor of the model.

    bitsandbytes stores it as ``<layer>.weight.absmax``, ``<layer>.weight.quant_map``, ... (0.50).
    """
    return name.partition(".weight.")[0] in layers


# bitsandbytes' import decorates with torch's deprecated ``torch.jit.script_method`` (torch 2.13).
KNOWN_WARNINGS: tuple[tuple[str, str, type[Warning]], ...] = (
    (r"`torch\.jit\.script_method` is deprecated", r"torch\.jit\._script", DeprecationWarning),
)

# bitsandbytes logs this when it is imported on a CPU with AVX512-BF16 and the optional ``kernels`` package
# (which fetches a kernel from the Hugging Face Hub) is absent. That kernel serves only the CPU packing
# format, which finsight switches off (keep_4bit_weights_unpacked): the line is about a path never taken.
NO_PACKED_KERNEL_NOTICE = "Failed to load CPU gemm_4bit_forward from kernels-community"


class _DropNoPackedKernelNotice(DropLinesStartingWith):
    prefix = NO_PACKED_KERNEL_NOTICE


LOG_FILTERS: tuple[tuple[str, type[logging.Filter]], ...] = (
    ("bitsandbytes.backends.cpu.ops", _DropNoPackedKernelNotice),
)
