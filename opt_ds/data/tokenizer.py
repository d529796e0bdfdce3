"""Tokenizers, on the `tokenizers` library: GPT-2 byte-level BPE with OPT's (fairseq) special-token ids, and
any Hugging Face `tokenizer.json` (how LLaMA tokenizers ship) with its own special ids. Both kinds can be
trained on a corpus: `train_bpe` (OPT's kind) and `train_byte_fallback_bpe` (LLaMA's kind).

OPT's vocabulary puts `<s>`=0, `<pad>`=1, `</s>`=2, `<unk>`=3 first. OPT prepends `</s>` as BOS, and the
preprocessor appends `</s>` after every document, so in a token stream `</s>` both ends one document and
starts the next. The special tokens are plain vocabulary entries, not "added tokens": the text "</s>"
inside a document is encoded as ordinary bytes, so any text round-trips exactly (byte-level BPE is
lossless) and no document can forge a separator. A tokenizer.json's special tokens are likewise never
matched inside a text.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Iterable

from tokenizers import ByteLevelBPETokenizer

from opt_ds import durable
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
    raise TokenizerError(f"no tokenizer in {directory}: expected vocab.json and merges.txt there (or "
                         f"gpt2-vocab.json and gpt2-merges.txt, or a tokenizer.json); use 'opt' for OPT's tokenizer")


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

    @property
    def files(self) -> dict:
        """{name in a tokenizer directory: the file} — what `save` copies and what identifies the tokenizer."""
        return {"vocab.json": self.vocab_file, "merges.txt": self.merges_file}

    def save(self, directory: str | os.PathLike) -> Path:
        return save_files(self.files, directory)


def save_files(files: dict, directory: str | os.PathLike) -> Path:
    """Copy a tokenizer's files into the directory `directory` (replaced whole, atomically)."""
    directory = Path(directory)
    staging = durable.staging_dir(directory)
    for name, path in files.items():
        shutil.copyfile(path, staging / name)
    durable.replace(staging, directory)
    return directory


HF_TOKENIZER_FILE, HF_TOKENIZER_CONFIG = "tokenizer.json", "tokenizer_config.json"
# Special tokens looked up by name when there is no tokenizer_config.json: LLaMA 1/2, then Llama 3 / GPT-2.
KNOWN_SPECIALS = {"bos": ("<s>", "<|begin_of_text|>", "<|endoftext|>"),
                  "eos": ("</s>", "<|end_of_text|>", "<|endoftext|>"),
                  "pad": ("<pad>",), "unk": ("<unk>",)}


class HFTokenizer:
    """A Hugging Face tokenizer.json (e.g. LLaMA's SentencePiece BPE with byte fallback) with its own special
    ids: from tokenizer_config.json beside it when present, else by the usual token names."""

    def __init__(self, tokenizer_file: str | os.PathLike):
        from tokenizers import Tokenizer
        self.tokenizer_file = Path(tokenizer_file)
        try:
            self._tok = Tokenizer.from_file(str(self.tokenizer_file))
        except Exception as err:  # tokenizers raises a bare Exception for a malformed file
            raise TokenizerError(f"cannot load {self.tokenizer_file}: {err}") from None
        # The text "</s>" (or any special token's string) inside a document is encoded as text, never as the
        # special id, so no document can forge a separator (transformers' split_special_tokens=True).
        self._tok.encode_special_tokens = True
        self.config_file = self.tokenizer_file.parent / HF_TOKENIZER_CONFIG
        ids = {role: self._special_id(role) for role in KNOWN_SPECIALS}
        if ids["eos"] is None:
            raise TokenizerError(f"{self.tokenizer_file}: cannot tell its end-of-document token; put a "
                                 f"{HF_TOKENIZER_CONFIG} with an eos_token beside it")
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        self.eos_id, self.unk_id = ids["eos"], ids["unk"]
        self.bos_id = ids["bos"] if ids["bos"] is not None else self.eos_id
        self.pad_id = ids["pad"] if ids["pad"] is not None else self.eos_id

    def _special_id(self, role: str):
        if self.config_file.is_file():
            try:
                token = json.loads(self.config_file.read_text(encoding="utf-8")).get(f"{role}_token")
            except (OSError, ValueError) as err:
                raise TokenizerError(f"cannot read {self.config_file}: {err}") from None
            token = token.get("content") if isinstance(token, dict) else token
            return self._tok.token_to_id(token) if token else None
        return next((self._tok.token_to_id(t) for t in KNOWN_SPECIALS[role]
                     if self._tok.token_to_id(t) is not None), None)

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        ids = self._tok.encode(text, add_special_tokens=False).ids
        return [self.bos_id, *ids] if add_bos else ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        """Text of `ids`, without the BOS/EOS/pad/unk ids when `skip_special_tokens` (other added tokens, such
        as byte-fallback pieces, are text)."""
        ids = [int(i) for i in ids]
        if skip_special_tokens:
            special = {self.bos_id, self.eos_id, self.pad_id, self.unk_id}
            ids = [i for i in ids if i not in special]
        return self._tok.decode(ids, skip_special_tokens=False)

    @property
    def files(self) -> dict:
        files = {HF_TOKENIZER_FILE: self.tokenizer_file}
        if self.config_file.is_file():
            files[HF_TOKENIZER_CONFIG] = self.config_file
        return files

    def save(self, directory: str | os.PathLike) -> Path:
        return save_files(self.files, directory)


def open_tokenizer_dir(directory: str | os.PathLike):
    """The tokenizer saved in `directory`: a tokenizer.json, or vocab.json + merges.txt."""
    directory = Path(directory)
    if (directory / HF_TOKENIZER_FILE).is_file():
        return HFTokenizer(directory / HF_TOKENIZER_FILE)
    return BPETokenizer(*tokenizer_files(directory))


def load_tokenizer(spec: str | os.PathLike):
    """'opt' (OPT's bundled BPE), a tokenizer.json file, or a directory holding either kind."""
    if str(spec) == "opt":
        return BPETokenizer.load("opt")
    path = Path(spec)
    if path.is_file() and path.name.endswith(".json"):
        return HFTokenizer(path)
    return open_tokenizer_dir(path)


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
    staging = durable.staging_dir(output_dir)
    bpe.save_model(str(staging))
    durable.replace(staging, output_dir)
    return BPETokenizer(*tokenizer_files(output_dir))


def tokenizer_of_run(data: dict):
    """The tokenizer a run config's `data` section names: data.tokenizer, else the one `opt-ds preprocess`
    saved beside its first corpus; None when it names none (synthetic tokens)."""
    if data.get("tokenizer"):
        return load_tokenizer(data["tokenizer"])
    if data.get("train"):
        return open_tokenizer_dir(DatasetFiles.of(data["train"][0]["path"]).tokenizer)
    return None


# LLaMA's layout: <unk>=0, <s>=1, </s>=2, then the 256 byte pieces <0x00>..<0xFF>, then the learnt pieces.
LLAMA_SPECIAL_TOKENS = ("<unk>", "<s>", "</s>")
BYTE_PIECES = tuple(f"<0x{b:02X}>" for b in range(256))
SPACE = "\u2581"  # SentencePiece's "▁", which stands for a space inside pieces


def _llama_pipeline(tok, split: bool) -> None:
    """Hugging Face's LLaMA pipeline (what transformers' LlamaTokenizer builds): no normalizer, spaces as "▁"
    with one prepended to the text, byte pieces decoded back to bytes, and that first space stripped."""
    from tokenizers import decoders, pre_tokenizers

    tok.normalizer = None
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement=SPACE, prepend_scheme="first", split=split)
    tok.decoder = decoders.Sequence([decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])


def train_byte_fallback_bpe(texts: Iterable[str], vocab_size: int, output_dir: str | os.PathLike,
                            min_frequency: int = 2) -> HFTokenizer:
    """Train a LLaMA-style BPE with byte fallback of at most `vocab_size` entries and save it as tokenizer.json +
    tokenizer_config.json in `output_dir` (replaced whole, atomically); returns it loaded as an HFTokenizer.

    As in LLaMA's SentencePiece model: <unk>=0, <s>=1, </s>=2, the 256 byte pieces <0x00>..<0xFF> next, then
    the characters and merges learnt from `texts`; pieces never span a space. A character outside the
    vocabulary is encoded as the byte pieces of its UTF-8 bytes, so any text round-trips through
    encode/decode, except that a leading space and the character "▁" itself decode as in transformers'
    LlamaTokenizer (dropped, and a space). Transformers loads the directory with AutoTokenizer."""
    from tokenizers import AddedToken, Tokenizer, models, processors, trainers

    reserved = len(LLAMA_SPECIAL_TOKENS) + len(BYTE_PIECES)
    if vocab_size < MIN_VOCAB_SIZE:  # callers check first: `opt-ds preprocess` refuses --vocab-size < 260
        raise ValueError(f"vocabulary size {vocab_size} is too small: at least {MIN_VOCAB_SIZE}")
    # Train the characters and merges alone (the byte pieces are added below, not learnt), with pieces split
    # at spaces as SentencePiece does; the alphabet is capped so the result fits in `vocab_size`.
    learner = Tokenizer(models.BPE(unk_token="<unk>"))
    _llama_pipeline(learner, split=True)
    learner.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=vocab_size - len(BYTE_PIECES), min_frequency=min_frequency, show_progress=False,
        special_tokens=list(LLAMA_SPECIAL_TOKENS), limit_alphabet=vocab_size - reserved))
    learnt = json.loads(learner.to_str())["model"]
    vocab = {token: i for i, token in enumerate((*LLAMA_SPECIAL_TOKENS, *BYTE_PIECES))}
    for token, _ in sorted(learnt["vocab"].items(), key=lambda item: item[1]):
        vocab.setdefault(token, len(vocab))
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in learnt["merges"]]

    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", fuse_unk=True, byte_fallback=True))
    _llama_pipeline(tok, split=False)  # as transformers builds it; pieces never span "▁", so the same ids
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in LLAMA_SPECIAL_TOKENS])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", vocab["<s>"])])
    config = {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
              "pad_token": None, "add_bos_token": True, "add_eos_token": False, "add_prefix_space": True,
              "legacy": False, "clean_up_tokenization_spaces": False}
    output_dir = Path(output_dir)
    staging = durable.staging_dir(output_dir)
    tok.save(str(staging / HF_TOKENIZER_FILE))
    (staging / HF_TOKENIZER_CONFIG).write_text(json.dumps(config, indent=1) + "\n", encoding="utf-8")
    durable.replace(staging, output_dir)
    return HFTokenizer(output_dir / HF_TOKENIZER_FILE)
