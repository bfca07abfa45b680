"""Crash-safe checkpoint files: written atomically, and refused with a clear message when damaged.

A run killed while it writes a checkpoint (out of memory, pre-empted machine, Ctrl-C twice) must never
leave a truncated ``last.ckpt`` or best checkpoint behind: resuming would fail, or worse, the only good
checkpoint would be gone. ``AtomicCheckpointIO`` writes every checkpoint to a temporary file in the same
folder, flushes and fsyncs it, and renames it over the target with ``os.replace`` (atomic on POSIX and
Windows), so a reader sees either the previous complete file or the new complete file.

Under DeepSpeed a checkpoint is a folder that DeepSpeed writes itself; ``finsight.checkpoint_files`` reads either
kind into the same dictionary.

``LatestCheckpoint`` keeps ``last.ckpt`` the newest state: Lightning's own ``ModelCheckpoint`` refreshes it
only when the best checkpoint changes, so a crash after validations that did not improve restarts from the
last improvement, not from the last validation.
"""

from __future__ import annotations

import os
import pickle
import zipfile
from datetime import timedelta
from pathlib import Path
from typing import Any, BinaryIO

import lightning as L
import torch
from fsspec.utils import get_protocol
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO

from finsight import compat
from finsight.atomic import atomic_path
from finsight.checkpoint_files import CheckpointError, verify_checkpoint_file, verify_deepspeed_folder
from finsight.errors import FinSightError
from finsight.tensors_only import tensors_only


def _is_local(path: str | Path) -> bool:
    """Whether a checkpoint path is a local file (not ``s3://``, ``gs://``, ...), as Lightning decides it."""
    return get_protocol(str(path)) == "file"


def verify_checkpoint(path: str | Path) -> None:
    """Verify a local checkpoint before anything reads it: a file, or every file of a DeepSpeed folder."""
    if _is_local(path) and Path(path).is_file():
        verify_checkpoint_file(path)
    elif _is_local(path) and Path(path).is_dir():
        verify_deepspeed_folder(path)


def verify_ckpt_path_argument(args: list[str]) -> None:
    """Check the file given as ``--ckpt_path`` on a command line before anything else reads it.

    LightningCLI reads a ``--ckpt_path`` file itself (for its hyperparameters) before the Trainer and its
    checkpoint IO exist, so a damaged file would otherwise end in a zip-reader traceback, and nothing may be
    written before a file holding code is refused. A DeepSpeed folder has every file checked. ``last`` is
    checked when the CLI resolves it; ``best`` is resolved by the Trainer and checked by its loader.
    """
    path = None
    for i, arg in enumerate(args):
        if arg.startswith("--ckpt_path="):
            path = arg.split("=", 1)[1]
        elif arg == "--ckpt_path" and i + 1 < len(args):
            path = args[i + 1]
    if path:
        verify_checkpoint(path)


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` whose saves are atomic and durable, and whose loads reject damaged files.

    Every file Lightning's ``ModelCheckpoint`` writes goes through ``save_checkpoint``: top-k files and
    ``last.ckpt`` alike with ``save_last: true``. (With ``save_last: link`` Lightning deletes ``last.ckpt``
    and then creates a symlink, outside this class: a kill in between leaves no ``last.ckpt``, so prefer
    ``true``.) Remote paths (``s3://`` …) fall back to Lightning's own transactional upload. Strategies
    that write checkpoint folders themselves (DeepSpeed, sharded FSDP) do not use a ``CheckpointIO``.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | Path,
                        storage_options: Any | None = None) -> None:
        """Write to a temporary beside ``path``, fsync it, then ``os.replace`` it onto ``path``."""
        if storage_options is not None or not _is_local(path):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        path = Path(path)
        with atomic_path(path, f"checkpoint {path.name}", expected_bytes=tensor_bytes(checkpoint)) as temporary:
            with open(temporary, "wb") as file:
                self.write(checkpoint, file, path)
                file.flush()
                os.fsync(file.fileno())

    def write(self, checkpoint: dict[str, Any], file: BinaryIO, path: Path) -> None:
        """Serialize ``checkpoint`` into ``file``, the open temporary that becomes ``path`` once complete."""
        torch.save(checkpoint, file)

    def load_checkpoint(self, path: str | Path, map_location: Any | None = lambda storage, loc: storage,
                        weights_only: bool | None = None) -> dict[str, Any]:
        """Load ``path`` as tensors and plain data only (whatever ``weights_only`` the caller asks for); a
        truncated or corrupt file raises ``CheckpointError`` naming it, not a pickle or zip traceback, and a
        file that holds code ``UnsafeCheckpointError``, before anything in it is unpickled."""
        if _is_local(path):
            if not Path(path).is_file():
                raise CheckpointError(f"checkpoint {path} does not exist")
            verify_checkpoint_file(path)
        try:
            with tensors_only(path):
                return super().load_checkpoint(path, map_location=map_location, weights_only=True)
        except (EOFError, zipfile.BadZipFile) as error:
            raise CheckpointError(f"checkpoint {path} is truncated or corrupt ({error}); "
                                  "use an earlier checkpoint") from error
        except pickle.UnpicklingError as error:
            raise CheckpointError(f"checkpoint {path} is corrupt ({error}); use an earlier checkpoint") from error
        except RuntimeError as error:
            if "PytorchStreamReader" not in str(error):
                raise
            first_line = str(error).split(". ")[0]
            raise CheckpointError(f"checkpoint {path} is truncated or corrupt ({first_line}); "
                                  "use an earlier checkpoint") from error


class CheckpointSettingsError(FinSightError, ValueError):
    """Checkpoint cadence options that contradict each other.

    Fix: give each checkpoint callback one cadence (`every_n_train_steps` or `train_time_interval`), as the
    message says.
    """


class LatestCheckpoint(ModelCheckpoint):
    """``last.ckpt``, always the newest state: after every validation, every ``every_n_minutes`` of training
    (or every ``every_n_train_steps`` optimizer steps) and at the end of fit, whether or not validation
    improved; a crash then costs at most that interval. The best checkpoint stays with a monitoring
    ``ModelCheckpoint`` beside it (with ``save_last: false``), in the same folder.
    """

    def __init__(self, dirpath: str | Path | None = None, every_n_minutes: float | None = 15.0,
                 every_n_train_steps: int | None = None) -> None:
        """
        Args:
            dirpath: the checkpoint folder; default: the logger's ``checkpoints/``, beside the best checkpoint.
            every_n_minutes: minutes of training between two writes (null: off). Lower: less work lost in a
                crash, more time writing (the adapter and optimizer state, tens of MB for a 7B at rank 64).
            every_n_train_steps: optimizer steps between two writes instead of minutes (null: off).
        """
        if every_n_minutes is not None and every_n_train_steps is not None:
            raise CheckpointSettingsError(
                f"LatestCheckpoint: every_n_minutes={every_n_minutes} and every_n_train_steps="
                f"{every_n_train_steps} both set; set one of them to null")
        if every_n_minutes is not None and every_n_minutes <= 0:
            raise CheckpointSettingsError(f"LatestCheckpoint: every_n_minutes must be > 0, got {every_n_minutes}")
        super().__init__(
            dirpath=dirpath, monitor=None, save_top_k=0, save_last=True, save_on_train_epoch_end=False,
            every_n_train_steps=every_n_train_steps,
            train_time_interval=timedelta(minutes=every_n_minutes) if every_n_minutes is not None else None,
            # A resumed run overwrites last.ckpt, never leaves last-v1.ckpt beside it.
            enable_version_counter=False,
        )

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Write ``last`` after every validation (Lightning's callbacks run after EarlyStopping's and the best
        checkpoint's, so their updated state is in it)."""
        compat.lightning.save_last_now(self, trainer)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Write ``last`` at the end of fit, so ``--ckpt_path last`` after a finished run starts from its end."""
        compat.lightning.save_last_now(self, trainer)


def best_checkpoint_callback(trainer: L.Trainer) -> ModelCheckpoint | None:
    """The checkpoint callback that keeps the best checkpoint: the first with a ``monitor`` (Lightning's
    ``trainer.checkpoint_callback`` is merely the first, which may be a ``LatestCheckpoint``)."""
    monitoring = [c for c in trainer.checkpoint_callbacks if isinstance(c, ModelCheckpoint) and c.monitor]
    return monitoring[0] if monitoring else trainer.checkpoint_callback


def newest_last_checkpoint(trainer: L.Trainer) -> str:
    """The newest ``last`` checkpoint any checkpoint callback wrote in this run ("" when none), for messages."""
    paths = [Path(c.last_model_path) for c in trainer.checkpoint_callbacks
             if getattr(c, "last_model_path", "") and Path(c.last_model_path).exists()]
    return str(max(paths, key=lambda p: p.stat().st_mtime)) if paths else ""


def tensor_bytes(value: Any) -> int:
    """The bytes of every tensor in a nested checkpoint: about what its file needs on disk."""
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, dict):
        return sum(tensor_bytes(v) for v in value.values())
    if isinstance(value, list | tuple):
        return sum(tensor_bytes(v) for v in value)
    return 0
