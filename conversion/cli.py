"""Convert OPT and LLaMA checkpoints between metaseq (OPT), Meta's consolidated.NN.pth (LLaMA), opt_ds
(DeepSpeed pipeline, any TP/PP), Hugging Face and
DeepSpeed universal checkpoints, and prove each conversion by comparing logits.

examples:
  opt-ds convert facebook-opt-125m/ ckpt/ --to opt_ds --tp 2 --pp 2
  opt-ds convert 125m/reshard-model_part-0.pt hf-125m/ --to hf
  opt-ds convert ckpt/ released/ --to metaseq --tp 2 --dtype fp16
  opt-ds convert llama-2-13b/ ckpt/ --to opt_ds --tp 2 --pp 4      # Meta's params.json + consolidated.NN.pth
  opt-ds convert run/checkpoints/ run/universal/ --to universal      # keeps the optimizer state
"""
from __future__ import annotations

import argparse
import signal
import sys
import warnings

from conversion.formats import DTYPE_NAMES, FORMATS

HELP = "convert checkpoints: metaseq, Hugging Face, opt_ds at any TP/PP, universal (verified by logits)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("source", help="checkpoint to read: a directory (HF, Meta, opt_ds, universal, metaseq) or a "
                                       "metaseq .pt file (for MP parts, any one part)")
    parser.add_argument("destination", help="directory to write; must be new or empty (see --force)")
    parser.add_argument("--to", required=True, choices=FORMATS, help="target format")
    parser.add_argument("--from", dest="src_format", choices=FORMATS, help="source format (default: detected)")
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel degree of an opt_ds target, or number "
                                                           "of metaseq / Meta MP parts (default 1)")
    parser.add_argument("--pp", type=int, default=1, help="pipeline stages of an opt_ds target (default 1)")
    parser.add_argument("--tag", default="global_step0", help="tag of an opt_ds target (default global_step0)")
    parser.add_argument("--src-tag", help="tag to read from an opt_ds source (default: the one `latest` names)")
    parser.add_argument("--num-heads", type=int, help="attention heads, for sources that do not record them")
    parser.add_argument("--dtype", choices=DTYPE_NAMES, help="cast every floating tensor (default: keep each "
                                                              "tensor's dtype; metaseq releases mix fp16 and fp32)")
    parser.add_argument("--metaseq-layout", choices=("parts", "restored"), default="parts",
                        help="metaseq target: reshard-model_part-K.pt with fused K,V,Q (metaseq's own loader, "
                             "reshard_mp) or a single restored.pt with separate q/k/v (HF's converter)")
    parser.add_argument("--max-shard-size", type=int, default=5, help="HF target: GiB per safetensors file")
    parser.add_argument("--tokenizer", help="HF target: the tokenizer to export ('opt' or a folder with vocab.json + "
                                            "merges.txt); default: the one the source records")
    parser.add_argument("--max-memory", metavar="SIZE", help="refuse to start when the estimated peak memory "
                        "exceeds SIZE (e.g. 64G; K, M, G, T are powers of 1024); see docs/conversion.md")
    parser.add_argument("--dry-run", action="store_true", help="print the key mapping and write nothing")
    parser.add_argument("--no-verify", dest="verify", action="store_false",
                        help="skip the logit comparison after writing (it streams both models, a layer at a time)")
    parser.add_argument("--force", action="store_true", help="replace a non-empty destination")


def _stop(signum, frame):
    """SIGTERM (a job's time limit, `kill`) unwinds like Ctrl-C, so the staging folder is removed."""
    raise SystemExit(128 + signum)


def run(args: argparse.Namespace) -> int:
    from conversion.convert import Options, convert
    from conversion.files import ConversionError
    options = Options(to=args.to, src_format=args.src_format, tp=args.tp, pp=args.pp, tag=args.tag,
                      src_tag=args.src_tag, num_heads=args.num_heads, dtype=args.dtype,
                      metaseq_layout=args.metaseq_layout, max_shard_bytes=args.max_shard_size * 2 ** 30,
                      force=args.force, verify=args.verify, dry_run=args.dry_run,
                      tokenizer=args.tokenizer, max_memory=args.max_memory)
    previous = signal.signal(signal.SIGTERM, _stop)
    with warnings.catch_warnings():             # keeps opt_ds.quiet's filters of third-party start-up noise
        warnings.showwarning = lambda message, *_, **__: print(f"warning: {message}", file=sys.stderr)
        try:
            return convert(args.source, args.destination, options)
        except ConversionError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        finally:
            signal.signal(signal.SIGTERM, previous)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="opt-ds convert", description=__doc__)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
