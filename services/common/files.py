"""Writing files so that a reader, or a crash, sees the old file or the new one, never half of one."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO


def fsync_dir(path: Path) -> None:
    """Makes a rename or creation inside ``path`` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, write: Callable[[BinaryIO], object], durable: bool = True) -> Path:
    """Replaces ``path`` with what ``write`` writes to a temporary file beside it, then renames it.

    With ``durable`` the data and the rename are fsynced (survive power loss, not only a crash).
    Creates the parent directory; returns ``path``.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            if durable:
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    if durable:
        fsync_dir(path.parent)
    return path


def atomic_write_text(path: Path, text: str, durable: bool = True) -> Path:
    """``atomic_write`` of UTF-8 text."""
    return atomic_write(path, lambda fh: fh.write(text.encode("utf-8")), durable)
