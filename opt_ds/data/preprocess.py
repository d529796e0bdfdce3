"""Raw text / JSONL -> megatron-core indexed dataset (.bin/.idx): one document an entry, eos appended.

The inputs are read twice, cut into chunks (about `chunk_mb` of text each), the unit of parallel work and
of resumption:
1. scan: check every record (a bad one stops the run, or is counted and skipped), drop empty documents,
   exact duplicates and optionally near duplicates (the first copy is kept);
2. tokenize: the kept documents of each chunk become one .bin/.idx shard in `<prefix>.partial/chunks/`.
When no tokenizer is given, a BPE is trained on the kept documents between the two passes: byte-level with
OPT's special ids (`tokenizer_kind="byte-level"`), or LLaMA-style with byte fallback ("byte-fallback").
The shards are then merged, and `<prefix>.bin/.idx/.tokenizer/.summary.json` are published by renames.
An interrupted run leaves `<prefix>.partial/`; the same command run again reuses its scan, its tokenizer
and every finished chunk. The output does not depend on the number of workers.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import os
import sys
import time
from collections import Counter, deque
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from opt_ds import durable
from opt_ds.data.dedup import MinHasher, NearDuplicateIndex, exact_digest
from opt_ds.data.files import DatasetFiles
from opt_ds.data.megatron_quiet import import_quietly, quiet_dataset_logs
from opt_ds.data.sources import BadRecord, Document, InputError, expand_inputs, read_records
from opt_ds.data.tokenizer import (MIN_VOCAB_SIZE, BPETokenizer, TokenizerError, load_tokenizer,
                                   open_tokenizer_dir, train_bpe, train_byte_fallback_bpe)
from opt_ds.data.workdir import Scan, WorkDir
from opt_ds.errors import UserError

MAX_RECORDS_PER_CHUNK = 100_000
MAX_EXAMPLES = 20  # skipped records listed by location in the summary
# --tokenizer-kind: what --vocab-size trains. byte-level: GPT-2/OPT's (vocab.json + merges.txt, OPT's special
# ids); byte-fallback: LLaMA's (tokenizer.json, SentencePiece-style spaces, <unk>=0 <s>=1 </s>=2, byte pieces).
TRAINERS = {"byte-level": train_bpe, "byte-fallback": train_byte_fallback_bpe}


class PreprocessError(UserError):
    """Arguments or inputs that cannot give a dataset; the message names the problem and the fix."""


@dataclass
class PreprocessConfig:
    inputs: list[str]
    output_prefix: str
    tokenizer: str | None = None  # "opt", a tokenizer.json, or a directory with it or vocab.json + merges.txt
    vocab_size: int | None = None  # instead: train a BPE of this size on the corpus
    tokenizer_kind: str = "byte-level"  # the kind trained with vocab_size: a key of TRAINERS
    json_key: str = "text"
    workers: int = 1
    chunk_mb: float = 1.0
    exact_dedup: bool = True
    near_dedup: bool = False
    near_threshold: float = 0.95
    skip_bad_records: bool = False
    overwrite: bool = False
    restart: bool = False  # discard an unfinished run made with other arguments


@dataclass
class _Plan:
    cfg: PreprocessConfig
    inputs: list[Path]
    out: DatasetFiles
    tokenizer: BPETokenizer | None  # the given one; None when one is trained


def preprocess(cfg: PreprocessConfig, progress: bool | None = None) -> dict:
    """Run the pipeline; returns the summary (also written to `<prefix>.summary.json`)."""
    started = time.time()
    plan = _validate(cfg)
    progress = sys.stderr.isatty() if progress is None else progress
    work = WorkDir(plan.out.work)
    with work.locked():
        work.begin(_fingerprint(plan), restart=cfg.restart)
        try:
            scan = work.load_scan() or work.save_scan(_scan(plan, progress))
            _check_not_empty(scan)
        except (InputError, PreprocessError):
            work.discard()  # nothing worth resuming: the scan is redone on the next run anyway
            raise
        tokenizer = _prepare_tokenizer(plan, work, scan.keep)
        chunks, resumed = _tokenize(plan, work, scan.keep, progress)
        summary = _summary(plan, scan, tokenizer, chunks, resumed, started)
        _publish(plan.out, work, chunks, summary)
    return summary


# --- validation -----------------------------------------------------------------------------------------

def _validate(cfg: PreprocessConfig) -> _Plan:
    if (cfg.tokenizer is None) == (cfg.vocab_size is None) or cfg.tokenizer_kind not in TRAINERS or \
            (cfg.tokenizer is not None and cfg.tokenizer_kind != "byte-level"):
        raise PreprocessError("give exactly one of --tokenizer (opt, a tokenizer.json, or a directory with vocab.json + merges.txt) "
                              "and --vocab-size (train a BPE of that size on the corpus; --tokenizer-kind, "
                              f"one of {', '.join(TRAINERS)}, goes only with it)")
    if cfg.vocab_size is not None and not MIN_VOCAB_SIZE <= cfg.vocab_size < 2 ** 31:
        raise PreprocessError(f"--vocab-size {cfg.vocab_size} is out of range: a byte-level BPE needs at least "
                              f"{MIN_VOCAB_SIZE} entries (4 special tokens + 256 bytes)")
    if not cfg.json_key:
        raise PreprocessError("--json-key is empty: name the JSON field that holds the text")
    if cfg.workers < 1:
        raise PreprocessError(f"--workers {cfg.workers}: use 1 or more")
    if not cfg.chunk_mb > 0:
        raise PreprocessError(f"--chunk-mb {cfg.chunk_mb}: use a positive size")
    if not 0 < cfg.near_threshold <= 1:
        raise PreprocessError(f"--near-threshold {cfg.near_threshold}: use a Jaccard similarity in (0, 1]")
    inputs = expand_inputs(cfg.inputs)
    try:
        tokenizer = load_tokenizer(cfg.tokenizer) if cfg.tokenizer is not None else None
    except TokenizerError as err:
        raise PreprocessError(f"--tokenizer {cfg.tokenizer}: {err}") from None
    out = DatasetFiles.of(cfg.output_prefix)
    if cfg.output_prefix.endswith(os.sep) or out.prefix.is_dir():
        raise PreprocessError(f"--output-prefix {cfg.output_prefix} is a directory; give a path prefix such as "
                              f"{out.prefix / 'corpus'} (writes corpus.bin and corpus.idx)")
    existing = [str(p) for p in out.outputs() if p.exists()]
    if existing and not cfg.overwrite:
        raise PreprocessError(f"output already exists: {', '.join(existing)}. Pass --overwrite to replace it "
                              "(replaced only once the new dataset is complete) or choose another --output-prefix")
    parent = next(p for p in [out.prefix.absolute().parent, *out.prefix.absolute().parents] if p.exists())
    if not os.access(parent, os.W_OK):
        raise PreprocessError(f"cannot write under {parent}: choose an --output-prefix in a writable directory")
    return _Plan(cfg, inputs, out, tokenizer)


def _fingerprint(plan: _Plan) -> dict:
    """What the partial results depend on; a rerun resumes only when this is unchanged."""
    cfg = plan.cfg
    tokenizer_digest = None
    if plan.tokenizer is not None:
        digest = hashlib.sha256()
        for path in plan.tokenizer.files.values():
            digest.update(path.read_bytes())
        tokenizer_digest = digest.hexdigest()
    inputs = [{"path": str(p.resolve()), "bytes": p.stat().st_size, "mtime_ns": p.stat().st_mtime_ns}
              for p in plan.inputs]
    options = asdict(cfg)
    for irrelevant in ("inputs", "output_prefix", "tokenizer", "workers", "overwrite", "restart"):
        options.pop(irrelevant)
    if options["tokenizer_kind"] == "byte-level":
        options.pop("tokenizer_kind")  # the default: fingerprints from before the option still match
    return {"format": 1, "inputs": inputs, "tokenizer_sha256": tokenizer_digest, **options}


# --- the two passes ---------------------------------------------------------------------------------------

def _chunks(plan: _Plan) -> Iterator[tuple[int, list]]:
    """(index, records) in reading order; a chunk closes after `chunk_mb` of text."""
    limit = plan.cfg.chunk_mb * 2 ** 20
    records = read_records(plan.inputs, plan.cfg.json_key)
    for index in itertools.count():
        chunk, size = [], 0
        for record in records:
            chunk.append(record)
            size += len(record.text) if isinstance(record, Document) else 0
            if size >= limit or len(chunk) >= MAX_RECORDS_PER_CHUNK:
                break
        if not chunk:
            return
        yield index, chunk


def _in_order(workers: int, function, jobs, initializer=None, initargs=()) -> Iterator:
    """(key, function(*args)) for each (key, args) of `jobs`, in order; a few chunks in flight at a time."""
    if workers == 1:
        if initializer:
            initializer(*initargs)
        for key, args in jobs:
            yield key, function(*args)
        return
    import multiprocessing

    with multiprocessing.get_context("fork").Pool(workers, initializer, initargs) as pool:
        pending = deque()
        for key, args in jobs:
            pending.append((key, pool.apply_async(function, args)))
            if len(pending) >= 2 * workers:
                key, result = pending.popleft()
                yield key, result.get()
        while pending:
            key, result = pending.popleft()
            yield key, result.get()


def _fingerprint_documents(texts: list[str], near: bool) -> list[tuple]:
    """Worker: (exact digest, MinHash signature or None) per text."""
    hasher = MinHasher() if near else None
    return [(exact_digest(t), hasher.signature(t) if near else None) for t in texts]


def _progress_bar(enabled: bool, **kwargs):
    from tqdm import tqdm

    return tqdm(disable=not enabled, unit="doc", dynamic_ncols=True, **kwargs)


def _scan(plan: _Plan, progress: bool) -> Scan:
    cfg = plan.cfg
    keep, counts, skipped, examples = [], Counter(), Counter(), []
    seen = set()
    near = NearDuplicateIndex(threshold=cfg.near_threshold) if cfg.near_dedup else None

    def skip(reason: str, where: str, detail: str):
        skipped[reason] += 1
        keep.append(False)
        if len(examples) < MAX_EXAMPLES:
            examples.append(f"{where}: {detail}")

    def jobs():
        for _, records in _chunks(plan):
            bad = next((r for r in records if isinstance(r, BadRecord)), None)
            if bad is not None and not cfg.skip_bad_records:
                raise PreprocessError(bad.message())
            texts = [r.text for r in records if isinstance(r, Document) and r.text.strip()]
            yield records, (texts, cfg.near_dedup)

    with _progress_bar(progress, desc="scan") as bar:
        for records, fingerprints in _in_order(cfg.workers, _fingerprint_documents, jobs()):
            fingerprints = iter(fingerprints)
            for record in records:
                if isinstance(record, BadRecord):
                    skip(record.reason, record.where, record.detail)
                    continue
                if not record.text.strip():
                    skip("empty", record.where, "empty or whitespace-only document")
                    continue
                digest, signature = next(fingerprints)
                if cfg.exact_dedup and digest in seen:
                    counts["exact_duplicates"] += 1
                    keep.append(False)
                elif near is not None and near.is_near_duplicate(signature):
                    counts["near_duplicates"] += 1
                    keep.append(False)
                else:
                    if cfg.exact_dedup:
                        seen.add(digest)
                    keep.append(True)
            bar.update(len(records))
    counts = {"records_read": len(keep), "documents_kept": sum(keep), "exact_duplicates": counts["exact_duplicates"],
              "near_duplicates": counts["near_duplicates"], "skipped": dict(sorted(skipped.items()))}
    return Scan(np.array(keep, dtype=bool), counts, examples)


def _check_not_empty(scan: Scan) -> None:
    c = scan.counts
    if c["documents_kept"] == 0:
        raise PreprocessError(
            f"no documents left to write: read {c['records_read']} records; skipped "
            f"{', '.join(f'{n} {why}' for why, n in c['skipped'].items()) or 'none'}; dropped "
            f"{c['exact_duplicates']} exact and {c['near_duplicates']} near duplicates. Fix: check the inputs "
            "hold text (for JSONL, that --json-key names the text field)")


def _kept_texts(plan: _Plan, keep: np.ndarray) -> Iterator[str]:
    records = (r for _, chunk in _chunks(plan) for r in chunk)
    return (r.text for r, k in zip(records, keep) if k)


def _prepare_tokenizer(plan: _Plan, work: WorkDir, keep: np.ndarray) -> BPETokenizer:
    """The tokenizer in the work directory: a copy of the given one, or one trained on the kept documents."""
    try:
        return open_tokenizer_dir(work.tokenizer)
    except TokenizerError:
        pass  # not made yet
    if plan.tokenizer is not None:
        plan.tokenizer.save(work.tokenizer)
        return open_tokenizer_dir(work.tokenizer)
    kind = plan.cfg.tokenizer_kind
    print(f"training a {kind} BPE of {plan.cfg.vocab_size} entries on {int(keep.sum())} documents", file=sys.stderr)
    return TRAINERS[kind](_kept_texts(plan, keep), plan.cfg.vocab_size, work.tokenizer)


_WORKER_TOKENIZER: BPETokenizer | None = None


def _load_worker_tokenizer(directory: str) -> None:
    import multiprocessing

    global _WORKER_TOKENIZER
    if multiprocessing.parent_process() is not None:
        os.environ["TOKENIZERS_PARALLELISM"] = "false"  # the pool is the parallelism; no threads per worker
    _WORKER_TOKENIZER = open_tokenizer_dir(directory)


def _indexed_dataset():
    return import_quietly("megatron.core.datasets.indexed_dataset")


def _token_dtype(vocab_size: int):
    return _indexed_dataset().DType.optimal_dtype(vocab_size)


def _tokenize_chunk(texts: list[str], prefix: str) -> dict:
    """Worker: tokenize documents (+eos) into the shard `prefix`.bin/.idx; the .json marker commits it."""
    tokenizer = _WORKER_TOKENIZER
    stats = {"documents": len(texts), "tokens": 0}
    if texts:
        builder = _indexed_dataset().IndexedDatasetBuilder(prefix + ".bin.tmp", dtype=_token_dtype(tokenizer.vocab_size))
        for ids in tokenizer.encode_batch(texts):
            ids.append(tokenizer.eos_id)
            builder.add_document(np.asarray(ids), [len(ids)])
            stats["tokens"] += len(ids)
        builder.finalize(prefix + ".idx.tmp")
        durable.replace(Path(prefix + ".bin.tmp"), Path(prefix + ".bin"))
        durable.replace(Path(prefix + ".idx.tmp"), Path(prefix + ".idx"))
    durable.write_atomically(Path(prefix + ".json"), json.dumps(stats))
    return stats


def _tokenize(plan: _Plan, work: WorkDir, keep: np.ndarray, progress: bool) -> tuple[list[dict], int]:
    """Per-chunk stats in chunk order, and how many chunks an earlier run had finished."""
    _indexed_dataset()  # import once here, not in every forked worker
    stats, finished = {}, set()
    bar = _progress_bar(progress, desc="tokenize", total=int(keep.sum()))

    def jobs():
        first_record = 0
        for index, records in _chunks(plan):
            mask = keep[first_record:first_record + len(records)]
            first_record += len(records)
            done = work.finished_chunk(index)
            if done is not None:
                stats[index] = done
                finished.add(index)
                bar.update(done["documents"])
            else:
                yield index, ([r.text for r, k in zip(records, mask) if k], str(work.chunk_prefix(index)))

    with bar:
        for index, chunk_stats in _in_order(plan.cfg.workers, _tokenize_chunk, jobs(),
                                            _load_worker_tokenizer, (str(work.tokenizer),)):
            stats[index] = chunk_stats
            bar.update(chunk_stats["documents"])
    return [dict(stats[i], index=i) for i in sorted(stats)], len(finished)


# --- merge, summary, publish ------------------------------------------------------------------------------

def _summary(plan: _Plan, scan: Scan, tokenizer: BPETokenizer, chunks: list[dict], resumed: int,
             started: float) -> dict:
    cfg = plan.cfg
    trained = "trained" if cfg.tokenizer_kind == "byte-level" else f"trained {cfg.tokenizer_kind}"
    return {
        "output_prefix": str(plan.out.prefix),
        "inputs": [str(p) for p in plan.inputs],
        **scan.counts,
        "tokens": sum(c["tokens"] for c in chunks),
        "skipped_examples": scan.examples,
        "tokenizer": {"source": cfg.tokenizer if cfg.tokenizer is not None else f"{trained} (asked {cfg.vocab_size})",
                      "directory": str(plan.out.tokenizer), "vocab_size": tokenizer.vocab_size,
                      "eos_id": tokenizer.eos_id, "pad_id": tokenizer.pad_id, "bos_id": tokenizer.bos_id},
        "token_dtype": np.dtype(_token_dtype(tokenizer.vocab_size)).name,
        "dedup": {"exact": cfg.exact_dedup, "near": cfg.near_dedup, "near_threshold": cfg.near_threshold},
        "chunks": len(chunks),
        "resumed_chunks": resumed,
        "workers": cfg.workers,
        "seconds": round(time.time() - started, 2),
    }


def _publish(out: DatasetFiles, work: WorkDir, chunks: list[dict], summary: dict) -> None:
    merged = work.path / "merged"
    indexed = _indexed_dataset()
    builder = indexed.IndexedDatasetBuilder(f"{merged}.bin", dtype=np.dtype(summary["token_dtype"]).type)
    with quiet_dataset_logs():
        # Document by document: IndexedDatasetBuilder.add_index runs gc.collect() per shard (0.2 s each here).
        for chunk in chunks:
            if chunk["documents"]:
                shard = indexed.IndexedDataset(str(work.chunk_prefix(chunk["index"])))
                for i, length in enumerate(shard.sequence_lengths):
                    builder.add_document(shard[i], [int(length)])
        builder.finalize(f"{merged}.idx")
        check = indexed.IndexedDataset(str(merged))
    if len(check) != summary["documents_kept"] or int(check.sequence_lengths.sum()) != summary["tokens"]:
        raise RuntimeError(f"merged dataset {merged} does not match its chunks; delete {work.path} and rerun")
    del check

    open_tokenizer_dir(work.tokenizer).save(out.tokenizer)
    durable.write_atomically(out.summary, json.dumps(summary, indent=1) + "\n")
    out.idx.unlink(missing_ok=True)  # never a new .bin beside an old .idx, even for a moment
    durable.replace(Path(f"{merged}.bin"), out.bin)
    durable.replace(Path(f"{merged}.idx"), out.idx)
    work.discard()
