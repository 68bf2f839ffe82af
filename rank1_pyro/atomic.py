"""Atomic file writes: a crash at any moment leaves either the previous file or the new one.

Run directories (:mod:`rank1_pyro.runs`), checkpoints (:mod:`rank1_pyro.inference.checkpoint`),
saved posteriors (:mod:`rank1_pyro.laplace.base`) and the user-data preprocessing
(:mod:`rank1_pyro.files`) all write through :func:`atomic_write`.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Callable
from pathlib import Path

__all__ = ["atomic_write", "temp_prefix"]


def temp_prefix(path: Path) -> str:
    """The name prefix of :func:`atomic_write`'s temporary files for ``path`` (``.<name>.``)."""
    return f".{Path(path).name}."


def atomic_write(path, content: str | bytes | Callable) -> Path:
    """Write ``path`` atomically: a crash at any moment leaves either the previous file or the new one.

    ``content``: the text or bytes of the file, or a function writing it to a binary file object
    (e.g. ``lambda f: torch.save(obj, f)``). It goes to a temporary file next to ``path``
    (``.<name>.<random>.tmp``), which is flushed and ``fsync``-ed, moved over ``path`` with
    ``os.replace`` (atomic on POSIX and Windows), and the directory is ``fsync``-ed; on any error
    the temporary file is removed. The parent directory is created when missing.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f"{temp_prefix(path)}{secrets.token_hex(6)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)  # umask applies
    try:
        with os.fdopen(fd, "wb") as f:
            if callable(content):
                content(f)
            else:
                f.write(content.encode() if isinstance(content, str) else content)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    with contextlib.suppress(OSError):  # persist the rename; directories cannot be opened on Windows
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    return path
