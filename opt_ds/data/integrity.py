"""Is a .bin/.idx pair whole and one pair? Checked before megatron reads it (it asserts, or reads garbage).

The .idx (megatron's MMIDIDX format, version 1) holds a header, then per document its length (int32) and
its byte offset into the .bin (int64), then the document indices. A pair belongs together when the header
is intact, the file is exactly as long as its counts say, every offset is the running sum of the lengths
before it, and the last document ends exactly at the end of the .bin; when `opt-ds preprocess` left a
summary beside them, its document and token counts must match too. This catches a truncated copy, a
damaged index, and a .bin beside another dataset's .idx, for the cost of reading the .idx once.
"""
from __future__ import annotations

import functools
import json
import os
import struct
from dataclasses import dataclass

import numpy as np

from opt_ds.data.files import DatasetFiles
from opt_ds.errors import UserError

MAGIC = b"MMIDIDX\x00\x00"
_HEADER = struct.Struct("<9sQBQQ")      # magic, version, dtype code, sequence count, document count
DTYPE_CODES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float64, 7: np.float32,
               8: np.uint16}
_TOKEN_DTYPES = (np.uint8, np.uint16, np.int16, np.int32, np.int64)
_SCAN_CHUNK = 2 ** 26                   # tokens per step of the max-id scan (128-512 MiB)


class DatasetIntegrityError(UserError):
    """A .bin/.idx pair that is damaged or does not belong together."""


@dataclass(frozen=True)
class IndexInfo:
    dtype: type
    documents: int
    tokens: int


def _remake(prefix) -> str:
    files = DatasetFiles.of(prefix)
    return (f"make the pair again with `opt-ds preprocess ... --output-prefix {prefix}`, or copy both "
            f"{files.bin.name} and {files.idx.name} again from where they were made")


def check_pair(prefix: str | os.PathLike) -> IndexInfo:
    """Raise DatasetIntegrityError unless the .bin/.idx at `prefix` are whole and belong together."""
    files = DatasetFiles.of(prefix)
    idx_bytes, bin_bytes = files.idx.stat().st_size, files.bin.stat().st_size
    dtype, count, doc_count = _header(prefix)
    expected = _HEADER.size + count * (4 + 8) + doc_count * 8
    if idx_bytes != expected:
        raise DatasetIntegrityError(f"{files.idx} is {idx_bytes} bytes but its header describes {count} documents "
                                    f"({expected} bytes): it is truncated or damaged; {_remake(prefix)}")
    itemsize = np.dtype(dtype).itemsize
    lengths, pointers, boundaries = (
        np.memmap(files.idx, kind, "r", offset=offset, shape=(n,)) if n else np.zeros(0, kind)
        for kind, offset, n in ((np.int32, _HEADER.size, count), (np.int64, _HEADER.size + 4 * count, count),
                                (np.int64, _HEADER.size + 12 * count, doc_count)))
    tokens = int(lengths.sum(dtype=np.int64))
    ends = np.cumsum(lengths, dtype=np.int64) * itemsize
    offsets_wrong = count and (pointers[0] != 0 or (pointers[1:] != ends[:-1]).any())
    boundaries_wrong = not doc_count or boundaries[0] != 0 or boundaries[-1] != count or (np.diff(boundaries) < 0).any()
    if (lengths < 0).any() or offsets_wrong or boundaries_wrong:
        raise DatasetIntegrityError(f"{files.idx}: its document offsets do not follow from its lengths: the index "
                                    f"is damaged; {_remake(prefix)}")
    if tokens * itemsize != bin_bytes:
        raise DatasetIntegrityError(
            f"{files.bin} is {bin_bytes} bytes but {files.idx} describes {count} documents of {tokens} "
            f"{np.dtype(dtype).name} tokens ({tokens * itemsize} bytes): the two files do not belong together (a "
            f".bin beside another dataset's .idx, or a truncated copy); {_remake(prefix)}")
    _check_summary(prefix, count, tokens, dtype)
    return IndexInfo(dtype, count, tokens)


def _header(prefix) -> tuple:
    """(token dtype, document count, document-index count) from the .idx header."""
    idx = DatasetFiles.of(prefix).idx
    with open(idx, "rb") as f:
        head = f.read(_HEADER.size)
    if len(head) < _HEADER.size or head[:len(MAGIC)] != MAGIC:
        raise DatasetIntegrityError(f"{idx} is not a megatron index (no MMIDIDX header); {_remake(prefix)}")
    _, version, code, count, doc_count = _HEADER.unpack(head)
    if version != 1 or code not in DTYPE_CODES or DTYPE_CODES[code] not in _TOKEN_DTYPES:
        raise DatasetIntegrityError(f"{idx} has index version {version} and dtype code {code}; opt_ds reads "
                                    f"version 1 with integer tokens; {_remake(prefix)}")
    return DTYPE_CODES[code], count, doc_count


def _check_summary(prefix, documents: int, tokens: int, dtype) -> None:
    path = DatasetFiles.of(prefix).summary
    try:
        summary = json.loads(path.read_text())
    except (OSError, ValueError):
        return      # made by another tool, or no summary: nothing to compare
    recorded = (summary.get("documents_kept"), summary.get("tokens"), summary.get("token_dtype"))
    if None not in recorded and recorded != (documents, tokens, np.dtype(dtype).name):
        raise DatasetIntegrityError(
            f"{DatasetFiles.of(prefix).idx} holds {documents} documents of {tokens} {np.dtype(dtype).name} tokens, "
            f"but {path.name}, written with the dataset, recorded {recorded[0]} documents of {recorded[1]} "
            f"{recorded[2]} tokens: the files come from different runs; {_remake(prefix)}")


def max_token_id(prefix: str | os.PathLike) -> int:
    """The largest token id in the .bin of a checked pair: a full scan through a memory map (remembered per
    file version, so the check before training and the one in build_datasets scan once)."""
    path = DatasetFiles.of(prefix).bin
    stat = path.stat()
    return _max_token_id(str(path.absolute()), stat.st_size, stat.st_mtime_ns, _header(prefix)[0])


@functools.lru_cache(maxsize=64)
def _max_token_id(path: str, size: int, mtime_ns: int, dtype) -> int:
    data = np.memmap(path, dtype, "r")
    if data.size == 0:
        return -1
    return int(max(data[i:i + _SCAN_CHUNK].max() for i in range(0, data.size, _SCAN_CHUNK)))
