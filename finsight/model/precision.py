"""The precision that follows the hardware: which Trainer precision and 4-bit compute dtype a run uses.

bf16 is the fast choice wherever the hardware multiplies it natively (CPUs with AVX512-BF16 or AMX, GPUs
with bf16 support) and the slow one where it is emulated (AVX2 CPUs), so no fixed config line is right on
every machine: the ``finsight`` command fills an unset ``trainer.precision`` with :func:`choose_precision`,
and ``compute_dtype: auto`` follows the precision the run has (:func:`resolve_compute_dtype`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from finsight import compat

ComputeDtype = Literal["bfloat16", "float16", "float32"]
ComputeDtypeChoice = Literal["auto", "bfloat16", "float16", "float32"]


@dataclass(frozen=True)
class HardwarePrecision:
    """The Trainer precision and 4-bit compute dtype this machine runs QLoRA fastest in, and why."""

    precision: str
    compute_dtype: ComputeDtype
    reason: str


def choose_precision(accelerator: str | None = None) -> HardwarePrecision:
    """The precision that follows the hardware: bf16 where it is native, float32 on CPUs without it.

    On a CPU with AVX512-BF16 or AMX, bf16 autocast with bfloat16 4-bit matmuls trains faster than float32
    (``benchmarks/RESULTS.md``, round 5); on AVX2 CPUs bf16 is emulated and slower than float32. GPUs
    use bf16 where they support it and fp16 mixed precision (with loss scaling) where they do not.
    ``accelerator`` ``"cpu"`` asks for the CPU's choice on a machine that also has a GPU.
    """
    if accelerator != "cpu" and torch.cuda.is_available():
        if torch.cuda.is_bf16_supported():
            return HardwarePrecision("bf16-mixed", "bfloat16", "CUDA GPU with bf16 support")
        return HardwarePrecision("16-mixed", "float16", "CUDA GPU without bf16 support")
    native, instructions = compat.torch.cpu_has_native_bf16()
    if native:
        return HardwarePrecision("bf16-mixed", "bfloat16", f"CPU with {instructions}: bf16 matmuls in hardware")
    return HardwarePrecision("32-true", "float32", f"CPU with {instructions}, no native bf16: float32 is faster")


# The 4-bit compute dtype each Trainer precision computes in (``compute_dtype: auto`` follows it).
PRECISION_COMPUTE_DTYPES: dict[str, ComputeDtype] = {
    "bf16-mixed": "bfloat16", "bf16-true": "bfloat16", "bf16": "bfloat16",
    "16-mixed": "float16", "16-true": "float16", "16": "float16",
    "32-true": "float32", "32": "float32",
}


def resolve_compute_dtype(requested: ComputeDtypeChoice,
                          trainer_precision: str | None = None) -> tuple[ComputeDtype, str]:
    """The compute dtype of the 4-bit layers, and why: ``auto`` follows the Trainer's precision when there
    is one (bf16 autocast feeds bfloat16 to the 4-bit matmuls anyway), else the hardware's choice."""
    if requested != "auto":
        return requested, "set in the config"
    if trainer_precision is not None and str(trainer_precision) in PRECISION_COMPUTE_DTYPES:
        return PRECISION_COMPUTE_DTYPES[str(trainer_precision)], f"auto: follows precision {trainer_precision}"
    choice = choose_precision()
    return choice.compute_dtype, f"auto: {choice.reason}"
