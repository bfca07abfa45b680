"""One process of a 2-process DDP run (gloo, CPU) of ``fit``, ``validate`` and ``test`` through the finsight CLI.

``python tests/ddp_worker.py OUT_DIR FINSIGHT_ARGS...`` builds the CLI's objects (``run=False``: the same
config, callbacks and ``eval``/``adapter_export`` sections as ``finsight fit|validate|test``) and runs the three
stages on one Trainer; Lightning's ddp strategy starts rank 1 by running this script again. Each rank writes
``OUT_DIR/rank<N>.json``: which sources its validation batches held, and the metrics of each stage.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback


class ValidationSources(Callback):
    """The source indices of the validation rows this rank saw, per stage."""

    def __init__(self) -> None:
        self.seen: dict[str, set[int]] = {}

    def on_validation_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                                  batch_idx: int, dataloader_idx: int = 0) -> None:
        self.seen.setdefault(trainer.state.fn.value, set()).update(batch["source_index"].tolist())


def _floats(metrics: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float, torch.Tensor))}


def main(out_dir: Path, args: list[str]) -> None:
    from finsight.cli.lightning_cli import main as finsight_main
    from finsight.evaluation.held_out import HeldOutEvaluator

    cli = finsight_main(args, run=False)
    trainer, model, data = cli.trainer, cli.model, cli.datamodule
    sources = ValidationSources()
    trainer.callbacks.append(sources)
    trainer.fit(model, datamodule=data)
    after_fit = _floats(trainer.callback_metrics)
    validated = trainer.validate(model, datamodule=data)
    tested = trainer.test(model, datamodule=data)
    trainer.save_checkpoint(out_dir / "final.ckpt")  # every rank calls it; rank 0 writes
    evaluator = next(c for c in trainer.callbacks if isinstance(c, HeldOutEvaluator))
    record = {
        "rank": trainer.global_rank, "world_size": trainer.world_size, "log_dir": trainer.log_dir,
        "val_sources": {stage: sorted(seen) for stage, seen in sources.seen.items()},
        "source_names": list(data.source_names),
        "fit": after_fit, "validate": _floats(validated[0]), "test": _floats(tested[0]),
        "eval_rows": evaluator.results,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"rank{trainer.global_rank}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2:])
