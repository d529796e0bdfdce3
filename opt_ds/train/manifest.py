"""Checkpoint manifests: the size and SHA-256 of every file of a checkpoint, written last inside its folder.

A checkpoint is complete only if its manifest exists and every file still has the size and digest the
manifest records; a crash, a full disk, a truncated copy or bit rot is then reported as "this file, this
size" instead of a pickle traceback deep inside DeepSpeed.

Why SHA-256 and not a cheaper checksum: the ranks hash in parallel, each about 1/world of the bytes
(largest files first to the least-loaded rank), right after writing, so the data is still in the page cache.
At ~1 GB/s per core that is ~2 s for OPT-175B's ~2.3 TB over 1024 ranks, small next to writing the files;
xxhash would save about one of those seconds but is not in the standard library nor checkable with
`sha256sum`. Where reading back is costly (object storage) `checkpoint.verify=size` checks sizes only.
The manifest also carries the checkpoint's health (loss, loss scale, anomalies), which retention and
rollback read without unpickling anything.
"""
from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Optional

from opt_ds.train.collective import all_gather_objects, from_rank0, rank_and_world
from opt_ds.durable import fsync, write_atomically

MANIFEST = "manifest.json"
_CHUNK = 16 * 2 ** 20


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def shares(sizes: dict, world: int) -> list:
    """Split files over ranks by bytes: largest first, each to the least-loaded rank (deterministic)."""
    loads = [0] * world
    assigned = [[] for _ in range(world)]
    for name in sorted(sizes, key=lambda n: (-sizes[n], n)):
        rank = loads.index(min(loads))
        assigned[rank].append(name)
        loads[rank] += sizes[name]
    return assigned


def _files(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.stat().st_size for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != MANIFEST and not p.name.startswith(".")}


def write(folder, *, tag: str, step: int, health: Optional[dict]) -> None:
    """Collective: hash this rank's share of `folder`, then rank 0 writes the manifest (atomically) last.
    Every file is fsynced by the rank that hashes it, so a published checkpoint survives a power loss."""
    folder = Path(folder)
    rank, world = rank_and_world()
    sizes = from_rank0(lambda: _files(folder))
    mine = {}
    for name in shares(sizes, world)[rank]:
        path = folder / name
        fsync(path)
        mine[name] = {"size": path.stat().st_size, "sha256": sha256(path)}
    entries = {}
    for part in all_gather_objects(mine):
        entries.update(part)
    if rank == 0:
        manifest = {"format": 1, "tag": tag, "step": step, "created": round(time.time(), 3), "health": health,
                    "files": dict(sorted(entries.items()))}
        write_atomically(folder / MANIFEST, json.dumps(manifest, indent=1))


def read(folder) -> Optional[dict]:
    path = Path(folder) / MANIFEST
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return {"files": None}


def verify(folder, mode: str = "sha256") -> Optional[list]:
    """Collective: the problems found (the same list on every rank; empty = intact), or None when the
    folder has no manifest (written before manifests existed, or not by opt_ds) and cannot be checked."""
    folder = Path(folder)
    manifest = read(folder)
    if manifest is None:
        return None
    files = manifest.get("files")
    if not isinstance(files, dict):
        return [f"{MANIFEST}: unreadable"]
    if mode == "none":
        return []
    rank, world = rank_and_world()
    problems = []
    for name in shares({name: entry["size"] for name, entry in files.items()}, world)[rank]:
        path, entry = folder / name, files[name]
        if not path.is_file():
            problems.append(f"{name}: missing")
        elif path.stat().st_size != entry["size"]:
            problems.append(f"{name}: size {path.stat().st_size} != {entry['size']} bytes in its manifest")
        elif mode == "sha256" and sha256(path) != entry["sha256"]:
            problems.append(f"{name}: content differs from its manifest (sha256)")
    merged = set()
    for part in all_gather_objects(problems):
        merged.update(part)
    return sorted(merged)
