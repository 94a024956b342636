"""Atomic file writes, at the bottom of the import graph: every module that writes a run's files uses these.

A file is written to a hidden temporary name beside its target, flushed to disk and renamed over it, so a reader
(or a resumed run) only ever sees a whole old file or a whole new one. Files get the permissions a plain ``open``
would give them under the process's umask (``mkstemp`` alone would leave them 0600).
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch

TEMPORARY_GLOB = ".*.tmp"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _atomic(path: Path, write: Callable[[Any], None]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(handle, 0o666 & ~_umask())
        with os.fdopen(handle, "wb") as stream:
            write(stream)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: Path, data: bytes) -> None:
    _atomic(path, lambda stream: stream.write(data))


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_torch_save(obj: Any, path: Path) -> None:
    _atomic(path, lambda stream: torch.save(obj, stream))


def remove_stale_temporaries(directory: Path) -> None:
    """Delete temporaries a killed process left (SIGKILL runs no cleanup); call only while holding the directory's
    lock, so no live writer's temporary is touched."""
    for path in Path(directory).glob(TEMPORARY_GLOB):
        path.unlink(missing_ok=True)
