"""The files of one preprocessed dataset, named from its prefix (megatron's convention for .bin/.idx)."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class DatasetFiles:
    prefix: Path

    @classmethod
    def of(cls, prefix: str | os.PathLike) -> "DatasetFiles":
        return cls(Path(prefix))

    def _with(self, suffix: str) -> Path:
        return self.prefix.with_name(self.prefix.name + suffix)

    @property
    def bin(self) -> Path:  # the token ids, documents back to back
        return self._with(".bin")

    @property
    def idx(self) -> Path:  # document lengths and offsets into .bin
        return self._with(".idx")

    @property
    def summary(self) -> Path:  # what preprocessing read, kept and dropped
        return self._with(".summary.json")

    @property
    def tokenizer(self) -> Path:  # vocab.json + merges.txt that produced the ids
        return self._with(".tokenizer")

    @property
    def work(self) -> Path:  # an unfinished preprocess run, kept so a rerun resumes it
        return self._with(".partial")

    def outputs(self) -> tuple[Path, ...]:
        return self.bin, self.idx, self.summary, self.tokenizer

    def exists(self) -> bool:
        return self.bin.is_file() and self.idx.is_file()
