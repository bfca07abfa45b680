"""A config that asks for hardware this machine lacks stops before anything loads, in one line that names the
setting and what to use instead.

Lightning finds out late and loudly: ``accelerator: gpu`` on a machine without one ends in a 30-line
``MisconfigurationException: No supported gpu backend found!``, more devices than the machine has in another,
and ``attn_implementation: flash_attention_2`` without flash-attn in an ``ImportError`` from transformers once the
model is being loaded. bf16 on a CPU without native bf16 (AVX2) runs, emulated, several times slower than
float32, which a user only finds out from the step time. The CLI calls :func:`exit_if_hardware_missing` on the parsed config first.
"""

from __future__ import annotations

import importlib.util
from typing import Any

import torch

from finsight import compat
from finsight.errors import FinSightError

GPU_ACCELERATORS = ("gpu", "cuda")


class HardwareUnavailableError(FinSightError, RuntimeError):
    """The config asks for a device, a device count or a kernel this machine does not have.

    Fix: use the alternative the message names (`--trainer.accelerator cpu`, fewer `--trainer.devices`,
    `--model.attn_implementation auto`, `--trainer.precision null`), or run the config on a machine that has the
    hardware ([GPU page](gpu.md)).
    """


def requested_device_count(devices: Any) -> int | None:
    """How many devices ``trainer.devices`` asks for, in Lightning's forms (``2``, ``"2"``, ``"0,1"``, ``[0, 1]``);
    None for ``auto`` and ``-1`` (all there are)."""
    if isinstance(devices, list | tuple):
        return len(devices)
    text = str(devices).strip()
    if text in ("auto", "-1", "None", ""):
        return None
    if "," in text:
        return len([part for part in text.split(",") if part.strip()])
    return int(text) if text.isdigit() else None


def hardware_problem(trainer_config: Any, model_config: Any) -> str | None:
    """What in the config this machine cannot provide (one line), or None."""
    accelerator = str(trainer_config.get("accelerator") or "auto").lower()
    wanted = requested_device_count(trainer_config.get("devices", "auto"))
    if accelerator in GPU_ACCELERATORS:
        available = torch.cuda.device_count()
        if available == 0:
            return (f"trainer.accelerator {accelerator!r} asks for a GPU and this machine has none (torch sees no "
                    "CUDA device; a CPU build of torch never does): use --trainer.accelerator cpu, or "
                    "configs/quickstart.yaml, which is made for a CPU")
        if wanted is not None and wanted > available:
            return (f"trainer.devices {wanted} asks for more GPUs than this machine has ({available}): use "
                    f"--trainer.devices {available}, or --trainer.num_nodes for several machines")
    problem = bf16_problem(accelerator, trainer_config, model_config or {})
    if problem:
        return problem
    attention = (model_config or {}).get("attn_implementation")
    if attention == "flash_attention_2":
        if importlib.util.find_spec("flash_attn") is None:
            return ("model.attn_implementation 'flash_attention_2' needs the flash-attn package, which is not "
                    "installed: pip install 'finsight[flash]' on a CUDA machine, or use auto (sdpa here)")
        if not torch.cuda.is_available():
            return ("model.attn_implementation 'flash_attention_2' needs a CUDA GPU and this machine has none: use "
                    "auto (sdpa here)")
    return None


def bf16_problem(accelerator: str, trainer_config: Any, model_config: Any) -> str | None:
    """bf16 asked for on a CPU that only emulates it (``trainer.precision`` or ``model.compute_dtype``).

    An unset precision (``null``) and ``compute_dtype: auto`` follow the hardware and are never refused.
    """
    on_cpu = accelerator == "cpu" or (accelerator == "auto" and not torch.cuda.is_available())
    if not on_cpu:
        return None
    precision = str(trainer_config.get("precision") or "")
    compute_dtype = str(model_config.get("compute_dtype") or "")
    if precision.startswith("bf16"):
        setting, alternative = f"trainer.precision {precision!r}", "--trainer.precision 32-true (or null"
    elif compute_dtype == "bfloat16":
        setting, alternative = "model.compute_dtype 'bfloat16'", "--model.compute_dtype float32 (or auto"
    else:
        return None
    native, instructions = compat.torch.cpu_has_native_bf16()
    if native:
        return None
    return (f"{setting} asks for bfloat16, which this CPU ({instructions}) only emulates, several times slower "
            f"than float32: use {alternative}, which follows the hardware), or a CPU with AVX512-BF16 or AMX")


def exit_if_hardware_missing(trainer_config: Any, model_config: Any) -> None:
    """Stop the command (one ``error:`` line) before any model or data is loaded; see :func:`hardware_problem`."""
    problem = hardware_problem(trainer_config, model_config)
    if problem:
        raise HardwareUnavailableError(problem)
