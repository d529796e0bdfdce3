"""`PREFIX.partial/`: the partial results of one `opt-ds preprocess` run, so that running the same command
again resumes it. Everything in it is written under a temporary name and renamed, and each piece is marked
done only after its data: the manifest (the run's fingerprint), the scan (dedup and skip decisions), the
tokenizer, and one .bin/.idx shard per chunk with its .json marker."""
from __future__ import annotations

import fcntl
import json
import shutil
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from opt_ds import durable
from opt_ds.errors import UserError


class PartialRunError(UserError):
    """The work directory is in use, or belongs to a run with other arguments."""


@dataclass
class Scan:
    keep: np.ndarray  # bool, one per record read, in reading order
    counts: dict  # records_read, documents_kept, exact_duplicates, near_duplicates, skipped: {reason: n}
    examples: list  # "where: why" of the first skipped records


class WorkDir:
    def __init__(self, path: Path):
        self.path = path
        self.chunks = path / "chunks"
        self.tokenizer = path / "tokenizer"

    @contextmanager
    def locked(self):
        self.path.mkdir(parents=True, exist_ok=True)
        with open(self.path / "lock", "w") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise PartialRunError(f"another `opt-ds preprocess` is writing {self.path}; wait for it to finish") from None
            yield

    def begin(self, fingerprint: dict, restart: bool) -> None:
        manifest = self.path / "manifest.json"
        if manifest.exists():
            previous = json.loads(manifest.read_text())
            if previous == fingerprint:
                return
            if not restart:
                changed = sorted(k for k in fingerprint.keys() | previous.keys() if previous.get(k) != fingerprint.get(k))
                raise PartialRunError(
                    f"{self.path} holds an unfinished run with other arguments or inputs (differs in: "
                    f"{', '.join(changed)}). Rerun that command to finish it, or pass --restart to discard it")
        self.discard(keep_lock=True)
        self.chunks.mkdir(parents=True)
        durable.write_atomically(manifest, json.dumps(fingerprint, indent=1))

    def discard(self, keep_lock: bool = False) -> None:
        for entry in self.path.iterdir():
            if entry.name == "lock" and keep_lock:
                continue
            shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
        if not keep_lock:
            self.path.rmdir()

    def load_scan(self) -> Scan | None:
        if not (self.path / "scan.json").exists():
            return None
        info = json.loads((self.path / "scan.json").read_text())
        return Scan(np.load(self.path / "scan-keep.npy"), info["counts"], info["examples"])

    def save_scan(self, scan: Scan) -> Scan:
        np.save(self.path / "scan-keep.npy", scan.keep)  # before scan.json, which marks the scan done
        durable.write_atomically(self.path / "scan.json", json.dumps({"counts": scan.counts, "examples": scan.examples}))
        return scan

    def chunk_prefix(self, index: int) -> Path:
        return self.chunks / f"{index:06d}"

    def finished_chunk(self, index: int) -> dict | None:
        marker = self.chunk_prefix(index).with_suffix(".json")
        return json.loads(marker.read_text()) if marker.exists() else None
