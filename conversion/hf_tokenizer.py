"""The tokenizer of a Hugging Face export: `tokenizer.json` + `tokenizer_config.json` + `special_tokens_map.json`.

opt_ds tokenizes with a byte-level BPE (OPT's GPT-2 files, or one trained by `opt-ds preprocess`) whose
special tokens sit at OPT's ids: <s>=0, <pad>=1, </s>=2, <unk>=3. The export is that BPE as a `tokenizers`
JSON whose post-processor prepends </s> (OPT's BOS) when special tokens are asked for, as facebook/opt-*
tokenizers do; `AutoTokenizer` on it encodes text to the ids opt_ds gives (`encode(text)` without special
tokens, `encode(text, add_bos=True)` with them).

Where the tokenizer comes from: an opt_ds training checkpoint records its run config (data.tokenizer, or
the tokenizer `opt-ds preprocess` saved beside the first corpus); a Hugging Face source carries its own
files, copied as they are. Other sources record none: `--tokenizer` supplies it.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Optional

from opt_ds.data.tokenizer import (BOS_ID, EOS_ID, PAD_ID, SPECIAL_TOKENS, BPETokenizer, HFTokenizer, TokenizerError,
                                   load_tokenizer, tokenizer_of_run)

from conversion.files import ConversionError

HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                      "merges.txt")
SPECIAL_TOKENS_MAP = {"bos_token": SPECIAL_TOKENS[BOS_ID], "eos_token": SPECIAL_TOKENS[EOS_ID],
                      "pad_token": SPECIAL_TOKENS[PAD_ID], "unk_token": SPECIAL_TOKENS[3]}


class SourceTokenizer:
    """What the export writes as its tokenizer: an opt_ds tokenizer (byte-level BPE, or a tokenizer.json
    copied as it is), or an HF source's own files."""

    def __init__(self, tokenizer=None, hf_directory: Optional[Path] = None, origin: str = ""):
        self.tokenizer, self.hf_directory, self.origin = tokenizer, hf_directory, origin

    def vocab_size(self) -> Optional[int]:
        return self.tokenizer.vocab_size if self.tokenizer is not None else None

    def write(self, dst: Path, model_max_length: int) -> None:
        if self.hf_directory is not None:
            for name in HF_TOKENIZER_FILES:
                if (self.hf_directory / name).is_file():
                    shutil.copyfile(self.hf_directory / name, dst / name)
        elif isinstance(self.tokenizer, HFTokenizer):
            for name, path in self.tokenizer.files.items():
                shutil.copyfile(path, dst / name)
        else:
            write_bpe(self.tokenizer, dst, model_max_length)


def tokenizer_argument(spec: str, vocab_size: int) -> SourceTokenizer:
    """`--tokenizer SPEC` ('opt', a tokenizer.json, or a folder with one or with vocab.json + merges.txt),
    checked to fit the model."""
    try:
        tokenizer = load_tokenizer(spec)
    except TokenizerError as err:
        raise ConversionError(f"--tokenizer {spec}: {err}") from None
    return checked(SourceTokenizer(tokenizer, origin=f"--tokenizer {spec}"), vocab_size)


def checked(tokenizer: SourceTokenizer, vocab_size: int) -> SourceTokenizer:
    size = tokenizer.vocab_size()
    if size is not None and size > vocab_size:
        raise ConversionError(f"the tokenizer of {tokenizer.origin} has {size} entries, more than the model's "
                              f"vocabulary of {vocab_size}: it belongs to another model; pass the run's "
                              "tokenizer with --tokenizer")
    return tokenizer


def recorded_tokenizer(src: Path, fmt: str, tag: Optional[str], vocab_size: int) -> Optional[SourceTokenizer]:
    """The tokenizer the source records, or None when it records none."""
    if fmt == "hf":
        found = (src / "tokenizer.json").is_file() or (src / "vocab.json").is_file()
        return SourceTokenizer(hf_directory=src, origin=str(src)) if found else None
    if fmt != "opt_ds":
        return None
    from opt_ds.train import checkpoint
    from opt_ds.train.generate_cli import locate
    try:
        point = locate(src) if tag is None else checkpoint.describe(src, tag=tag)
    except checkpoint.CheckpointError:
        return None
    if point.run_state is None:
        return None     # weights only (written by `opt-ds convert`): no run config
    data = point.run_state["config"].get("data", {})
    try:
        tokenizer = tokenizer_of_run(data)
    except TokenizerError as err:
        raise ConversionError(f"{src}: the run's tokenizer cannot be loaded ({err}); pass it with --tokenizer") from None
    return checked(SourceTokenizer(tokenizer, origin=f"the run config of {src}"), vocab_size) if tokenizer else None


def write_bpe(bpe: BPETokenizer, dst: Path, model_max_length: int) -> None:
    from tokenizers import ByteLevelBPETokenizer, processors
    hf = ByteLevelBPETokenizer(str(bpe.vocab_file), str(bpe.merges_file))
    bos = SPECIAL_TOKENS[BOS_ID]
    hf.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, BOS_ID)]),
    ])
    hf.save(str(dst / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": model_max_length,
              "add_prefix_space": False, "clean_up_tokenization_spaces": False, **SPECIAL_TOKENS_MAP}
    (dst / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (dst / "special_tokens_map.json").write_text(json.dumps(SPECIAL_TOKENS_MAP, indent=2) + "\n")
