"""Model FLOPs of a training step, counted by Lightning's ``measure_flops``, and the card's peak from its
``get_available_flops``: the MFU rows of the comparison.

A step's cost is linear in its tokens (every projection, the LM head, the LoRA adapters) plus a term in
each sample's squared length (attention's two products), so ``measure_flops`` runs one forward and backward
pass at two sequence lengths on a meta-device copy of the model (no memory, no compute) and the two
coefficients are solved from them. The copy has the real run's trainable set: the base frozen (no weight
gradients), LoRA on the target modules. It is not quantized: bitsandbytes' 4-bit layers cannot live on the
meta device and run their matmuls in kernels ``FlopCounterMode`` does not see; they dequantize and multiply
in the compute dtype, so the unquantized shape has the same matmul FLOPs. As before, recomputation by
gradient checkpointing is not counted (model FLOPs, not hardware FLOPs) and causal masking is not discounted.
"""

from __future__ import annotations

from typing import Any

# The two sequence lengths the coefficients are solved from (any two distinct lengths give the same answer).
_SHORT, _LONG = 8, 16
# The card's dense bf16 peak where Lightning's table has none (H100 and H200 SXM: 989 TFLOP/s).
DEFAULT_PEAK_TFLOPS = 989.0


def flop_coefficients(config: Any, lora_r: int, target_modules: tuple[str, ...]) -> dict[str, float]:
    """FLOPs of one training pass per token and per squared sample length, measured with Lightning's
    ``measure_flops`` on a meta-device copy of ``config``'s model with LoRA on ``target_modules``."""
    import torch
    from lightning.fabric.utilities.throughput import measure_flops
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
        model = get_peft_model(model, LoraConfig(r=lora_r, lora_alpha=lora_r, lora_dropout=0.0,
                                                 target_modules=list(target_modules)))

    def pass_flops(length: int) -> int:
        ids = torch.zeros(1, length, dtype=torch.long, device="meta")
        return measure_flops(model, lambda: model(input_ids=ids).logits, lambda logits: logits.sum())

    short, long = pass_flops(_SHORT), pass_flops(_LONG)
    # short = a·S + b·S², long = a·L + b·L²
    per_squared = (long * _SHORT - short * _LONG) / (_LONG**2 * _SHORT - _SHORT**2 * _LONG)
    per_token = (short - per_squared * _SHORT**2) / _SHORT
    return {"per_token": per_token, "per_squared_length": per_squared}


def step_flops(coefficients: dict[str, float], tokens: float, squared_lengths: float) -> float:
    """Model FLOPs of one optimizer step: ``tokens`` through the linear layers, attention per sample."""
    return coefficients["per_token"] * tokens + coefficients["per_squared_length"] * squared_lengths


def peak_flops(cuda: bool) -> float | None:
    """The GPU's dense bf16 peak in TFLOP/s from Lightning's table (None on a CPU or a card it lacks)."""
    if not cuda:
        return None
    import torch
    from lightning.fabric.utilities.throughput import get_available_flops

    flops = get_available_flops(torch.device("cuda"), torch.bfloat16)
    return flops / 1e12 if flops else None
