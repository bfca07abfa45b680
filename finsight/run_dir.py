"""Where a run writes its files, as rank 0 knows it without a collective call."""

from __future__ import annotations

import lightning as L
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger


def rank_zero_log_dir(trainer: L.Trainer) -> str | None:
    """``trainer.log_dir`` for code that runs on global rank 0 only (inside ``if trainer.is_global_zero``).

    ``Trainer.log_dir`` broadcasts rank 0's value, a collective call: made on rank 0 alone it waits forever
    for the other ranks (Lightning's docstring says so), and a DDP run hangs. On rank 0 the value is the
    same without the broadcast: the first logger's folder, or ``default_root_dir`` without a logger.
    """
    if trainer.loggers:
        logger = trainer.loggers[0]
        return logger.log_dir if isinstance(logger, TensorBoardLogger | CSVLogger) else logger.save_dir
    return trainer.default_root_dir
