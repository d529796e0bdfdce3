"""Meta's original LLaMA release layout: `params.json` + `consolidated.NN.pth`, one file per model-parallel
rank (1 for 7B, 2 for 13B, 4 for 33B, 8 for 65B/70B).

Keys per file: `tok_embeddings.weight` (split on dim 1), `output.weight`, `layers.N.attention.wq/wk/wv`,
`layers.N.feed_forward.w1/w3` (column-parallel: split on dim 0), `layers.N.attention.wo`,
`layers.N.feed_forward.w2` (row-parallel: dim 1), `attention_norm`, `ffn_norm`, `norm` (replicated), and in
LLaMA 1 `rope.freqs` (recomputed, so ignored). `params.json` gives dim, n_layers, n_heads, n_kv_heads,
norm_eps, rope_theta, vocab_size (-1: read it from the weights) and the FFN width as
multiple_of * ceil(ffn_dim_multiplier * int(8·dim/3) / multiple_of). wq/wk rows are in the interleaved-pairs
RoPE order (GPT-J); the canonical form (Hugging Face) is rotate-half, so they are permuted per head.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Dict, List

import torch

from opt_ds.models.llama.shape import LlamaShape

from conversion import llama as L
from conversion.canonical import Checkpoint
from conversion.files import ConversionError, StreamedTorchFile, drop_file_pages, load_torch
from conversion.sharding import check_same, chunk

PARAMS = "params.json"
SHARD_FILE = re.compile(r"^consolidated\.(\d+)\.pth$")
# Meta name inside a layer -> (canonical name, split dim or None when replicated)
LAYER_NAMES = {"attention.wq.weight": ("self_attn.q_proj.weight", 0),
               "attention.wk.weight": ("self_attn.k_proj.weight", 0),
               "attention.wv.weight": ("self_attn.v_proj.weight", 0),
               "attention.wo.weight": ("self_attn.o_proj.weight", 1),
               "feed_forward.w1.weight": ("mlp.gate_proj.weight", 0),
               "feed_forward.w3.weight": ("mlp.up_proj.weight", 0),
               "feed_forward.w2.weight": ("mlp.down_proj.weight", 1),
               "attention_norm.weight": ("input_layernorm.weight", None),
               "ffn_norm.weight": ("post_attention_layernorm.weight", None)}
GLOBAL_NAMES = {"tok_embeddings.weight": (L.EMBED_TOKENS, 1), "norm.weight": (L.FINAL_NORM, None),
                "output.weight": (L.LM_HEAD, 0)}
IGNORED = ("rope.freqs",)


def interleaved_to_rotate_half(w: torch.Tensor, heads: int) -> torch.Tensor:
    d = w.shape[0] // heads
    return w.reshape(heads, d // 2, 2, -1).transpose(1, 2).reshape(w.shape).clone()


def rotate_half_to_interleaved(w: torch.Tensor, heads: int) -> torch.Tensor:
    d = w.shape[0] // heads
    return w.reshape(heads, 2, d // 2, -1).transpose(1, 2).reshape(w.shape).clone()


def ffn_width(dim: int, multiple_of: int, multiplier) -> int:
    hidden = int(2 * (4 * dim) / 3)
    if multiplier is not None:
        hidden = int(multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


def shard_files(directory: Path) -> List[Path]:
    found: Dict[int, List[Path]] = {}
    for path in directory.iterdir():
        if m := SHARD_FILE.match(path.name):
            found.setdefault(int(m.group(1)), []).append(path)
    if not found:
        raise ConversionError(f"{directory}: no consolidated.NN.pth files; not a Meta LLaMA checkpoint")
    twice = [paths for paths in found.values() if len(paths) > 1]
    if twice:
        raise ConversionError(f"{directory}: shard {', '.join(p.name for p in twice[0])} are the same shard number "
                              "twice; keep one file per model-parallel rank")
    missing = sorted(set(range(max(found) + 1)) - set(found))
    if missing:
        raise ConversionError(f"{directory}: consolidated.{missing[0]:02d}.pth is missing (found shards "
                              f"{sorted(found)}); copy every consolidated.NN.pth of the release")
    return [found[i][0] for i in sorted(found)]


class MetaReader:
    def __init__(self, directory):
        self.directory = Path(directory)
        params_path = self.directory / PARAMS
        if not params_path.is_file():
            raise ConversionError(f"{self.directory}: no {PARAMS}; not a Meta LLaMA checkpoint")
        try:
            self.params = json.loads(params_path.read_text())
        except ValueError as err:
            raise ConversionError(f"{params_path}: not valid JSON ({err})") from None
        self.files = shard_files(self.directory)
        self.shards = [{k: v for k, v in load_torch(p, weights_only=True).items() if k not in IGNORED}
                       for p in self.files]
        self._check_shards()
        self.shape = self._shape(str(params_path))

    def _check_shards(self) -> None:
        keys, first = set(self.shards[0]), self.files[0].name
        for path, shard in zip(self.files[1:], self.shards[1:]):
            if set(shard) != keys:
                raise ConversionError(f"{path.name} holds other tensors than {first} "
                                      f"({sorted(set(shard) ^ keys)[:3]}...); the shards come from different models")
            wrong = [k for k in keys if shard[k].shape != self.shards[0][k].shape]
            if wrong:
                raise ConversionError(f"{path.name}: {wrong[0]} has shape {tuple(shard[wrong[0]].shape)}, "
                                      f"{first} {tuple(self.shards[0][wrong[0]].shape)}; the shards' shapes disagree "
                                      "(mixed model sizes?)")
        if len(self.shards) > 1 and torch.equal(self.shards[0]["tok_embeddings.weight"],
                                                self.shards[1]["tok_embeddings.weight"]):
            raise ConversionError(f"{self.files[0].name} and {self.files[1].name} hold the same embedding slice; a "
                                  "shard is duplicated under another number")

    def _merged(self, key: str, dim) -> torch.Tensor:
        pieces = [shard[key] for shard in self.shards]
        return torch.cat(pieces, dim=dim) if dim is not None else check_same(pieces, f"{self.directory}: {key}")

    def _shape(self, where: str) -> LlamaShape:
        p, parts = self.params, len(self.shards)
        try:
            dim, layers, heads = p["dim"], p["n_layers"], p["n_heads"]
        except KeyError as err:
            raise ConversionError(f"{where} lacks {err.args[0]!r}") from None
        vocab, width = self.shards[0]["tok_embeddings.weight"].shape
        if width * parts != dim:
            raise ConversionError(f"{self.directory}: {parts} shards of tok_embeddings give dim {width * parts}, "
                                  f"{PARAMS} says {dim}: a shard is missing or extra (the release has "
                                  f"{dim // width if dim % width == 0 else '?'} consolidated.NN.pth files)")
        if p.get("vocab_size", -1) not in (-1, vocab):
            raise ConversionError(f"{where}: vocab_size {p['vocab_size']} but tok_embeddings has {vocab} rows")
        ffn = self.shards[0]["layers.0.feed_forward.w1.weight"].shape[0] * parts
        if "multiple_of" in p and ffn_width(dim, p["multiple_of"], p.get("ffn_dim_multiplier")) != ffn:
            raise ConversionError(f"{where}: multiple_of/ffn_dim_multiplier give an FFN of "
                                  f"{ffn_width(dim, p['multiple_of'], p.get('ffn_dim_multiplier'))}, the weights {ffn}")
        try:
            return LlamaShape(num_layers=layers, hidden_size=dim, num_heads=heads, ffn_hidden_size=ffn,
                              vocab_size=vocab, num_kv_heads=p.get("n_kv_heads") or heads,
                              rope_theta=float(p.get("rope_theta", 10000.0)), rms_norm_eps=p.get("norm_eps", 1e-6),
                              max_position_embeddings=p.get("max_seq_len", 4096 if p.get("n_kv_heads") else 2048))
        except ValueError as err:
            raise ConversionError(f"{where}: {err}") from None

    def read_globals(self, meta: bool = False) -> Dict[str, torch.Tensor]:
        out = {canonical: self._merged(key, dim) for key, (canonical, dim) in GLOBAL_NAMES.items()}
        self._release()
        return out

    def _release(self) -> None:
        """Let the kernel drop the memory-mapped pages this read touched (they would stay resident otherwise)."""
        for path in self.files:
            drop_file_pages(path)

    def read_layer(self, layer: int, meta: bool = False) -> Dict[str, torch.Tensor]:
        out = {}
        for name, (canonical, dim) in LAYER_NAMES.items():
            tensor = self._merged(f"layers.{layer}.{name}", dim)
            if name == "attention.wq.weight":
                tensor = interleaved_to_rotate_half(tensor, self.shape.num_heads)
            elif name == "attention.wk.weight":
                tensor = interleaved_to_rotate_half(tensor, self.shape.kv_heads)
            out[canonical] = tensor
        self._release()
        return out

    def checkpoint(self) -> Checkpoint:
        parts = len(self.shards)
        shapes, sources = {}, {}
        for key, (canonical, dim) in GLOBAL_NAMES.items():
            shapes[canonical] = _merged_shape(self.shards[0][key].shape, dim, parts)
            sources[canonical] = f"consolidated.*.pth: {key}"
        for layer in range(self.shape.num_layers):
            for name, (canonical, dim) in LAYER_NAMES.items():
                key = f"layers.{layer}.{name}"
                if key not in self.shards[0]:
                    continue
                full = f"{L.LAYER_PREFIX}{layer}.{canonical}"
                shapes[full] = _merged_shape(self.shards[0][key].shape, dim, parts)
                sources[full] = f"consolidated.*.pth: {key}"
        extra = [k for k in self.shards[0] if not k.startswith("layers.") and k not in GLOBAL_NAMES]
        extra += [k for k in self.shards[0] if k.startswith("layers.") and
                  (int(k.split(".")[1]) >= self.shape.num_layers or k.split(".", 2)[2] not in LAYER_NAMES)]
        if extra:
            raise ConversionError(f"{self.directory}: unexpected tensors {extra[:3]} for a {self.shape.num_layers}-"
                                  f"layer model per {PARAMS}")
        return Checkpoint(self.shape, f"Meta LLaMA checkpoint {self.directory} ({parts} shards)", self.read_globals,
                          self.read_layer, sources, shapes)


def _merged_shape(shape, dim, parts) -> tuple:
    shape = list(shape)
    if dim is not None:
        shape[dim] *= parts
    return tuple(shape)


def read(directory) -> Checkpoint:
    return MetaReader(directory).checkpoint()


def check_parts(shape, parts: int) -> None:
    if not isinstance(shape, LlamaShape):
        raise ConversionError("only LLaMA models have a Meta release layout; choose another --to")
    for what, value in (("heads", shape.num_heads), ("key/value heads", shape.kv_heads),
                        ("hidden size", shape.hidden_size), ("FFN width", shape.ffn_hidden_size),
                        ("vocabulary", shape.vocab_size)):
        if value % parts:
            raise ConversionError(f"--tp {parts} shards do not divide the {what} {value}; choose a shard count "
                                  "that does")


def params_for(shape: LlamaShape) -> dict:
    base = int(2 * (4 * shape.hidden_size) / 3)
    params = {"dim": shape.hidden_size, "n_layers": shape.num_layers, "n_heads": shape.num_heads,
              "n_kv_heads": shape.kv_heads, "vocab_size": shape.vocab_size, "multiple_of": shape.ffn_hidden_size,
              "norm_eps": shape.rms_norm_eps, "rope_theta": shape.rope_theta,
              "max_seq_len": shape.max_position_embeddings}
    if shape.ffn_hidden_size < base:
        params["ffn_dim_multiplier"] = shape.ffn_hidden_size / base
    return params


def write(ckpt: Checkpoint, dst: Path, *, parts: int = 1) -> None:
    """Write every consolidated.NN.pth at once as the source's layers stream through, one layer in memory."""
    shape = ckpt.shape
    check_parts(shape, parts)
    dst = Path(dst)
    files = [StreamedTorchFile(dst / f"consolidated.{index:02d}.pth") for index in range(parts)]
    shards: List[Dict[str, object]] = [{} for _ in range(parts)]

    def put(key, tensor, dim):
        pieces = chunk(tensor, parts, dim) if dim is not None else [tensor] * parts
        for file, shard, piece in zip(files, shards, pieces):
            shard[key] = file.put(piece)

    globals_ = ckpt.globals()
    for key, (canonical, dim) in GLOBAL_NAMES.items():
        put(key, globals_.pop(canonical), dim)
    for layer in range(shape.num_layers):
        state = ckpt.layer(layer)
        for name, (canonical, dim) in LAYER_NAMES.items():
            tensor = state.pop(canonical)
            if name == "attention.wq.weight":
                tensor = rotate_half_to_interleaved(tensor, shape.num_heads)
            elif name == "attention.wk.weight":
                tensor = rotate_half_to_interleaved(tensor, shape.kv_heads)
            put(f"layers.{layer}.{name}", tensor, dim)
    for file, shard in zip(files, shards):
        file.close(shard)
    (dst / PARAMS).write_text(json.dumps(params_for(shape), indent=2) + "\n")


def target_locations(shape, parts: int) -> Dict[str, str]:
    located = {}
    for key, (canonical, dim) in GLOBAL_NAMES.items():
        located[canonical] = f"consolidated.*.pth: {key} [{'replicated' if dim is None else f'split dim {dim}'}]"
    for layer in range(shape.num_layers):
        for name, (canonical, dim) in LAYER_NAMES.items():
            located[f"{L.LAYER_PREFIX}{layer}.{canonical}"] = (
                f"consolidated.*.pth: layers.{layer}.{name} [{'replicated' if dim is None else f'split dim {dim}'}]")
    return located
