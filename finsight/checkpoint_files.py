"""Reading a training checkpoint, verified: a ``torch.save`` file or a folder written by DeepSpeed.

Resume (``AtomicCheckpointIO``), ``FinSightModule.from_checkpoint``, export and the chat all read checkpoints;
none of them may end in a zip-reader or pickle traceback on a damaged file. Every reader goes through here,
so a truncated, corrupt or foreign checkpoint is one ``CheckpointError`` naming the file, and a checkpoint that
holds code rather than data is one ``UnsafeCheckpointError`` (:mod:`finsight.tensors_only`), refused before
anything in it is unpickled. Lightning is imported only for a DeepSpeed folder (its ZeRO conversion): the chat
reads a checkpoint without the training stack.
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
from finsight.tensors_only import check_tensors_only, tensors_only


class CheckpointError(FinSightError, RuntimeError):
    """A checkpoint file that is truncated, corrupt or not a checkpoint at all.

    Fix: use another checkpoint (`last.ckpt` or an earlier step's); a truncated file comes from an interrupted
    copy or a full disk: copy it again.
    """


class CheckpointContentError(FinSightError, ValueError):
    """An intact checkpoint that is not a finsight training checkpoint (or not of this model).

    Fix: pass a checkpoint that `finsight fit` wrote for the same base model.
    """


def verify_checkpoint_file(path: str | Path, deepspeed: bool = False) -> None:
    """Raise ``CheckpointError`` unless ``path`` is a complete, intact ``torch.save`` archive, and
    ``UnsafeCheckpointError`` when its pickle names anything but tensors and plain data.

    Every member's CRC is checked (``torch.load`` checks none), so a truncated file and a file with
    damaged bytes are both caught before any weight is loaded; this reads the file once more, which the
    page cache makes cheap next to the load itself. ``deepspeed``: a file of a DeepSpeed folder, which may
    also hold DeepSpeed's own value types (:func:`finsight.compat.deepspeed.checkpoint_value_types`).
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
    check_tensors_only(path, deepspeed=deepspeed)


PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
"""Weight files in ``torch.save`` (pickle) format that transformers and PEFT read from a model or adapter folder."""


def verify_folder_pickles(folder: str | Path) -> None:
    """Refuse a model or adapter folder whose ``torch.save`` weight files (``pytorch_model.bin``,
    ``adapter_model.bin``) hold anything but tensors and plain data, naming the file; safetensors files hold
    no code and are not read here. Only each file's pickle is read, never its tensors: cheap for a large base.
    """
    for file in sorted(Path(folder).expanduser().glob("*")):
        if file.suffix in PICKLE_SUFFIXES and file.is_file():
            if not zipfile.is_zipfile(file):
                raise CheckpointError(f"weights file {file} is not a torch.save archive (truncated, corrupt or "
                                      "an old pickle format finsight does not read)")
            check_tensors_only(file)


def verify_deepspeed_folder(path: str | Path) -> None:
    """Raise unless ``path`` is a DeepSpeed checkpoint folder whose every file passes ``verify_checkpoint_file``.

    DeepSpeed finds its files through the tag written in ``latest``; a tag that leaves the folder
    (``../elsewhere``) would make it read files nobody checked, so it must name a folder inside. DeepSpeed's
    ``zero_to_fp32.py`` beside them is a script for the user, never run by finsight, and left alone.
    """
    path = Path(path)
    if not is_deepspeed_checkpoint(path):
        raise CheckpointError(f"checkpoint {path} is a folder without DeepSpeed's 'latest' file: not a checkpoint")
    tag = (path / "latest").read_text(errors="replace").strip()
    if not tag or Path(tag).name != tag or tag in {".", ".."} or not (path / tag).is_dir():
        raise CheckpointError(f"DeepSpeed checkpoint {path}: its 'latest' file names {tag[:80]!r}, not a folder "
                              "inside the checkpoint; use an earlier checkpoint")
    for file in sorted((path / tag).rglob("*.pt")):
        verify_checkpoint_file(file, deepspeed=True)


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
            with tensors_only(path):
                return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except (EOFError, zipfile.BadZipFile, pickle.UnpicklingError, RuntimeError) as error:
            raise CheckpointError(f"checkpoint {path} is truncated or corrupt ({error}); "
                                  "use an earlier checkpoint") from error
    with tempfile.TemporaryDirectory() as scratch:
        return _convert_deepspeed_folder(path, Path(scratch) / "checkpoint.pt")


def _convert_deepspeed_folder(path: Path, target: Path) -> dict[str, Any]:
    """Lightning's ZeRO → single-file conversion into ``target``, its failures as ``CheckpointError``; every
    file it reads is verified first and loaded as data only."""
    verify_deepspeed_folder(path)
    from lightning.pytorch.utilities.deepspeed import convert_zero_checkpoint_to_fp32_state_dict

    with contextlib.redirect_stdout(io.StringIO()), tensors_only(path, deepspeed=True):
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
