"""One conversion: detect the source format, open it, check the target, write it atomically, verify it."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

from conversion import hf, hf_tokenizer, meta, metaseq, opt_ds_format, universal
from conversion.canonical import Checkpoint, describe_shape, expected_shapes
from conversion.files import ConversionError, check_writable_destination, staged_directory
from conversion.formats import DTYPE_NAMES, FORMATS
from conversion.memory import check_max_memory, parse_size
from conversion.verify import verify

DTYPES = dict(zip(DTYPE_NAMES, (torch.float32, torch.float16, torch.bfloat16)))


def detect_format(path) -> str:
    """The format of the checkpoint at `path`; one error when it is none of them, or several at once."""
    path = Path(path)
    if not path.exists():
        raise ConversionError(f"{path}: no such file or directory")
    if path.is_file():
        if opt_ds_format.LAYER_FILE.match(path.name) or opt_ds_format.MP_RANK_FILE.match(path.name):
            raise ConversionError(f"{path} is one file of an opt_ds checkpoint; pass its directory")
        if path.suffix == ".pt":
            return "metaseq"
        raise ConversionError(f"{path}: unknown checkpoint file; pass a metaseq .pt file or a checkpoint directory "
                              "(Hugging Face, opt_ds, universal)")
    found = []
    names = {p.name for p in path.iterdir()}
    if "config.json" in names:
        found.append("hf")
    if meta.PARAMS in names and any(meta.SHARD_FILE.match(n) for n in names):
        found.append("meta")
    if universal.LATEST in names:
        found.append("universal")
    if "latest" in names or any(opt_ds_format.LAYER_FILE.match(n) for n in names) or \
            any(p.is_dir() and any(opt_ds_format.LAYER_FILE.match(q.name) for q in p.iterdir()) for p in path.iterdir()):
        found.append("opt_ds")
    if any(n.endswith(".pt") and not opt_ds_format.LAYER_FILE.match(n) and not opt_ds_format.MP_RANK_FILE.match(n)
           for n in names):
        found.append("metaseq")
    if len(found) == 1:
        return found[0]
    if not found:
        raise ConversionError(f"{path}: unknown format (no config.json, no opt_ds layer files, no metaseq .pt files); "
                              f"pass a checkpoint directory or --from one of {', '.join(FORMATS)}")
    raise ConversionError(f"{path} mixes checkpoint formats ({', '.join(found)}); put each checkpoint in its own "
                          "directory or pass --from FORMAT")


def open_checkpoint(path, fmt: str, *, tag: Optional[str] = None, num_heads: Optional[int] = None) -> Checkpoint:
    if fmt == "hf":
        return hf.read(path)
    if fmt == "meta":
        return meta.read(path)
    if fmt == "metaseq":
        return metaseq.read(path, num_heads)
    if fmt == "opt_ds":
        return opt_ds_format.read(path, tag, num_heads)
    if fmt == "universal":
        return universal.read(path)
    raise ConversionError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")


@dataclass
class Options:
    to: str
    src_format: Optional[str] = None
    tp: int = 1
    pp: int = 1
    tag: str = opt_ds_format.DEFAULT_TAG       # tag written for an opt_ds target
    src_tag: Optional[str] = None               # tag read from an opt_ds source (default: its `latest`)
    num_heads: Optional[int] = None             # for sources that do not record it
    dtype: Optional[str] = None                 # fp32 | fp16 | bf16; None keeps every tensor's dtype
    metaseq_layout: str = "parts"
    max_shard_bytes: int = hf.DEFAULT_MAX_SHARD_BYTES
    force: bool = False
    verify: bool = True
    reference: bool = True                      # also check against transformers when installed
    dry_run: bool = False
    tokenizer: Optional[str] = None             # HF target: 'opt' or a vocab.json + merges.txt folder
    max_memory: Optional[str] = None            # refuse to start when the estimated peak exceeds it ('64G')


def check_options(fmt: str, o: Options) -> None:
    if o.to not in FORMATS:
        raise ConversionError(f"unknown target format {o.to!r}; choose one of {', '.join(FORMATS)}")
    if o.tp < 1 or o.pp < 1:
        raise ConversionError(f"--tp and --pp must be >= 1 (got {o.tp}, {o.pp})")
    if o.num_heads is not None and o.num_heads < 1:
        raise ConversionError(f"--num-heads {o.num_heads} must be >= 1: the attention heads per layer of the source")
    if o.max_memory is not None:
        parse_size(o.max_memory)
    if o.max_shard_bytes < 1:
        raise ConversionError("--max-shard-size must be >= 1 (GiB per safetensors file), e.g. 5")
    if o.dtype is not None and o.dtype not in DTYPES:
        raise ConversionError(f"--dtype {o.dtype!r}: choose one of {', '.join(DTYPES)}")
    if o.tokenizer is not None and o.to != "hf":
        raise ConversionError(f"--tokenizer applies to --to hf (the export carries a tokenizer); {o.to} "
                              "checkpoints hold weights only: drop it")
    if o.to in ("hf", "universal") and (o.tp, o.pp) != (1, 1):
        raise ConversionError(f"--tp/--pp do not apply to {o.to} checkpoints, which are not split; drop them")
    if o.to in ("metaseq", "meta") and o.pp != 1:
        raise ConversionError(f"{o.to} checkpoints have no pipeline stages; drop --pp (--tp sets the MP parts)")
    if o.to == "universal":
        if fmt != "opt_ds":
            raise ConversionError("--to universal converts an opt_ds training checkpoint (weights + ZeRO optimizer "
                                  f"state); a {fmt} checkpoint has no DeepSpeed optimizer state, use --to opt_ds")
        if o.dtype is not None:
            raise ConversionError("--dtype does not apply to universal checkpoints (they hold fp32 master weights)")


def mapping_lines(ckpt: Checkpoint, o: Options) -> list:
    shape = ckpt.shape
    if o.to == "opt_ds":
        targets = opt_ds_format.target_locations(shape, o.tp)
    elif o.to == "metaseq":
        targets = metaseq.target_locations(shape, o.tp, o.metaseq_layout)
    elif o.to == "meta":
        targets = meta.target_locations(shape, o.tp)
    elif o.to == "hf":
        targets = hf.target_locations(shape)
    else:
        targets = {k: "zero/<pipeline parameter name>/{fp32,exp_avg,exp_avg_sq}.pt" for k in expected_shapes(shape)}
    cast = f" -> {o.dtype}" if o.dtype else ""
    return [f"{key} {list(size)}{cast}\n    from {ckpt.sources.get(key, '?')}\n    to   {targets[key]}"
            for key, size in expected_shapes(shape).items()]


def export_tokenizer(source: Checkpoint, src: Path, fmt: str, o: Options, out) -> Optional[hf_tokenizer.SourceTokenizer]:
    """The tokenizer an HF export carries: --tokenizer, else the one the source records (None: said so)."""
    if o.to != "hf":
        return None
    vocab = source.shape.vocab_size
    found = hf_tokenizer.tokenizer_argument(o.tokenizer, vocab) if o.tokenizer else \
        hf_tokenizer.recorded_tokenizer(src, fmt, o.src_tag, vocab)
    if found is None:
        out(f"note: {src} records no tokenizer, so the export has none (AutoTokenizer cannot load it); pass "
            "--tokenizer opt or --tokenizer DIR (vocab.json + merges.txt, e.g. PREFIX.tokenizer of the dataset)")
    else:
        out(f"tokenizer: from {found.origin}")
    return found


def write_target(ckpt: Checkpoint, src, staging: Path, o: Options, tokenizer=None) -> None:
    if o.to == "opt_ds":
        opt_ds_format.write(ckpt, staging, tp=o.tp, pp=o.pp, tag=o.tag)
    elif o.to == "metaseq":
        metaseq.write(ckpt, staging, parts=o.tp, layout=o.metaseq_layout)
    elif o.to == "meta":
        meta.write(ckpt, staging, parts=o.tp)
    elif o.to == "hf":
        hf.write(ckpt, staging, max_shard_bytes=o.max_shard_bytes)
        if tokenizer is not None:
            tokenizer.write(staging, model_max_length=ckpt.shape.max_position_embeddings)
    else:
        universal.write(src, staging, tag=o.src_tag, num_heads=o.num_heads)


def check_target_layout(ckpt: Checkpoint, o: Options) -> None:
    if o.to == "opt_ds":
        opt_ds_format.check_layout(ckpt.shape, o.tp, o.pp)
    elif o.to == "metaseq":
        metaseq.check_parts(ckpt.shape, o.tp)
    elif o.to == "meta":
        meta.check_parts(ckpt.shape, o.tp)


def convert(src, dst, o: Options, out: Callable[[str], None] = print) -> int:
    """Run one conversion; returns the exit code (0 ok, 1 verification failed). Raises ConversionError for
    bad input, always before anything is written."""
    src, dst = Path(src), Path(dst)
    if overlapping(src, dst):
        raise ConversionError(f"the destination {dst} overlaps the source {src}; write to a separate directory")
    fmt = o.src_format or detect_format(src)
    check_options(fmt, o)
    if fmt == "opt_ds":
        opt_ds_format.check_manifest(src, o.src_tag)
    if not o.dry_run:
        check_writable_destination(dst, o.force)
    source = open_checkpoint(src, fmt, tag=o.src_tag, num_heads=o.num_heads)
    check_target_layout(source, o)
    if o.max_memory is not None:
        check_max_memory(source.shape, o.max_memory)
    out(f"source: {source.origin}\nmodel:  {describe_shape(source.shape)}")
    tokenizer = export_tokenizer(source, src, fmt, o, out)
    if o.dry_run:
        out("\n".join(mapping_lines(source, o)))
        out(f"dry run: nothing written (would write {o.to} to {dst})")
        return 0
    with staged_directory(dst, o.force) as staging:
        write_target(source.with_dtype(DTYPES.get(o.dtype)), src, staging, o, tokenizer)
    out(f"wrote {o.to} checkpoint to {dst}")
    if source.optimizer_state and o.to != "universal":
        out(optimizer_state_note(source.optimizer_state, fmt))
    if o.to == "universal":
        out(f"resume from it at any TP/PP/DP with the DeepSpeed config entry {universal.LOAD_CONFIG} "
            f"(engine.load_checkpoint('{dst}') then reads {universal.LATEST})")
    if not o.verify:
        out("verify: skipped (--no-verify)")
        return 0
    report = verify(open_checkpoint(src, fmt, tag=o.src_tag, num_heads=o.num_heads),
                    open_checkpoint(dst, o.to, num_heads=o.num_heads), reference=o.reference)
    out(str(report))
    return 0 if report.ok else 1


def overlapping(src: Path, dst: Path) -> bool:
    a, b = src.resolve(), dst.resolve()
    return a == b or a in b.parents or b in a.parents


def optimizer_state_note(what: str, fmt: str) -> str:
    """The statement printed when the source holds optimizer state that a weights-only conversion drops."""
    note = (f"note: {what} is dropped: the target holds weights only (an opt_ds engine loads them with "
            "load_module_only=True), so training from it restarts Adam's moments and the LR schedule.")
    if fmt == "opt_ds":
        note += (" To change TP/PP/DP and keep the optimizer state, convert with --to universal and resume with "
                 "{\"checkpoint\": {\"load_universal\": true}}.")
    return note
