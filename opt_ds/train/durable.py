"""Durable file writes: what a crash or power loss leaves on disk is either the old file or the new one."""
from __future__ import annotations

import os
from pathlib import Path


def fsync(path) -> None:
    """Flush a file's (or a directory's entries') data to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomically(path, text: str) -> None:
    """Write to a hidden temporary name, flush it, rename it over `path`, flush the directory."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync(path.parent)
