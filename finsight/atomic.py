"""Files and folders that appear complete or not at all, and a full disk reported as one clear error.

A run killed or out of space while it writes an export (an adapter folder, a merged model, a ``.gguf``) must
not leave something under the final name that PEFT or llama.cpp chokes on later. Everything is written under
a hidden temporary name in the same folder (same filesystem, so the rename is atomic) and renamed into place
only once complete; an older version stays readable until then.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from finsight.errors import FinSightError

TEMP_MARKER = ".tmp-"


class DiskFullError(FinSightError, OSError):
    """A write that failed for lack of space; what was there before is intact.

    Fix: free space on the disk the message names, or write elsewhere (`--trainer.logger.init_args.save_dir`,
    `--output`); what was there before is intact.
    """


def human_bytes(count: float) -> str:
    """``1.5 GB``-style sizes for messages."""
    for unit in ("B", "KB", "MB", "GB"):
        if count < 1000:
            return f"{count:.1f} {unit}" if unit != "B" else f"{int(count)} B"
        count /= 1000
    return f"{count:.1f} TB"


def disk_full_error(folder: Path, needed: int, what: str) -> DiskFullError:
    """The one-line error for ``ENOSPC``: the folder, the space needed and the space free."""
    free = shutil.disk_usage(folder).free if folder.exists() else 0
    error = DiskFullError(f"no space left in {folder} to write {what}: it needs about {human_bytes(needed)}, "
                          f"{human_bytes(free)} free; the previous files are intact")
    error.errno = errno.ENOSPC  # still an ENOSPC OSError to code that checks; str() stays the one line
    return error


def temporary_sibling(path: Path, tag: str | None = None) -> Path:
    """The hidden temporary ``path`` is written under; it never matches ``*.ckpt``, ``*.gguf`` or a folder
    name a loader looks for. ``tag`` (default: this process id) must be the same on every rank that writes
    a part of it."""
    return path.with_name(f".{path.name}{TEMP_MARKER}{os.getpid() if tag is None else tag}")


def stale_temporaries(path: Path) -> list[Path]:
    """Temporaries of ``path`` left behind by a process killed while it was writing."""
    return sorted(path.parent.glob(f".{path.name}{TEMP_MARKER}*"))


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def fsync_directory(folder: Path) -> None:
    """Make a rename inside ``folder`` durable (POSIX); a no-op where directories cannot be opened."""
    with contextlib.suppress(OSError):
        descriptor = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.exists() else 0


def is_no_space(error: BaseException) -> bool:
    """Whether ``error`` is, or was raised while handling, an ``ENOSPC``: ``torch.save`` reports a failed
    write as a ``RuntimeError`` whose context is the ``OSError``."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        if isinstance(current, OSError) and current.errno == errno.ENOSPC:
            return True
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return False


_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


@functools.cache
def _renameat2() -> Any:
    """libc's ``renameat2`` (Linux, glibc 2.28+), looked up once; None where there is none."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        function = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    function.restype = ctypes.c_int
    return function


def _exchange(first: Path, second: Path) -> bool:
    """Swap two existing paths atomically (Linux ``renameat2(RENAME_EXCHANGE)``); False where unsupported."""
    renameat2 = _renameat2()
    if renameat2 is None:
        return False
    if renameat2(_AT_FDCWD, os.fsencode(first), _AT_FDCWD, os.fsencode(second), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):  # a kernel or file system without it
        return False
    raise OSError(code, os.strerror(code), str(second))


def replace_with(temporary: Path, path: Path) -> None:
    """Rename a complete ``temporary`` (file or folder) onto ``path``.

    A file replaces an older one atomically (``os.replace``). A folder cannot be renamed over a non-empty
    one: on Linux the two are swapped in one step (``renameat2`` with ``RENAME_EXCHANGE``) and the old one
    removed; elsewhere (or on a file system without it) the older folder is moved aside first and removed
    after, so a reader sees the old folder, then (for an instant) none, then the new one, never a mix.
    """
    if temporary.is_dir() and path.is_dir():
        if _exchange(temporary, path):  # one atomic step: readers see the old folder, then the new one
            _remove(temporary)  # the old folder, now under the temporary name
            fsync_directory(path.parent)
            return
        aside = path.with_name(f".{path.name}.old{TEMP_MARKER}{os.getpid()}")
        _remove(aside)
        os.rename(path, aside)
        os.rename(temporary, path)
        _remove(aside)
    else:
        os.replace(temporary, path)
    fsync_directory(path.parent)


def remove_stale_temporaries(path: Path) -> None:
    """Clear what a killed writer of ``path`` left (the next complete write replaces ``path`` anyway)."""
    for stale in stale_temporaries(path):
        _remove(stale)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, what: str = "", expected_bytes: int = 0) -> Iterator[Path]:
    """Yield a temporary path to write a file or folder into; :func:`replace_with` renames it onto ``path``
    when the block ends.

    On an exception nothing is left but what was there before; ``ENOSPC`` becomes :class:`DiskFullError`
    naming the folder and the space needed (``expected_bytes``, or what had been written when it failed).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    temporary = temporary_sibling(path)
    try:
        yield temporary
        replace_with(temporary, path)
    except BaseException as error:
        written = _size(temporary)
        _remove(temporary)
        if is_no_space(error):
            raise disk_full_error(path.parent, max(expected_bytes, written), what or path.name) from error
        raise
