"""Train/valid samples over preprocessed corpora, built with megatron-core's GPTDataset and BlendedDataset.

A sample is `seq_length + 1` consecutive tokens of the concatenated, shuffled documents of one corpus
(documents end with eos, as OPT trained: no attention or position reset, loss on every token, eos
included): `tokens` = the first seq_length, `labels` = the same shifted by one. Each corpus is split into
train/valid/test by *documents*: a permutation of its documents seeded by `split_seed` is cut by the split
weights ("train,valid,test"), so valid never sees a training document and no part of a concatenated corpus
becomes the whole validation set. Corpora are mixed by weight.

The validation set depends only on (corpora, weights, split, split_seed, seq_length): one pass over the
validation documents, its samples shuffled with `split_seed` too. So a validation loss over its first N
samples is comparable across runs whatever their train.steps, seed, eval_interval or layout. The train order is a fixed function of (corpora, split,
split_seed, seq_length, seed, samples). megatron caches the indices under `cache_dir`; a second build with
the same arguments loads them.

`build_datasets` is collective under torch.distributed: every rank calls it; rank 0 builds the index caches
and the others load them after a barrier (so `cache_dir` must be shared by the ranks of a node or job).
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import math
import os
import re
import types
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
DEFAULT_SPLIT_SEED = 1234
PARTS = ("train", "valid", "test")


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
                   vocab_size: int | None = None, eos_id: int = EOS_ID, pad_id: int = PAD_ID,
                   split_seed: int = DEFAULT_SPLIT_SEED) -> tuple[TokenWindows, TokenWindows | None]:
    """(train, valid) over the corpora of `blend` ((prefix, weight) pairs, mixed by weight), cut by
    documents with `split` ("train,valid,test" weights, e.g. "949,50,1") over a permutation of each corpus's
    documents seeded by `split_seed`. Train holds at least `num_train_samples` samples (corpora repeat when
    too small), in an order seeded by `seed`; valid `num_valid_samples`, in an order seeded by `split_seed`;
    valid is None when the split gives it no share or `num_valid_samples` is 0. Call it on every rank.

    `cache_dir` defaults to `index-cache/` beside the first corpus. `vocab_size` is the model's vocabulary
    (checked to hold the corpora's tokenizer); by default the size of the tokenizer saved with the corpora."""
    if seq_length < 1 or num_train_samples < 1 or num_valid_samples < 0:
        raise DataError(f"need seq_length >= 1, num_train_samples >= 1, num_valid_samples >= 0; got "
                        f"{seq_length}, {num_train_samples}, {num_valid_samples}")
    prefixes, weights, want_valid, vocab_size = check_corpora(blend, split, num_valid_samples, vocab_size)
    shares = _check_split(split)
    cache_dir = Path(cache_dir if cache_dir is not None else Path(prefixes[0]).parent / "index-cache").absolute()
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise DataError(f"cannot create the index cache {cache_dir} ({err}); choose a writable cache_dir") from None

    megatron = _megatron()
    with quiet_dataset_logs():
        def config(sample_seed: int):
            return megatron.Config(
                random_seed=sample_seed, document_split_seed=split_seed, sequence_length=seq_length, split=split,
                path_to_cache=str(cache_dir), blend=(prefixes, weights if len(prefixes) > 1 else None),
                tokenizer=TokenIds(vocab_size, eod=eos_id, pad=pad_id), reset_position_ids=False,
                reset_attention_mask=False, eod_mask_loss=False, create_attention_mask=False)
        with _process_group():
            train = _blend(megatron, prefixes, weights, shares, "train", num_train_samples, config(seed))
            valid = _blend(megatron, prefixes, weights, shares, "valid", None, config(split_seed)) \
                if want_valid else None
    return TokenWindows(train), (TokenWindows(valid) if valid is not None else None)


def split_documents(documents: int, shares: list[float], split_seed: int) -> dict[str, np.ndarray]:
    """The document indices of each part ("train", "valid", "test") of a corpus of `documents` documents:
    a permutation seeded by `split_seed`, cut at round(cumulative share x documents); each part sorted."""
    order = np.random.RandomState(split_seed).permutation(documents).astype(np.int32)
    bounds = [int(round(b * documents)) for b in np.cumsum([0.0, *shares])]
    return {part: np.sort(order[a:b]) for part, a, b in zip(PARTS, bounds[:-1], bounds[1:])}


def describe_split(blend: list[tuple[str | os.PathLike, float]], split: str,
                   split_seed: int = DEFAULT_SPLIT_SEED) -> list[dict]:
    """What a run records about its split: per corpus, the documents of each part and a digest of the
    validation documents (equal digests: the same validation documents)."""
    shares = _check_split(split)
    described = []
    for prefix, _ in blend:
        parts = split_documents(corpus_stats(prefix).documents, shares, split_seed)
        described.append({"path": str(prefix), "split": split, "split_seed": split_seed,
                          **{f"{part}_documents": len(ids) for part, ids in parts.items()},
                          "valid_documents_sha256": hashlib.sha256(parts["valid"].tobytes()).hexdigest()})
    return described


@functools.cache
def _megatron():
    """megatron's dataset classes, extended so the document split seed is part of the index cache key."""
    gpt = import_quietly("megatron.core.datasets.gpt_dataset")
    blended = import_quietly("megatron.core.datasets.blended_dataset")
    builder = import_quietly("megatron.core.datasets.blended_megatron_dataset_builder").BlendedMegatronDatasetBuilder
    indexed = import_quietly("megatron.core.datasets.indexed_dataset")
    split_enum = import_quietly("megatron.core.datasets.utils").Split

    @dataclasses.dataclass
    class Config(gpt.GPTDatasetConfig):
        document_split_seed: int = DEFAULT_SPLIT_SEED

    class DocumentSplitGPTDataset(gpt.GPTDataset):
        @staticmethod
        def _key_config_attributes() -> list[str]:
            return [*gpt.GPTDataset._key_config_attributes(), "document_split_seed"]

    def build(cls, *args):
        return builder.build_generic_dataset(cls, lambda: True, True, *args)

    return types.SimpleNamespace(Config=Config, GPTDataset=DocumentSplitGPTDataset, build=build,
                                 BlendedDataset=blended.BlendedDataset, IndexedDataset=indexed.IndexedDataset,
                                 Split=split_enum)


def _blend(megatron, prefixes: list[str], weights: list[float], shares: list[float], part: str,
           size: int | None, config):
    """Samples of `part`, mixed from every corpus by weight: `size` of them (each corpus sized as megatron's
    builder does), or with `size` None one pass over each corpus's documents, mixed into as many samples
    as the weights allow without repeating one (a count fixed by the data alone)."""
    index_split = getattr(megatron.Split, part)
    normalized = [w / sum(weights) for w in weights]
    datasets = []
    for prefix, weight in zip(prefixes, normalized):
        low_level = megatron.IndexedDataset(prefix)
        documents = split_documents(len(low_level), shares, config.document_split_seed)[part]
        wanted = size if size is None or len(prefixes) == 1 else int(math.ceil(math.ceil(size * weight) * 1.005))
        datasets.append(megatron.build(megatron.GPTDataset, low_level, prefix, documents, wanted, index_split, config))
    if len(datasets) == 1:
        return datasets[0]
    if size is None:    # megatron's greedy blending draws at most ceil(weight x size) samples of a corpus
        size = min(int((len(dataset) - 1) / weight) for dataset, weight in zip(datasets, normalized))
        if size < 1:
            raise DataError(f"the {part} part of a corpus of the blend holds too few tokens for one sample of "
                            f"{config.sequence_length}; give it a larger share of the split")
    return megatron.build(megatron.BlendedDataset, datasets, normalized, size, config)


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
    """An empty train or valid part would fail deep inside megatron, so say which corpus is too small here."""
    for prefix in prefixes:
        documents = corpus_stats(prefix).documents
        counts = {part: len(ids) for part, ids in split_documents(documents, shares, 0).items()}
        for name, needed in (("train", True), ("valid", want_valid)):
            if needed and counts[name] == 0:
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
