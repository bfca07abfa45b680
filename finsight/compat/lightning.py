"""Lightning's loop state, private constructor arguments and helpers finsight reads (checked on 2.6.0–2.6.6).

Exact resume needs the fit loop's restart state (no public API says "this batch's validation was skipped"),
the module needs its trainer before ``Trainer.fit`` has attached one publicly, the CLI reads a checkpoint's
hyper-parameters through LightningCLI's private parsing step, and DeepSpeed on the CPU starts its process
group with the strategy's private initialiser.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from finsight.compat.noise import DropLinesStartingWith

if TYPE_CHECKING:
    import lightning as L
    from torch.utils.data import Sampler

DISTRIBUTION = "lightning"
TESTED = ">=2.6,<2.7"


def checkpoint_every_n_train_steps(callback: Any) -> int:
    """A ``ModelCheckpoint``'s ``every_n_train_steps`` (0 when off), for the start-up summary.

    Lightning keeps the constructor argument only as a private attribute.
    """
    return int(callback._every_n_train_steps or 0)


def checkpoint_train_time_interval(callback: Any) -> float:
    """A ``ModelCheckpoint``'s ``train_time_interval`` in minutes (0 when off), for the start-up summary."""
    interval = callback._train_time_interval
    return interval.total_seconds() / 60 if interval is not None else 0.0


def save_last_now(callback: Any, trainer: L.Trainer) -> None:
    """Write a ``ModelCheckpoint``'s ``last`` checkpoint now, unless this step is already saved or no fit runs.

    Lightning (2.6) refreshes ``last`` after a validation only when a top-k checkpoint was saved at the same
    step, and at the end of fit only when none was ever saved; its skip test and its ``last`` writer (which
    keeps ``last_model_path`` and removes the previous file) are private.
    """
    if not callback._should_skip_saving_checkpoint(trainer):
        callback._save_last_checkpoint(trainer, callback._monitor_candidates(trainer))


def is_batch_size_finder_checkpoint(path: str | None) -> bool:
    """Whether ``path`` is the scratch checkpoint Lightning's batch size finder saves before its trials and
    restores after them (``.scale_batch_size_<uuid>.ckpt``, a private name), not a user's ``--ckpt_path``."""
    from pathlib import Path

    return path is not None and Path(path).name.startswith(".scale_batch_size_")


def batch_size_finder_argument(finder: Any) -> str:
    """A ``BatchSizeFinder``'s ``batch_arg_name``, kept only as a private attribute."""
    return finder._batch_arg_name


def retarget_batch_size_finder(finder: Any, batch_arg_name: str) -> None:
    """Make a ``BatchSizeFinder`` search another attribute, before its search begins."""
    finder._batch_arg_name = batch_arg_name


def attached_trainer(module: L.LightningModule) -> L.Trainer | None:
    """The trainer a module is attached to, or None: ``module.trainer`` raises when there is none.

    ``configure_model`` runs attached (fit) and also directly in tests and tools; it reads the precision and
    the data module from the trainer when there is one.
    """
    return module._trainer


def validation_skipped_at_resume(trainer: L.Trainer) -> bool:
    """Whether a run resumed from an ``every_n_train_steps`` checkpoint skips a validation that was due.

    Such checkpoints are written in ``on_train_batch_end``, before that batch's validation; Lightning
    resumes past the batch and so past its validation, which the uninterrupted run did run.
    """
    epoch_loop = trainer.fit_loop.epoch_loop
    return bool(epoch_loop.restarting and epoch_loop.restarted_on_train_batch_end
                and not epoch_loop.val_loop.restarted_mid_evaluation
                and epoch_loop._should_check_val_fx(trainer.fit_loop._data_fetcher))


def run_skipped_validation_first(trainer: L.Trainer) -> None:
    """Make a resumed run validate before its next batch, with the uninterrupted run's counters.

    The validation loop is marked as restarted before it began, so Lightning runs it instead of skipping
    it; the restored batch is then counted as stepped twice (by the restart and by the validation's step
    end) unless gradients are still accumulating, so one count is taken back.
    """
    from lightning.pytorch.loops.evaluation_loop import RestartStage

    epoch_loop = trainer.fit_loop.epoch_loop
    val_loop = epoch_loop.val_loop
    val_loop._restart_stage = RestartStage.RESTARTED_MID_EVALUATION
    val_loop.batch_progress.current.reset()
    if not epoch_loop._should_accumulate():
        epoch_loop._batches_that_stepped -= 1


def init_deepspeed_distributed(strategy: Any) -> None:
    """Start DeepSpeed's process group as ``DeepSpeedStrategy.setup_distributed`` does, minus its CUDA check."""
    strategy._init_deepspeed_distributed()


def scatter_into_zero3_partitions(strategy: Any, checkpoint: Any) -> None:
    """Load a consolidated state dict into a ZeRO-3 model, layer by layer (gathered, loaded on rank 0,
    partitioned again): ``DeepSpeedStrategy._restore_zero_state``, which Lightning runs only for
    ``load_full_weights``. Missing keys (the frozen base, left out of checkpoints) are expected."""
    strategy._restore_zero_state(checkpoint, strict=False)


def reset_seed() -> None:
    """Re-seed this process from ``PL_GLOBAL_SEED`` as Lightning's own strategies do in ``setup_distributed``.

    Lightning exports it from ``lightning.fabric.utilities.seed`` only, not from a documented module.
    """
    from lightning.fabric.utilities.seed import reset_seed as lightning_reset_seed

    lightning_reset_seed()


def distributed_sampler(sampler: Sampler, **kwargs: Any) -> Sampler:
    """Each rank's share of a sampler's order, as Lightning's DistributedSamplerWrapper splits it.

    ``kwargs``: the trainer's ``distributed_sampler_kwargs`` (num_replicas, rank) and shuffle.
    """
    from lightning.fabric.utilities.distributed import DistributedSamplerWrapper

    return DistributedSamplerWrapper(sampler, **kwargs)


class CheckpointHyperParametersHook:
    """A LightningCLI mixin that hands the reading of ``--ckpt_path``'s hyper-parameters to a public method.

    LightningCLI reads them in its private ``_parse_ckpt_path`` (2.6), before classes are instantiated. A
    subclass defines ``read_checkpoint_hyperparameters()``, returning False to keep LightningCLI's own reading.
    """

    def read_checkpoint_hyperparameters(self) -> bool:
        """Read ``--ckpt_path``'s hyper-parameters into the config; False: let LightningCLI do it."""
        return False

    def _parse_ckpt_path(self) -> None:
        if not self.read_checkpoint_hyperparameters():
            super()._parse_ckpt_path()


@contextmanager
def adapter_only_load() -> Iterator[None]:
    """Load an adapter-only checkpoint without Lightning's warning that every base weight is missing from it.

    ``load_from_checkpoint(strict=False)`` lists the keys it did not find; for finsight's checkpoints, which
    hold the adapter alone on purpose, that is every base weight.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Found keys that are in the model state dict but not in")
        yield


# Lightning's pytree helper builds torch's deprecated ``LeafSpec`` (torch 2.13) on every optimizer step.
KNOWN_WARNINGS: tuple[tuple[str, str, type[Warning]], ...] = (
    (r"`isinstance\(treespec, LeafSpec\)` is deprecated", r"lightning\.pytorch\.utilities\._pytree", FutureWarning),
)

# Lightning logs this advertisement at every Trainer start without the optional litlogger package.
LITLOGGER_TIP = "💡 Tip: For seamless cloud logging"


class _DropLitLoggerTip(DropLinesStartingWith):
    prefix = LITLOGGER_TIP


LOG_FILTERS: tuple[tuple[str, type[logging.Filter]], ...] = (
    ("lightning.pytorch.utilities.rank_zero", _DropLitLoggerTip),
)
