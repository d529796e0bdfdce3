"""Documents from raw inputs: a .txt file is one document; a .jsonl file holds one JSON object a line with the
text under a key. Either may be gzipped (.gz). Bytes must be UTF-8.

Reading yields, in a fixed order, either a `Document` or a `BadRecord` (with the reason and where it is),
so the caller decides whether a bad record stops the run or is counted and skipped.
"""
from __future__ import annotations

import gzip
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from opt_ds.errors import UserError

BUNDLED_CORPUS = Path(__file__).resolve().parent.parent / "assets" / "corpus" / "shakespeare.jsonl.gz"
TEXT_SUFFIXES = (".txt", ".text")
JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")
SUFFIX_HELP = "a .txt file (one document) or a .jsonl file (one JSON object a line), optionally .gz"

# Why a record is skipped -> how to fix it (used in error messages).
FIXES = {
    "undecodable": "convert the file to UTF-8 (e.g. `iconv -f latin1 -t utf-8`)",
    "invalid_json": "make every line one JSON object (JSON Lines)",
    "missing_field": "pass --json-key with the field that holds the text",
    "not_a_string": "pass --json-key with a field whose value is a string",
}


class InputError(UserError):
    """Inputs that cannot be read; the message names the file and the fix."""


@dataclass(frozen=True)
class Document:
    text: str
    where: str  # "path" or "path:line"


@dataclass(frozen=True)
class BadRecord:
    reason: str  # a key of FIXES
    where: str
    detail: str

    def message(self) -> str:
        return f"{self.where}: {self.detail}. Fix: {FIXES[self.reason]}, or pass --skip-bad-records to count and skip such records"


def input_kind(path: Path) -> str:
    """'txt' or 'jsonl' from the file name; an InputError for anything else."""
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] == ".gz":
        suffixes.pop()
    if suffixes and suffixes[-1] in TEXT_SUFFIXES:
        return "txt"
    if suffixes and suffixes[-1] in JSONL_SUFFIXES:
        return "jsonl"
    raise InputError(f"{path}: unknown input type; expected {SUFFIX_HELP}. Rename the file accordingly")


def expand_inputs(paths: list[str | os.PathLike]) -> list[Path]:
    """Check the inputs exist and have a known type; a directory stands for its .txt/.jsonl(.gz) files."""
    if not paths:
        raise InputError("no input given: pass one or more .txt/.jsonl files or directories")
    files = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.is_file() and _known(p))
            if not found:
                raise InputError(f"{path}: directory holds no input files ({SUFFIX_HELP})")
            files.extend(found)
        elif path.is_file():
            input_kind(path)
            if not os.access(path, os.R_OK):
                raise InputError(f"{path}: not readable; fix its permissions")
            files.append(path)
        else:
            raise InputError(f"{path}: no such file or directory; check the path")
    return files


def _known(path: Path) -> bool:
    try:
        input_kind(path)
        return True
    except InputError:
        return False


def _open(path: Path):
    return gzip.open(path, "rb") if path.suffix.lower() == ".gz" else open(path, "rb")


def read_records(files: list[Path], json_key: str = "text") -> Iterator[Document | BadRecord]:
    for path in files:
        try:
            if input_kind(path) == "txt":
                yield _read_text_file(path)
            else:
                yield from _read_jsonl_file(path, json_key)
        except (OSError, EOFError) as err:  # gzip.BadGzipFile is an OSError
            raise InputError(f"{path}: cannot read ({err}); check the file is complete") from None


def _read_text_file(path: Path) -> Document | BadRecord:
    with _open(path) as f:
        data = f.read()
    try:
        return Document(data.decode("utf-8"), str(path))
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        return BadRecord("undecodable", f"{path}:{line}", f"bytes are not UTF-8 at byte offset {err.start}")


def _read_jsonl_file(path: Path, key: str) -> Iterator[Document | BadRecord]:
    with _open(path) as f:
        for number, raw in enumerate(f, 1):
            if not raw.strip():
                continue  # blank lines hold no record
            where = f"{path}:{number}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                yield BadRecord("undecodable", where, f"bytes are not UTF-8 at column {err.start + 1}")
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                yield BadRecord("invalid_json", where, f"not valid JSON ({err.msg} at column {err.colno})")
                continue
            if not isinstance(record, dict) or key not in record:
                found = f"keys {', '.join(map(repr, list(record)[:8]))}" if isinstance(record, dict) else type(record).__name__
                yield BadRecord("missing_field", where, f"no {key!r} field (found {found})")
            elif not isinstance(record[key], str):
                yield BadRecord("not_a_string", where, f"field {key!r} is {type(record[key]).__name__}, not a string")
            else:
                yield Document(record[key], where)
