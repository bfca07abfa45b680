"""Run monitoring: a start-up summary, training speed and memory, and a useful message on out-of-memory."""

from __future__ import annotations

import logging
import time
from typing import Any

import lightning as L
import psutil
import torch
from rich.console import Console
from rich.table import Table

from finsight import compat
from finsight.data.batching import CONVERSATION_LENGTHS
from finsight.data.chat import IGNORE_INDEX
from finsight.model.loading import torch_dtype
from finsight.model.precision import choose_precision
from finsight.run_dir import rank_zero_log_dir
from finsight.training.checkpoint import LatestCheckpoint
from finsight.training.memory_plan import measured_rank_memory

log = logging.getLogger(__name__)

OOM_ADVICE = (
    "CUDA ran out of memory. Knobs, cheapest first: lower data.batch_size (raise "
    "trainer.accumulate_grad_batches to keep the effective batch), lower data.max_length, keep "
    "model.gradient_checkpointing true, or offload the optimizer with "
    "--config configs/deepspeed_zero2_offload.yaml. The last checkpoint is kept; resume with --ckpt_path last."
)


def _peak_memory_gb() -> dict[str, float]:
    """Peak CUDA memory on GPU, resident set size of the process on CPU."""
    if torch.cuda.is_available():
        return {"perf/cuda_max_allocated_gb": torch.cuda.max_memory_allocated() / 2**30,
                "perf/cuda_max_reserved_gb": torch.cuda.max_memory_reserved() / 2**30}
    return {"perf/rss_gb": psutil.Process().memory_info().rss / 2**30}


class TrainingMonitor(L.Callback):
    """Logs throughput per optimizer step (all tokens, trained tokens, samples per second) and peak memory.

    Trained tokens are the ones with a label (the assistant's), counted after the shift, so
    ``perf/trained_tokens_per_s`` is the honest speed of learning, and ``perf/tokens_per_s`` includes
    prompts and padding-free context. It also prints the start-up summary and explains CUDA OOMs.
    """

    def __init__(self, summary: bool = True) -> None:
        """
        Args:
            summary: Print the start-up summary (model, data, batch, steps, cadence, strategy).
        """
        self.summary = summary
        self._started: float | None = None
        self._tokens = self._trained = self._samples = 0

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if torch.cuda.is_available():
            # Loading and quantizing leaves freed blocks in the cache; training should start from a clean one.
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        if self.summary and trainer.is_global_zero:
            print_summary(trainer, pl_module)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if self._started is None:
            self._started = time.perf_counter()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        # A packed batch (data.packing) has no mask: it says how many tokens each of its conversations has.
        lengths = batch.get(CONVERSATION_LENGTHS)
        self._tokens += int(batch["attention_mask"].sum() if lengths is None else lengths.sum())
        self._trained += int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
        self._samples += int(batch["input_ids"].shape[0] if lengths is None else lengths.numel())
        # Lightning steps the optimizer on the last micro-batch of an accumulation window.
        if (batch_idx + 1) % trainer.accumulate_grad_batches and not trainer.fit_loop.epoch_loop.done:
            return
        elapsed = time.perf_counter() - (self._started or time.perf_counter())
        if elapsed > 0:
            metrics = {"perf/tokens_per_s": self._tokens / elapsed,
                       "perf/trained_tokens_per_s": self._trained / elapsed,
                       "perf/samples_per_s": self._samples / elapsed,
                       "perf/step_seconds": elapsed}
            metrics.update(_peak_memory_gb())
            pl_module.log_dict(metrics, on_step=True, on_epoch=False, batch_size=1)
        self._started = None
        self._tokens = self._trained = self._samples = 0

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if isinstance(exception, torch.cuda.OutOfMemoryError):
            log.error(OOM_ADVICE)


def precision_summary(precision: str, device_type: str) -> str:
    """The run's precision beside the one the hardware calls for, so a slow choice shows at start-up."""
    choice = choose_precision("cpu" if device_type == "cpu" else None)
    if precision == choice.precision:
        return f"{precision} (the choice for this hardware: {choice.reason})"
    return f"{precision} (set in the config; this hardware would pick {choice.precision}: {choice.reason})"


def print_summary(trainer: L.Trainer, pl_module: L.LightningModule) -> None:
    """One Rich panel with what a user checks before leaving a run alone for hours."""
    hp = getattr(pl_module, "hparams", {})
    info = getattr(pl_module, "model_info", None)
    datamodule = getattr(trainer, "datamodule", None)
    batch_size = getattr(datamodule, "batch_size", None) or 0
    accumulation = trainer.accumulate_grad_batches
    effective = batch_size * accumulation * trainer.world_size
    batch_tokens = getattr(datamodule, "batch_tokens", None)
    table = Table(title="FinSight run", show_header=False)
    table.add_column(style="bold")
    table.add_column()
    table.add_row("model", str(hp.get("model_name", "?")))
    table.add_row("quantization", f"{hp.get('quantization')} (double quant {hp.get('double_quant')}, "
                                  f"compute {hp.get('compute_dtype')}: "
                                  f"{getattr(pl_module, 'compute_dtype_reason', 'set in the config')})")
    if info is not None:
        table.add_row("attention", f"{info.attention} ({info.attention_reason})")
        table.add_row("gradient checkpointing", f"{'on' if info.gradient_checkpointing else 'off'} "
                                                f"({info.gradient_checkpointing_reason})")
        table.add_row("freed memory to the OS", f"{'yes' if info.release_freed_memory else 'no'} "
                                                f"({info.release_freed_memory_reason})")
        table.add_row("trainable parameters", f"{info.trainable_parameters:,} of {info.total_parameters:,} "
                                              f"({100 * info.trainable_parameters / info.total_parameters:.2f}%)")
    table.add_row("LoRA", f"r={hp.get('lora_r')} alpha={hp.get('lora_alpha')} dropout={hp.get('lora_dropout')}")
    report = getattr(datamodule, "report", None)
    if report is not None:
        table.add_row("data (train/val)", ", ".join(f"{s.name} {s.train}/{s.val}" for s in report.sources))
    if batch_tokens is None:
        table.add_row("effective batch", f"{effective} = micro-batch {batch_size} × accumulation {accumulation} × "
                                         f"{trainer.world_size} device(s)")
    else:
        micro_batches = len(trainer.train_dataloader or datamodule.train_dataloader()) * trainer.world_size
        table.add_row("effective batch", f"{batch_tokens * accumulation * trainer.world_size:,} tokens at most = "
                                         f"micro-batch of {batch_tokens:,} tokens × accumulation {accumulation} × "
                                         f"{trainer.world_size} device(s); "
                                         f"{len(datamodule.train_dataset) / micro_batches:.1f} conversations per "
                                         "micro-batch on average")
    table.add_row("optimizer steps", str(trainer.estimated_stepping_batches))
    table.add_row("precision", precision_summary(str(trainer.precision), trainer.strategy.root_device.type))
    interval = trainer.val_check_interval
    if isinstance(interval, int):
        table.add_row("validation", f"every {interval // accumulation} optimizer steps ({interval} batches)")
    else:
        table.add_row("validation", f"every {interval} of an epoch")
    for callback in trainer.checkpoint_callbacks:
        every = compat.lightning.checkpoint_every_n_train_steps(callback)
        minutes = compat.lightning.checkpoint_train_time_interval(callback)
        cadence = (f"every {every} optimizer steps" if every else f"every {minutes:g} minutes" if minutes
                   else "after each validation")
        if isinstance(callback, LatestCheckpoint) and (every or minutes):
            cadence += ", after each validation and at the end"
        table.add_row("checkpoints", cadence + (f", best by {callback.monitor}" if callback.monitor else "")
                      + (", plus last" if callback.save_last else ""))
    table.add_row("strategy", type(trainer.strategy).__name__)
    if info is not None:
        table.add_row("memory per rank", measured_rank_memory(
            pl_module, trainer.strategy, info.model.config, pl_module.micro_batch(),
            torch_dtype(hp.get("compute_dtype", "float32")).itemsize, info.recomputed_layers or 0).described())
    table.add_row("logs", str(rank_zero_log_dir(trainer)))
    Console(stderr=True).print(table)
