"""Test-only callbacks for the kill-and-resume and non-finite tests (importable by ``finsight fit`` runs in a
subprocess when ``tests/`` is on ``PYTHONPATH``)."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any, BinaryIO

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from finsight.training.checkpoint import AtomicCheckpointIO

# Read at every save: "<file name>@<global step>" (e.g. "last.ckpt@4") makes PausingCheckpointIO's save of that
# file at that step stop for PAUSE_SECONDS after part of it is on disk, so a test can kill the process in the
# middle of a checkpoint write deterministically.
PAUSE_ENV = "FINSIGHT_TEST_PAUSE_CHECKPOINT_WRITE"
PAUSE_SECONDS = 120.0


class FreezeAt(Callback):
    """At the start of the batch that would take optimizer step ``step + 1``, write ``marker`` and sleep, so the
    test can SIGKILL the process at an exact point of the run."""

    def __init__(self, step: int, marker: str, seconds: float = 120.0) -> None:
        super().__init__()
        self.step = step
        self.marker = Path(marker)
        self.seconds = seconds

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if trainer.global_step == self.step:
            self.marker.write_text(str(trainer.global_step))
            time.sleep(self.seconds)


class InjectNonFinite(Callback):
    """Make the loss (``where="loss"``) or one LoRA gradient (``where="grad"``) non-finite at global step ``step``.

    Runs before ``NonFiniteGuard`` (configured callbacks come before the CLI's defaults), which must catch it.
    """

    def __init__(self, step: int, where: str = "loss", value: float = float("nan")) -> None:
        super().__init__()
        self.step = step
        self.where = where
        self.value = value

    def on_before_backward(self, trainer: L.Trainer, pl_module: L.LightningModule, loss: torch.Tensor) -> None:
        if self.where == "loss" and trainer.global_step == self.step:
            loss.mul_(self.value)  # in place: the guard and backward see the same tensor

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        # A hook on the gradient as backward computes it reaches every strategy's gradient storage: DeepSpeed
        # ZeRO keeps its gradients in its own buffers, never in param.grad.
        if self.where == "grad" and trainer.global_step == self.step and not getattr(self, "_hook", None):
            param = next(p for p in pl_module.parameters() if p.requires_grad)
            self._hook = param.register_hook(self._poison)

    def _poison(self, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        grad.view(-1)[0] = self.value
        return grad


class StepRecorder(Callback):
    """Per optimizer step and rank: the samples of its accumulation window, the logged ``train/loss`` and
    ``train/grad_norm``, and (at ``grad_step``) the gradients it applied, written to ``<out_dir>/<tag>-rank<N>.*``
    after every step, so a run that stops with an error still leaves what it recorded."""

    def __init__(self, out_dir: str, tag: str = "run", grad_step: int = -1) -> None:
        super().__init__()
        self.out_dir, self.tag, self.grad_step = Path(out_dir), tag, grad_step
        self.window: list[int] = []
        self.window_sizes: list[int] = []
        self.steps: list[dict[str, Any]] = []

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        self.window += batch["sample_id"].tolist()
        self.window_sizes.append(len(batch["sample_id"]))
        self._batch_tokens = int((batch["labels"][:, 1:] != -100).sum())

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule,
                                 optimizer: torch.optim.Optimizer) -> None:
        from finsight.training.deepspeed import at_optimizer_step, trainable_gradients

        if at_optimizer_step(trainer) and trainer.global_step == self.grad_step:
            grads = {name: grad.detach().cpu().clone() for name, grad in trainable_gradients(trainer, pl_module)}
            self.out_dir.mkdir(parents=True, exist_ok=True)
            torch.save(grads, self.out_dir / f"{self.tag}-rank{trainer.global_rank}-grads.pt")

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if trainer.global_step == len(self.steps) + self._first_step:
            return  # still accumulating
        metrics = trainer.callback_metrics
        self.steps.append({"step": trainer.global_step, "samples": self.window, "micro_batches": self.window_sizes,
                           "loss": float(metrics["train/loss"]), "grad_norm": float(metrics["train/grad_norm"])})
        self.window, self.window_sizes = [], []
        self.out_dir.mkdir(parents=True, exist_ok=True)
        path = self.out_dir / f"{self.tag}-rank{trainer.global_rank}.json"
        path.write_text(json.dumps(self.steps))

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        import dataclasses

        import psutil

        from finsight.training.memory_plan import measured_rank_memory

        self._first_step = trainer.global_step  # a resumed run starts counting where its checkpoint ended
        # What this rank holds once the strategy has set the model up, and the process's resident memory.
        memory = measured_rank_memory(pl_module, trainer.strategy, pl_module.model.config, pl_module.micro_batch(), 4)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        (self.out_dir / f"{self.tag}-rank{trainer.global_rank}-memory.json").write_text(json.dumps(
            {**dataclasses.asdict(memory), "rss": psutil.Process().memory_info().rss}))


class SampleRecorder(L.Callback):
    """Writes, per rank, which samples each training batch held, how the train loader was built, and the
    validation loss the rank saw, to ``<out_dir>/<tag>-rank<N>.json`` at the end of fit."""

    def __init__(self, out_dir: str, tag: str = "run") -> None:
        self.out_dir, self.tag = Path(out_dir), tag
        self.batches: list[list[int]] = []
        self.val_loss: list[float] = []
        self.info: dict[str, Any] = {}

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        loader = trainer.train_dataloader
        sampler = loader.sampler
        self.info = {
            "rank": trainer.global_rank, "world_size": trainer.world_size, "pid": os.getpid(),
            "loader": type(loader).__name__, "sampler": type(sampler).__name__,
            "shuffle": getattr(sampler, "shuffle", None),
            "inner_sampler": type(getattr(getattr(sampler, "dataset", None), "_sampler", None)).__name__,
            "batch_size": getattr(loader.batch_sampler, "batch_size", None),  # None: token budgets
            "lengths": list(trainer.datamodule.train_dataset["length"]),
        }

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        self.batches.append(batch["sample_id"].tolist())

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking and "val/loss" in trainer.callback_metrics:
            self.val_loss.append(float(trainer.callback_metrics["val/loss"]))

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        record = {**self.info, "batches": self.batches, "val_loss": self.val_loss,
                  "global_step": trainer.global_step}
        (self.out_dir / f"{self.tag}-rank{trainer.global_rank}.json").write_text(json.dumps(record))


class _PausingWriter:
    """File wrapper that stops once, after the first chunk reached the disk."""

    def __init__(self, file: BinaryIO) -> None:
        self.file = file
        self.paused = False

    def write(self, data: bytes) -> int:
        written = self.file.write(data)
        if not self.paused:
            self.paused = True
            self.file.flush()
            os.fsync(self.file.fileno())
            print(f"{PAUSE_ENV}: pausing for {PAUSE_SECONDS:.0f}s while writing {self.file.name}",
                  file=sys.stderr, flush=True)
            time.sleep(PAUSE_SECONDS)
        return written

    def flush(self) -> None:
        self.file.flush()


class PausingCheckpointIO(AtomicCheckpointIO):
    """finsight's atomic checkpoint writer, pausing in the middle of the save ``PAUSE_ENV`` names."""

    def write(self, checkpoint: dict[str, Any], file: BinaryIO, path: Path) -> None:
        name, _, step = os.environ.get(PAUSE_ENV, "").rpartition("@")
        if name == path.name and str(checkpoint.get("global_step")) == step:
            file = _PausingWriter(file)
        super().write(checkpoint, file, path)


# "<file name>@<global step>": FullDiskCheckpointIO's save of that file at that step runs out of space after
# part of it is written, as a real full disk does (the OSError inside torch.save's stream writer).
FULL_DISK_ENV = "FINSIGHT_TEST_FULL_DISK"


class NoSpaceAfter:
    """A file whose writes fail with ENOSPC once ``limit`` bytes are written."""

    def __init__(self, file: BinaryIO, limit: int = 4096) -> None:
        self.file, self.limit, self.written = file, limit, 0

    def write(self, data: bytes) -> int:
        if self.written + len(data) > self.limit:
            import errno

            raise OSError(errno.ENOSPC, "No space left on device")
        self.written += len(data)
        return self.file.write(data)

    def flush(self) -> None:
        self.file.flush()


class FullDiskCheckpointIO(AtomicCheckpointIO):
    """finsight's atomic checkpoint writer on a disk that fills during the save ``FULL_DISK_ENV`` names."""

    def write(self, checkpoint: dict[str, Any], file: BinaryIO, path: Path) -> None:
        name, _, step = os.environ.get(FULL_DISK_ENV, "").rpartition("@")
        if name == path.name and str(checkpoint.get("global_step")) == step:
            file = NoSpaceAfter(file)
        super().write(checkpoint, file, path)


class KillInsideSave(Callback):
    """SIGKILL this process inside the checkpoint save at ``step``, right after the save's first file is
    complete (under DeepSpeed: the model states, before the optimizer states), as a crash mid-save would.
    ``full_disk``: raise ENOSPC there instead, as a disk that fills up during the save does."""

    def __init__(self, step: int, full_disk: bool = False) -> None:
        self.step = step
        self.full_disk = full_disk

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        if trainer.global_step != self.step:
            return
        import errno
        import signal

        real_save = torch.save

        def save_then_die(*args: Any, **kwargs: Any) -> None:
            real_save(*args, **kwargs)
            written = args[1] if len(args) > 1 else kwargs.get("f")
            if self.full_disk:
                torch.save = real_save  # the error stops the run; nothing else is written after it
                raise OSError(errno.ENOSPC, "No space left on device", str(written))
            print(f"KillInsideSave: killed after writing {written}", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)

        torch.save = save_then_die
