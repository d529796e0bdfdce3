"""GPT-2 byte-level BPE with OPT's (fairseq) special-token ids, on the `tokenizers` library.

OPT's vocabulary puts `<s>`=0, `<pad>`=1, `</s>`=2, `<unk>`=3 first. OPT prepends `</s>` as BOS, and the
preprocessor appends `</s>` after every document, so in a token stream `</s>` both ends one document and
starts the next. The special tokens are plain vocabulary entries, not "added tokens": the text "</s>"
inside a document is encoded as ordinary bytes, so any text round-trips exactly (byte-level BPE is
lossless) and no document can forge a separator.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Iterable

from tokenizers import ByteLevelBPETokenizer

from opt_ds.data import atomic
from opt_ds.data.files import DatasetFiles
from opt_ds.errors import UserError

SPECIAL_TOKENS = ("<s>", "<pad>", "</s>", "<unk>")  # ids 0..3, fairseq order
PAD_ID, EOS_ID, BOS_ID = 1, 2, 2
MIN_VOCAB_SIZE = len(SPECIAL_TOKENS) + 256  # the specials and the 256 byte symbols

OPT_TOKENIZER_DIR = Path(__file__).resolve().parent.parent / "assets" / "opt-tokenizer"
# (vocab, merges) file names: ours, then metaseq's spelling (the bundled OPT files).
FILE_NAMES = (("vocab.json", "merges.txt"), ("gpt2-vocab.json", "gpt2-merges.txt"))


class TokenizerError(UserError):
    """A tokenizer that cannot be loaded or trained; the message says why and how to fix it."""


def tokenizer_files(directory: str | os.PathLike) -> tuple[Path, Path]:
    """The (vocab.json, merges.txt) pair in `directory`, or a TokenizerError naming what is missing."""
    directory = Path(directory)
    for vocab_name, merges_name in FILE_NAMES:
        vocab, merges = directory / vocab_name, directory / merges_name
        if vocab.is_file() and merges.is_file():
            return vocab, merges
    raise TokenizerError(f"no tokenizer in {directory}: expected vocab.json and merges.txt there "
                         f"(or gpt2-vocab.json and gpt2-merges.txt); use 'opt' for OPT's tokenizer")


class BPETokenizer:
    """A byte-level BPE tokenizer loaded from vocab.json + merges.txt with OPT's special-token ids."""

    def __init__(self, vocab_file: str | os.PathLike, merges_file: str | os.PathLike):
        self.vocab_file, self.merges_file = Path(vocab_file), Path(merges_file)
        try:
            vocab = json.loads(self.vocab_file.read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            raise TokenizerError(f"cannot read the vocabulary {self.vocab_file}: {err}") from None
        wrong = {tok: vocab.get(tok) for i, tok in enumerate(SPECIAL_TOKENS) if vocab.get(tok) != i}
        if wrong:
            raise TokenizerError(
                f"{self.vocab_file} does not use OPT's special-token ids (<s>=0, <pad>=1, </s>=2, <unk>=3); "
                f"found {wrong}. Use OPT's files ('opt') or a tokenizer trained by `opt-ds preprocess --vocab-size`")
        try:
            self._bpe = ByteLevelBPETokenizer(str(self.vocab_file), str(self.merges_file))
        except Exception as err:  # tokenizers raises a bare Exception for malformed merges
            raise TokenizerError(f"cannot load {self.merges_file} with {self.vocab_file}: {err}") from None
        self.vocab_size = len(vocab)
        self.bos_id, self.pad_id, self.eos_id, self.unk_id = BOS_ID, PAD_ID, EOS_ID, 3

    @classmethod
    def of_run(cls, data: dict) -> "BPETokenizer | None":
        """The tokenizer a run config's `data` section names: data.tokenizer, else the one `opt-ds
        preprocess` saved beside its first corpus; None when it names none (synthetic tokens)."""
        if data.get("tokenizer"):
            return cls.load(data["tokenizer"])
        if data.get("train"):
            return cls(*tokenizer_files(DatasetFiles.of(data["train"][0]["path"]).tokenizer))
        return None

    @classmethod
    def load(cls, spec: str | os.PathLike) -> "BPETokenizer":
        """'opt' for OPT's bundled files, or a directory holding vocab.json + merges.txt."""
        directory = OPT_TOKENIZER_DIR if str(spec) == "opt" else Path(spec)
        return cls(*tokenizer_files(directory))

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        ids = self._bpe.encode(text).ids
        return [self.bos_id, *ids] if add_bos else ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [encoding.ids for encoding in self._bpe.encode_batch(texts)]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        ids = [int(i) for i in ids]
        if skip_special_tokens:
            ids = [i for i in ids if i >= len(SPECIAL_TOKENS)]
        return self._bpe.decode(ids, skip_special_tokens=False)

    def save(self, directory: str | os.PathLike) -> Path:
        """Write vocab.json + merges.txt as the directory `directory` (replaced whole, atomically)."""
        directory = Path(directory)
        staging = atomic.staging_dir(directory)
        shutil.copyfile(self.vocab_file, staging / "vocab.json")
        shutil.copyfile(self.merges_file, staging / "merges.txt")
        atomic.replace(staging, directory)
        return directory


def train_bpe(texts: Iterable[str], vocab_size: int, output_dir: str | os.PathLike,
              min_frequency: int = 2) -> BPETokenizer:
    """Train a byte-level BPE of at most `vocab_size` entries (specials at OPT's ids 0..3) and save it as
    vocab.json + merges.txt in `output_dir`. The vocabulary is smaller than asked when the corpus has fewer
    pairs seen `min_frequency` times; `.vocab_size` of the result is the real size."""
    if vocab_size < MIN_VOCAB_SIZE:
        raise TokenizerError(f"vocabulary size {vocab_size} is too small: a byte-level BPE needs at least "
                             f"{MIN_VOCAB_SIZE} entries (4 special tokens + 256 bytes)")
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(texts, vocab_size=vocab_size, min_frequency=min_frequency,
                            special_tokens=list(SPECIAL_TOKENS), show_progress=False)
    output_dir = Path(output_dir)
    staging = atomic.staging_dir(output_dir)
    bpe.save_model(str(staging))
    atomic.replace(staging, output_dir)
    return BPETokenizer(*tokenizer_files(output_dir))
