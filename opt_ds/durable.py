"""Durable writes, the one way every file of opt_ds and the converter reaches its final name: written under a
hidden temporary name in the same directory, flushed to disk, given the mode the user's umask gives a new
file, renamed over the final name, and the directory flushed. What a crash or a power loss leaves is the old
file or the new one, never half of either, and a reader never sees a partial file under its final name.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator, Union


def fsync(path) -> None:
    """Flush a file's (or a directory's entries') data to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def replacing(path) -> Iterator[Path]:
    """Yield a temporary path beside `path` (same suffix, for writers that pick a format by it) to write; on
    success it becomes `path` durably, on an error it is removed and `path` is untouched."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~umask())       # mkstemp's 0600 would hide the file from other users
        fsync(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync(path.parent)


def write_atomically(path, content: Union[str, bytes]) -> None:
    """Write `content` (text as UTF-8) to `path` durably."""
    with replacing(path) as tmp:
        tmp.write_bytes(content.encode() if isinstance(content, str) else content)


def staging_dir(final: Path, label: str = "") -> Path:
    """A fresh empty directory beside `final` (same file system, so renaming it into place is atomic), named
    `.<final name>.<label>XXXX`, with the permissions the user's umask gives a new directory."""
    final.parent.mkdir(parents=True, exist_ok=True)
    path = tempfile.mkdtemp(prefix=f".{final.name}.{label}", dir=final.parent)
    os.chmod(path, 0o777 & ~umask())  # mkdtemp's 0700 would hide the result from other users
    return Path(path)


def follow_umask(root: Path) -> None:
    """Give `root` and everything under it the modes a new file or folder gets under the user's umask (some
    writers, e.g. safetensors, create private 0600 files)."""
    mask = umask()
    for path in [root, *root.rglob("*")]:
        if not path.is_symlink():
            os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~mask)


def sync_tree(root: Path) -> None:
    """Flush every file and directory under `root` (a staged folder, before it is renamed into place)."""
    root = Path(root)
    if root.is_dir():
        for path in root.rglob("*"):
            if not path.is_symlink():
                fsync(path)
    fsync(root)


def replace(source: Path, final: Path) -> None:
    """Move the written `source` (file or directory) to `final` durably, replacing what is there."""
    source, final = Path(source), Path(final)
    sync_tree(source)
    if final.is_dir() and not final.is_symlink():
        old = final.with_name(f".{final.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
        source.rename(final)
        fsync(final.parent)
        shutil.rmtree(old)
    else:
        os.replace(source, final)
        fsync(final.parent)
