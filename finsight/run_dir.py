"""Where a run writes its files: the logger's own version folder, or one finsight chooses for the others.

TensorBoard and CSV loggers keep a ``version_N`` folder of their own. Loggers that keep their runs elsewhere
(MLflow in a database or on a server, Weights & Biases in its cloud or its offline folder) have none that
finsight could put checkpoints, the adapter and the results beside, so finsight chooses one, the same way:
``<default_root_dir>/runs/<logger>/version_N`` (:func:`assign_run_folder`, at the command line, before anything
is built), points every ``ModelCheckpoint`` without a ``dirpath`` at its ``checkpoints`` folder, and keeps the
tracker's run id there, so ``--ckpt_path last`` resumes the newest run into the same folder and the same
tracked run.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, MLFlowLogger, TensorBoardLogger, WandbLogger

from finsight.class_paths import configured_class

log = logging.getLogger(__name__)

RUNS_FOLDER = "runs"
TRACKED_RUN_FILE = "tracked_run.json"
"""In a chosen run folder: the tracker's run id, so a resume continues the same tracked run."""
LAST_CHECKPOINT = Path("checkpoints") / f"{ModelCheckpoint.CHECKPOINT_NAME_LAST}{ModelCheckpoint.FILE_EXTENSION}"
# The init argument of each tracker's logger that names the run to continue.
RUN_ID_ARGUMENT = {MLFlowLogger: "run_id", WandbLogger: "id"}


def rank_zero_log_dir(trainer: L.Trainer) -> str | None:
    """The run's folder, for code that runs on global rank 0 only (inside ``if trainer.is_global_zero``).

    ``Trainer.log_dir`` broadcasts rank 0's value, a collective call: made on rank 0 alone it waits forever
    for the other ranks (Lightning's docstring says so), and a DDP run hangs. On rank 0 the value is the
    same without the broadcast: the first logger's folder; for a logger without one, the folder finsight chose
    (where its checkpoints go); ``default_root_dir`` without a logger.
    """
    if not trainer.loggers:
        return trainer.default_root_dir
    logger = trainer.loggers[0]
    if isinstance(logger, TensorBoardLogger | CSVLogger):
        return logger.log_dir
    chosen = next((callback.dirpath for callback in trainer.checkpoint_callbacks if callback.dirpath), None)
    return str(Path(chosen).parent) if chosen else (logger.save_dir or trainer.default_root_dir)


def shared_run_folder(trainer: L.Trainer) -> str:
    """:func:`rank_zero_log_dir` as rank 0 knows it, on every rank: a collective call every rank must make."""
    return str(trainer.strategy.broadcast(rank_zero_log_dir(trainer) or trainer.default_root_dir or "."))


def _first(logger_config: Any) -> Any:
    """The first logger of a ``trainer.logger`` value (a list or one)."""
    if isinstance(logger_config, list):
        return logger_config[0] if logger_config else None
    return logger_config


def assign_run_folder(trainer_config: Any, resume: bool) -> Path | None:
    """Choose the run folder of a logger without one of its own, before anything is built.

    Every ``ModelCheckpoint`` in the config without a ``dirpath`` writes to its ``checkpoints`` folder. With
    ``resume`` (``--ckpt_path last``), the newest folder holding a ``last`` checkpoint is chosen again, and the
    logger continues the tracked run recorded there. Returns the folder, or None for loggers that keep their own
    (TensorBoard, CSV) and for no logger (``default_root_dir``, where Lightning finds ``last`` itself).
    """
    logger_class = configured_class(_first(trainer_config.get("logger")))
    if logger_class is None or issubclass(logger_class, TensorBoardLogger | CSVLogger):
        return None
    kind = logger_class.__name__.removesuffix("Logger").lower() or "logger"
    root = Path(trainer_config.get("default_root_dir") or ".") / RUNS_FOLDER / kind
    versions = {int(path.name.removeprefix("version_")): path for path in root.glob("version_*")
                if path.name.removeprefix("version_").isdigit()}
    folder = None
    if resume:
        newest = next((n for n in sorted(versions, reverse=True) if (versions[n] / LAST_CHECKPOINT).exists()), None)
        if newest is not None:
            folder = versions[newest]
            log.info("Resuming %s", folder)
            _continue_tracked_run(_first(trainer_config.get("logger")), logger_class, folder)
    if folder is None:
        folder = root / f"version_{max(versions, default=-1) + 1}"
    for callback in trainer_config.get("callbacks") or []:
        args = callback.get("init_args") if hasattr(callback, "get") else None
        cls = configured_class(callback)
        if args is not None and args.get("dirpath") is None and cls is not None and issubclass(cls, ModelCheckpoint):
            args["dirpath"] = str(folder / "checkpoints")
    return folder


def _continue_tracked_run(logger_config: Any, logger_class: type, folder: Path) -> None:
    """Point the logger at the tracked run the folder recorded, unless the config names one itself."""
    record = folder / TRACKED_RUN_FILE
    argument = next((arg for cls, arg in RUN_ID_ARGUMENT.items() if issubclass(logger_class, cls)), None)
    if argument is None or not record.is_file() or not hasattr(logger_config, "get"):
        return
    args = logger_config.get("init_args")
    if args is not None and not args.get(argument):
        args[argument] = json.loads(record.read_text())["run_id"]


def record_tracked_run(trainer: L.Trainer) -> None:
    """Write the tracker's run id into the chosen run folder (rank 0), for a later ``--ckpt_path last``."""
    if not trainer.loggers or not trainer.is_global_zero or int(os.environ.get("RANK", "0")) != 0:
        return
    logger = trainer.loggers[0]
    if not isinstance(logger, tuple(RUN_ID_ARGUMENT)) or not trainer.checkpoint_callbacks:
        return
    folder = Path(rank_zero_log_dir(trainer))
    folder.mkdir(parents=True, exist_ok=True)
    run_id = logger.run_id if isinstance(logger, MLFlowLogger) else logger.experiment.id  # starts the run
    (folder / TRACKED_RUN_FILE).write_text(json.dumps({"logger": type(logger).__name__, "run_id": run_id}) + "\n")


def publish_file(trainer: L.Trainer, path: Path) -> None:
    """Send a file the run wrote (the data report, the evaluation results) to the trackers that keep files."""
    for logger in trainer.loggers:
        if isinstance(logger, MLFlowLogger):
            logger.experiment.log_artifact(logger.run_id, str(path))
        elif isinstance(logger, WandbLogger):
            logger.experiment.save(str(path), base_path=str(path.parent), policy="now")
