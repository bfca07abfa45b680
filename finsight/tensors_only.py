"""Checkpoints are data, never code: every file finsight reads with ``torch.load`` yields tensors and plain data.

A ``torch.save`` file is a zip archive around a pickle, and unpickling may call any function the file names:
a checkpoint received from someone else (a colleague's ``last.ckpt``, a DeepSpeed folder from a cluster) could
run a command on load. torch's own weights-only unpickler refuses every such call; this module makes it the
only unpickler that finsight's readers reach, in three steps:

* :func:`tensors_only` forces ``weights_only=True`` on every ``torch.load`` in its block, also the ones
  Lightning and DeepSpeed make with ``weights_only=False`` (torch reads ``TORCH_FORCE_WEIGHTS_ONLY_LOAD`` at
  every call, so setting it is torch's own switch, not a patch), and turns torch's refusal into
  :class:`UnsafeCheckpointError`. Nothing ever falls back to full unpickling.
* :func:`check_tensors_only` reads a file's pickle statically before the load (it executes nothing), so the
  refusal names the exact file, also inside a DeepSpeed folder, and what it holds.
* :func:`finsight.compat.deepspeed.checkpoint_value_types` allow-lists the few non-tensor types that DeepSpeed
  writes into its checkpoint folders (Lightning's own files hold none), and only where a DeepSpeed folder is read.
"""

from __future__ import annotations

import contextlib
import io
import os
import pickle
import pickletools
import re
import zipfile
from collections.abc import Iterator

import torch

from finsight import compat
from finsight.errors import FinSightError

FORCE_VARIABLE = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"
"""torch's switch: when true, every ``torch.load`` is weights-only, whatever its caller passed."""
UNSAFE_VARIABLE = "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"
"""torch's opposite switch; cleared inside :func:`tensors_only` (torch refuses both at once)."""


class UnsafeCheckpointError(FinSightError):
    """A checkpoint whose pickle names functions or classes beyond tensors and plain data: refused, not run.

    Not a ``RuntimeError`` or ``UnpicklingError``: handlers of damaged files must never re-label it as damage.

    Fix: do not load the file: use a checkpoint that finsight wrote, or check where it came from
    ([Security](security.md)). Nothing in it was run.
    """


@contextlib.contextmanager
def tensors_only(path: str | os.PathLike | None = None, deepspeed: bool = False) -> Iterator[None]:
    """Every ``torch.load`` in the block loads tensors and plain data only; a refusal names ``path``.

    ``deepspeed``: also allow :func:`finsight.compat.deepspeed.checkpoint_value_types`, for the files of a
    DeepSpeed checkpoint folder.

    Process-wide while the block runs (torch reads the switch at each call), so loads made by Lightning and
    DeepSpeed inside it are covered; worker processes started inside it inherit it. Nested use is fine.
    """
    saved = {name: os.environ.get(name) for name in (FORCE_VARIABLE, UNSAFE_VARIABLE)}
    os.environ[FORCE_VARIABLE] = "1"
    os.environ.pop(UNSAFE_VARIABLE, None)
    try:
        with _allowed_library_types(deepspeed):
            yield
    except pickle.UnpicklingError as error:
        if "Weights only load failed" not in str(error):
            raise
        what = _type_in_torch_message(str(error))
        raise UnsafeCheckpointError(refusal(path or "a checkpoint", what)) from None
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _allowed_library_types(deepspeed: bool) -> contextlib.AbstractContextManager:
    """torch's allow-list, extended by DeepSpeed's value types where a DeepSpeed folder is read."""
    return torch.serialization.safe_globals(list(compat.deepspeed.checkpoint_value_types() if deepspeed else ()))


def refusal(path: str | os.PathLike, what: str) -> str:
    """The one-line refusal: the file, what it holds, that nothing ran, and what to do."""
    return (f"checkpoint {path} holds {what}, not tensors or plain data: refused, nothing in it was run "
            "(finsight loads checkpoints as data only, see Security in the docs); use a checkpoint from a source "
            "you trust")


def _type_in_torch_message(message: str) -> str:
    """The function or class torch's weights-only unpickler names in its refusal, else its reason."""
    # "Unsupported global: GLOBAL m.f ..." or "unsupported GLOBAL m.f whose module m is blocked"
    found = re.search(r"GLOBAL ([\w.]+)", message)
    if found:
        return found.group(1)
    found = re.search(r"(?:Unsupported operand|Trying to \w+ [^.\n]*)[^\n.]*", message)
    return f"pickle data that torch's data-only reader refuses ({found.group(0) if found else 'unknown'})"


def check_tensors_only(path: str | os.PathLike, deepspeed: bool = False) -> None:
    """Raise :class:`UnsafeCheckpointError` when the ``torch.save`` archive ``path`` names anything beyond
    tensors and plain data (and, with ``deepspeed``, :func:`finsight.compat.deepspeed.checkpoint_value_types`);
    nothing in the file is executed.

    ``path`` must be a complete zip archive (checked before, by ``verify_checkpoint_file``).
    """
    with _allowed_library_types(deepspeed):
        try:
            unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
        except (pickle.UnpicklingError, EOFError) as error:
            # An opcode torch's static reader does not know (a newer pickle protocol than torch.save writes):
            # torch's loader refuses it as well; name what the pickle would call, if anything.
            named = _globals_named_in_pickle(path)
            raise UnsafeCheckpointError(refusal(path, ", ".join(named) if named else
                                                f"pickle data torch's data-only reader refuses ({error})")) from None
    if unsafe:
        raise UnsafeCheckpointError(refusal(path, ", ".join(sorted(unsafe))))


def _globals_named_in_pickle(path: str | os.PathLike) -> list[str]:
    """Every ``module.name`` that the archive's pickle would import, read with :mod:`pickletools` (no execution)."""
    try:
        with zipfile.ZipFile(path) as archive:
            record = next(name for name in archive.namelist() if name.endswith("data.pkl"))
            data = archive.read(record)
        named: list[str] = []
        strings: list[str] = []
        for opcode, argument, _ in pickletools.genops(io.BytesIO(data)):
            if opcode.name == "GLOBAL":
                named.append(str(argument).replace(" ", "."))
            elif opcode.name == "STACK_GLOBAL" and len(strings) >= 2:
                named.append(f"{strings[-2]}.{strings[-1]}")
            if isinstance(argument, str):
                strings.append(argument)
        return sorted(set(named))
    except (StopIteration, ValueError, zipfile.BadZipFile, OSError):
        return []
