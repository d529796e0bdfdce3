"""Train/valid samples over preprocessed corpora, built by megatron-core (GPTDataset, BlendedDataset,
BlendedMegatronDatasetBuilder).

A sample is `seq_length + 1` consecutive tokens of the concatenated, shuffled documents of one corpus
(documents end with eos, as OPT trained: no attention or position reset, loss on every token, eos
included): `tokens` = the first seq_length, `labels` = the same shifted by one. Each corpus is split into
train/valid/test by *documents* (the split string), so valid never sees a training document; corpora are
mixed by weight. The sample order is a fixed function of (corpora, split, seq_length, seed, sizes): megatron
caches its indices under `cache_dir`, and a second build with the same arguments loads them.

`build_datasets` is collective under torch.distributed: every rank calls it; rank 0 builds the index caches
and the others load them after a barrier (so `cache_dir` must be shared by the ranks of a node or job).
"""
from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from opt_ds.data.files import DatasetFiles
from opt_ds.data.integrity import check_pair, max_token_id
from opt_ds.data.megatron_quiet import import_quietly, quiet_dataset_logs
from opt_ds.data.tokenizer import EOS_ID, PAD_ID, TokenizerError, open_tokenizer_dir
from opt_ds.errors import UserError

_SPLIT = re.compile(r"^\s*\d+(\.\d*)?(\s*,\s*\d+(\.\d*)?){0,2}\s*$")


class DataError(UserError):
    """Datasets that cannot be built from these arguments; the message says why and how to fix it."""


@dataclass(frozen=True)
class TokenIds:
    """What megatron's GPTDataset needs of a tokenizer: the vocabulary size (it picks the token dtype) and
    the eod/pad ids. The corpora are already tokenized, so nothing else is needed."""
    vocab_size: int
    eod: int = EOS_ID
    pad: int = PAD_ID

    @property
    def unique_identifiers(self) -> dict:  # part of megatron's cache key
        return {"class": "opt_ds.TokenIds", "vocab_size": self.vocab_size, "eod": self.eod, "pad": self.pad}


class TokenWindows(torch.utils.data.Dataset):
    """Samples `{"tokens", "labels", "loss_mask"}` (the interface of `SyntheticTokens`) of a megatron dataset."""

    def __init__(self, megatron_dataset):
        self.megatron_dataset = megatron_dataset

    def __len__(self) -> int:
        return len(self.megatron_dataset)

    def __getitem__(self, index: int) -> dict:
        index = int(index)
        if not 0 <= index < len(self):
            raise IndexError(f"sample {index} out of range [0, {len(self)})")
        sample = self.megatron_dataset[index]
        return {"tokens": sample["tokens"], "labels": sample["labels"], "loss_mask": sample["loss_mask"]}


@dataclass(frozen=True)
class CorpusStats:
    documents: int
    tokens: int


def corpus_stats(prefix: str | os.PathLike) -> CorpusStats:
    """How many documents and tokens (eos included) the dataset at `prefix` holds."""
    _require_dataset(prefix)
    with quiet_dataset_logs():
        indexed = import_quietly("megatron.core.datasets.indexed_dataset").IndexedDataset(str(prefix))
    return CorpusStats(len(indexed), int(np.sum(indexed.sequence_lengths, dtype=np.int64)))


def dataset_tokenizer(prefix: str | os.PathLike):
    """The tokenizer `opt-ds preprocess` saved beside the dataset at `prefix` (to decode its samples)."""
    return open_tokenizer_dir(DatasetFiles.of(prefix).tokenizer)


def build_datasets(blend: list[tuple[str | os.PathLike, float]], split: str, seq_length: int, seed: int,
                   num_train_samples: int, num_valid_samples: int, cache_dir: str | os.PathLike | None = None,
                   vocab_size: int | None = None, eos_id: int = EOS_ID, pad_id: int = PAD_ID
                   ) -> tuple[TokenWindows, TokenWindows | None]:
    """(train, valid) over the corpora of `blend` ((prefix, weight) pairs, mixed by weight), cut by
    documents with `split` ("train,valid,test" weights, e.g. "949,50,1"). Train holds at least
    `num_train_samples` samples (corpora repeat when too small), valid `num_valid_samples`; valid is None
    when the split gives it no share or `num_valid_samples` is 0. Call it on every rank.

    `cache_dir` defaults to `index-cache/` beside the first corpus. `vocab_size` is the model's vocabulary
    (checked to hold the corpora's tokenizer); by default the size of the tokenizer saved with the corpora."""
    if seq_length < 1 or num_train_samples < 1 or num_valid_samples < 0:
        raise DataError(f"need seq_length >= 1, num_train_samples >= 1, num_valid_samples >= 0; got "
                        f"{seq_length}, {num_train_samples}, {num_valid_samples}")
    prefixes, weights, want_valid, vocab_size = check_corpora(blend, split, num_valid_samples, vocab_size)
    cache_dir = Path(cache_dir if cache_dir is not None else Path(prefixes[0]).parent / "index-cache").absolute()
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise DataError(f"cannot create the index cache {cache_dir} ({err}); choose a writable cache_dir") from None

    builder_module = import_quietly("megatron.core.datasets.blended_megatron_dataset_builder")
    gpt = import_quietly("megatron.core.datasets.gpt_dataset")
    with quiet_dataset_logs():
        config = gpt.GPTDatasetConfig(
            random_seed=seed, sequence_length=seq_length, split=split, path_to_cache=str(cache_dir),
            blend=(prefixes, weights if len(prefixes) > 1 else None),
            tokenizer=TokenIds(vocab_size, eod=eos_id, pad=pad_id),
            reset_position_ids=False, reset_attention_mask=False, eod_mask_loss=False,
            create_attention_mask=False)
        sizes = [num_train_samples, num_valid_samples if want_valid else 0, 0]
        with _process_group():
            train, valid, _ = builder_module.BlendedMegatronDatasetBuilder(
                gpt.GPTDataset, sizes, lambda: True, config).build()
    return TokenWindows(train), (TokenWindows(valid) if want_valid else None)


def check_corpora(blend, split: str, num_valid_samples: int, vocab_size: int | None = None) -> tuple:
    """Everything build_datasets checks before megatron reads a file, cheap enough to run before the engine
    is built: every corpus exists, its .bin/.idx pair is whole and one pair, the split leaves each part
    documents, and the token ids fit `vocab_size`. Returns (prefixes, weights, want_valid, vocab_size)."""
    prefixes, weights = _check_blend(blend)
    shares = _check_split(split)
    want_valid = num_valid_samples > 0 and shares[1] > 0
    _check_documents_per_split(prefixes, shares, want_valid)
    return prefixes, weights, want_valid, _check_tokenizers(prefixes, vocab_size)


class _process_group:
    """megatron's BlendedDataset asks torch.distributed for the rank when it writes its cache, even in a
    single process. Without a caller's process group, build inside a private one-process gloo group."""

    def __enter__(self):
        self.private = not torch.distributed.is_initialized()
        if self.private:
            torch.distributed.init_process_group("gloo", store=torch.distributed.HashStore(), rank=0, world_size=1)

    def __exit__(self, *exc):
        if self.private:
            torch.distributed.destroy_process_group()


def _require_dataset(prefix) -> None:
    files = DatasetFiles.of(prefix)
    if not files.exists():
        raise DataError(f"no dataset at {prefix}: {files.bin} and {files.idx} are needed; make them with "
                        f"`opt-ds preprocess ... --output-prefix {prefix}`")


def _check_blend(blend) -> tuple[list[str], list[float]]:
    if not blend:
        raise DataError("the blend is empty: give one or more (dataset prefix, weight) pairs")
    prefixes, weights = [], []
    for item in blend:
        try:
            prefix, weight = item
            weight = float(weight)
        except (TypeError, ValueError):
            raise DataError(f"blend entry {item!r} is not a (dataset prefix, weight) pair") from None
        if not (weight > 0 and np.isfinite(weight)):
            raise DataError(f"blend weight {weight} of {prefix} must be a positive number")
        _require_dataset(prefix)
        check_pair(prefix)
        prefixes.append(str(Path(prefix).absolute()))  # megatron's cache key holds the path
        weights.append(weight)
    return prefixes, weights


def _check_split(split: str) -> list[float]:
    if not isinstance(split, str) or not _SPLIT.match(split):
        raise DataError(f"split {split!r} is not 'train,valid,test' weights (e.g. '949,50,1' or '98,2,0')")
    shares = [float(x) for x in split.split(",")] + [0.0] * (3 - len(split.split(",")))
    if shares[0] <= 0:
        raise DataError(f"split {split!r} gives training no share; make its first number positive")
    return [x / sum(shares) for x in shares]


def _check_documents_per_split(prefixes: list[str], shares: list[float], want_valid: bool) -> None:
    """megatron cuts each corpus at round(share * documents); an empty train or valid part would fail deep
    inside it, so say which corpus is too small here."""
    bounds = np.cumsum([0.0, *shares])
    for prefix in prefixes:
        documents = corpus_stats(prefix).documents
        counts = [int(round(b * documents)) - int(round(a * documents)) for a, b in zip(bounds[:-1], bounds[1:])]
        for name, count, needed in (("train", counts[0], True), ("valid", counts[1], want_valid)):
            if needed and count == 0:
                raise DataError(
                    f"{prefix} has {documents} documents: the split gives its {name} part none. Use a larger "
                    f"{name} share, or cut the corpus into more documents")


def _check_tokenizers(prefixes: list[str], vocab_size: int | None) -> int:
    """Blended corpora must share one tokenizer, and its ids must fit the model's vocabulary (returned:
    `vocab_size`, or by default the tokenizer's size)."""
    seen, sizes = {}, set()
    for prefix in prefixes:
        try:
            tokenizer = dataset_tokenizer(prefix)
        except TokenizerError:      # made by another tool, or its tokenizer folder was not copied
            if vocab_size is not None and (largest := max_token_id(prefix)) >= vocab_size:
                raise DataError(f"{prefix} holds token id {largest}, beyond vocab_size={vocab_size} (ids 0.."
                                f"{vocab_size - 1}); raise model.vocab_size, or preprocess the corpus with the "
                                "model's tokenizer") from None
            continue
        sizes.add(tokenizer.vocab_size)
        if vocab_size is not None and tokenizer.vocab_size > vocab_size:
            raise DataError(f"{prefix} was tokenized with a vocabulary of {tokenizer.vocab_size} entries, more than "
                            f"vocab_size={vocab_size}; raise the model's vocabulary size")
        digest = hashlib.sha256(b"".join(path.read_bytes() for path in tokenizer.files.values())).hexdigest()
        seen.setdefault(digest, prefix)
    if len(seen) > 1:
        raise DataError(f"the blend mixes tokenizers ({', '.join(seen.values())} differ): their token ids mean "
                        "different things. Preprocess every corpus with the same --tokenizer")
    if vocab_size is None and not sizes:
        raise DataError(f"no tokenizer saved beside {prefixes[0]} (PREFIX.tokenizer/): pass vocab_size, the "
                        "model's vocabulary size")
    return vocab_size if vocab_size is not None else sizes.pop()
