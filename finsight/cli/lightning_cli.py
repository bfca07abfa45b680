"""The ``finsight`` command: Lightning's own CLI over ``FinSightModule`` and ``FinSightDataModule``.

``finsight fit --config configs/quickstart.yaml`` trains; ``validate``, ``test`` and ``predict`` work the
same way. ``main(args=None)`` lets tests drive the CLI in-process.
"""

from __future__ import annotations

import inspect
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from rich.console import Console
from rich.logging import RichHandler

from finsight import compat
from finsight.checkpoint_files import CheckpointContentError
from finsight.cli.chat import chat_main
from finsight.cli.plan import plan_main
from finsight.cli.version import version_report
from finsight.data.datamodule import FinSightDataModule
from finsight.data.sources import default_sources
from finsight.evaluation.held_out import HeldOutEvaluator
from finsight.evaluation.metrics import check_eval_source, eval_file_conversations
from finsight.evaluation.prediction import JsonlPredictionWriter
from finsight.export.adapter import AdapterExport, export_main
from finsight.model.precision import choose_precision
from finsight.run_dir import assign_run_folder, rank_zero_log_dir, record_tracked_run
from finsight.tensors_only import tensors_only
from finsight.training.checkpoint import (
    best_checkpoint_callback,
    verify_checkpoint,
    verify_ckpt_path_argument,
)
from finsight.training.deepspeed import exit_if_strategy_unavailable
from finsight.training.hardware import exit_if_hardware_missing
from finsight.training.module import FinSightModule
from finsight.training.reliability import reliability_callbacks

log = logging.getLogger(__name__)


def setup_logging(level: int = logging.INFO) -> None:
    """Send finsight's log messages through a Rich handler (once)."""
    logger = logging.getLogger("finsight")
    if not any(isinstance(h, RichHandler) for h in logger.handlers):
        handler = RichHandler(show_path=False, rich_tracebacks=False)
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False


class FinSightCLI(compat.lightning.CheckpointHyperParametersHook, LightningCLI):
    """LightningCLI with the model name linked into the data module, validation counted in optimizer steps,
    and two callbacks configured in their own sections: ``eval`` (:class:`~finsight.callbacks.HeldOutEvaluator`,
    what ``test`` answers and scores) and ``adapter_export`` (:class:`~finsight.callbacks.AdapterExport`, the
    adapter ``fit`` writes)."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        # One model reference serves the model and the data module's tokenizer and chat template.
        parser.link_arguments("model.model_name", "data.tokenizer")
        # Always-present callbacks with their own config sections (`--eval.compare_base true`, `eval:` in YAML).
        parser.add_lightning_class_args(HeldOutEvaluator, "eval")
        parser.add_lightning_class_args(AdapterExport, "adapter_export")
        parser.add_argument(
            "--val_every_n_optimizer_steps", type=int | None, default=None,
            help="Validate every N optimizer steps. Lightning's val_check_interval counts batches; this "
                 "sets it to N × accumulate_grad_batches so changing the accumulation keeps the cadence.",
        )
        parser.add_argument(
            "--predictions_file", type=str | None, default=None,
            help="predict only: the JSON-lines file to write (one line per conversation: sample_id, source, "
                 "loss, trained_tokens); default predictions.jsonl in the run's log folder.",
        )

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        # A GPU, a device count or a kernel this machine lacks: one line, before anything is built or loaded.
        exit_if_hardware_missing(config.trainer, config.get("model"))
        every = config.get("val_every_n_optimizer_steps")
        if every:
            accumulation = config.trainer.accumulate_grad_batches or 1
            config.trainer.val_check_interval = int(every) * int(accumulation)
        if config.trainer.get("precision") is None:
            # Unset: the precision that follows the hardware (bf16 where it is native, else float32).
            choice = choose_precision(config.trainer.get("accelerator"))
            config.trainer.precision = choice.precision
            log.info("Precision: %s (auto: %s)", choice.precision, choice.reason)
        if self.subcommand == "test":
            # A source name or an eval file that cannot work: one line, before the model is loaded.
            check_eval_settings(config.get("eval"), config.get("data"))
        if config.get("ckpt_path") == "last":
            _resume_into_latest_version(config.trainer)
        # A logger that keeps no folder of its own (MLflow, W&B): finsight chooses the run's folder.
        assign_run_folder(config.trainer, resume=config.get("ckpt_path") == "last")
        # A strategy this machine cannot run (DeepSpeed without its package) stops here, in one line.
        exit_if_strategy_unavailable(config.trainer)

    def read_checkpoint_hyperparameters(self) -> bool:
        """Read a ``--ckpt_path`` file's hyper-parameters into the config, as LightningCLI does, keeping only
        those :class:`FinSightModule` still takes.

        A checkpoint written by an earlier finsight version records options since removed (``export_dir``);
        LightningCLI would refuse it ("does not accept option 'model.export_dir'"), so ``validate``, ``test``
        and ``predict`` could not read the runs they were made for. The dropped names are logged once.
        ``load_from_checkpoint`` (chat, export) already ignores such keys. A checkpoint naming a class of its own
        (``_class_path``) is refused: it would choose what gets built. False for a CLI in subclass mode, where the
        command line chooses the class and LightningCLI's own reading handles it.
        """
        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if not ckpt_path or not Path(ckpt_path).is_file():
            return True  # none, ``last``/``best``, or a DeepSpeed folder: nothing to read, as in LightningCLI
        # Memory-mapped: only the hyper-parameters are read, not the adapter and optimizer state beside them.
        hparams = torch.load(ckpt_path, weights_only=True, map_location="cpu", mmap=True).get("hyper_parameters", {})
        hparams.pop("_instantiator", None)
        if "_class_path" in hparams:
            if self.subclass_mode_model:  # a CLI that lets the command line choose the class: LightningCLI's rules
                return False
            # A checkpoint never chooses which class is built (it could name any importable callable).
            raise CheckpointContentError(
                f"checkpoint {ckpt_path} names a model class of its own ({hparams['_class_path']!r}); finsight "
                "builds FinSightModule and takes only its options' values from a checkpoint, never a class it "
                "names: nothing was imported; use a checkpoint written by finsight fit")
        accepted = set(inspect.signature(self.model_class.__init__).parameters) - {"self"}
        dropped = sorted(set(hparams) - accepted)
        if dropped:
            log.warning("%s records hyper-parameters this finsight version no longer has, ignored: %s",
                        ckpt_path, ", ".join(dropped))
        kept = {key: value for key, value in hparams.items() if key in accepted}
        if kept:
            self.config = self.parser.parse_object({subcommand: {"model": kept}}, self.config)
        return True

    def before_predict(self) -> None:
        """Point the prediction writer at ``--predictions_file`` when one is given."""
        output = self.config[self.subcommand].get("predictions_file")
        for callback in self.trainer.callbacks:
            if isinstance(callback, JsonlPredictionWriter) and output:
                callback.output = Path(output)

    def before_fit(self) -> None:
        """Record the tracker's run id in the run folder, so ``--ckpt_path last`` continues the same tracked run."""
        record_tracked_run(self.trainer)

    def after_fit(self) -> None:
        """Tell the user where the run's outputs are."""
        trainer = self.trainer
        if not trainer.is_global_zero:
            return
        console = Console(stderr=True)
        adapter = next((c.path for c in trainer.callbacks if isinstance(c, AdapterExport)), None)
        if adapter is not None:
            console.print(f"[bold green]Adapter:[/] {Path(adapter).resolve()}")
        log_dir = rank_zero_log_dir(trainer)
        if log_dir:
            tensorboard = isinstance(trainer.logger, TensorBoardLogger)
            console.print(f"[bold green]{'Logs' if tensorboard else 'Run folder'}:[/] {Path(log_dir).resolve()}"
                          + (f"  (tensorboard --logdir {Path(log_dir).parent})" if tensorboard else ""))
        best = best_checkpoint_callback(trainer)
        if best is not None and best.best_model_path:
            console.print(f"[bold green]Best checkpoint:[/] {best.best_model_path}")


class RunFolderConfigSaver(SaveConfigCallback):
    """LightningCLI's ``config.yaml`` writer, into finsight's run folder for loggers that keep none of their own.

    Lightning writes into ``trainer.log_dir`` and asserts it is a folder, which an MLflow database is not; for
    such loggers its own writing is off and its ``save_config`` hook (rank 0) writes into the run folder.
    """

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Lightning's, with its own writing on only for a logger with a folder (or none)."""
        self.save_to_log_dir = not trainer.loggers or isinstance(trainer.loggers[0], TensorBoardLogger | CSVLogger)
        super().setup(trainer, pl_module, stage)

    def save_config(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Write the config into finsight's run folder when Lightning's writing is off."""
        if self.save_to_log_dir:
            return
        folder = Path(rank_zero_log_dir(trainer))
        folder.mkdir(parents=True, exist_ok=True)
        self.parser.save(self.config, str(folder / self.config_filename), skip_none=False, overwrite=self.overwrite,
                         multifile=self.multifile)


def check_eval_settings(eval_config: Any, data_config: Any) -> None:
    """Refuse an ``eval.source`` the run does not have and an ``eval.file`` with no usable conversation."""
    if eval_config is None:
        return
    sources = data_config.get("sources") if data_config is not None else None
    names = [s["name"] if isinstance(s, dict) else getattr(s, "name", None) for s in sources] if sources else [
        s.name for s in default_sources()]
    check_eval_source(eval_config.get("source"), names)
    if eval_config.get("file"):
        columns = eval_config.get("columns")
        eval_file_conversations(str(eval_config["file"]), str(data_config.get("system_prompt") or ""),
                                eval_config.get("format") or "qa", dict(columns) if columns else None)


def _resume_into_latest_version(trainer_config: Any) -> None:
    """``--ckpt_path last`` must look in the run it resumes: pin the TensorBoard logger to the newest version
    that holds a ``checkpoints/last.ckpt``.

    Without this the logger would open a new ``version_N`` folder, Lightning would find no checkpoint in it
    and silently start from scratch. The newest version is not always a training run: ``validate``, ``test``
    and ``predict`` log into version folders of their own, without checkpoints. With no run to resume the
    logger is left alone, so a first run (a job that always passes ``--ckpt_path last``) starts in a new
    folder, as Lightning intends. Checkpoints written to a ``dirpath`` of their own are Lightning's to find;
    then the newest version is pinned.
    """
    logger = trainer_config.get("logger")
    if not logger or isinstance(logger, bool) or "TensorBoardLogger" not in str(logger.get("class_path", "")):
        return
    args = logger.get("init_args") or {}
    if args.get("version") is not None:
        return
    root = Path(args.get("save_dir") or "lightning_logs") / (args.get("name") or "lightning_logs")
    versions = {int(path.name.removeprefix("version_")): path for path in root.glob("version_*")
                if path.name.removeprefix("version_").isdigit()}
    callbacks = trainer_config.get("callbacks") or []
    own_dirpath = any((callback.get("init_args") or {}).get("dirpath")
                      for callback in callbacks if hasattr(callback, "get"))
    # Lightning's default checkpoint folder inside the logger's version, and its name for the last checkpoint.
    last = Path("checkpoints") / f"{ModelCheckpoint.CHECKPOINT_NAME_LAST}{ModelCheckpoint.FILE_EXTENSION}"
    newest = next((number for number in sorted(versions, reverse=True)
                   if own_dirpath or (versions[number] / last).exists()), None)
    if newest is not None:
        args["version"] = newest
        log.info("Resuming %s", versions[newest])
        if not own_dirpath:  # checked before the run writes anything into its folder
            verify_checkpoint(versions[newest] / last)


# Subcommands that are not Trainer methods get their own parsers.
# `plan` parses with this module's CLI class, stopped before anything is built.
EXTRA_COMMANDS: dict[str, Callable[[list[str]], Any]] = {"export": export_main, "chat": chat_main,
                                                           "plan": lambda args: plan_main(args, FinSightCLI)}


def main(args: list[str] | None = None, run: bool = True) -> FinSightCLI | Any:
    """Entry point of ``finsight`` and ``python -m finsight``; ``run=False`` only builds the objects."""
    with tensors_only():  # every checkpoint this command reads is data, never code (finsight.tensors_only)
        return _main(args, run)


def _main(args: list[str] | None, run: bool) -> FinSightCLI | Any:
    setup_logging()
    compat.quiet_known_noise()
    argv = list(sys.argv[1:] if args is None else args)
    if argv in (["--version"], ["-V"]):
        print(version_report())
        return None
    if argv and argv[0] in EXTRA_COMMANDS:
        return EXTRA_COMMANDS[argv[0]](argv[1:])
    # A damaged --ckpt_path file, or one holding code: one clear error, before LightningCLI reads it.
    verify_ckpt_path_argument(argv)
    return FinSightCLI(
        FinSightModule,
        FinSightDataModule,
        args=args,
        run=run,
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"default_env": False},
        # Reliability defaults: atomic, verified checkpoints (a configurable default: --trainer.plugins
        # replaces it, --trainer.plugins+= adds to it); always on: a stop at the first NaN/inf, and resumes
        # that continue exactly (loader position, dropout masks); `predict` writes its JSON lines.
        trainer_defaults={
            "plugins": [{"class_path": "finsight.callbacks.AtomicCheckpointIO"}],
            "callbacks": [*reliability_callbacks(), JsonlPredictionWriter()],
        },
        save_config_callback=RunFolderConfigSaver,
    )
