"""Write-then-rename helpers: a reader (or a crash) never sees a half-written file under its final name."""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def staging_dir(final: Path, label: str = "") -> Path:
    """A fresh empty directory beside `final` (same file system, so renaming it into place is atomic), named
    `.<final name>.<label>XXXX`, with the permissions the user's umask gives a new directory."""
    final.parent.mkdir(parents=True, exist_ok=True)
    path = tempfile.mkdtemp(prefix=f".{final.name}.{label}", dir=final.parent)
    os.chmod(path, 0o777 & ~_umask())  # mkdtemp's 0700 would hide the result from other users
    return Path(path)


def follow_umask(root: Path) -> None:
    """Give `root` and everything under it the modes a new file or folder gets under the user's umask (some
    writers, e.g. safetensors, create private 0600 files)."""
    mask = _umask()
    for path in [root, *root.rglob("*")]:
        if not path.is_symlink():
            os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~mask)


def write_text(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    os.chmod(tmp, 0o666 & ~_umask())
    os.replace(tmp, path)


def replace(source: Path, final: Path) -> None:
    """Move `source` (file or directory) to `final`, replacing what is there."""
    if final.is_dir() and not final.is_symlink():
        old = final.with_name(f".{final.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
        source.rename(final)
        shutil.rmtree(old)
    else:
        os.replace(source, final)
