"""One live job per save folder: rank 0 holds an exclusive lock on `<save_dir>/.lock` for the job's life.

Two jobs writing one folder would publish, prune and set aside each other's checkpoints. The lock is a
`flock`, which the kernel drops when the holding process ends however it ends (kill -9, OOM), so a dead job
never keeps the folder; the file stays and names its last holder for the message. On NFS, Linux emulates
flock with POSIX locks that work across hosts; Lustre needs the `flock` mount option.
"""
from __future__ import annotations

import fcntl
import os
import socket
import time
from pathlib import Path
from typing import Optional

from opt_ds.errors import UserError
from opt_ds.train.collective import from_rank0, rank_and_world

LOCK = ".lock"


class SaveDirInUse(UserError):
    """Another live job holds the save folder."""


class SaveDirLock:
    def __init__(self, path: Path, handle):
        self.path = path
        self._handle = handle           # the open file holds the lock; closing it (or exiting) releases it

    @classmethod
    def acquire(cls, save_dir) -> "SaveDirLock":
        """Take the lock without waiting, or raise SaveDirInUse naming the holder. Writes nothing (an
        existing lock file is left as it is) until `record_holder`."""
        path = Path(save_dir) / LOCK
        path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(path, "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.seek(0)
            holder = handle.read(300).strip() or "a process"
            handle.close()
            raise SaveDirInUse(f"train.save_dir={path.parent} is in use by another running job ({holder} holds "
                               f"{path}); stop that job first, or give this run another train.save_dir") from None
        return cls(path, handle)

    def record_holder(self) -> None:
        """Note in the lock file who holds it (for the message a second job gets)."""
        self._handle.seek(0)
        self._handle.truncate()
        self._handle.write(f"pid {os.getpid()} on {socket.gethostname()} since "
                           f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        self._handle.flush()

    def release(self) -> None:
        self._handle.close()


def claim(save_dir) -> Optional[SaveDirLock]:
    """Collective, before the save folder is read: rank 0 takes the lock (returned; None on the other ranks);
    when another job holds it every rank raises the same SaveDirInUse."""
    held = []

    def take() -> Optional[str]:
        try:
            held.append(SaveDirLock.acquire(save_dir))
        except SaveDirInUse as err:
            return str(err)
        return None

    refusal = from_rank0(take)
    if refusal is not None:
        raise SaveDirInUse(refusal)
    return held[0] if rank_and_world()[0] == 0 else None
