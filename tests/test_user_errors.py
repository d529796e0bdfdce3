"""Every user-error `raise` in opt_ds/config, opt_ds/data and conversion/, triggered through the real entry
points, with its message checked (the key or file it names, and the fix it offers), and nothing on disk
changed by the bad input (a digest of the case's folder before and after).

`test_every_raise_site_is_in_the_table` finds the raise sites by reading the source (a `raise X(...)` of a
UserError subclass) and fails when one is not reached by a row of CASES, so a new check gets a row here.
"""
from __future__ import annotations

import ast
import dataclasses
import fcntl
import hashlib
import importlib
import json
import os
import shutil
import struct
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Callable

import pytest
import torch

from conftest import TINY_MODEL
from opt_ds.config import RunConfig, load_config
from opt_ds.config.ranges import RANGES, OneOf, Range
from opt_ds.errors import UserError

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("opt_ds/config", "opt_ds/data", "conversion")
BASE = TINY_MODEL + ["batch.global_batch_size=8", "batch.micro_batch_size=2"]


# --- the table ------------------------------------------------------------------------------------------

@dataclass
class Case:
    id: str
    trigger: Callable          # (folder, resources) -> anything; must raise a UserError
    expect: tuple              # substrings of the message
    setup: Callable = None     # (folder, resources) -> None, before the "nothing changed" digest
    may_write: str = None      # a sub-folder the failed command may leave (preprocess's resumable work folder)


CASES: list = []


def case(id: str, trigger, *expect, setup=None, may_write=None) -> None:
    CASES.append(Case(id, trigger, expect, setup, may_write))


def config(*overrides, world_size=None, path=None):
    return load_config(path, BASE + list(overrides), world_size=world_size)


def without_module(name: str, call):
    """Run `call` as if the package `name` were not installed (Python's own import block: None in sys.modules)."""
    import sys
    saved = sys.modules.get(name, False)
    sys.modules[name] = None
    try:
        return call()
    finally:
        if saved is False:
            del sys.modules[name]
        else:
            sys.modules[name] = saved


# config/loading.py
case("yaml-missing", lambda t, r: config(path=t / "nope.yaml"), "nope.yaml' does not exist", "ds_configs/demo.yaml")
case("yaml-invalid", lambda t, r: config(path=t / "c.yaml"), "not valid YAML",
     setup=lambda t, r: (t / "c.yaml").write_text("model: [1, 2\n"))
case("yaml-not-mapping", lambda t, r: config(path=t / "c.yaml"), "top level must be a mapping",
     setup=lambda t, r: (t / "c.yaml").write_text("- 1\n- 2\n"))
case("override-no-equals", lambda t, r: config("train.steps"), "not of the form section.key=value",
     "train.steps=100")
case("override-not-section", lambda t, r: config("train.steps=5", "train.steps.x=1"), "'steps' is not a section")
case("unknown-key", lambda t, r: config("parallel.tensr=2"), "unknown key 'parallel.tensr'", "did you mean 'tensor'")
case("section-not-mapping", lambda t, r: config("model=3"), "model: expected a mapping of keys, got 3")
case("expected-list", lambda t, r: config("optimizer.betas=0.9"), "optimizer.betas: expected a list")
case("expected-bool", lambda t, r: config("train.tensorboard=maybe"), "train.tensorboard: expected true or false")
case("expected-int", lambda t, r: config("train.steps=many"), "train.steps: expected an integer, got 'many'")
case("expected-number", lambda t, r: config("optimizer.lr=fast"), "optimizer.lr: expected a number")
case("expected-string", lambda t, r: config(path=t / "c.yaml"), "precision.dtype: expected a string",
     setup=lambda t, r: (t / "c.yaml").write_text("precision:\n  dtype: 16\n"))

# config/sections.py
case("unknown-preset", lambda t, r: load_config(None, ["model.preset=opt-7b"]), "model.preset:", "opt-6.7b")
case("no-preset-no-shape", lambda t, r: load_config(None, ["model.num_layers=2"]),
     "set model.preset (e.g. opt-125m) or all of hidden_size, num_heads, ffn_hidden_size")
case("unknown-family", lambda t, r: config("model.family=gpt"), "model.family: unknown model family 'gpt'",
     "choose one of opt, llama")
case("family-disagrees-with-preset", lambda t, r: load_config(None, ["model.preset=opt-125m", "model.family=llama"]),
     "model.family llama disagrees with model.preset opt-125m", "drop model.family or pick a llama preset")
case("key-of-another-family", lambda t, r: config("model.num_kv_heads=2"),
     "model.num_kv_heads is not a setting of the opt family", "remove it")
case("llama-kv-heads-not-dividing", lambda t, r: config("model.family=llama", "model.num_kv_heads=3"),
     "model: num_heads 4 is not divisible by num_kv_heads 3", "choose num_kv_heads from 1, 2, 4")

# config/resolve.py
case("hidden-not-divisible-by-heads", lambda t, r: config("model.num_heads=3"),
     "model.hidden_size 64 is not divisible by model.num_heads 3")
case("heads-not-divisible-by-tp", lambda t, r: config("parallel.tensor=3", "model.hidden_size=96",
                                                       "model.ffn_hidden_size=192", world_size=3),
     "model.num_heads 4 is not divisible by parallel.tensor 3", "1, 2, 4")
case("ffn-not-divisible-by-tp", lambda t, r: config("parallel.tensor=2", "model.ffn_hidden_size=129", world_size=2),
     "model.ffn_hidden_size 129 is not divisible by parallel.tensor 2")
case("vocab-not-divisible-by-tp", lambda t, r: config("parallel.tensor=2", "model.vocab_size=511", world_size=2),
     "model.vocab_size 511 is not divisible by parallel.tensor 2", "pad the vocabulary")
case("fewer-layers-than-stages", lambda t, r: config("parallel.pipeline=8", world_size=8),
     "model.num_layers 4 is fewer than parallel.pipeline 8 stages", "use at most 4 pipeline stages")
case("layer-recompute-without-full", lambda t, r: config("parallel.recompute=selective",
                                                          "parallel.activation_checkpoint_interval=2"),
     "recomputes whole decoder layers, but parallel.recompute is selective", "parallel.recompute=full")
case("sequence-parallel-seq-not-divisible", lambda t, r: config("parallel.tensor=2", "parallel.sequence_parallel=true",
                                                                "batch.seq_length=33", world_size=2),
     "batch.seq_length 33 is not divisible by parallel.tensor 2", "parallel.sequence_parallel=false")
case("batch-arithmetic", lambda t, r: config("batch.gradient_accumulation_steps=3", world_size=2),
     "global_batch_size 8 != micro_batch_size 2 x gradient_accumulation_steps 3", "drop gradient_accumulation_steps")
case("batch-not-multiple", lambda t, r: config(world_size=3),
     "global_batch_size 8 is not a multiple of micro_batch_size 2 x data-parallel degree 3", "use e.g. 6")
case("seq-beyond-positions", lambda t, r: config("batch.seq_length=128"),
     "batch.seq_length 128 exceeds model.max_position_embeddings 64")
case("spike-warmup-beyond-window", lambda t, r: config("health.spike_window=5"),
     "health.spike_warmup_steps 10 exceeds health.spike_window 5", "raise the window or lower the warm-up")
case("override-not-yaml", lambda t, r: config("data.train=[{path: corpus"), "the value is not valid YAML",
     "quote it for the shell")
case("wandb-not-installed", lambda t, r: without_module("wandb", lambda: config("train.wandb.project=p")),
     "train.wandb.project is set but wandb is not installed", "pip install 'opt_ds[wandb]'")
case("betas-not-two", lambda t, r: config("optimizer.betas=[0.9]"), "optimizer.betas must be two numbers",
     "optimizer.betas=[0.9, 0.95]")
case("data-train-empty", lambda t, r: config("data.train=[]"), "data.train is empty",
     "drop data.train to train on synthetic tokens")
case("faults-without-env", lambda t, r: config("faults.nan_at_step=3"), "faults: nan_at_step=3",
     "OPT_DS_FAULT_INJECTION=1")
case("faults-rank", lambda t, r: config("faults.rank=4", world_size=2), "faults.rank 4 is not a rank of this 2-process")
case("world-not-multiple", lambda t, r: config("parallel.tensor=2", "parallel.pipeline=2", world_size=6),
     "world size 6 is not a multiple of TP x PP = 2 x 2", "launch a multiple of 4 processes")
case("parallel-data-bad", lambda t, r: config("parallel.data=0"), "parallel.data must be a positive integer or 'auto'")
case("world-not-layout", lambda t, r: config("parallel.data=2", world_size=4),
     "world size 4 != TP x PP x DP = 1 x 1 x 2 = 2", "launch 2 processes or set parallel.data=auto")

# config/deepspeed_json.py
case("ds-json-missing", lambda t, r: config(f"deepspeed={t / 'ds.json'}"), "ds.json' does not exist",
     "remove the key")
case("ds-json-invalid", lambda t, r: config(f"deepspeed={t / 'ds.json'}"), "is not valid JSON",
     setup=lambda t, r: (t / "ds.json").write_text("{"))
case("ds-json-disagrees", lambda t, r: config(f"deepspeed={t / 'ds.json'}"),
     "train_batch_size=99 but the config gives 8", "batch.global_batch_size",
     setup=lambda t, r: (t / "ds.json").write_text('{"train_batch_size": 99}'))

# config/ranges.py: the values issue 9 found, then one violation of every declared range (generated below)
ISSUE_RANGES = [
    ("model.num_heads=0", "model.num_heads 0 must be >= 1", "model.num_heads=12"),
    ("model.hidden_size=0", "model.hidden_size 0 must be >= 1", "model.hidden_size=768"),
    ("model.ffn_hidden_size=-256", "model.ffn_hidden_size -256 must be >= 1", "model.ffn_hidden_size=3072"),
    ("model.vocab_size=0", "model.vocab_size 0 must be >= 1", "model.vocab_size=50272"),
    ("model.num_layers=-2", "model.num_layers -2 must be >= 1", "model.num_layers=12"),
    ("optimizer.lr=-1", "optimizer.lr -1.0 must be > 0", "optimizer.lr=6e-4"),
    ("optimizer.betas=[0.9,1.5]", "optimizer.betas[1] 1.5 must be in [0, 1)", "optimizer.betas=[0.9, 0.95]"),
    ("model.dropout=2.0", "model.dropout 2.0 must be in [0, 1)", "model.dropout=0.1"),
    ("train.log_interval=0", "train.log_interval 0 must be >= 1", "train.log_interval=1"),
    ("train.eval_iters=0", "train.eval_iters 0 must be >= 1", "train.eval_iters=2"),
    ("train.steps=0", "train.steps 0 must be >= 1", "train.steps=100"),
    ("train.steps=-5", "train.steps -5 must be >= 1", "train.steps=100"),
    ("batch.seq_length=0", "batch.seq_length 0 must be >= 1", "batch.seq_length=2048"),
    ("optimizer.warmup_steps=-3", "optimizer.warmup_steps -3 must be >= 0", "0 turns it off"),
    ("train.save_interval=-5", "train.save_interval -5 must be >= 0", "0 saves only at the end"),
    ("optimizer.clip_grad=-1", "optimizer.clip_grad -1.0 must be >= 0", "optimizer.clip_grad=1.0"),
    ("optimizer.lr=.nan", "optimizer.lr nan must be > 0", "optimizer.lr=6e-4"),
    ("parallel.zero_stage=2", "parallel.zero_stage 2 must be in [0, 1]", "ZeRO stage 0 or 1 only"),
    ("precision.dtype=fp8", "precision.dtype 'fp8': choose fp32, bf16 or fp16"),
    ("data.train=[{path: x, weight: 0}]", "data.train[0].weight 0.0 must be > 0", "weight: 1.0"),
]
for override, *expect in ISSUE_RANGES:
    case(f"range {override}", lambda t, r, o=override: config(o), *expect)
case("save-dir-is-a-file", lambda t, r: config(f"train.save_dir={t / 'f'}"), "is a file, not a folder",
     "name a folder for the checkpoints", setup=lambda t, r: (t / "f").write_text("x"))
case("log-dir-is-a-file", lambda t, r: config(f"train.log_dir={t / 'f'}"), "train.log_dir", "is a file, not a folder",
     setup=lambda t, r: (t / "f").write_text("x"))


def _violation(rule):
    """A value outside `rule`: below its low bound, else above its high bound, else not a choice."""
    if isinstance(rule, OneOf):
        return "no-such-choice"
    if rule.low is not None:
        return rule.low if rule.low_open else rule.low - 1
    return rule.high if rule.high_open else rule.high + 1


def _dotted(cls, section=None, prefix: str = "") -> str:
    """The config path of a section class, nested ones included (BlendEntry lives inside data.train)."""
    section = RunConfig() if section is None else section
    for f in dataclasses.fields(section):
        value = getattr(section, f.name)
        if type(value) is cls:
            return prefix + f.name
        if dataclasses.is_dataclass(value):
            try:
                return _dotted(cls, value, f"{prefix}{f.name}.")
            except KeyError:
                pass
    raise KeyError(cls)


for section, rules in RANGES.items():
    for name, rule in rules.items():
        if not isinstance(rule, (Range, OneOf)) or section.__name__ == "BlendEntry":
            continue
        key = f"{_dotted(section)}.{name}"
        value = _violation(rule)
        text = json.dumps([value, value]) if name == "betas" else str(value)
        env_needed = section.__name__ == "FaultsConfig"
        case(f"declared range {key}={text}", lambda t, r, k=key, v=text: config(f"{k}={v}"),
             f"{key}{'[0]' if name == 'betas' else ''} ", "must be" if isinstance(rule, Range) else ": choose")


# --- data: resources shared by the rows (made once, never changed by a row) -------------------------------

class Resources:
    def __init__(self, root: Path):
        self.root = root

    def _preprocessed(self, name: str, texts: list, **options) -> Path:
        from opt_ds.data.preprocess import PreprocessConfig, preprocess
        source = self.root / f"{name}.jsonl"
        source.write_text("".join(json.dumps({"text": text}) + "\n" for text in texts))
        preprocess(PreprocessConfig(inputs=[str(source)], output_prefix=str(self.root / name), **options),
                   progress=False)
        return self.root / name

    @cached_property
    def corpus(self) -> Path:
        """A 40-document dataset preprocessed with OPT's tokenizer (with .tokenizer and .summary.json)."""
        return self._preprocessed("a", [f"document {i}: " + "the quick brown fox " * (i % 7 + 1) for i in range(40)],
                                  tokenizer="opt")

    @cached_property
    def other_corpus(self) -> Path:
        """Another dataset, with its own trained tokenizer (a different .bin size from `corpus`)."""
        return self._preprocessed("b", [f"line {i} " + "lorem ipsum dolor " * (i % 5 + 2) for i in range(60)],
                                  vocab_size=300)

    @cached_property
    def hf_dir(self) -> Path:
        from conversion_helpers import tiny_hf_model
        path = self.root / "hf"
        tiny_hf_model("pre_ln").save_pretrained(path)
        return path

    @cached_property
    def hf_model(self):
        from conversion_helpers import tiny_hf_model
        return tiny_hf_model("pre_ln")

    @cached_property
    def opt_ds_dir(self) -> Path:
        """A TP=2 x PP=2 weights-only opt_ds checkpoint."""
        path = self.root / "ods"
        assert converting(self.hf_dir, path, to="opt_ds", tp=2, pp=2) == 0
        return path

    @cached_property
    def metaseq_dir(self) -> Path:
        from conversion_helpers import write_metaseq_parts
        path = self.root / "metaseq"
        write_metaseq_parts(self.hf_model, path, parts=2)
        return path

    @cached_property
    def meta_dir(self) -> Path:
        """A 2-shard Meta LLaMA release (params.json + consolidated.0N.pth) of test_conversion_llama_meta's shape."""
        from hf_llama_reference import random_hf_llama
        from test_conversion_llama_meta import SHAPE, write_meta
        path = self.root / "meta"
        write_meta(random_hf_llama(SHAPE), path)
        return path

    @cached_property
    def hf_tokenizer(self) -> Path:
        """A Hugging Face tokenizer.json whose tokens name no end-of-document token (<s>, </s>, ... absent)."""
        from tokenizers import Tokenizer, models
        path = self.root / "hf-tok" / "tokenizer.json"
        path.parent.mkdir()
        Tokenizer(models.WordLevel({"[UNK]": 0, "hello": 1, "world": 2}, unk_token="[UNK]")).save(str(path))
        return path


def converting(src, dst, **options):
    from conversion.convert import Options, convert
    return convert(src, dst, Options(verify=False, **options), out=lambda _: None)


def copy_pair(src: Path, dst: Path, *, bin_from: Path = None, idx_from: Path = None, tokenizer: bool = True) -> Path:
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile((bin_from or src).with_suffix(".bin"), dst.with_suffix(".bin"))
    shutil.copyfile((idx_from or src).with_suffix(".idx"), dst.with_suffix(".idx"))
    if tokenizer and src.with_suffix(".tokenizer").is_dir():
        shutil.copytree(src.with_suffix(".tokenizer"), dst.with_suffix(".tokenizer"))
    return dst


def build(blend, split="90,10,0", seq=16, train=10, valid=1, cache=None, vocab=50272):
    from opt_ds.data.datasets import build_datasets
    return build_datasets(blend, split, seq, 1, train, valid, cache, vocab_size=vocab)


def rewrite_idx(path: Path, offset: int, data: bytes) -> None:
    raw = bytearray(path.read_bytes())
    raw[offset:offset + len(data)] = data
    path.write_bytes(bytes(raw))


# data/datasets.py
case("data-seq-length", lambda t, r: build([(r.corpus, 1.0)], seq=0), "need seq_length >= 1")
case("data-cache-unwritable", lambda t, r: build([(r.corpus, 1.0)], cache=t / "file" / "cache"),
     "cannot create the index cache", "choose a writable cache_dir", setup=lambda t, r: (t / "file").write_text("x"))
case("data-missing", lambda t, r: build([(t / "missing", 1.0)]), "no dataset at", "opt-ds preprocess")
case("data-blend-empty", lambda t, r: build([]), "the blend is empty")
case("data-blend-entry", lambda t, r: build([(r.corpus,)]), "is not a (dataset prefix, weight) pair")
case("data-blend-weight", lambda t, r: build([(r.corpus, -1.0)]), "blend weight -1.0", "must be a positive number")
case("data-split-format", lambda t, r: build([(r.corpus, 1.0)], split="90;10"), "not 'train,valid,test' weights")
case("data-split-no-train", lambda t, r: build([(r.corpus, 1.0)], split="0,10,0"), "gives training no share")
case("data-split-too-small", lambda t, r: build([(r.corpus, 1.0)], split="999,1,0"),
     "has 40 documents: the split gives its valid part none", "Use a larger valid share")
case("data-token-beyond-vocab", lambda t, r: build([(t / "bare" / "a", 1.0)], vocab=600),
     "beyond vocab_size=600", "raise model.vocab_size",
     setup=lambda t, r: copy_pair(r.corpus, t / "bare" / "a", tokenizer=False))
case("data-tokenizer-beyond-vocab", lambda t, r: build([(r.corpus, 1.0)], vocab=1000),
     "vocabulary of 50265 entries, more than vocab_size=1000", "raise the model's vocabulary size")
case("data-mixed-tokenizers", lambda t, r: build([(r.corpus, 1.0), (r.other_corpus, 1.0)]), "mixes tokenizers",
     "same --tokenizer")
case("data-blend-valid-too-short", lambda t, r: build([(r.corpus, 1.0), (r.corpus, 1.0)], seq=64, cache=t / "cache"),
     "the valid part of a corpus of the blend holds too few tokens for one sample of 64",
     "give it a larger share of the split", may_write="cache")
case("data-no-tokenizer-no-vocab", lambda t, r: build([(t / "bare" / "a", 1.0)], vocab=None),
     "no tokenizer saved beside", "pass vocab_size",
     setup=lambda t, r: copy_pair(r.corpus, t / "bare" / "a", tokenizer=False))

# data/integrity.py
IDX_HEADER = 9 + 8 + 1 + 8 + 8
case("idx-garbage", lambda t, r: build([(t / "d" / "a", 1.0)]), "is not a megatron index", "opt-ds preprocess",
     setup=lambda t, r: (copy_pair(r.corpus, t / "d" / "a"), (t / "d" / "a.idx").write_bytes(b"garbage" * 20)))
case("idx-version", lambda t, r: build([(t / "d" / "a", 1.0)]), "index version 7", "make the pair again",
     setup=lambda t, r: (copy_pair(r.corpus, t / "d" / "a"), rewrite_idx(t / "d" / "a.idx", 9, struct.pack("<Q", 7))))
case("idx-truncated", lambda t, r: build([(t / "d" / "a", 1.0)]), "it is truncated or damaged",
     setup=lambda t, r: (copy_pair(r.corpus, t / "d" / "a"),
                         os.truncate(t / "d" / "a.idx", (t / "d" / "a.idx").stat().st_size - 8)))
case("idx-offsets", lambda t, r: build([(t / "d" / "a", 1.0)]), "document offsets do not follow from its lengths",
     setup=lambda t, r: (copy_pair(r.corpus, t / "d" / "a"),
                         rewrite_idx(t / "d" / "a.idx", IDX_HEADER + 4 * 40 + 8, struct.pack("<q", 3))))
case("bin-of-another-dataset", lambda t, r: build([(t / "d" / "a", 1.0)]), "do not belong together",
     "a .bin beside another dataset's .idx",
     setup=lambda t, r: copy_pair(r.corpus, t / "d" / "a", bin_from=r.other_corpus))
case("bin-truncated", lambda t, r: build([(t / "d" / "a", 1.0)]), "do not belong together",
     setup=lambda t, r: (copy_pair(r.corpus, t / "d" / "a"),
                         os.truncate(t / "d" / "a.bin", (t / "d" / "a.bin").stat().st_size - 2)))
case("summary-mismatch", lambda t, r: build([(t / "d" / "a", 1.0)]), "recorded 41 documents", "different runs",
     setup=lambda t, r: (copy_pair(r.corpus, t / "d" / "a"), (t / "d" / "a.summary.json").write_text(
         json.dumps({**json.loads(r.corpus.with_suffix(".summary.json").read_text()), "documents_kept": 41}))))


# data/tokenizer.py
def _tokenizer(t, r):
    from opt_ds.data.tokenizer import BPETokenizer
    return BPETokenizer.load(t / "tok")


def _write_tokenizer(t, vocab: str, merges: str = "#version: 0.2\n"):
    (t / "tok").mkdir()
    (t / "tok" / "vocab.json").write_text(vocab)
    (t / "tok" / "merges.txt").write_text(merges)


SPECIALS = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3}
case("tokenizer-missing", _tokenizer, "no tokenizer in", "expected vocab.json and merges.txt",
     setup=lambda t, r: (t / "tok").mkdir())
case("tokenizer-vocab-unreadable", _tokenizer, "cannot read the vocabulary",
     setup=lambda t, r: _write_tokenizer(t, "{not json"))
case("tokenizer-special-ids", _tokenizer, "does not use OPT's special-token ids", "opt-ds preprocess --vocab-size",
     setup=lambda t, r: _write_tokenizer(t, json.dumps({"<s>": 3, "<pad>": 1, "</s>": 2, "<unk>": 0})))
case("tokenizer-merges", _tokenizer, "cannot load", "merges.txt",
     setup=lambda t, r: _write_tokenizer(t, json.dumps(SPECIALS), "#version: 0.2\nq z\n"))
case("tokenizer-too-small", lambda t, r: importlib.import_module("opt_ds.data.tokenizer").train_bpe(
    ["a b"], 10, t / "out"), "vocabulary size 10 is too small", "at least 260")


def _hf_tokenizer(t, r):
    return importlib.import_module("opt_ds.data.tokenizer").load_tokenizer(t / "tok")


def _hf_tokenizer_dir(t, r, config: str = None, tokenizer: str = None):
    (t / "tok").mkdir()
    if tokenizer is None:
        shutil.copyfile(r.hf_tokenizer, t / "tok" / "tokenizer.json")
    else:
        (t / "tok" / "tokenizer.json").write_text(tokenizer)
    if config is not None:
        (t / "tok" / "tokenizer_config.json").write_text(config)


case("hf-tokenizer-unloadable", _hf_tokenizer, "cannot load", "tokenizer.json",
     setup=lambda t, r: _hf_tokenizer_dir(t, r, tokenizer='{"model": {"type": "BPE"}}'))
case("hf-tokenizer-no-eos", _hf_tokenizer, "tokenizer.json: cannot tell its end-of-document token",
     "put a tokenizer_config.json with an eos_token beside it", setup=_hf_tokenizer_dir)
case("hf-tokenizer-config-invalid", _hf_tokenizer, "cannot read", "tokenizer_config.json",
     setup=lambda t, r: _hf_tokenizer_dir(t, r, config="{not json"))


# data/preprocess.py, sources.py, workdir.py
def prep(t, inputs=None, output_prefix=None, **options):
    from opt_ds.data.preprocess import PreprocessConfig, preprocess
    options.setdefault("tokenizer", "opt")
    inputs = [str(t / "in.jsonl")] if inputs is None else inputs
    output_prefix = str(t / "out" / "c") if output_prefix is None else output_prefix
    return preprocess(PreprocessConfig(inputs=inputs, output_prefix=output_prefix, **options), progress=False)


def _jsonl(t, lines=('{"text": "hello world"}',)):
    (t / "in.jsonl").write_text("\n".join(lines) + "\n")


case("prep-tokenizer-and-vocab", lambda t, r: prep(t, vocab_size=300), "give exactly one of --tokenizer",
     setup=lambda t, r: _jsonl(t))
case("prep-vocab-range", lambda t, r: prep(t, tokenizer=None, vocab_size=5), "--vocab-size 5 is out of range",
     setup=lambda t, r: _jsonl(t))
case("prep-json-key", lambda t, r: prep(t, json_key=""), "--json-key is empty", setup=lambda t, r: _jsonl(t))
case("prep-workers", lambda t, r: prep(t, workers=0), "--workers 0: use 1 or more", setup=lambda t, r: _jsonl(t))
case("prep-chunk", lambda t, r: prep(t, chunk_mb=0), "--chunk-mb 0: use a positive size",
     setup=lambda t, r: _jsonl(t))
case("prep-near-threshold", lambda t, r: prep(t, near_threshold=1.5), "--near-threshold 1.5",
     "Jaccard similarity in (0, 1]", setup=lambda t, r: _jsonl(t))
case("prep-bad-tokenizer", lambda t, r: prep(t, tokenizer=str(t)), "--tokenizer", "no tokenizer in",
     setup=lambda t, r: _jsonl(t))
case("prep-output-is-dir", lambda t, r: prep(t, output_prefix=str(t)), "is a directory; give a path prefix",
     setup=lambda t, r: _jsonl(t))
case("prep-output-exists", lambda t, r: prep(t), "output already exists", "Pass --overwrite",
     setup=lambda t, r: (_jsonl(t), (t / "out").mkdir(), (t / "out" / "c.bin").write_bytes(b"")))
WORK = "out"    # preprocess keeps its work folder out/c.partial, so a rerun resumes (or --restart discards it)
case("prep-bad-record", lambda t, r: prep(t), "in.jsonl:2: not valid JSON", "--skip-bad-records",
     setup=lambda t, r: _jsonl(t, ('{"text": "a"}', "{oops")), may_write=WORK)
case("prep-nothing-left", lambda t, r: prep(t), "no documents left to write", "check the inputs",
     setup=lambda t, r: _jsonl(t, ('{"text": "   "}',)), may_write=WORK)
case("input-unknown-type", lambda t, r: prep(t, inputs=[str(t / "in.csv")]), "unknown input type",
     "Rename the file", setup=lambda t, r: (t / "in.csv").write_text("a,b\n"))
case("input-none", lambda t, r: prep(t, inputs=[]), "no input given")
case("input-empty-dir", lambda t, r: prep(t, inputs=[str(t / "d")]), "directory holds no input files",
     setup=lambda t, r: (t / "d").mkdir())
case("input-missing", lambda t, r: prep(t, inputs=[str(t / "missing.txt")]), "no such file or directory",
     "check the path")
case("input-unreadable-gzip", lambda t, r: prep(t, inputs=[str(t / "in.jsonl.gz")]), "cannot read",
     "check the file is complete", setup=lambda t, r: (t / "in.jsonl.gz").write_bytes(b"not gzip at all"),
     may_write=WORK)


def _hold_lock(t):
    """Another preprocess holds the work folder's lock (an open file description with an flock)."""
    _jsonl(t)
    work = t / "out" / "c.partial"
    work.mkdir(parents=True)
    holder = open(work / "lock", "w")
    fcntl.flock(holder, fcntl.LOCK_EX | fcntl.LOCK_NB)
    _held.append(holder)


_held: list = []
case("workdir-locked", lambda t, r: prep(t), "another `opt-ds preprocess` is writing", "wait for it to finish",
     setup=lambda t, r: _hold_lock(t))
case("workdir-other-run", lambda t, r: prep(t), "holds an unfinished run with other arguments", "--restart",
     setup=lambda t, r: (_jsonl(t), (t / "out" / "c.partial").mkdir(parents=True),
                         (t / "out" / "c.partial" / "manifest.json").write_text('{"inputs": "other"}')),
     may_write=WORK)


def _as_user(make_unwritable):
    """A check of file permissions; root passes every permission check, so there os.access answers False
    for the one path (the check itself still runs for real as an ordinary user, e.g. in CI)."""
    def trigger(t, r):
        path, mode = make_unwritable(t)
        if os.geteuid() != 0:
            os.chmod(path, mode)
            try:
                return prep(t, inputs=[str(t / "in.jsonl")])
            finally:
                os.chmod(path, 0o755)
        real = os.access
        os.access = lambda p, m, **kw: False if Path(p) == path else real(p, m, **kw)  # noqa: E731
        try:
            return prep(t, inputs=[str(t / "in.jsonl")])
        finally:
            os.access = real
    return trigger


case("input-unreadable", _as_user(lambda t: (t / "in.jsonl", 0o000)), "not readable; fix its permissions",
     setup=lambda t, r: _jsonl(t))
case("output-unwritable", _as_user(lambda t: (t / "out", 0o555)), "cannot write under",
     "choose an --output-prefix in a writable directory", setup=lambda t, r: (_jsonl(t), (t / "out").mkdir()))


# --- conversion ------------------------------------------------------------------------------------------

def conv(t, r, src, dst_name="dst", **options):
    return converting(src, t / dst_name, **options)


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, symlinks=True)
    return dst


def _edit_config(t, r, **changes):
    _copy(r.hf_dir, t / "hf")
    config = json.loads((t / "hf" / "config.json").read_text())
    for key, value in changes.items():
        if value is ...:
            config.pop(key)
        else:
            config[key] = value
    (t / "hf" / "config.json").write_text(json.dumps(config))


# conversion/convert.py
case("conv-no-source", lambda t, r: conv(t, r, t / "missing", to="hf"), "no such file or directory")
case("conv-one-opt-ds-file", lambda t, r: conv(t, r, t / "layer_00-model_00-model_states.pt", to="hf"),
     "is one file of an opt_ds checkpoint; pass its directory",
     setup=lambda t, r: (t / "layer_00-model_00-model_states.pt").write_bytes(b"x"))
case("conv-unknown-file", lambda t, r: conv(t, r, t / "model.onnx", to="hf"), "unknown checkpoint file",
     setup=lambda t, r: (t / "model.onnx").write_bytes(b"x"))
case("conv-unknown-dir", lambda t, r: conv(t, r, t / "d", to="hf"), "unknown format", "--from",
     setup=lambda t, r: ((t / "d").mkdir(), (t / "d" / "x.txt").write_text("x")))
case("conv-mixed", lambda t, r: conv(t, r, t / "d", to="hf"), "mixes checkpoint formats (hf, metaseq)",
     setup=lambda t, r: ((t / "d").mkdir(), (t / "d" / "config.json").write_text("{}"), (t / "d" / "a.pt").write_bytes(b"")))
case("conv-unknown-from", lambda t, r: importlib.import_module("conversion.convert").open_checkpoint(r.hf_dir, "onnx"),
     "unknown format 'onnx'")
case("conv-unknown-to", lambda t, r: conv(t, r, r.hf_dir, to="onnx"), "unknown target format 'onnx'")
case("conv-tp-zero", lambda t, r: conv(t, r, r.hf_dir, to="metaseq", tp=0), "--tp and --pp must be >= 1")
case("conv-num-heads", lambda t, r: conv(t, r, r.hf_dir, to="hf", num_heads=0), "--num-heads 0 must be >= 1")
case("conv-shard-size", lambda t, r: conv(t, r, r.hf_dir, to="hf", max_shard_bytes=0), "--max-shard-size must be >= 1")
case("conv-dtype", lambda t, r: conv(t, r, r.hf_dir, to="hf", dtype="fp64"), "--dtype 'fp64'", "fp32, fp16, bf16")
case("conv-tokenizer-for-opt-ds", lambda t, r: conv(t, r, r.hf_dir, to="opt_ds", tokenizer="opt"),
     "--tokenizer applies to --to hf", "opt_ds checkpoints hold weights only: drop it")
case("conv-tp-for-hf", lambda t, r: conv(t, r, r.hf_dir, to="hf", tp=2), "--tp/--pp do not apply to hf")
case("conv-pp-for-metaseq", lambda t, r: conv(t, r, r.hf_dir, to="metaseq", pp=2), "metaseq checkpoints have no "
     "pipeline stages")
case("conv-universal-from-hf", lambda t, r: conv(t, r, r.hf_dir, to="universal"),
     "a hf checkpoint has no DeepSpeed optimizer state, use --to opt_ds")
case("conv-universal-dtype", lambda t, r: conv(t, r, r.opt_ds_dir, to="universal", dtype="fp16"),
     "--dtype does not apply to universal checkpoints")
case("conv-overlap", lambda t, r: conv(t, r, t / "hf", "hf/out", to="hf"), "overlaps the source",
     setup=lambda t, r: _copy(r.hf_dir, t / "hf"))

# conversion/files.py
case("conv-file-not-found", lambda t, r: importlib.import_module("conversion.files").load_torch(t / "x.pt"),
     "file not found")
case("conv-file-empty", lambda t, r: conv(t, r, t / "part.pt", to="hf"), "the file is empty", "copy it again",
     setup=lambda t, r: (t / "part.pt").write_bytes(b""))
case("conv-file-corrupt", lambda t, r: conv(t, r, t / "part.pt", to="hf"), "cannot be read as a torch checkpoint",
     setup=lambda t, r: (t / "part.pt").write_bytes(b"\x80\x02garbage"))
case("conv-dst-is-file", lambda t, r: conv(t, r, r.hf_dir, "f", to="hf"), "exists and is not a directory",
     setup=lambda t, r: (t / "f").write_text("x"))
case("conv-dst-not-empty", lambda t, r: conv(t, r, r.hf_dir, to="hf"), "is not empty", "--force",
     setup=lambda t, r: ((t / "dst").mkdir(), (t / "dst" / "x").write_text("x")))

# conversion/memory.py
case("conv-max-memory-size", lambda t, r: conv(t, r, r.hf_dir, to="opt_ds", max_memory="lots"),
     "--max-memory 'lots' is not a size", "e.g. --max-memory 64G")
case("conv-max-memory", lambda t, r: conv(t, r, r.hf_dir, to="opt_ds", max_memory="100K"),
     "needs about", "GiB of memory", "more than --max-memory 100K", "raise --max-memory")

# conversion/hf.py, and conversion/opt.py (an OPT config.json)
case("hf-model-type", lambda t, r: conv(t, r, t / "hf", to="opt_ds"), "model_type is 'gpt2'",
     "only 'opt' and 'llama' models convert", setup=lambda t, r: _edit_config(t, r, model_type="gpt2"))
case("hf-variant", lambda t, r: conv(t, r, t / "hf", to="opt_ds"), "activation_function='gelu'",
     "it needs activation_function='relu'", setup=lambda t, r: _edit_config(t, r, activation_function="gelu"))
case("hf-lacks-hidden-size", lambda t, r: conv(t, r, t / "hf", to="opt_ds"), "config.json lacks 'hidden_size'",
     "fetch config.json again", setup=lambda t, r: _edit_config(t, r, hidden_size=...))
case("hf-null-heads", lambda t, r: conv(t, r, t / "hf", to="opt_ds"), "num_attention_heads=None",
     "must be a positive integer", setup=lambda t, r: _edit_config(t, r, num_attention_heads=None))
case("hf-heads-not-dividing", lambda t, r: conv(t, r, t / "hf", to="opt_ds"),
     "hidden_size=32, not divisible by num_attention_heads=5", setup=lambda t, r: _edit_config(t, r, num_attention_heads=5))
case("hf-bad-index", lambda t, r: conv(t, r, t / "hf", to="opt_ds"), "not a valid weight index",
     setup=lambda t, r: (_copy(r.hf_dir, t / "hf"), (t / "hf" / "model.safetensors.index.json").write_text("{}")))
case("hf-missing-shard", lambda t, r: conv(t, r, t / "hf", to="opt_ds"), "shard file(s) b.safetensors",
     "download the complete model directory",
     setup=lambda t, r: (_copy(r.hf_dir, t / "hf"), (t / "hf" / "model.safetensors.index.json").write_text(
         json.dumps({"weight_map": {"x": "b.safetensors"}}))))
case("hf-no-weights", lambda t, r: conv(t, r, t / "hf", to="opt_ds"), "no model.safetensors, pytorch_model.bin",
     setup=lambda t, r: (_copy(r.hf_dir, t / "hf"), (t / "hf" / "model.safetensors").unlink()))
case("hf-bad-safetensors", lambda t, r: conv(t, r, t / "hf", to="opt_ds"), "cannot be read as safetensors",
     "download it again", setup=lambda t, r: (_copy(r.hf_dir, t / "hf"),
                                              (t / "hf" / "model.safetensors").write_bytes(b"\x10\x00garbage")))
case("hf-bin-not-dict", lambda t, r: conv(t, r, t / "hf", to="opt_ds"), "holds a list, not a state dict",
     setup=lambda t, r: (_copy(r.hf_dir, t / "hf"), (t / "hf" / "model.safetensors").unlink(),
                         torch.save([torch.zeros(1)], t / "hf" / "pytorch_model.bin")))
case("hf-no-config", lambda t, r: importlib.import_module("conversion.hf").read(t), "no config.json")
case("hf-layer-dtypes", lambda t, r: conv(t, r, t / "hf", to="hf"), "model.decoder.layers.1.", "torch.float16",
     "planned", "pass --dtype", setup=lambda t, r: _layer_in_fp16(t, r))
case("hf-config-invalid", lambda t, r: conv(t, r, t / "hf", to="opt_ds", src_format="hf"), "not valid JSON",
     setup=lambda t, r: (_copy(r.hf_dir, t / "hf"), (t / "hf" / "config.json").write_text("{")))


def _layer_in_fp16(t, r):
    """Decoder layer 1 stored in fp16, the others in fp32: the HF writer plans its files from layer 0."""
    from safetensors.torch import load_file, save_file
    _copy(r.hf_dir, t / "hf")
    state = load_file(t / "hf" / "model.safetensors")
    save_file({k: v.half() if ".layers.1." in k else v for k, v in state.items()}, t / "hf" / "model.safetensors")


def _untied_head(t, r):
    from safetensors.torch import load_file, save_file
    _copy(r.hf_dir, t / "hf")
    state = load_file(t / "hf" / "model.safetensors")
    state["lm_head.weight"] = torch.randn_like(state["model.decoder.embed_tokens.weight"])
    save_file(state, t / "hf" / "model.safetensors")


case("hf-untied-head", lambda t, r: conv(t, r, t / "hf", to="opt_ds"), "lm_head.weight differs from the token "
     "embedding", setup=_untied_head)


def _hf_with_state(t, r, edit):
    from safetensors.torch import load_file, save_file
    _copy(r.hf_dir, t / "hf")
    state = load_file(t / "hf" / "model.safetensors")
    edit(state)
    save_file(state, t / "hf" / "model.safetensors")


case("hf-shapes", lambda t, r: conv(t, r, t / "hf", to="opt_ds"), "the tensors do not match the model configuration",
     setup=lambda t, r: _hf_with_state(t, r, lambda s: s.pop("model.decoder.layers.0.fc1.bias")))


# conversion/llama.py: a LLaMA config.json (read before any weight file, so the directory holds only it)
def _llama_config(t, r, **changes):
    from conversion.llama import config_from_shape
    from test_conversion_llama_meta import SHAPE
    config = config_from_shape(SHAPE, torch.float32)
    for key, value in changes.items():
        if value is ...:
            config.pop(key)
        else:
            config[key] = value
    (t / "llama").mkdir()
    (t / "llama" / "config.json").write_text(json.dumps(config))


case("llama-unimplemented", lambda t, r: conv(t, r, t / "llama", to="opt_ds"), "rope_scaling=",
     "is not implemented by opt_ds's LLaMA", "refusing rather than ignoring it",
     setup=lambda t, r: _llama_config(t, r, rope_scaling={"rope_type": "linear", "factor": 2.0}))
case("llama-lacks-key", lambda t, r: conv(t, r, t / "llama", to="opt_ds"), "config.json lacks 'intermediate_size'",
     "not a complete LLaMA config", setup=lambda t, r: _llama_config(t, r, intermediate_size=...))
case("llama-bad-shape", lambda t, r: conv(t, r, t / "llama", to="opt_ds"), "config.json: num_heads 8 is not divisible "
     "by num_kv_heads 3", setup=lambda t, r: _llama_config(t, r, num_key_value_heads=3))

# conversion/canonical.py
case("canonical-heads", lambda t, r: importlib.import_module("conversion.canonical").check_model_shape(
    importlib.import_module("opt_ds.models.presets").OPTShape(2, 30, 4, 64)), "hidden size 30 is not divisible by 4")


def _checked(t, r, tensors):
    from conversion.hf import read
    ckpt = read(r.hf_dir)
    return ckpt._checked(tensors, {"x": (2,)}, "model.")


case("canonical-missing", lambda t, r: _checked(t, r, {}), "tensors model.['x'] missing")
case("canonical-shape", lambda t, r: _checked(t, r, {"x": torch.zeros(3)}), "model.x has shape (3,), the model needs (2,)")

# conversion/sharding.py
case("sharding-chunk", lambda t, r: importlib.import_module("conversion.sharding").chunk(torch.zeros(5), 2),
     "cannot split dimension 0 of size 5 into 2")
case("sharding-qkv", lambda t, r: importlib.import_module("conversion.sharding").merge_metaseq_kvq([torch.zeros(4, 2)]),
     "not a multiple of 3")
case("sharding-replicas", lambda t, r: importlib.import_module("conversion.sharding").check_same(
    [torch.zeros(2), torch.ones(2)], "bias"), "bias should be identical on every tensor-parallel rank")


# conversion/opt_ds_format.py
def _ods(t, r) -> Path:
    return _copy(r.opt_ds_dir, t / "ods")


def _tag(t) -> Path:
    return t / "ods" / (t / "ods" / "latest").read_text().strip()


def _with_manifest(t, r, damage):
    from opt_ds.train import manifest
    _ods(t, r)
    manifest.write(_tag(t), tag=_tag(t).name, step=0, health={"healthy": True})
    damage(_tag(t))


case("ods-damaged", lambda t, r: conv(t, r, t / "ods", to="hf"), "is damaged (", "content differs from its manifest",
     "restore it from a copy", setup=lambda t, r: _with_manifest(
         t, r, lambda tag: rewrite_idx(tag / "layer_02-model_00-model_states.pt", 200, b"\x00\x01\x02\x03")))
case("ods-merge-ranks", lambda t, r: importlib.import_module("conversion.opt_ds_format").merge_state(
    [{"a": torch.zeros(1)}, {"b": torch.zeros(1)}], "layer_00", {}), "TP rank 1 holds tensors ['b']")
case("ods-layout-heads", lambda t, r: conv(t, r, r.hf_dir, to="opt_ds", tp=3), "--tp 3 does not divide the 4 attention "
     "heads", "1, 2, 4")
case("ods-layout-ffn", lambda t, r: importlib.import_module("conversion.opt_ds_format").check_layout(
    importlib.import_module("opt_ds.models.presets").OPTShape(2, 32, 4, 66), 4, 1), "--tp 4 does not divide "
     "ffn_hidden_size 66", "use one of 1, 2, 3, 6, 11, 22, 33, 66")
case("ods-layout-pp", lambda t, r: conv(t, r, r.hf_dir, to="opt_ds", pp=5), "--pp 5 is more pipeline stages than the 4")
case("ods-not-dir", lambda t, r: conv(t, r, t / "f", to="hf", src_format="opt_ds"), "an opt_ds checkpoint is a directory",
     setup=lambda t, r: (t / "f").write_text("x"))
case("ods-no-tag", lambda t, r: conv(t, r, t / "ods", to="hf", src_tag="global_step9"), "no checkpoint tag "
     "'global_step9'", setup=_ods)
case("ods-latest-dangling", lambda t, r: conv(t, r, t / "ods", to="hf"), "names tag 'global_step7', which does not "
     "exist", setup=lambda t, r: (_ods(t, r), (t / "ods" / "latest").write_text("global_step7")))
case("ods-no-latest", lambda t, r: conv(t, r, t / "ods", to="hf", src_format="opt_ds"), "no `latest` file; pass --tag",
     setup=lambda t, r: ((t / "ods").mkdir(), (t / "ods" / "a").mkdir(), (t / "ods" / "b").mkdir()))
case("ods-no-layer-files", lambda t, r: conv(t, r, t / "ods", to="hf", src_format="opt_ds"), "no "
     "layer_XX-model_YY-model_states.pt files", setup=lambda t, r: ((t / "ods" / "global_step1").mkdir(parents=True),
                                                                   (t / "ods" / "latest").write_text("global_step1")))
case("ods-missing-layer", lambda t, r: conv(t, r, t / "ods", to="hf"), "layer files layer_02 are missing",
     setup=lambda t, r: (_ods(t, r), [p.unlink() for p in _tag(t).glob("layer_02-*")]))
case("ods-missing-tp-rank", lambda t, r: conv(t, r, t / "ods", to="hf"), "layer_03 has TP ranks [0] but layer_00",
     setup=lambda t, r: (_ods(t, r), (_tag(t) / "layer_03-model_01-model_states.pt").unlink()))
case("ods-mp-rank-gap", lambda t, r: conv(t, r, t / "ods", to="hf"), "are not numbered 0..N-1",
     setup=lambda t, r: (_ods(t, r), (_tag(t) / "mp_rank_00_model_states.pt").unlink()))
case("ods-num-heads-contradicts", lambda t, r: conv(t, r, r.opt_ds_dir, to="hf", num_heads=2),
     "--num-heads 2 contradicts the 4 heads recorded")


def _meta_edit(t, r, edit, files="mp_rank_*_model_states.pt"):
    _ods(t, r)
    for path in _tag(t).glob(files):
        state = torch.load(path, weights_only=False)
        torch.save(edit(state), path)


def _drop_shape(state):
    from opt_ds.train.contract import MODEL_SHAPE_KEY
    state.pop(MODEL_SHAPE_KEY, None)
    return state


def _shape_with_layers(layers):
    def edit(state):
        from opt_ds.train.contract import MODEL_SHAPE_KEY
        state[MODEL_SHAPE_KEY] = {**state[MODEL_SHAPE_KEY], "num_layers": layers}
        return state
    return edit


case("ods-layer-count", lambda t, r: conv(t, r, t / "ods", to="hf"), "7 layer files but the recorded model has 6 "
     "decoder layers", setup=lambda t, r: _meta_edit(t, r, _shape_with_layers(6)))
case("ods-no-mp-rank", lambda t, r: conv(t, r, t / "ods", to="hf"), "no mp_rank_XX_model_states.pt files",
     setup=lambda t, r: (_ods(t, r), [p.unlink() for p in _tag(t).glob("mp_rank_*")]))
case("ods-mp-rank-count", lambda t, r: conv(t, r, t / "ods", to="hf"), "3 mp_rank files is not a multiple of the TP",
     setup=lambda t, r: (_ods(t, r), (_tag(t) / "mp_rank_03_model_states.pt").unlink()))
case("ods-recorded-layout", lambda t, r: conv(t, r, t / "ods", to="hf"), "but DeepSpeed recorded",
     setup=lambda t, r: _meta_edit(t, r, lambda s: {**s, "mp_world_size": 8}))
case("ods-needs-num-heads", lambda t, r: conv(t, r, t / "ods", to="hf"), "pass --num-heads N",
     setup=lambda t, r: _meta_edit(t, r, _drop_shape))


def _vocab_rows(state):
    from opt_ds.train.contract import MODEL_SHAPE_KEY
    state[MODEL_SHAPE_KEY] = {**state[MODEL_SHAPE_KEY], "vocab_size": 200}
    return state


case("ods-embedding-rows", lambda t, r: conv(t, r, t / "ods", to="hf"), "the embedding has 128 rows over 2 TP rank(s), "
     "the recorded model 200", setup=lambda t, r: _meta_edit(t, r, _vocab_rows))


# conversion/hf_tokenizer.py: the tokenizer an HF export carries
def _run_tokenizer(folder: Path):
    """A run config whose data.tokenizer names `folder`, recorded in the checkpoint as `opt-ds train` does."""
    def edit(state):
        from opt_ds.train.contract import RUN_STATE_KEY
        return {**state, RUN_STATE_KEY: {"config": {"data": {"tokenizer": str(folder)}}}}
    return edit


case("hf-tokenizer-argument", lambda t, r: conv(t, r, r.hf_dir, to="hf", tokenizer=str(t / "tok")),
     "--tokenizer ", "tok: no tokenizer in", "use 'opt' for OPT's tokenizer")
case("hf-tokenizer-beyond-vocab", lambda t, r: conv(t, r, r.hf_dir, to="hf", tokenizer="opt"),
     "the tokenizer of --tokenizer opt has 50265 entries, more than the model's vocabulary of 127",
     "pass the run's tokenizer with --tokenizer")
case("hf-tokenizer-of-run", lambda t, r: conv(t, r, t / "ods", to="hf"), "ods: the run's tokenizer cannot be loaded",
     "tok: expected vocab.json and merges.txt", "pass it with --tokenizer",
     setup=lambda t, r: _meta_edit(t, r, _run_tokenizer(t / "tok")))

# conversion/universal.py
case("universal-no-optimizer", lambda t, r: conv(t, r, r.opt_ds_dir, to="universal"), "has no ZeRO optimizer files",
     "--to opt_ds")
case("universal-no-latest", lambda t, r: conv(t, r, t / "u", to="hf", src_format="universal"), "no latest_universal "
     "file", setup=lambda t, r: (t / "u").mkdir())
case("universal-incomplete", lambda t, r: conv(t, r, t / "u", to="hf"), "missing zero/ or mp_rank files",
     setup=lambda t, r: ((t / "u" / "global_step1").mkdir(parents=True),
                         (t / "u" / "latest_universal").write_text("global_step1")))


def _universal(t, r, with_shape=True, with_param=True):
    from opt_ds.train.contract import checkpoint_client_state
    from conversion.hf import read
    tag = t / "u" / "global_step1"
    (tag / "zero").mkdir(parents=True)
    (t / "u" / "latest_universal").write_text("global_step1")
    shape = read(r.hf_dir).shape
    torch.save(checkpoint_client_state(shape) if with_shape else {"x": 1}, tag / "mp_rank_00_model_states.pt")


case("universal-no-shape", lambda t, r: conv(t, r, t / "u", to="hf"), "no `opt_model_shape` entry",
     setup=lambda t, r: _universal(t, r, with_shape=False))
case("universal-missing-param", lambda t, r: conv(t, r, t / "u", to="hf"), "fp32.pt is missing; the universal "
     "checkpoint is incomplete", setup=_universal)


# conversion/meta.py
def _meta(t, r, edit=None) -> Path:
    """A copy of the 2-shard Meta release; `edit(folder)` damages it."""
    _copy(r.meta_dir, t / "meta")
    if edit is not None:
        edit(t / "meta")
    return t / "meta"


def _meta_shards(edit):
    """Rewrite every consolidated.NN.pth with `edit(rank, state)`."""
    def damage(folder):
        for rank, path in enumerate(sorted(folder.glob("consolidated.*.pth"))):
            torch.save(edit(rank, torch.load(path)), path)
    return damage


def _meta_params(**changes):
    def damage(folder):
        params = json.loads((folder / "params.json").read_text())
        (folder / "params.json").write_text(json.dumps({**params, **changes}))
    return damage


def _meta_conv(t, r, **options):
    return conv(t, r, t / "meta", **{"to": "opt_ds", **options})


case("meta-no-shards", lambda t, r: _meta_conv(t, r, src_format="meta"), "no consolidated.NN.pth files; not a Meta "
     "LLaMA checkpoint", setup=lambda t, r: _meta(t, r, lambda d: [p.unlink() for p in d.glob("consolidated.*")]))
case("meta-shard-twice", _meta_conv, "consolidated.01.pth, consolidated.1.pth are the same shard number twice",
     "keep one file per model-parallel rank",
     setup=lambda t, r: _meta(t, r, lambda d: shutil.copyfile(d / "consolidated.01.pth", d / "consolidated.1.pth")))
case("meta-shard-missing", _meta_conv, "consolidated.01.pth is missing (found shards [0, 2])",
     "copy every consolidated.NN.pth of the release",
     setup=lambda t, r: _meta(t, r, lambda d: (d / "consolidated.01.pth").rename(d / "consolidated.02.pth")))
case("meta-no-params", lambda t, r: _meta_conv(t, r, src_format="meta"), "no params.json; not a Meta LLaMA checkpoint",
     setup=lambda t, r: _meta(t, r, lambda d: (d / "params.json").unlink()))
case("meta-params-invalid", _meta_conv, "params.json: not valid JSON",
     setup=lambda t, r: _meta(t, r, lambda d: (d / "params.json").write_text("{")))
case("meta-other-tensors", _meta_conv, "consolidated.01.pth holds other tensors than consolidated.00.pth",
     "the shards come from different models", setup=lambda t, r: _meta(t, r, _meta_shards(
         lambda rank, s: {**s, "extra.weight": torch.zeros(1)} if rank == 1 else s)))
case("meta-shapes-disagree", _meta_conv, "consolidated.01.pth: layers.0.attention.wo.weight has shape (64, 16)",
     "the shards' shapes disagree", setup=lambda t, r: _meta(t, r, _meta_shards(
         lambda rank, s: {**s, "layers.0.attention.wo.weight": s["layers.0.attention.wo.weight"][:, :16]}
         if rank == 1 else s)))
case("meta-shard-duplicated", _meta_conv, "consolidated.00.pth and consolidated.01.pth hold the same embedding slice",
     "a shard is duplicated under another number",
     setup=lambda t, r: _meta(t, r, lambda d: shutil.copyfile(d / "consolidated.00.pth", d / "consolidated.01.pth")))
case("meta-params-lacks", _meta_conv, "params.json lacks 'n_heads'",
     setup=lambda t, r: _meta(t, r, lambda d: (d / "params.json").write_text(json.dumps(
         {k: v for k, v in json.loads((d / "params.json").read_text()).items() if k != "n_heads"}))))
case("meta-shard-count", _meta_conv, "1 shards of tok_embeddings give dim 32, params.json says 64",
     "a shard is missing or extra (the release has 2 consolidated.NN.pth files)",
     setup=lambda t, r: _meta(t, r, lambda d: (d / "consolidated.01.pth").unlink()))
case("meta-vocab", _meta_conv, "params.json: vocab_size 999 but tok_embeddings has 250 rows",
     setup=lambda t, r: _meta(t, r, _meta_params(vocab_size=999)))
case("meta-ffn-width", _meta_conv, "multiple_of/ffn_dim_multiplier give an FFN of 256, the weights 176",
     setup=lambda t, r: _meta(t, r, _meta_params(multiple_of=256)))
case("meta-bad-shape", _meta_conv, "params.json: num_heads 8 is not divisible by num_kv_heads 3",
     setup=lambda t, r: _meta(t, r, _meta_params(n_kv_heads=3)))
case("meta-unexpected", _meta_conv, "unexpected tensors ['layers.2.attention.wq.weight'] for a 2-layer model per "
     "params.json", setup=lambda t, r: _meta(t, r, _meta_shards(
         lambda rank, s: {**s, "layers.2.attention.wq.weight": s["layers.1.attention.wq.weight"]})))
case("meta-from-opt", lambda t, r: conv(t, r, r.hf_dir, to="meta"), "only LLaMA models have a Meta release layout",
     "choose another --to")
case("meta-parts", lambda t, r: conv(t, r, r.meta_dir, to="meta", tp=3), "--tp 3 shards do not divide the heads 8",
     "choose a shard count that does")


# conversion/metaseq.py
def _metaseq(t, r, parts=1, edit=None, names=None):
    from conversion_helpers import metaseq_file, metaseq_part
    (t / "m").mkdir()
    for k in range(parts):
        state = metaseq_file(metaseq_part(r.hf_model, k, parts), r.hf_model, parts)
        if edit is not None:
            state = edit(state, k)
        torch.save(state, t / "m" / (names or "reshard-model_part-{k}.pt").format(k=k))


case("metaseq-no-path", lambda t, r: importlib.import_module("conversion.metaseq").find_parts(t / "nope"),
     "no such file or directory")
case("metaseq-no-pt", lambda t, r: importlib.import_module("conversion.metaseq").find_parts(t), "no .pt files")
case("metaseq-several", lambda t, r: conv(t, r, t / "m", to="hf"), "holds several metaseq checkpoints",
     setup=lambda t, r: _metaseq(t, r, parts=1, names="a{k}.pt") or shutil.copyfile(t / "m" / "a0.pt", t / "m" / "b.pt"))
case("metaseq-missing-part", lambda t, r: conv(t, r, t / "m" / "reshard-model_part-1.pt", to="hf"),
     "reshard-model_part-0*.pt is missing", "copy every model-parallel part",
     setup=lambda t, r: (_metaseq(t, r, parts=2), (t / "m" / "reshard-model_part-0.pt").unlink()))
case("metaseq-shards-incomplete", lambda t, r: conv(t, r, t / "m" / "c-model_part-0-shard1.pt", to="hf"),
     "FSDP shard files of c are incomplete", setup=lambda t, r: _metaseq(t, r, parts=1, names="c-model_part-0-shard1.pt"))
case("metaseq-not-dict", lambda t, r: conv(t, r, t / "x.pt", to="hf"), "holds a list, not a metaseq checkpoint dict",
     setup=lambda t, r: torch.save([1], t / "x.pt"))
case("metaseq-flat-no-metadata", lambda t, r: conv(t, r, t / "x.pt", to="hf"), "without the shard_metadata",
     setup=lambda t, r: torch.save({"model": {"flat_param_0": torch.zeros(3)}}, t / "x.pt"))
case("metaseq-unflattened-shards", lambda t, r: conv(t, r, t / "m" / "c-model_part-0-shard0.pt", to="hf"),
     "several -shardD files of unflattened weights",
     setup=lambda t, r: (_metaseq(t, r, parts=1, names="c-model_part-0-shard0.pt"),
                         shutil.copyfile(t / "m" / "c-model_part-0-shard0.pt", t / "m" / "c-model_part-0-shard1.pt")))


def _flat_missing_shard(t, r):
    from conversion_helpers import fsdp_groups, fsdp_shards, metaseq_part
    state = metaseq_part(r.hf_model, 0, 1)
    shards = fsdp_shards(state, 2, fsdp_groups(state))
    (t / "m").mkdir()
    torch.save(shards[0], t / "m" / "x.pt")     # one of two DP shards, passed as a plain file


case("metaseq-flat-numel", lambda t, r: conv(t, r, t / "m" / "x.pt", to="hf", num_heads=4),
     "a -shardD file is missing or from another run", setup=_flat_missing_shard)


def _cfg_edit(**changes):
    def edit(state, k):
        for key, value in changes.items():
            setattr(state["cfg"]["model"], key, value)
        return state
    return edit


case("metaseq-mp-size", lambda t, r: conv(t, r, t / "m", to="hf"), "model_parallel_size=4 but 1 part file(s)",
     setup=lambda t, r: _metaseq(t, r, edit=_cfg_edit(model_parallel_size=4)))
case("metaseq-no-heads", lambda t, r: conv(t, r, t / "m", to="hf"), "no cfg with decoder_attention_heads",
     "pass --num-heads N", setup=lambda t, r: _metaseq(t, r, edit=lambda s, k: {"model": s["model"]}))
case("metaseq-heads-contradict", lambda t, r: conv(t, r, t / "m", to="hf", num_heads=2),
     "--num-heads 2 contradicts decoder_attention_heads=4", setup=lambda t, r: _metaseq(t, r))


def _vocab_differs(state, k):
    if k == 1:
        state["model"]["decoder.embed_tokens.weight"] = state["model"]["decoder.embed_tokens.weight"][:-1]
    return state


case("metaseq-vocab-rows", lambda t, r: conv(t, r, t / "m", to="hf"), "hold different numbers of vocabulary rows",
     setup=lambda t, r: _metaseq(t, r, parts=2, edit=_vocab_differs))


def _drop_tensor(name):
    def edit(state, k):
        state["model"].pop(name)
        return state
    return edit


case("metaseq-no-positions", lambda t, r: conv(t, r, t / "m", to="hf"), "no decoder.embed_positions.weight tensor",
     setup=lambda t, r: _metaseq(t, r, edit=_drop_tensor("decoder.embed_positions.weight")))
case("metaseq-layers", lambda t, r: conv(t, r, t / "m", to="hf"), "cfg says decoder_layers=9 but the weights have 4",
     setup=lambda t, r: _metaseq(t, r, edit=_cfg_edit(decoder_layers=9)))


def _untied(state, k):
    state["model"]["decoder.output_projection.weight"] = torch.randn_like(state["model"]["decoder.embed_tokens.weight"])
    return state


case("metaseq-untied", lambda t, r: converting(t / "m", t / "dst", to="hf"), "differs from "
     "decoder.embed_tokens.weight", setup=lambda t, r: _metaseq(t, r, edit=_untied))


def _unexpected(state, k):
    state["model"]["decoder.alibi"] = torch.zeros(1)
    return state


case("metaseq-unexpected", lambda t, r: conv(t, r, t / "m", to="hf"), "unexpected tensors decoder.alibi",
     setup=lambda t, r: _metaseq(t, r, edit=_unexpected))
case("metaseq-parts", lambda t, r: conv(t, r, r.hf_dir, to="metaseq", tp=3), "--tp 3 (metaseq MP parts) does not "
     "divide the 4 attention heads")
case("metaseq-layout", lambda t, r: conv(t, r, r.hf_dir, to="metaseq", metaseq_layout="flat"),
     "unknown metaseq layout 'flat'")
case("metaseq-from-llama", lambda t, r: conv(t, r, r.meta_dir, to="metaseq"), "metaseq checkpoints hold OPT models "
     "only", "convert a LLaMA to hf, meta or opt_ds")
case("metaseq-restored-parts", lambda t, r: importlib.import_module("conversion.metaseq").write(
    None, t / "dst", parts=2, layout="restored"),
     "restored.pt is a single file (MP=1)")


# --- running the table ----------------------------------------------------------------------------------

def tree_digest(folder: Path, allowed: str = None) -> str:
    digest = hashlib.sha256()
    for path in sorted(folder.rglob("*")):
        if allowed is not None and (path == folder / allowed or folder / allowed in path.parents):
            continue
        digest.update(str(path.relative_to(folder)).encode())
        if path.is_file() and not path.is_symlink():
            digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()


def raise_site(err: BaseException) -> tuple:
    tb = err.__traceback__
    while tb.tb_next is not None:
        tb = tb.tb_next
    return str(Path(tb.tb_frame.f_code.co_filename).resolve().relative_to(REPO)), tb.tb_lineno


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory):
    """case id -> (raise site, message) or (None, what went wrong), every row run once."""
    resources = Resources(tmp_path_factory.mktemp("resources"))
    results = {}
    for index, row in enumerate(CASES):
        folder = tmp_path_factory.mktemp(f"case{index}")
        if row.setup is not None:
            row.setup(folder, resources)
        before = tree_digest(folder, row.may_write)
        try:
            row.trigger(folder, resources)
            results[row.id] = (None, "no error was raised")
        except UserError as err:
            after = tree_digest(folder, row.may_write)
            results[row.id] = (raise_site(err), str(err)) if after == before else \
                (None, f"the bad input changed files on disk: {err}")
        except Exception as err:  # noqa: BLE001 - reported as the row's failure
            results[row.id] = (None, f"{type(err).__name__} instead of a UserError: {err}")
    for holder in _held:
        holder.close()
    return results


@pytest.mark.parametrize("row", CASES, ids=[c.id for c in CASES])
def test_user_error_message(row, outcomes):
    site, message = outcomes[row.id]
    assert site is not None, message
    for part in row.expect:
        assert part in message, f"{part!r} not in the message {message!r}"
    assert "\n" not in message, "one line"


def user_error_raise_sites() -> set:
    """(file, line) of every `raise X(...)` in PACKAGES where X is a UserError subclass (X a module global, or
    imported inside a function: `from conversion.files import ConversionError`)."""
    sites = set()
    for package in PACKAGES:
        for path in sorted((REPO / package).glob("*.py")):
            module = importlib.import_module(".".join(path.relative_to(REPO).with_suffix("").parts))
            tree = ast.parse(path.read_text())
            local = {alias.asname or alias.name: (node.module, alias.name) for node in ast.walk(tree)
                     if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 for alias in node.names}
            for node in ast.walk(tree):
                if isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call) and \
                        isinstance(node.exc.func, ast.Name):
                    cls = getattr(module, node.exc.func.id, None)
                    if cls is None and node.exc.func.id in local:
                        source, name = local[node.exc.func.id]
                        cls = getattr(importlib.import_module(source), name, None)
                    if isinstance(cls, type) and issubclass(cls, UserError):
                        sites.add((str(path.relative_to(REPO)), node.lineno))
    return sites


def test_every_raise_site_is_in_the_table(outcomes):
    sites = user_error_raise_sites()
    assert len(sites) > 150, "the source scan found too few raise sites"
    reached = {site for site, _ in outcomes.values() if site is not None}
    missing = sorted(sites - reached)
    assert not missing, f"{len(missing)} user-error raise sites no row of CASES reaches: {missing}"


def test_every_numeric_config_field_has_a_declared_range():
    """The class rule of config/ranges.py: a new numeric key (int, float, or a list of them) of any section
    needs a declaration, and a declaration must name a real key."""
    import typing

    def numeric(annotation) -> bool:
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if annotation in (int, float):
            return True
        return any(numeric(a) for a in args)

    sections = {type(getattr(RunConfig(), f.name)) for f in dataclasses.fields(RunConfig)
                if dataclasses.is_dataclass(getattr(RunConfig(), f.name))}
    sections.add(importlib.import_module("opt_ds.config.sections").BlendEntry)
    undeclared, stale = [], []
    for section in sections:
        hints = typing.get_type_hints(section)
        declared = RANGES.get(section, {})
        undeclared += [f"{section.__name__}.{f.name}" for f in dataclasses.fields(section)
                       if numeric(hints[f.name]) and f.name not in declared]
        stale += [f"{section.__name__}.{name}" for name in declared if name not in hints]
    assert not undeclared, f"declare a range in opt_ds/config/ranges.py for {undeclared}"
    assert not stale, f"ranges.py declares keys that no longer exist: {stale}"
