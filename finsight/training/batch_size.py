"""A batch size finder whose learning-rate schedule follows the batch size it finds."""

from __future__ import annotations

from typing import Any

from lightning.pytorch.callbacks import BatchSizeFinder

from finsight import compat
from finsight.errors import FinSightError


class BatchSizeFinderSettingsError(FinSightError, ValueError):
    """A batch size finder asked to search ``batch_tokens`` in tokens, which Lightning's search cannot do.

    Fix: leave the finder's ``batch_arg_name`` unset: with ``data.batch_tokens`` it searches the budget in rows
    of ``data.max_length`` tokens (``batch_token_rows``).
    """


class FinSightBatchSizeFinder(BatchSizeFinder):
    """Lightning's ``BatchSizeFinder`` that also rebuilds the optimizer and learning-rate schedule afterwards.

    The search runs at the start of ``fit``, after ``configure_optimizers`` sized the warmup/decay schedule
    for the batch size in the config. When the run's length is given in epochs, a different batch size
    changes the number of optimizer steps, so the schedule would end too early or too late; rebuilding it
    (the search restores the initial weights, so nothing is lost) makes it match the batch size found.
    The search itself changes ``data.batch_size`` and re-creates the loaders, so batches, the length-grouped
    order and Lightning's step count all follow the new size. Not supported with distributed strategies
    (Lightning's restriction): find the size on one device, then set ``--data.batch_size``.

    With ``data.batch_tokens`` set, ``data.batch_size`` no longer sizes training micro-batches and the search is
    over the token budget instead, counted in rows of ``max_length`` tokens (the data module's
    ``batch_token_rows``): Lightning's search compares its sizes with the number of samples, which a count
    of tokens would always exceed. So ``init_val``, ``max_val`` and the size found are rows: the defaults start
    at a budget of two full-length conversations.
    """

    def scale_batch_size(self, trainer: Any, pl_module: Any) -> None:
        """Search, then rebuild the optimizer and schedule for the batch size found."""
        datamodule = getattr(trainer, "datamodule", None)
        if getattr(datamodule, "batch_tokens", None) is not None:
            self._search_token_budget()
        super().scale_batch_size(trainer, pl_module)
        if trainer.state.fn == "fit":
            trainer.strategy.setup_optimizers(trainer)

    def _search_token_budget(self) -> None:
        name = compat.lightning.batch_size_finder_argument(self)
        if name == "batch_size":
            compat.lightning.retarget_batch_size_finder(self, "batch_token_rows")
        elif name == "batch_tokens":
            raise BatchSizeFinderSettingsError(
                "the batch size finder cannot search batch_tokens directly (its search stops at once when a size "
                "reaches the number of samples): leave batch_arg_name unset, and it searches batch_token_rows, the "
                "budget in rows of data.max_length tokens")
