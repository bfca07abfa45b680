"""``finsight predict`` output: one JSON line per conversation, written by Lightning's ``BasePredictionWriter``.

Each line holds the sample id (its row in the prepared held-out split), the source's name, the mean loss
over the conversation's trained (assistant) tokens and how many tokens were trained, so the conversations
the model finds hardest are one ``sort`` away. Lines are written as batches finish, into a partial file
that becomes the named file when the loop ends; the path is printed then.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import BasePredictionWriter

from finsight.run_dir import rank_zero_log_dir

log = logging.getLogger(__name__)


class JsonlPredictionWriter(BasePredictionWriter):
    """Writes ``predict_step``'s per-conversation results as JSON lines.

    Args:
        output: The file to write; None writes ``predictions.jsonl`` in the run's log folder (or in the
            working folder without a logger). Under several processes each rank writes
            ``<name>.rank<N>.jsonl``.
    """

    def __init__(self, output: str | Path | None = None) -> None:
        super().__init__(write_interval="batch")
        self.output = Path(output) if output is not None else None
        self.path: Path | None = None
        self.lines = 0
        self._handle = None

    def _target(self, trainer: L.Trainer) -> Path:
        path = self.output or Path(rank_zero_log_dir(trainer) or trainer.log_dir or ".") / "predictions.jsonl"
        if trainer.world_size > 1:
            path = path.with_name(f"{path.stem}.rank{trainer.global_rank}{path.suffix}")
        return path

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.path = self._target(trainer)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.lines = 0
        self._handle = self.path.with_name(self.path.name + ".partial").open("w", encoding="utf-8")

    def write_on_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, prediction: Any,
                           batch_indices: Any, batch: Any, batch_idx: int, dataloader_idx: int) -> None:
        """One line per conversation of the batch."""
        if self._handle is None or not isinstance(prediction, dict):
            return
        names = list(getattr(trainer.datamodule, "source_names", []) or [])
        columns = {key: value.tolist() if isinstance(value, torch.Tensor) else list(value)
                   for key, value in prediction.items()}
        for row in zip(*columns.values()):
            record = dict(zip(columns, row))
            source = record.pop("source_index", None)
            line = {"sample_id": record.pop("sample_id", None),
                    "source": names[source] if source is not None and 0 <= source < len(names) else source,
                    **record}
            self._handle.write(json.dumps(line) + "\n")
            self.lines += 1

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        """Close the partial file; an interrupted run never leaves a file under the final name."""
        if self._handle is not None:
            self._handle.close()
            self._handle = None

    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Close the file under its final name and say where it is."""
        if self._handle is None:
            return
        self._handle.close()
        self._handle = None
        self.path.with_name(self.path.name + ".partial").replace(self.path)
        log.info("Predictions: %s (%d conversations)", self.path.resolve(), self.lines)
