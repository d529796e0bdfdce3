"""File handling shared by every format: one clear error for unreadable files, and all-or-nothing output."""
from __future__ import annotations

import collections
import contextlib
import ctypes
import os
import pickle
import shutil
import sys
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


def drop_file_pages(path) -> None:
    """Let the kernel drop this process's resident pages of the memory-mapped file `path`.

    torch.load(mmap=True) maps a whole checkpoint file, and every page a reader touches stays resident until
    the map goes; a reader that keeps a multi-layer file open calls this after each layer, so memory stays
    one layer. The file is mapped read-only in effect (nothing writes to loaded tensors), so a page touched
    again is read back from the page cache. Only maps of `path` itself are touched; a no-op without /proc.
    """
    target = os.path.realpath(path)
    try:
        with open("/proc/self/maps") as f:
            lines = f.read().splitlines()
    except OSError:
        return
    for line in lines:
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[5] == target:
            start, end = (int(x, 16) for x in fields[0].split("-"))
            _LIBC.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), MADV_DONTNEED)


_LIBC = ctypes.CDLL(None, use_errno=True)
MADV_DONTNEED = 4


def save_torch(obj, path) -> None:
    torch.save(obj, path)


def tensor_headers(path) -> object:
    """The object in a torch checkpoint file with every tensor on the `meta` device: names, shapes and dtypes
    from the file's pickle, no tensor data read (what a reader checks before converting anything)."""
    path = Path(path)
    try:
        return torch.load(path, map_location="meta", weights_only=False, mmap=True)
    except Exception:  # noqa: BLE001 - legacy files, or damage: load_torch says which, with the fix
        return _to_meta(load_torch(path))


def _to_meta(obj):
    if torch.is_tensor(obj):
        return obj.to("meta")
    if isinstance(obj, dict):
        return type(obj)((k, _to_meta(v)) for k, v in obj.items()) if isinstance(obj, collections.OrderedDict) \
            else {k: _to_meta(v) for k, v in obj.items()}
    return obj


class StreamedTorchFile:
    """A file in torch.save's format written one tensor at a time, so a checkpoint file larger than memory
    can be written while its tensors stream through: `put(tensor)` writes the tensor's bytes to the file at
    once and returns a small placeholder to put where the tensor goes in the object; `close(obj)` writes the
    object's pickle (placeholders become the stored tensors) and the zip directory.

    torch.load reads the result as it reads torch.save's (mmap or not, weights_only or not): the records are
    the ones torch.serialization._save writes (`data/<key>` storages, `data.pkl`, `.format_version`,
    `.storage_alignment`, `byteorder`) through the same zip writer; only their order differs (storages first),
    which the zip directory makes irrelevant.
    """

    def __init__(self, path):
        self._opener = torch.serialization._open_zipfile_writer(str(path))
        self._zip = self._opener.file_like
        self._count = 0

    def put(self, tensor: torch.Tensor) -> "_StoredTensor":
        tensor = tensor.detach().contiguous()
        if tensor.storage_offset() or tensor.untyped_storage().nbytes() != tensor.nbytes:
            tensor = tensor.clone()         # a view: write its own bytes, not its base's whole storage
        key = str(self._count)
        self._count += 1
        self._zip.write_record(f"data/{key}", tensor.untyped_storage(), tensor.nbytes)
        return _StoredTensor(key, tensor.dtype, tuple(tensor.shape), tensor.stride(), tensor.numel())

    def close(self, obj) -> None:
        buffer = _PlaceholderPickler.dumps(obj)
        self._zip.write_record("data.pkl", buffer, len(buffer))
        self._zip.write_record(".format_version", "1", 1)
        alignment = str(torch.serialization._get_storage_alignment())
        self._zip.write_record(".storage_alignment", alignment, len(alignment))
        self._zip.write_record("byteorder", sys.byteorder, len(sys.byteorder))
        self._opener.__exit__(None, None, None)


class _StoredTensor(collections.namedtuple("_StoredTensor", "key dtype shape stride numel")):
    """A tensor already written to a StreamedTorchFile; pickled as torch.save pickles that tensor."""


class _StorageRef(collections.namedtuple("_StorageRef", "key dtype numel")):
    pass


class _PlaceholderPickler(pickle.Pickler):
    @classmethod
    def dumps(cls, obj) -> bytes:
        import io
        buffer = io.BytesIO()
        cls(buffer, protocol=2).dump(obj)       # torch.save's default protocol
        return buffer.getvalue()

    def reducer_override(self, obj):
        if isinstance(obj, _StoredTensor):
            return torch._utils._rebuild_tensor_v2, (_StorageRef(obj.key, obj.dtype, obj.numel), 0, obj.shape,
                                                     obj.stride, False, collections.OrderedDict())
        if torch.is_tensor(obj):
            raise TypeError("a StreamedTorchFile object holds placeholders from put(), not tensors")
        return NotImplemented

    def persistent_id(self, obj):
        if isinstance(obj, _StorageRef):
            storage_type = getattr(torch, torch.storage._dtype_to_storage_type_map()[obj.dtype])
            return "storage", storage_type, obj.key, "cpu", obj.numel
        return None


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
