"""What DeepSpeed on the CPU needs beyond Lightning's DeepSpeedStrategy (checked on DeepSpeed 0.19.8).

Lightning 2.6 passes ``device_rank=root_device.index`` to ``deepspeed.initialize``, which a CPU device (index
None) cannot give; DeepSpeed's engine divides the loss by the accumulation steps again unless told not to;
a CUDA machine asked to train on its CPU has to be given DeepSpeed's CPU accelerator by class; and its checkpoint
files hold a few DeepSpeed value types that a data-only load must be told about.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from finsight.compat.noise import DropLinesStartingWith

DISTRIBUTION = "deepspeed"
TESTED = ">=0.19.8,<0.20"


def use_cpu_accelerator() -> None:
    """Make DeepSpeed use its CPU accelerator (it picks CUDA on a machine that has it)."""
    from deepspeed.accelerator import get_accelerator, set_accelerator
    from deepspeed.accelerator.cpu_accelerator import CPU_Accelerator

    if get_accelerator().device_name() != "cpu":
        set_accelerator(CPU_Accelerator())


@contextmanager
def cpu_device_rank(local_rank: int) -> Iterator[None]:
    """While open, ``deepspeed.initialize`` takes the process's local rank where Lightning passes no device.

    Lightning's ``init_deepspeed`` hands ``args.device_rank=None`` on the CPU, which DeepSpeed compares with 0.
    """
    import deepspeed

    initialize = deepspeed.initialize

    def initialize_with_rank(*args: Any, **kwargs: Any) -> Any:
        if getattr(kwargs.get("args"), "device_rank", 0) is None:
            kwargs["args"].device_rank = local_rank
        return initialize(*args, **kwargs)

    deepspeed.initialize = initialize_with_rank
    try:
        yield
    finally:
        deepspeed.initialize = initialize


@functools.cache
def checkpoint_value_types() -> tuple[Any, ...]:
    """The types DeepSpeed writes into its checkpoint files that torch's weights-only unpickler does not allow
    by default (found with ``torch.serialization.get_unsafe_globals_in_checkpoint`` on ZeRO-2 folders).

    Each is a plain value type (an enum, a dataclass or a class holding numbers) whose unpickling calls no
    other code. Imported only when a DeepSpeed checkpoint is read: a chat from a ``.ckpt`` file needs none.
    """
    # In the ZeRO optimizer state ('*optim_states.pt'): the stage ('zero_stage'), the loss scaler's settings
    # ('loss_scaler'; dynamic under fp16), and each parameter's slice of the flat partition
    # ('param_slice_mappings').
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return ZeroStageEnum, LossScaler, DynamicLossScaler, fragment_address


def backward_without_accumulation_scaling(kwargs: dict[str, Any]) -> dict[str, Any]:
    """``DeepSpeedEngine.backward`` keyword arguments that keep it from dividing by the accumulation steps.

    Lightning has already divided the loss by ``accumulate_grad_batches``; the engine's ``scale_wrt_gas``
    (default True) would divide it again, making every gradient and its clipping threshold 1/accumulation of
    what they should be.
    """
    return {"scale_wrt_gas": False, **kwargs}


KNOWN_WARNINGS: tuple[tuple[str, str, type[Warning]], ...] = ()

# DeepSpeed's notice (on standard output) each time a process imports it on a machine without CUDA; saving a
# transformers model imports it through accelerate, so every CPU fit and chat that saves one printed it.
NO_ACCELERATOR_NOTICE = "Setting accelerator to CPU. If you have GPU or other accelerator"


class _DropNoAcceleratorNotice(DropLinesStartingWith):
    prefix = NO_ACCELERATOR_NOTICE

    def filter(self, record: logging.LogRecord) -> bool:
        if super().filter(record):
            return True
        import torch  # loaded already (DeepSpeed is logging); this module imports no heavy library itself

        return torch.cuda.is_available()  # CUDA there and DeepSpeed still chose the CPU: that is news, it stays


LOG_FILTERS: tuple[tuple[str, type[logging.Filter]], ...] = (
    ("DeepSpeed", _DropNoAcceleratorNotice),  # DeepSpeed configures this logger when imported; filters stay
)
