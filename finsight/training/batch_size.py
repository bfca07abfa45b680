"""A batch size finder whose learning-rate schedule follows the batch size it finds."""

from __future__ import annotations

from typing import Any

from lightning.pytorch.callbacks import BatchSizeFinder


class FinSightBatchSizeFinder(BatchSizeFinder):
    """Lightning's ``BatchSizeFinder`` that also rebuilds the optimizer and learning-rate schedule afterwards.

    The search runs at the start of ``fit``, after ``configure_optimizers`` sized the warmup/decay schedule
    for the batch size in the config. When the run's length is given in epochs, a different batch size
    changes the number of optimizer steps, so the schedule would end too early or too late; rebuilding it
    (the search restores the initial weights, so nothing is lost) makes it match the batch size found.
    The search itself changes ``data.batch_size`` and re-creates the loaders, so batches, the length-grouped
    order and Lightning's step count all follow the new size. Not supported with distributed strategies
    (Lightning's restriction): find the size on one device, then set ``--data.batch_size``.
    """

    def scale_batch_size(self, trainer: Any, pl_module: Any) -> None:
        """Search, then rebuild the optimizer and schedule for the batch size found."""
        super().scale_batch_size(trainer, pl_module)
        if trainer.state.fn == "fit":
            trainer.strategy.setup_optimizers(trainer)
