"""LoRA dropout that keeps a one-byte mask for backward instead of two float copies of the input.

PEFT computes each adapter as ``lora_B(lora_A(dropout(x)))``. Without gradient checkpointing, backward then
holds, per adapter, the dropped input (``lora_A`` saves it for its weight gradient) and, on the CPU, the
float noise tensor the dropout multiplied by (on CUDA a bool mask). With LoRA on the seven projections of a
Llama-style layer that is two float copies of seven layer inputs, about a third of what a step keeps for backward
(``benchmarks/RESULTS.md``, round 4). :class:`DropoutLoraA` fuses the dropout into ``lora_A`` and saves only
the undropped input (one tensor shared by the adapters that read it, q/k/v and gate/up) and the keep mask
as bools; backward rebuilds the dropped input with one elementwise product.

The numbers are exactly PEFT's: the forward draws the same random numbers in the same order as
``torch.nn.functional.dropout`` (on the CPU: a Bernoulli noise tensor divided by the keep probability; on
CUDA and other fused devices: ``torch.native_dropout``), and backward computes the gradients with the same
operations autograd would. ``tests/model/test_lora_dropout.py`` checks losses and gradients against PEFT's own
modules bit for bit.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from finsight import compat


def _dropout_with_mask(x: torch.Tensor, p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``F.dropout(x, p, training=True)`` and its keep mask, drawing the same random numbers as it does."""
    if x.device.type in ("cuda", "xpu", "lazy", "privateuseone"):
        return torch.native_dropout(x, p, True)  # what F.dropout runs on these devices
    noise = torch.empty_like(x).bernoulli_(1 - p).div_(1 - p)  # F.dropout's CPU path, step by step
    return x * noise, noise.ne(0)


class _DropoutLinear(torch.autograd.Function):
    """``F.linear(F.dropout(x, p), weight)`` whose backward keeps ``x`` and a bool mask, not the dropped copy."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, p: float) -> torch.Tensor:  # noqa: ANN001
        dropped, keep = _dropout_with_mask(x, p)
        ctx.save_for_backward(x, keep, weight)
        ctx.p = p
        return F.linear(dropped, weight)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, None]:  # noqa: ANN001
        x, keep, weight = ctx.saved_tensors
        # The noise F.dropout multiplied by: the same float op on the same 0/1 values.
        noise = keep.to(x.dtype).div_(1 - ctx.p)
        # Under autocast the forward's matmul ran in the half dtype of grad_output; elsewhere the casts are no-ops.
        grad_x = grad_weight = None
        if ctx.needs_input_grad[0]:
            grad_x = (grad_output @ weight.to(grad_output.dtype)).to(x.dtype) * noise
        if ctx.needs_input_grad[1]:
            dropped = (x * noise).reshape(-1, x.shape[-1]).to(grad_output.dtype)
            grad_weight = (grad_output.reshape(-1, grad_output.shape[-1]).t() @ dropped).to(weight.dtype)
        return grad_x, grad_weight, None


class DropoutLoraA(nn.Linear):
    """A LoRA ``A`` projection that applies the adapter's dropout itself, saving memory in backward.

    It holds the same weight parameter as the ``nn.Linear`` it replaces, so state dicts, saved adapters,
    merging and optimizers see no difference.
    """

    def __init__(self, linear: nn.Linear, p: float) -> None:
        nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.register_parameter("bias", None)
        self.p = p
        self.train(linear.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Dropout then projection; the memory-saving path only where backward will run."""
        if self.training and torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad):
            return _DropoutLinear.apply(x, self.weight, self.p)
        return F.linear(F.dropout(x, self.p, self.training), self.weight)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, dropout={self.p}"


def fuse_lora_dropout(model: nn.Module) -> int:
    """Move every plain LoRA adapter's dropout into its ``A`` projection; returns how many were moved.

    Adapters without dropout, with a bias on ``A`` or with a LoRA variant (DoRA and others, which read the
    dropout module themselves) keep PEFT's modules.
    """
    fused = 0
    for adapter in compat.peft.lora_adapters(model):
        dropout, lora_a = adapter.dropout, adapter.lora_a
        if (not isinstance(dropout, nn.Dropout) or not 0 < dropout.p < 1 or type(lora_a) is not nn.Linear
                or lora_a.bias is not None or adapter.has_variant):
            continue
        adapter.replace(DropoutLoraA(lora_a, dropout.p), nn.Identity())
        fused += 1
    return fused
