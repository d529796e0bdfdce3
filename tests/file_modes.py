"""Whether what opt_ds wrote is readable by colleagues: the user's umask, and the paths it would keep from them."""
import os
import stat
from contextlib import contextmanager


@contextmanager
def umask(mask: int):
    previous = os.umask(mask)
    try:
        yield
    finally:
        os.umask(previous)


def unreadable(root) -> list:
    """Paths under `root` (itself included) that group or others cannot read (or enter, for folders)."""
    bad = []
    for path in [root, *root.rglob("*")]:
        mode = stat.S_IMODE(path.stat().st_mode)
        needed = 0o055 if path.is_dir() else 0o044
        if mode & needed != needed:
            bad.append(f"{path.relative_to(root.parent)} {oct(mode)}")
    return bad
