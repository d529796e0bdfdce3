"""File handling shared by every format: one clear error for unreadable files, and all-or-nothing output."""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path

import torch

from opt_ds.durable import follow_umask, fsync, staging_dir, sync_tree
from opt_ds.errors import UserError


class ConversionError(UserError, ValueError):
    """A conversion that cannot run; the message names the problem and the fix."""


def load_torch(path, weights_only: bool = False) -> object:
    """torch.load for checkpoint files, memory-mapped when the file allows it.

    metaseq and DeepSpeed files pickle Namespace / config objects, so they need `weights_only=False`:
    convert only files you trust. Any failure to read the file becomes one ConversionError (a truncated
    file otherwise ends in a zip or pickle traceback).
    """
    path = Path(path)
    if not path.is_file():
        raise ConversionError(f"{path}: file not found")
    if path.stat().st_size == 0:
        raise ConversionError(f"{path}: the file is empty (truncated copy?); copy it again from its source")
    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=weights_only, mmap=True)
        except RuntimeError as err:
            if "mmap" not in str(err):      # legacy (pre-zip) torch files cannot be memory-mapped
                raise
            return torch.load(path, map_location="cpu", weights_only=weights_only)
    except Exception as err:  # noqa: BLE001 - any reader failure means the same thing to the user
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConversionError(f"{path}: cannot be read as a torch checkpoint ({reason}); the file is "
                              "truncated or corrupt: copy it again from its source") from None


def save_torch(obj, path) -> None:
    torch.save(obj, path)


def check_writable_destination(dst: Path, force: bool) -> None:
    """A destination must be new or empty, unless --force allows replacing it."""
    if dst.exists() and not dst.is_dir():
        raise ConversionError(f"destination {dst} exists and is not a directory; choose a directory path")
    if dst.is_dir() and any(dst.iterdir()) and not force:
        raise ConversionError(f"destination {dst} is not empty; choose a new directory or pass --force to "
                              "replace its contents")


@contextlib.contextmanager
def staged_directory(dst: Path, force: bool):
    """Yield a temporary directory next to `dst`; on success it replaces `dst`, on error it is removed.

    Nothing is written into `dst` itself until the conversion has finished, so a failed or interrupted
    conversion never leaves a half-written checkpoint where a complete one is expected.
    """
    dst = Path(dst)
    check_writable_destination(dst, force)
    dst.parent.mkdir(parents=True, exist_ok=True)
    staging = staging_dir(dst, "partial-")     # not mkdtemp's 0700: colleagues must be able to read the result
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    follow_umask(staging)
    sync_tree(staging)
    if dst.exists():
        backup = Path(tempfile.mkdtemp(prefix=f".{dst.name}.old-", dir=dst.parent))
        os.replace(dst, backup / dst.name)
        os.replace(staging, dst)
        shutil.rmtree(backup, ignore_errors=True)
    else:
        os.replace(staging, dst)
    fsync(dst.parent)
