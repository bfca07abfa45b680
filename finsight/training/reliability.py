"""Trainer callbacks.

Reliability (on by default in the ``finsight`` command):

- ``NonFiniteGuard`` stops a run at the first NaN/inf loss or gradient, before the optimizer step, so no
  checkpoint with broken weights is ever written.
- ``StepSeededRNG`` makes dropout reproducible across a kill and resume.
- ``ExactResume`` makes a resumed run continue mid-epoch with the next unseen batch, and with the metrics
  checkpointing and early stopping compare against.

Diagnostics: ``SampleLog`` records which samples every training batch consumed.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback

from finsight import compat
from finsight.errors import FinSightError
from finsight.training.checkpoint import newest_last_checkpoint


class NonFiniteError(FinSightError, RuntimeError):
    """Training produced a NaN or infinite loss or gradient.

    Fix: resume from the `last.ckpt` written before the step with a lower `model.learning_rate`, gradient
    clipping (`trainer.gradient_clip_val`) or bf16 instead of fp16; the data report shows whether odd rows came
    in.
    """


class NonFiniteGuard(Callback):
    """Stop training at the first non-finite loss or gradient, naming the step.

    The loss is checked before ``backward`` and the gradients before the optimizer step, and the run ends
    with ``NonFiniteError``: the weights are never updated with NaN, so neither ``last.ckpt`` nor a best
    checkpoint can be overwritten by a broken one, and the last good checkpoint can be resumed (with a
    lower learning rate, say). Under a ``GradScaler`` (``16-mixed``) infinite gradients are part of
    normal loss scaling (the scaler skips that step), so only the loss is checked there. With several
    processes the loss verdict is shared, so every rank stops at the same step instead of some waiting for
    the others in ``backward``.
    """

    def __init__(self, check_gradients: bool = True) -> None:
        """
        Args:
            check_gradients: Also check the trainable parameters' gradients before the optimizer step.
        """
        super().__init__()
        self.check_gradients = check_gradients

    def on_before_backward(self, trainer: L.Trainer, pl_module: L.LightningModule, loss: torch.Tensor) -> None:
        local_bad = not bool(torch.isfinite(loss.detach()).all())
        bad = local_bad
        if trainer.world_size > 1:
            bad = trainer.strategy.reduce_boolean_decision(local_bad, all=False)
        if bad:
            value = loss.detach().float().item()
            self._fail(trainer, f"the training loss is {value}" if local_bad else
                       "the training loss is not finite on another process")

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule,
                                 optimizer: torch.optim.Optimizer) -> None:
        if not self.check_gradients or _loss_scaling(trainer):
            return
        from finsight.training.deepspeed import at_optimizer_step, trainable_gradients

        if not at_optimizer_step(trainer):
            return
        named = trainable_gradients(trainer, pl_module)
        # One device sync for all gradients; names are looked up only once something is wrong.
        if not named or bool(torch.stack([torch.isfinite(g).all() for _, g in named]).all()):
            return
        name, grad = next((n, g) for n, g in named if not bool(torch.isfinite(g).all()))
        kind = "NaN" if bool(torch.isnan(grad).any()) else "infinite"
        self._fail(trainer, f"the gradient of {name} has {kind} values")

    @staticmethod
    def _fail(trainer: L.Trainer, what: str) -> None:
        last = newest_last_checkpoint(trainer)
        where = f"; the last good checkpoint is {last}" if last else ""
        # global_step counts the optimizer steps done, so this is the step that was about to be taken.
        raise NonFiniteError(
            f"non-finite value at global step {trainer.global_step} (epoch {trainer.current_epoch}, "
            f"batch {trainer.fit_loop.epoch_loop.batch_idx}): {what}; stopped before the optimizer step, "
            f"so no weights were changed{where}"
        )


def _loss_scaling(trainer: L.Trainer) -> bool:
    """Whether fp16 loss scaling is on (a ``GradScaler``, or DeepSpeed's own), which skips overflowing steps."""
    if getattr(trainer.precision_plugin, "scaler", None) is not None:
        return True
    config = getattr(trainer.strategy, "config", None)
    return isinstance(config, dict) and bool(config.get("fp16", {}).get("enabled"))


class StepSeededRNG(Callback):
    """Reseed torch, numpy and ``random`` at every training batch from (seed, epoch, batch, step, rank).

    Dropout draws from the global generators. Saving their state in a checkpoint is not enough for an
    exact resume: between a checkpoint and the next batch the uninterrupted run and the resumed one draw
    different amounts (starting a DataLoader iterator draws a seed, a resumed run starts its loaders
    again). Deriving every batch's generator state from its position in the run instead makes the masks
    of a batch the same whether or not the run was interrupted before it.
    """

    def __init__(self, seed: int | None = None) -> None:
        """
        Args:
            seed: Base seed; defaults to the one ``seed_everything`` set (``PL_GLOBAL_SEED``), else 0.
        """
        super().__init__()
        self.seed = seed

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        base = self.seed if self.seed is not None else int(os.environ.get("PL_GLOBAL_SEED", 0))
        position = [base, trainer.current_epoch, batch_idx, trainer.global_step, trainer.global_rank]
        torch_seed, numpy_seed, python_seed = np.random.SeedSequence(position).generate_state(3, np.uint64)
        torch.manual_seed(int(torch_seed))  # also seeds every CUDA device
        np.random.seed(int(numpy_seed) % 2**32)
        random.seed(int(python_seed))


class ExactResume(Callback):
    """Restore what Lightning's resume leaves out, so a resumed run continues exactly.

    - The last logged metrics (``trainer.callback_metrics``). ``ModelCheckpoint(every_n_train_steps=…)``
      and ``EarlyStopping`` compare against the latest ``val/loss``; a resumed run starts without one, so
      its first step checkpoint would be postponed to the next validation and a different file would
      become the best.
    - A validation due right after the checkpointed batch. ``every_n_train_steps`` checkpoints are written
      in ``on_train_batch_end``, before that step's validation; Lightning resumes from them by skipping
      the validation, so early stopping would miss one count and the best-checkpoint record one score.
      The resumed run runs it first, as the uninterrupted run did.

    The training loader's position needs nothing here: Lightning saves the ``StatefulDataLoader``'s state
    and loads it into the loader it builds after the restore (``FinSightModule`` sizes its schedule without
    building that loader early, see ``finsight.training.module.planned_optimizer_steps``).

    Each part does nothing when there is nothing to restore. The validation part uses Lightning loop
    internals, through :mod:`finsight.compat`; ``tests/training/test_reliability.py`` compares a killed-and-resumed
    run with an uninterrupted one and fails if any part stops working.
    """

    def __init__(self) -> None:
        super().__init__()
        self._trainer: L.Trainer | None = None
        self._metrics: dict[str, Any] = {}

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._trainer = trainer

    def state_dict(self) -> dict[str, Any]:
        metrics = self._trainer.callback_metrics if self._trainer is not None else {}
        return {"callback_metrics": {k: v.detach().cpu() if isinstance(v, torch.Tensor) else v
                                     for k, v in metrics.items()},
                "run_settings": run_settings(self._trainer) if self._trainer is not None else {}}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Keep the metrics for ``on_train_start``; refuse a changed run now, before Lightning restores the
        loader position and the loops (a position saved for another batch size or world size fails there)."""
        self._metrics = dict(state_dict.get("callback_metrics", {}))
        trainer = self._trainer
        # Only a user's --ckpt_path: the batch size finder restores its own checkpoint of other batch sizes.
        if trainer is not None and trainer.ckpt_path is not None and \
                not compat.lightning.is_batch_size_finder_checkpoint(trainer.ckpt_path):
            refuse_changed_resume(dict(state_dict.get("run_settings", {})), run_settings(trainer))

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._metrics:
            device = pl_module.device
            for name, value in self._metrics.items():
                trainer.callback_metrics.setdefault(
                    name, value.to(device) if isinstance(value, torch.Tensor) else value)
            self._metrics = {}
        if compat.lightning.validation_skipped_at_resume(trainer):
            compat.lightning.run_skipped_validation_first(trainer)



class ResumeChangedError(FinSightError, ValueError):
    """``--ckpt_path`` with settings that decide what each step trains on, changed since the checkpoint.

    Fix: resume with the settings the message lists as they were, or start a new run from the adapter
    (`--model.adapter_path`).
    """


# What decides which samples each optimizer step holds and how its loss is normalised: with any of these
# changed, the resumed run is not the continuation of the checkpoint's run (the data order, the loader
# position and the step boundaries saved in it mean something else).
RESUME_SETTINGS = ("data.batch_size", "data.batch_tokens", "data.max_length", "data.seed", "data.sources",
                   "data.system_prompt")


def run_settings(trainer: L.Trainer) -> dict[str, Any]:
    """The settings a resumed run must share with its checkpoint, as plain values (saved in checkpoints)."""
    settings: dict[str, Any] = {"trainer.accumulate_grad_batches": trainer.accumulate_grad_batches,
                                "trainer.devices (world size)": trainer.world_size}
    data = getattr(trainer, "datamodule", None)
    for key in RESUME_SETTINGS:
        name = key.removeprefix("data.")
        if data is not None and hasattr(data, name):
            # JSON-shaped so that source configs compare by content, not by object identity.
            settings[key] = json.loads(json.dumps(getattr(data, name), default=_plain))
    return settings


def _as_saved(current: Any, saved: Any) -> Any:
    """``current`` without the source fields a checkpoint of an earlier version did not record (they had their
    default then): a field added since is no change."""
    if isinstance(current, list) and isinstance(saved, list) and len(current) == len(saved):
        return [{k: v for k, v in now.items() if k in before} if isinstance(now, dict) and isinstance(before, dict)
                else now for now, before in zip(current, saved)]
    return current


def _plain(value: Any) -> Any:
    return vars(value) if hasattr(value, "__dict__") else str(value)


def refuse_changed_resume(saved: dict[str, Any], current: dict[str, Any]) -> None:
    """Raise one ``ResumeChangedError`` naming every setting that differs from the checkpoint's run."""
    changed = [f"{key} was {saved[key]!r}, now {current[key]!r}" for key in saved
               if key in current and saved[key] != _as_saved(current[key], saved[key])]
    if changed:
        raise ResumeChangedError(
            "--ckpt_path: this run changes what the checkpoint's steps were trained with: " + "; ".join(changed)
            + ". Resume with the checkpoint's settings, or start a new run without --ckpt_path "
            "(--model.adapter_path <exported adapter> continues from its weights)")


def reliability_callbacks() -> list[Callback]:
    """The callbacks the ``finsight`` command always adds; add them to a ``Trainer`` built in Python too."""
    return [NonFiniteGuard(), StepSeededRNG(), ExactResume()]


class SampleLog(Callback):
    """Append ``{"step", "epoch", "batch", "ids"}`` for every training batch to a JSONL file.

    Shows exactly which samples a run trained on, in which order: a resumed run's lines continue the
    interrupted run's (with several processes, rank 0's batches). Enable with ``--trainer.callbacks+=finsight.callbacks.SampleLog
    --trainer.callbacks.path=samples.jsonl``.
    """

    def __init__(self, path: str, key: str = "sample_id") -> None:
        """
        Args:
            path: JSONL file to append to (created with its folder).
            key: Batch entry holding the sample ids.
        """
        super().__init__()
        self.path = Path(path)
        self.key = key

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if not trainer.is_global_zero or self.key not in batch:
            return
        record = {"step": trainer.global_step, "epoch": trainer.current_epoch, "batch": batch_idx,
                  "ids": batch[self.key].tolist()}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as file:  # flushed on close: a killed run keeps every line written
            file.write(json.dumps(record) + "\n")
