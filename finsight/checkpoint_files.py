"""Reading a training checkpoint, verified: a ``torch.save`` file or a folder written by DeepSpeed.

Resume (``AtomicCheckpointIO``), ``FinSightModule.from_checkpoint``, export and the chat all read checkpoints;
none of them may end in a zip-reader or pickle traceback on a damaged file. Every reader goes through here,
so a truncated, corrupt or foreign checkpoint is one ``CheckpointError`` naming the file. Lightning is imported
only for a DeepSpeed folder (its ZeRO conversion): the chat reads a checkpoint without the training stack.
"""

from __future__ import annotations

import contextlib
import io
import os
import pickle
import tempfile
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from finsight.errors import FinSightError


class CheckpointError(FinSightError, RuntimeError):
    """A checkpoint file that is truncated, corrupt or not a checkpoint at all."""


class CheckpointContentError(FinSightError, ValueError):
    """An intact checkpoint that is not a finsight training checkpoint (or not of this model)."""


def verify_checkpoint_file(path: str | Path) -> None:
    """Raise ``CheckpointError`` unless ``path`` is a complete, intact ``torch.save`` archive.

    Every member's CRC is checked (``torch.load`` checks none), so a truncated file and a file with
    damaged bytes are both caught before any weight is loaded; this reads the file once more, which the
    page cache makes cheap next to the load itself.
    """
    path = Path(path)
    size = path.stat().st_size
    if size == 0:
        raise CheckpointError(f"checkpoint {path} is empty (0 bytes); use an earlier checkpoint")
    if not zipfile.is_zipfile(path):
        # torch.save has written zip archives since torch 1.6; a file that is not one was cut before its
        # central directory (at the end) was written, or is something else entirely.
        raise CheckpointError(f"checkpoint {path} is truncated or corrupt (not a complete torch.save "
                              f"archive, {size} bytes); use an earlier checkpoint")
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as error:
        raise CheckpointError(f"checkpoint {path} is truncated or corrupt ({error}); "
                              "use an earlier checkpoint") from error
    if bad is not None:
        raise CheckpointError(f"checkpoint {path} is corrupt (checksum mismatch in {bad!r}); "
                              "use an earlier checkpoint")


def is_deepspeed_checkpoint(path: str | Path) -> bool:
    """Whether ``path`` is a checkpoint folder written by DeepSpeed (Lightning names it like a file: ``last.ckpt``)."""
    return Path(path).is_dir() and (Path(path) / "latest").is_file()


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """A training checkpoint as one dictionary, from a ``torch.save`` file or a DeepSpeed ZeRO folder.

    Files are verified first (``CheckpointError`` when damaged). A DeepSpeed folder goes through Lightning's
    ``convert_zero_checkpoint_to_fp32_state_dict``: ``state_dict`` then holds the fp32 master weights of the
    trained parameters (those the optimizer updates, not a half-precision copy), beside Lightning's own keys
    (``hyper_parameters``, ``global_step``, ...).
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if not path.is_dir():
        verify_checkpoint_file(path)
        try:
            # Memory-mapped: only the pages read are loaded (the adapter, not the optimizer state beside it).
            return torch.load(path, map_location="cpu", weights_only=False, mmap=True)
        except (EOFError, zipfile.BadZipFile, pickle.UnpicklingError, RuntimeError) as error:
            raise CheckpointError(f"checkpoint {path} is truncated or corrupt ({error}); "
                                  "use an earlier checkpoint") from error
    with tempfile.TemporaryDirectory() as scratch:
        return _convert_deepspeed_folder(path, Path(scratch) / "checkpoint.pt")


def _convert_deepspeed_folder(path: Path, target: Path) -> dict[str, Any]:
    """Lightning's ZeRO → single-file conversion into ``target``, its failures as ``CheckpointError``."""
    if not is_deepspeed_checkpoint(path):
        raise CheckpointError(f"checkpoint {path} is a folder without DeepSpeed's 'latest' file: not a checkpoint")
    from lightning.pytorch.utilities.deepspeed import convert_zero_checkpoint_to_fp32_state_dict

    with contextlib.redirect_stdout(io.StringIO()):
        try:
            return convert_zero_checkpoint_to_fp32_state_dict(path, target)
        except (OSError, EOFError, ValueError, KeyError, RuntimeError, zipfile.BadZipFile,
                pickle.UnpicklingError) as error:
            raise CheckpointError(f"DeepSpeed checkpoint {path} is incomplete or corrupt ({error}); "
                                  "use an earlier checkpoint") from error


@contextlib.contextmanager
def loadable_checkpoint(path: str | os.PathLike) -> Iterator[Path]:
    """A verified one-file checkpoint for ``path``, for ``LightningModule.load_from_checkpoint``.

    A file is verified (``CheckpointError`` when damaged) and given as is; a DeepSpeed folder is converted
    into a temporary file first (Lightning's own recipe for loading ZeRO checkpoints), removed afterwards.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if not path.is_dir():
        verify_checkpoint_file(path)
        yield path
        return
    with tempfile.TemporaryDirectory() as scratch:
        target = Path(scratch) / "checkpoint.pt"
        _convert_deepspeed_folder(path, target)
        yield target
