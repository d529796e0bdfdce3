"""Tokenize raw text (.txt: one document a file) and JSON Lines (.jsonl: one document a line), optionally
gzipped, into a megatron-core indexed dataset PREFIX.bin/.idx, with the tokenizer beside it in
PREFIX.tokenizer/ and a summary in PREFIX.summary.json. Rerun an interrupted command to resume it."""
from __future__ import annotations

import argparse
import os
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("inputs", nargs="*", metavar="INPUT",
                        help="files (.txt, .jsonl, either optionally .gz) or directories of them")
    parser.add_argument("--bundled-corpus", action="store_true",
                        help="add the bundled public-domain corpus (18 Shakespeare plays, 2.4 MB) to the inputs")
    parser.add_argument("--output-prefix", required=True, help="write PREFIX.bin, PREFIX.idx, ...")
    tok = parser.add_mutually_exclusive_group(required=True)
    tok.add_argument("--tokenizer", metavar="opt|PATH",
                     help="'opt' (OPT's GPT-2 BPE, bundled), a Hugging Face tokenizer.json (e.g. LLaMA's), or a "
                          "directory with tokenizer.json or vocab.json + merges.txt")
    tok.add_argument("--vocab-size", type=int, metavar="N",
                     help="train a BPE of N entries (--tokenizer-kind) on the (deduplicated) corpus instead")
    parser.add_argument("--tokenizer-kind", choices=("byte-level", "byte-fallback"), default="byte-level",
                        help="what --vocab-size trains: 'byte-level' (default), GPT-2/OPT's BPE with OPT's special "
                             "ids (vocab.json + merges.txt); 'byte-fallback', LLaMA's: a SentencePiece-style BPE "
                             "whose unseen characters become byte pieces <0x00>..<0xFF>, <unk>=0 <s>=1 </s>=2 "
                             "(tokenizer.json)")
    parser.add_argument("--json-key", default="text", help="JSONL field holding the text (default: text)")
    parser.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1),
                        help="worker processes (default: min(4, CPUs)); the output does not depend on it")
    parser.add_argument("--near-dedup", action="store_true",
                        help="also drop near duplicates (MinHash LSH, Jaccard >= --near-threshold, as OPT did)")
    parser.add_argument("--near-threshold", type=float, default=0.95, help="default: 0.95")
    parser.add_argument("--no-exact-dedup", dest="exact_dedup", action="store_false",
                        help="keep documents whose text repeats an earlier one exactly")
    parser.add_argument("--skip-bad-records", action="store_true",
                        help="count and skip undecodable/invalid/field-less records instead of stopping")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing dataset at PREFIX (only once the new one is complete)")
    parser.add_argument("--restart", action="store_true",
                        help="discard an unfinished run at PREFIX made with other arguments")
    parser.add_argument("--chunk-mb", type=float, default=1.0,
                        help="text per work unit and resume point (default: 1 MB)")
    parser.add_argument("--no-progress", dest="progress", action="store_false", default=None,
                        help="no progress bars (they are off anyway when stderr is not a terminal)")


def run(args: argparse.Namespace) -> int:
    from opt_ds.data.preprocess import PreprocessConfig, preprocess
    from opt_ds.data.sources import BUNDLED_CORPUS

    inputs = list(args.inputs) + ([str(BUNDLED_CORPUS)] if args.bundled_corpus else [])
    cfg = PreprocessConfig(
        inputs=inputs, output_prefix=args.output_prefix, tokenizer=args.tokenizer, vocab_size=args.vocab_size,
        tokenizer_kind=args.tokenizer_kind, json_key=args.json_key, workers=args.workers, chunk_mb=args.chunk_mb,
        exact_dedup=args.exact_dedup, near_dedup=args.near_dedup, near_threshold=args.near_threshold,
        skip_bad_records=args.skip_bad_records, overwrite=args.overwrite, restart=args.restart)
    try:  # bad input raises a UserError, which `opt-ds` prints as one line (exit status 2)
        summary = preprocess(cfg, progress=args.progress)
    except KeyboardInterrupt:
        print("opt-ds preprocess: interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    print(format_summary(summary))
    return 0


def format_summary(s: dict) -> str:
    skipped = ", ".join(f"{why} {n}" for why, n in s["skipped"].items()) or "none"
    resumed = f"; resumed {s['resumed_chunks']} of {s['chunks']} chunks" if s["resumed_chunks"] else ""
    return "\n".join([
        f"wrote {s['output_prefix']}.bin/.idx: {s['documents_kept']:,} documents, {s['tokens']:,} tokens "
        f"({s['token_dtype']})",
        f"read {s['records_read']:,} records: dropped {s['exact_duplicates']:,} exact and "
        f"{s['near_duplicates']:,} near duplicates; skipped: {skipped}",
        f"tokenizer: {s['tokenizer']['directory']} ({s['tokenizer']['source']}, {s['tokenizer']['vocab_size']:,} entries)",
        f"summary: {s['output_prefix']}.summary.json; {s['seconds']:.1f} s with {s['workers']} worker(s){resumed}",
    ])
