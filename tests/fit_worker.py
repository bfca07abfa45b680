"""Test-only callbacks for the kill-and-resume and non-finite tests (importable by ``finsight fit`` runs in a
subprocess when ``tests/`` is on ``PYTHONPATH``)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback


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

    def on_after_backward(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.where == "grad" and trainer.global_step == self.step:
            param = next(p for p in pl_module.parameters() if p.requires_grad and p.grad is not None)
            param.grad.view(-1)[0] = self.value
