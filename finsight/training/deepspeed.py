"""Scale-out runtime: DeepSpeed ZeRO with CPU offload, checked before anything heavy is loaded.

DDP needs no strategy code: ``--trainer.strategy ddp --trainer.devices N`` (``--trainer.num_nodes`` for
several machines) runs the same config, and the data module shards its length-grouped order per rank. Code
that runs on rank 0 only gets the run's folder from ``finsight.run_dir`` (``trainer.log_dir`` is a
collective call and would hang there).

DeepSpeed: ``finsight fit --config configs/finsight.yaml --config configs/deepspeed_zero2_offload.yaml``
selects :class:`FinSightDeepSpeedStrategy`. Its DeepSpeed config is built by :func:`deepspeed_config`, a
pure function, so what a run will get can be inspected (and tested) without DeepSpeed or a GPU. It runs on
CUDA GPUs and, through DeepSpeed's CPU accelerator (gloo between processes), on the CPU: the same ZeRO code
path, small enough to test for real on a machine without a GPU.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import logging
import shutil
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

import torch
from lightning.pytorch.accelerators import CPUAccelerator
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy
from lightning.pytorch.utilities.rank_zero import rank_zero_only

from finsight import compat
from finsight.atomic import (
    disk_full_error,
    is_no_space,
    remove_stale_temporaries,
    replace_with,
    temporary_sibling,
)
from finsight.checkpoint_files import read_checkpoint, verify_deepspeed_folder
from finsight.class_paths import configured_class
from finsight.errors import FinSightError
from finsight.tensors_only import tensors_only
from finsight.training.checkpoint import tensor_bytes

log = logging.getLogger(__name__)

DEEPSPEED_INSTALL = "pip install 'finsight[deepspeed]'"
ZeroStage = Literal[1, 2, 3]


class StrategyUnavailableError(FinSightError, RuntimeError):
    """A requested strategy cannot run here; the one-line message names what is missing and how to get it.

    Fix: install what the message names (`pip install 'finsight[deepspeed]'`; on a machine without CUDA
    `DS_BUILD_OPS=0 pip install 'finsight[deepspeed]'`), or choose another strategy (`--trainer.strategy auto`).
    """


class DeepSpeedSettingsError(FinSightError, ValueError):
    """A ZeRO setting finsight's DeepSpeed strategy does not take (a stage or offload device it cannot run).

    Fix: use `finsight.callbacks.FinSightDeepSpeedStrategy` with a stage from 1 to 3 and `cpu` offload, as
    `configs/deepspeed_zero2_offload.yaml` and `configs/deepspeed_zero3_offload.yaml` do.
    """


@functools.cache
@rank_zero_only
def _log_once(message: str) -> None:
    """Log a warning once per process, on global rank 0 only."""
    log.warning(message)


def deepspeed_unavailable_reason() -> str | None:
    """Why DeepSpeed cannot run on this machine (one line), or None when it can.

    CUDA is not needed: without a GPU the strategy runs on DeepSpeed's CPU accelerator.
    """
    if importlib.util.find_spec("deepspeed") is None:
        return f"the deepspeed package is not installed ({DEEPSPEED_INSTALL})"
    return None


def deepspeed_config(
    stage: ZeroStage = 2,
    offload_optimizer: bool = True,
    offload_optimizer_device: Literal["cpu"] = "cpu",
    offload_param: bool = False,
    offload_param_device: Literal["cpu"] = "cpu",
    pin_memory: bool = True,
) -> dict[str, Any]:
    """The DeepSpeed config dict for a ZeRO stage and its CPU offloads (pure: needs neither DeepSpeed nor CUDA).

    The ZeRO bucket settings are Lightning's ``DeepSpeedStrategy`` defaults. Micro-batch size, gradient
    accumulation and clipping are deliberately absent: Lightning writes ``train_micro_batch_size_per_gpu``
    (from the train loader's batch sampler, i.e. ``data.batch_size``), ``gradient_accumulation_steps``
    (``trainer.accumulate_grad_batches``) and ``gradient_clipping`` (``trainer.gradient_clip_val``) at setup,
    and refuses a config that already holds the accumulation. Precision (``bf16``/``fp16``) is likewise
    added by Lightning from ``trainer.precision``.

    Parameter offload exists only in ZeRO stage 3 (stages 1 and 2 keep a full copy of the parameters on
    every GPU), so ``offload_param`` is applied for stage 3 and, for stages 1-2, left out with a warning
    logged once rather than handed to DeepSpeed as a setting it would not honour.
    """
    if stage not in (1, 2, 3):
        raise DeepSpeedSettingsError(f"DeepSpeed ZeRO stage must be 1, 2 or 3, got {stage!r}")
    for key, device in (("offload_optimizer_device", offload_optimizer_device),
                        ("offload_param_device", offload_param_device)):
        if device != "cpu":
            raise DeepSpeedSettingsError(f"{key} must be 'cpu' (NVMe offload needs Lightning's DeepSpeedStrategy and its "
                             f"nvme_path/aio settings), got {device!r}")
    zero: dict[str, Any] = {
        "stage": stage,
        "contiguous_gradients": True,
        "overlap_comm": True,
        "allgather_partitions": True,
        "reduce_scatter": True,
        "allgather_bucket_size": 200_000_000,
        "reduce_bucket_size": 200_000_000,
        "sub_group_size": 1_000_000_000_000,
    }
    if offload_optimizer:
        zero["offload_optimizer"] = {"device": offload_optimizer_device, "pin_memory": pin_memory}
    if offload_param:
        if stage == 3:
            zero["offload_param"] = {"device": offload_param_device, "pin_memory": pin_memory}
        else:
            _log_once(f"offload_param is ignored with ZeRO stage {stage}: DeepSpeed offloads parameters only in "
                      "stage 3 (stages 1-2 keep the full parameters on every GPU); the optimizer offload still "
                      "applies. Set stage: 3 to offload parameters too.")
    # Lightning's default too: ZeRO checks the optimizer class against a short list; AdamW is fine.
    return {"zero_allow_untested_optimizer": True, "zero_optimization": zero}


class FinSightDeepSpeedStrategy(DeepSpeedStrategy):
    """Lightning's ``DeepSpeedStrategy`` with the methodology's ZeRO offload settings, explicit handling of
    parameter offload (stage 3 only), adapter-only checkpoints, and a one-line error instead of a traceback
    when DeepSpeed is not installed. Runs on CUDA GPUs, and on the CPU through DeepSpeed's CPU accelerator.

    Only the settings that shape the DeepSpeed config are arguments; Lightning's own config-building
    arguments (buckets, NVMe, activation partitioning) are not accepted here, because with an explicit
    config Lightning would silently ignore them.
    """

    def __init__(
        self,
        stage: ZeroStage = 2,
        offload_optimizer: bool = True,
        offload_optimizer_device: Literal["cpu"] = "cpu",
        offload_param: bool = False,
        offload_param_device: Literal["cpu"] = "cpu",
        pin_memory: bool = True,
        exclude_frozen_parameters: bool = True,
        load_full_weights: bool = False,
        logging_level: int = logging.WARN,
    ) -> None:
        """
        Args:
            stage: ZeRO stage: 1 shards optimizer state, 2 also gradients, 3 also parameters.
            offload_optimizer: Keep optimizer state (and the update step, via DeepSpeedCPUAdam) in CPU memory.
            offload_optimizer_device: Where the optimizer state goes; only ``cpu``.
            offload_param: Offload parameters to CPU too. DeepSpeed honours this only in stage 3; with
                stages 1-2 it is left out of the config and a warning says so.
            offload_param_device: Where parameters go; only ``cpu``.
            pin_memory: Page-locked CPU buffers for the offloaded state: faster GPU transfers, more host RAM.
            exclude_frozen_parameters: Leave frozen weights (the 4-bit base) out of DeepSpeed checkpoints,
                so they hold the adapter and its optimizer state only.
            load_full_weights: Not taken (kept so that a config naming it gets a clear error): every command reads
                both kinds of checkpoint itself.
            logging_level: DeepSpeed's own log level.
        """
        reason = deepspeed_unavailable_reason()
        if reason:
            raise StrategyUnavailableError(f"DeepSpeed strategy requested, but {reason}")
        if load_full_weights:
            raise DeepSpeedSettingsError(
                "load_full_weights: true loads one file of the whole model into ZeRO-3, but finsight's checkpoints "
                "hold the adapter only, and fit, validate, test, predict, export and chat read a DeepSpeed folder "
                "or a .ckpt file themselves; remove load_full_weights")
        self.zero_settings = {
            "stage": stage, "offload_optimizer": offload_optimizer,
            "offload_optimizer_device": offload_optimizer_device, "offload_param": offload_param,
            "offload_param_device": offload_param_device, "pin_memory": pin_memory,
        }
        super().__init__(
            config=deepspeed_config(**self.zero_settings),
            exclude_frozen_parameters=exclude_frozen_parameters,
            load_full_weights=load_full_weights,
            logging_level=logging_level,
        )

    @contextmanager
    def model_sharded_context(self) -> Iterator[None]:
        """``configure_model`` without ``deepspeed.zero.Init`` around it, in every stage.

        Under ZeRO-3 Lightning would build the model inside ``zero.Init``, which partitions each layer's
        parameters as it is constructed; transformers then initializes weights that are already partitioned
        away (an ``IndexError`` in ``_init_weights``), and it loads 4-bit models outside ``zero.Init`` by design.
        So the quantized model is built whole, its 4-bit weights stored in a float dtype
        (:func:`shards_parameters`), and ``deepspeed.initialize`` partitions every parameter, the 4-bit
        storage included, across the ranks (and to the CPU with ``offload_param``).
        """
        yield

    def setup(self, trainer: Any) -> None:
        """Lightning's, with DeepSpeed's nominal micro-batch size set to 1 under ``data.batch_tokens``.

        Lightning reads that size from the train loader's batch sampler, which a loader of whole token-budget
        micro-batches does not have; DeepSpeed uses it only for its throughput log and a consistency check.
        """
        if getattr(trainer.datamodule, "batch_tokens", None) is not None:
            self.config.setdefault("train_micro_batch_size_per_gpu", 1)
        super().setup(trainer)

    # Lightning's DeepSpeedStrategy refuses anything but CUDA in three places; DeepSpeed itself runs on the CPU
    # (its CPU accelerator, gloo between processes). The three overrides below lift exactly those refusals.

    def setup_environment(self) -> None:
        """On a CPU accelerator: skip Lightning's CUDA-only check and make DeepSpeed use its CPU accelerator."""
        if not isinstance(self.accelerator, CPUAccelerator):
            super().setup_environment()
            return
        compat.deepspeed.use_cpu_accelerator()  # also on a CUDA machine asked to train on its CPU
        DDPStrategy.setup_environment(self)

    def setup_distributed(self) -> None:
        """Lightning's, minus the device-index validation that a CPU device (index None) cannot pass."""
        if not isinstance(self.accelerator, CPUAccelerator):
            super().setup_distributed()
            return
        compat.lightning.reset_seed()
        self.set_world_ranks()
        compat.lightning.init_deepspeed_distributed(self)

    def init_deepspeed(self) -> None:
        """Lightning's, with the process's local rank as DeepSpeed's device on the CPU (training and inference)."""
        if not isinstance(self.accelerator, CPUAccelerator):
            super().init_deepspeed()
            return
        with compat.deepspeed.cpu_device_rank(self.local_rank):
            super().init_deepspeed()

    def save_checkpoint(self, checkpoint: dict, filepath: Any, storage_options: Any | None = None) -> None:
        """DeepSpeed's checkpoint folder, written atomically: every rank writes its part under a temporary
        name (the same on every rank), and rank 0 renames the complete folder onto ``filepath``; a kill in
        between leaves the previous folder readable. A full disk is one ``DiskFullError``."""
        target = Path(self.broadcast(str(filepath)))
        temporary = temporary_sibling(target, tag=f"step{checkpoint.get('global_step', 0)}")
        if self.is_global_zero:
            remove_stale_temporaries(target)
        self.barrier()
        try:
            self._save_trained_state(checkpoint, temporary, storage_options)
        except BaseException as error:
            # The partial folder is never read (hidden, not under the final name); removing it gives back
            # the space a full disk needs.
            shutil.rmtree(temporary, ignore_errors=True)
            if is_no_space(error):
                raise disk_full_error(target.parent, tensor_bytes(checkpoint), f"checkpoint {target.name}") from error
            raise
        self.barrier()
        if self.is_global_zero:
            replace_with(temporary, target)
        self.barrier()

    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        """DeepSpeed's own loader, once every file of the folder is verified (damage, code), and every load in
        it of tensors and plain data only: DeepSpeed itself asks ``torch.load`` for full unpickling."""
        if self._evaluating_zero3():
            # ZeRO-3 keeps the trained values in the optimizer's partitions only (the module states hold
            # placeholders), and DeepSpeed restores those for training only: validate, test and predict read the
            # consolidated weights instead (verified there) and scatter them into the partitions.
            return read_checkpoint(checkpoint_path)
        if Path(checkpoint_path).is_dir():
            verify_deepspeed_folder(checkpoint_path)
        with tensors_only(checkpoint_path, deepspeed=True):
            return super().load_checkpoint(checkpoint_path, weights_only=True)

    def load_model_state_dict(self, checkpoint: Mapping[str, Any], strict: bool = True) -> None:
        """Under ZeRO-3 outside fit, the weights :meth:`load_checkpoint` read, scattered into the partitions;
        otherwise DeepSpeed has loaded them already."""
        if self._evaluating_zero3():
            load_trained_weights(self, self.lightning_module, checkpoint)
            return
        super().load_model_state_dict(checkpoint, strict=strict)

    def _evaluating_zero3(self) -> bool:
        module = self.lightning_module
        # TrainerFn is a str enum: "fit", "validate", "test", "predict".
        return bool(self.zero_stage_3 and module is not None and module.trainer.state.fn != "fit")

    def _save_trained_state(self, checkpoint: dict, filepath: Path, storage_options: Any | None) -> None:
        """DeepSpeed's checkpoint folder, holding the trained weights and their optimizer state only.

        ``exclude_frozen_parameters`` leaves out frozen *parameters*, but a 4-bit layer's state dict also
        holds its quantization constants (``absmax``, ``quant_map``, ...), which are not parameters: several
        percent of the base model's size in every checkpoint. They are dropped here too.
        """
        if not self.exclude_frozen_parameters:
            super().save_checkpoint(checkpoint, filepath, storage_options)
            return
        module = self.lightning_module
        trained = {name for name, p in module.named_parameters() if p.requires_grad}

        def keep_trained(_module: Any, state_dict: dict, prefix: str, _metadata: Any) -> None:
            for key in [key for key in state_dict if key[len(prefix):] not in trained]:
                del state_dict[key]

        handle = module.register_state_dict_post_hook(keep_trained)
        try:
            super().save_checkpoint(checkpoint, filepath, storage_options)
        finally:
            handle.remove()

    def backward(self, closure_loss: torch.Tensor, optimizer: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
        """Backward through the DeepSpeed engine with the loss scaled once.

        Lightning has already divided the loss by ``accumulate_grad_batches``; ``DeepSpeedEngine.backward``
        would divide it by the same number again.
        """
        kwargs = compat.deepspeed.backward_without_accumulation_scaling(kwargs)
        return super().backward(closure_loss, optimizer, *args, **kwargs)


def uses_deepspeed(strategy: Any) -> bool:
    """Whether a ``trainer.strategy`` value (name, class_path namespace or instance) selects DeepSpeed."""
    if isinstance(strategy, str):
        return strategy.lower().startswith("deepspeed")
    cls = configured_class(strategy)
    return cls is not None and issubclass(cls, DeepSpeedStrategy)


def strategy_problem(strategy: Any) -> str | None:
    """What stops the requested strategy from running here (one line), or None."""
    if not uses_deepspeed(strategy):
        return None
    reason = deepspeed_unavailable_reason()
    if reason:
        return f"DeepSpeed strategy requested, but {reason}"
    cls = configured_class(strategy)
    if cls is None or not issubclass(cls, FinSightDeepSpeedStrategy):
        # Lightning's own class (or a registered name such as deepspeed_stage_3) refuses the CPU, scales the loss
        # twice under gradient accumulation and, in stage 3, builds the model inside zero.Init, which a 4-bit
        # model does not survive.
        name = strategy if isinstance(strategy, str) else getattr(strategy, "class_path", type(strategy).__name__)
        return (f"trainer.strategy {name!r} is Lightning's own DeepSpeedStrategy, which does not train 4-bit "
                "models correctly; use finsight.callbacks.FinSightDeepSpeedStrategy, e.g. --config "
                "configs/deepspeed_zero2_offload.yaml or configs/deepspeed_zero3_offload.yaml")
    return None


def exit_if_strategy_unavailable(trainer_config: Any) -> None:
    """Stop the command (one ``error:`` line, no traceback) before any model or data is loaded when the
    configured strategy cannot run on this machine. Called by the CLI on the parsed ``trainer`` config."""
    problem = strategy_problem(trainer_config.get("strategy"))
    if problem:
        raise StrategyUnavailableError(problem)


def adamw_for(strategy: Any, params: list[torch.nn.Parameter], *, lr: float,
              weight_decay: float) -> torch.optim.Optimizer:
    """AdamW where the strategy keeps the optimizer state: DeepSpeed's CPU Adam when ZeRO offloads it to the CPU
    (DeepSpeed refuses a torch optimizer there), torch's AdamW otherwise."""
    config = (getattr(strategy, "config", None) or {}) if isinstance(strategy, DeepSpeedStrategy) else {}
    if config.get("zero_optimization", {}).get("offload_optimizer", {}).get("device") == "cpu":
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(params, lr=lr, weight_decay=weight_decay, adamw_mode=True)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)


def load_trained_weights(strategy: Any, module: torch.nn.Module, checkpoint: Mapping[str, Any]) -> None:
    """Load a checkpoint's trained weights (the adapter) into ``module`` on every strategy; the frozen base,
    when a checkpoint holds it too (``exclude_frozen_parameters: false``), is the model reference's already.

    Under ZeRO-3 every parameter is partitioned: each layer is gathered, loaded on rank 0 and partitioned again
    (a collective call, on every rank).
    """
    trained = {name for name, param in module.named_parameters() if param.requires_grad}
    state = {key: value for key, value in checkpoint["state_dict"].items() if key in trained}
    if shards_parameters(strategy):
        compat.lightning.scatter_into_zero3_partitions(strategy, {**checkpoint, "state_dict": state})
    else:
        module.load_state_dict(state, strict=False)


@contextmanager
def whole_parameters(strategy: Any, module: torch.nn.Module, trained_only: bool = False) -> Iterator[None]:
    """``module``'s parameters (or only the trained ones) whole inside the block: under ZeRO-3 gathered from every
    rank's partition (a collective call: every rank enters), so that rank 0 can save the adapter, or every rank
    can build a model to generate with; elsewhere they are whole already."""
    if not shards_parameters(strategy):
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters([p for p in module.parameters() if p.requires_grad or not trained_only]):
        yield


def generation_inference(strategy: Any, requested: Any) -> Any:
    """The generation route under ``strategy``: under ZeRO-3 always a dense copy ("merged") of the gathered
    model, whose forward passes never wait for ZeRO-3's per-layer gathers (which would need every rank
    generating in step); elsewhere what was asked."""
    return "merged" if shards_parameters(strategy) else requested


def shards_parameters(strategy: Any) -> bool:
    """Whether the strategy partitions the model's parameters across ranks (DeepSpeed ZeRO stage 3): then the
    4-bit weights must be stored in a float dtype, which ZeRO-3 partitions like any parameter."""
    return isinstance(strategy, DeepSpeedStrategy) and bool(strategy.zero_stage_3)


def at_optimizer_step(trainer: Any) -> bool:
    """Whether ``on_before_optimizer_step`` is running before a real optimizer step.

    Lightning calls it once per optimizer step, except under DeepSpeed, which accumulates gradients itself:
    there Lightning calls it after every micro-batch and the engine steps only at its accumulation boundary.
    """
    strategy = trainer.strategy
    if isinstance(strategy, DeepSpeedStrategy):
        return bool(strategy.deepspeed_engine.is_gradient_accumulation_boundary())
    return True


def trainable_gradients(trainer: Any, module: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    """The gradients the coming optimizer step applies, by parameter name, on every strategy.

    Under DeepSpeed ZeRO ``param.grad`` stays None: the reduced gradients live in DeepSpeed's partitioned
    buffers, and ``safe_get_full_grad`` gathers each one. That is a collective call (every rank must make it)
    and valid at the accumulation boundary only (see :func:`at_optimizer_step`).
    """
    if isinstance(trainer.strategy, DeepSpeedStrategy):
        from deepspeed.utils import safe_get_full_grad

        named = [(name, safe_get_full_grad(p)) for name, p in module.named_parameters() if p.requires_grad]
    else:
        named = [(name, p.grad) for name, p in module.named_parameters()]
    return [(name, grad) for name, grad in named if grad is not None]
