"""Writing a file so that no reader ever sees half of it, and a failed write loses nothing.

Used for checkpoints (``training.save_checkpoint``) and for the coordinate checks' outputs.
"""
from __future__ import annotations

import contextlib
import os
import secrets
import stat
from typing import Callable


def _fsync_directory(folder: str) -> None:
    """Make a rename in ``folder`` durable, where the platform allows opening a directory."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def replace_atomically(path: str | os.PathLike, write: Callable[[str], object]) -> None:
    """Write ``path`` as ``write(temporary)``, then rename the temporary file over ``path``.

    The temporary file lies beside the target (a symbolic link is followed, so the file it points
    to is replaced), is named ``.STEM.<random>.tmp.SUFFIX`` (writers that go by the suffix, such
    as matplotlib's, still see it) and is created with the mode a new file gets (umask applied).
    It is fsynced, given the target's permissions if the target exists (a 0600 file stays
    0600), renamed into place, and the folder is fsynced. On any failure, Ctrl-C included, the
    temporary file is removed and the error propagates: ``path`` is then exactly as it was.

    Args:
        path: the file to create or replace.
        write: writes the whole content to the path it is given.
    """
    target = os.path.realpath(os.fspath(path))
    folder, base = os.path.split(target)
    stem, suffix = os.path.splitext(base)
    temporary = os.path.join(folder, f".{stem}.{secrets.token_hex(8)}.tmp{suffix}")
    os.close(os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666))
    try:
        write(temporary)
        fd = os.open(temporary, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        with contextlib.suppress(FileNotFoundError):
            os.chmod(temporary, stat.S_IMODE(os.stat(target).st_mode))
        os.replace(temporary, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise
    _fsync_directory(folder)
