"""opt_ds checkpoints: the files DeepSpeed's PipelineEngine writes and reads for `opt_ds.parallel.pipe`.

    <dir>/latest                                     the tag, e.g. global_step1000
    <dir>/<tag>/layer_XX-model_YY-model_states.pt    state_dict of pipeline layer XX, TP rank YY
    <dir>/<tag>/mp_rank_ZZ_model_states.pt           engine metadata per (stage, TP rank), ZZ = stage*TP + tp
    <dir>/<tag>/zero_pp_rank_D_mp_rank_ZZ_optim_states.pt   ZeRO optimizer partitions (training only)

Layer XX (OPT): 0 token embedding (vocab rows split over TP), 1 positions (+ project_in), 2..L+1 decoder
layers, L+2 final LayerNorm / project_out; (LLaMA) 0 embedding, 1..L decoder layers, L+1 RMSNorm, L+2 head.
Which tensors are split over TP, on which dim and with which stride, is read from the model's megatron
layers (`opt_ds.parallel.pipe.tensor_parallel_dims`). The writer names files through DeepSpeed's own topology, so they are
the names a real engine at the target layout looks for; the reader infers TP from the files of layer 0
and PP from the mp_rank files, and checks both against the metadata DeepSpeed recorded.
"""
from __future__ import annotations

import functools
import re
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple

import torch

from opt_ds.models.presets import OPTShape
from opt_ds.train.contract import mp_rank_state, shape_from_client_state
from opt_ds.models.family import family_of
from opt_ds.parallel.pipe import tensor_parallel_dims

from conversion import canonical as C
from conversion.families import names_of
from conversion.canonical import Checkpoint
from conversion.files import ConversionError, load_torch, save_torch, tensor_headers
from conversion.opt import ATTENTION_INPUTS, DECODER_RENAMES, EMBEDDING_INDEX, POSITIONS_INDEX
from conversion.progress import progress
from conversion.sharding import check_same, chunk, merge_shards, pad_rows, padded_rows, split_full

LAYER_FILE = re.compile(r"^layer_(\d+)(?:-model_(\d+))?-model_states\.pt$")
MP_RANK_FILE = re.compile(r"^mp_rank_(\d+)_model_states\.pt$")
ZERO_FILE = re.compile(r"^(?:bf16_)?zero_pp_rank_\d+_mp_rank_\d+_optim_states\.pt$")
DEFAULT_TAG = "global_step0"



@functools.lru_cache(maxsize=8)
def layer_splits(shape) -> Dict[str, Tuple[int, int]]:
    """{name inside a pipeline layer: (TP split dim, stride)} for every TP-split tensor; others are replicated."""
    splits = {}
    for name, split in tensor_parallel_dims(shape).items():
        if split.dim is not None:
            splits[name.split(".", 1)[1].split(".", 1)[1] if name.startswith("tied_modules.")
                   else name.split(".", 1)[1]] = (split.dim, split.stride)
    return splits


# --- canonical <-> opt_ds layer states (full tensors, before TP cutting) -------------------------------

def special_layer_index(role: str, shape) -> int:
    return names_of(shape).layer_roles(shape)[role]


def full_layer_states(ckpt: Checkpoint, vocab_rows: int) -> Iterator[Tuple[int, Dict[str, torch.Tensor]]]:
    """(pipeline layer index, full TP=1 state) for every layer file, vocabulary rows padded to `vocab_rows`."""
    shape, names = ckpt.shape, names_of(ckpt.shape)
    roles = names.layer_roles(shape)
    special = {index: {} for index in roles.values()}
    for key, tensor in ckpt.globals().items():
        role, name = names.global_names[key]
        special[roles[role]][name] = pad_rows(tensor, vocab_rows) if key in names.vocab_keys else tensor
    first_decoder = family_of(shape).first_decoder_layer
    for index in range(max(special) + 1):
        if index in special:
            yield index, special.pop(index)
        else:
            yield index, names.decoder_to_opt_ds(ckpt.layer(index - first_decoder), shape)


def shard_state(state: Dict[str, torch.Tensor], tp: int, splits: Dict[str, Tuple[int, int]]
                ) -> List[Dict[str, torch.Tensor]]:
    """Cut one full layer state into the state of each TP rank (`splits`: `layer_splits(shape)`)."""
    ranks = [{} for _ in range(tp)]
    for name, tensor in state.items():
        if name in splits:
            dim, stride = splits[name]
            chunk(tensor, tp * stride, dim)         # one clear error when the rows do not divide
            pieces = [piece.clone() for piece in split_full(tensor, dim, tp, stride)]
        else:
            pieces = [tensor] * tp
        for rank, piece in zip(ranks, pieces):
            rank[name] = piece
    return ranks


def merge_state(ranks: List[Dict[str, torch.Tensor]], where: str, splits: Dict[str, Tuple[int, int]],
                compare: bool = True) -> Dict[str, torch.Tensor]:
    """The inverse of shard_state; replicated tensors must agree on every rank (unless compare=False)."""
    names = list(ranks[0])
    for rank, state in enumerate(ranks[1:], start=1):
        if list(state) != names:
            raise ConversionError(f"{where}: TP rank {rank} holds tensors {sorted(state)} but rank 0 holds "
                                  f"{sorted(names)}; the files come from different models")
    merged = {}
    for name in names:
        pieces = [state[name] for state in ranks]
        if name in splits:
            merged[name] = merge_shards(pieces, *splits[name])
        else:
            merged[name] = check_same(pieces, f"{where}: {name}") if compare else pieces[0]
    return merged


# --- writing -------------------------------------------------------------------------------------------

def check_layout(shape, tp: int, pp: int) -> None:
    """The TP / PP degrees a model of this shape can be cut into (vocabulary rows are padded instead)."""
    divisors = lambda n: ", ".join(str(d) for d in range(1, n + 1) if n % d == 0)  # noqa: E731
    if shape.num_heads % tp:
        raise ConversionError(f"--tp {tp} does not divide the {shape.num_heads} attention heads; use one of "
                              f"{divisors(shape.num_heads)}")
    for field, value in family_of(shape).tensor_parallel_divisors(shape).items():
        if field not in ("num_heads", "vocab_size") and value % tp:
            raise ConversionError(f"--tp {tp} does not divide {field} {value}; use one of {divisors(value)}")
    if pp > shape.num_layers:
        raise ConversionError(f"--pp {pp} is more pipeline stages than the {shape.num_layers} decoder layers; "
                              f"use at most {shape.num_layers}")


def layer_file_name(index: int, tp_rank: int, topology) -> str:
    """DeepSpeed's `PipelineModule.ckpt_layer_path` name for this layer and TP rank."""
    rank = topology.get_rank(pipe=0, data=0, model=tp_rank)
    repr_ = topology.get_rank_repr(rank=rank)
    return f"layer_{index:02d}" + (f"-{repr_}" if repr_ else "") + "-model_states.pt"


def write(ckpt: Checkpoint, dst: Path, *, tp: int = 1, pp: int = 1, tag: str = DEFAULT_TAG) -> None:
    """Write `ckpt` as a weights-only opt_ds checkpoint for a TP x PP layout (any DP)."""
    from opt_ds.parallel.layout import ParallelLayout
    shape = ckpt.shape
    check_layout(shape, tp, pp)
    rows = padded_rows(shape.vocab_size, tp)
    topology = ParallelLayout(tp, pp, 1).topology()
    tag_dir = Path(dst) / tag
    tag_dir.mkdir(parents=True)
    splits = layer_splits(shape.replace(vocab_size=rows))
    for index, state in progress(full_layer_states(ckpt, rows), total=shape.num_layers + 3, desc="opt_ds layers"):
        for rank, piece in enumerate(shard_state(state, tp, splits)):
            save_torch(piece, tag_dir / layer_file_name(index, rank, topology))
    meta = mp_rank_state(shape.replace(vocab_size=rows), shape.vocab_size, tp, pp)
    for model_rank in range(tp * pp):
        save_torch(meta, tag_dir / f"mp_rank_{model_rank:02d}_model_states.pt")
    (Path(dst) / "latest").write_text(tag)


def target_locations(shape, tp: int) -> Dict[str, str]:
    """Canonical key -> where the writer puts it (for --dry-run)."""
    files = lambda index: f"layer_{index:02d}-model_{{00..{tp - 1:02d}}}" if tp > 1 else f"layer_{index:02d}-model_00"  # noqa: E731
    return {key: describe_location(key, shape, files, tp) for key in C.expected_shapes(shape)}


def describe_location(key: str, shape, files, tp: int) -> str:
    names = names_of(shape)
    if key in names.global_names:
        role, name = names.global_names[key]
        index = special_layer_index(role, shape)
    else:
        layer, rel = _split_layer_key(key, names.layer_prefix)
        index = family_of(shape).decoder_layer_index(layer)
        if rel.startswith("self_attn.") and rel.split(".")[1] in ATTENTION_INPUTS:
            part, w = rel.split(".")[1:]
            layout = "[np,3,hn]" if family_of(shape).name == "opt" else "grouped per key/value head"
            name = f"self_attn.qkv.{w} ({part[0]} rows of each head, {layout})"
        elif rel.startswith("mlp.") and rel.split(".")[1] in ("gate_proj", "up_proj"):
            name = f"mlp.gate_up.weight ({rel.split('.')[1][:-5]} half of each TP shard)"
        else:
            name = DECODER_RENAMES.get(rel, rel)
    split = layer_splits(shape).get(name.split(" ")[0], (None, 1))[0]
    how = "whole" if tp == 1 else f"split dim {split} over {tp} TP ranks" if split is not None else "replicated"
    return f"{files(index)}: {name} [{how}]"


def _split_layer_key(key: str, prefix: str) -> Tuple[int, str]:
    layer, rel = key[len(prefix):].split(".", 1)
    return int(layer), rel


# --- reading -------------------------------------------------------------------------------------------

def resolve_tag_dir(path: Path, tag: Optional[str]) -> Path:
    """The directory holding the layer files: `path` itself, `path/<tag>`, or `path/<contents of latest>`."""
    path = Path(path)
    if not path.is_dir():
        raise ConversionError(f"{path}: an opt_ds checkpoint is a directory (with a `latest` file)")
    if tag is not None:
        tag_dir = path / tag
        if not tag_dir.is_dir():
            raise ConversionError(f"{path}: no checkpoint tag {tag!r} (found {', '.join(_tags(path)) or 'none'})")
        return tag_dir
    if any(LAYER_FILE.match(p.name) for p in path.iterdir()):
        return path
    latest = path / "latest"
    if latest.is_file():
        tag_dir = path / latest.read_text().strip()
        if not tag_dir.is_dir():
            raise ConversionError(f"{latest} names tag {tag_dir.name!r}, which does not exist in {path}; pass --tag")
        return tag_dir
    tags = _tags(path)
    if len(tags) == 1:
        return path / tags[0]
    raise ConversionError(f"{path}: no `latest` file; pass --tag (found tags: {', '.join(tags) or 'none'})")


def check_manifest(path, tag: Optional[str]) -> None:
    """The source's files match the SHA-256 manifest `opt-ds train` wrote beside them (a damaged checkpoint
    would otherwise convert, and verify, as if intact). Checkpoints without a manifest are not checked."""
    from opt_ds.train import checkpoint, manifest
    tag_dir = resolve_tag_dir(Path(path), tag)
    problems = manifest.verify(tag_dir, "sha256")
    if not problems:
        return
    detail = problems[0] + (f"; and {len(problems) - 1} more" if len(problems) > 1 else "")
    step = tag_dir.name.removeprefix("global_step")
    previous = checkpoint.previous_intact(tag_dir.parent, int(step), "sha256") if step.isdigit() else None
    fix = (f"convert the previous intact checkpoint with --src-tag {previous.tag}" if previous is not None
           else "restore it from a copy (no older intact checkpoint is beside it)")
    raise ConversionError(f"{tag_dir} is damaged ({detail}); {fix}")


def _tags(path: Path) -> List[str]:
    return sorted(p.name for p in path.iterdir() if p.is_dir() and any(LAYER_FILE.match(q.name) for q in p.iterdir()))


def scan(tag_dir: Path) -> Tuple[Dict[int, Dict[int, Path]], List[Path], bool]:
    """Layer files by (index, TP rank), the mp_rank files in order, and whether ZeRO files are present."""
    layers: Dict[int, Dict[int, Path]] = {}
    mp_ranks: Dict[int, Path] = {}
    has_zero = False
    for p in tag_dir.iterdir():
        if m := LAYER_FILE.match(p.name):
            layers.setdefault(int(m.group(1)), {})[int(m.group(2) or 0)] = p
        elif m := MP_RANK_FILE.match(p.name):
            mp_ranks[int(m.group(1))] = p
        elif ZERO_FILE.match(p.name):
            has_zero = True
    if not layers:
        raise ConversionError(f"{tag_dir}: no layer_XX-model_YY-model_states.pt files; not an opt_ds checkpoint")
    indices = sorted(layers)
    if indices != list(range(indices[-1] + 1)):
        missing = sorted(set(range(indices[-1] + 1)) - set(indices))
        raise ConversionError(f"{tag_dir}: layer files {', '.join(f'layer_{i:02d}' for i in missing)} are missing; "
                              "copy the complete checkpoint directory")
    tp = len(layers[EMBEDDING_INDEX])
    for index in indices:
        if sorted(layers[index]) != list(range(tp)):
            missing = sorted(set(range(tp)) - set(layers[index]))
            raise ConversionError(
                f"{tag_dir}: layer_{index:02d} has TP ranks {sorted(layers[index])} but layer_00 has "
                f"{list(range(tp))}: the file(s) for TP rank(s) {missing} "
                f"(layer_{index:02d}-model_{(missing or [tp])[0]:02d}-model_states.pt) are missing; copy the "
                "complete checkpoint directory")
    if sorted(mp_ranks) != list(range(len(mp_ranks))):
        raise ConversionError(f"{tag_dir}: mp_rank files {sorted(mp_ranks)} are not numbered 0..N-1; some are missing")
    return layers, [mp_ranks[i] for i in sorted(mp_ranks)], has_zero


class OptDsReader:
    """Reads an opt_ds checkpoint of any TP x PP layout into the canonical form."""

    def __init__(self, path, tag: Optional[str] = None, num_heads: Optional[int] = None):
        self.tag_dir = resolve_tag_dir(Path(path), tag)
        self.layers, mp_files, self.has_optimizer_state = scan(self.tag_dir)
        self.tp = len(self.layers[EMBEDDING_INDEX])
        self.meta = load_torch(mp_files[0]) if mp_files else {}
        self.pp = self._pipeline_degree(mp_files)
        self._loaded: Dict[int, List[dict]] = {}
        stored_shape = shape_from_client_state(self.meta) or self._infer_shape(num_heads)
        if num_heads is not None and num_heads != stored_shape.num_heads:
            raise ConversionError(f"--num-heads {num_heads} contradicts the {stored_shape.num_heads} heads recorded "
                                  f"in {mp_files[0]}; drop --num-heads")
        self.padded_vocab = stored_shape.vocab_size
        info = self.meta.get("universal_checkpoint_info") or {}
        self.shape = stored_shape.replace(vocab_size=info.get("original_vocab_size", stored_shape.vocab_size))
        if max(names_of(self.shape).layer_roles(self.shape).values()) != max(self.layers):
            raise ConversionError(f"{self.tag_dir}: {max(self.layers) + 1} layer files but the recorded model has "
                                  f"{self.shape.num_layers} decoder layers (expected "
                                  f"{max(names_of(self.shape).layer_roles(self.shape).values()) + 1} "
                                  "files); the checkpoint is incomplete or its metadata belongs to another model")

    def _pipeline_degree(self, mp_files: List[Path]) -> int:
        if not mp_files:
            raise ConversionError(f"{self.tag_dir}: no mp_rank_XX_model_states.pt files; the checkpoint is "
                                  "incomplete (DeepSpeed cannot load it either)")
        if len(mp_files) % self.tp:
            raise ConversionError(f"{self.tag_dir}: {len(mp_files)} mp_rank files is not a multiple of the TP degree "
                                  f"{self.tp} found from the layer files; some files are missing")
        pp = len(mp_files) // self.tp
        recorded = self.meta.get("checkpoint_parallel_dimensions") or {}
        mp_world = self.meta.get("mp_world_size")
        if (recorded and (recorded.get("tp_degree"), recorded.get("pp_degree")) != (self.tp, pp)) or \
                (mp_world is not None and mp_world != self.tp * pp):
            raise ConversionError(
                f"{self.tag_dir}: the files show TP={self.tp}, PP={pp} but DeepSpeed recorded "
                f"TP={recorded.get('tp_degree')}, PP={recorded.get('pp_degree')} (mp_world_size={mp_world}); "
                "files are missing or come from different runs")
        return pp

    def _infer_shape(self, num_heads: Optional[int]) -> OPTShape:
        """Shapes from the tensors (TP rank 0's, split dims times TP), for OPT checkpoints saved without
        `opt_model_shape` in their client state (layers: 0 embedding, 1 positions, 2.. decoder)."""
        if num_heads is None:
            raise ConversionError(f"{self.tag_dir}: the checkpoint does not record the model shape "
                                  "(no `opt_model_shape` in its client state) and the number of attention heads "
                                  "cannot be read from the weights; pass --num-heads N")
        first = {index: self._ranks(index, meta=True)[0] for index in (EMBEDDING_INDEX, POSITIONS_INDEX, 2, max(self.layers))}
        embedding, positions = first[EMBEDDING_INDEX]["word_embeddings.weight"], first[POSITIONS_INDEX]
        decoder, final = first[2], first[max(self.layers)]
        hidden = positions["embed_positions.weight"].shape[1]
        return OPTShape(num_layers=max(self.layers) - 2, hidden_size=hidden,
                        num_heads=num_heads, ffn_hidden_size=decoder["mlp.fc1.weight"].shape[0] * self.tp,
                        vocab_size=embedding.shape[0] * self.tp,
                        max_position_embeddings=positions["embed_positions.weight"].shape[0] - 2,
                        word_embed_proj_dim=embedding.shape[1] if embedding.shape[1] != hidden else None,
                        pre_layer_norm="final_layer_norm.weight" in final)

    def _ranks(self, index: int, meta: bool = False) -> List[dict]:
        if meta:        # shapes only: the files' pickles, no tensor data
            return [tensor_headers(self.layers[index][r]) for r in range(self.tp)]
        if index not in self._loaded:
            self._loaded[index] = [load_torch(self.layers[index][r]) for r in range(self.tp)]
        return self._loaded[index]

    def _merged(self, index: int, meta: bool = False) -> Dict[str, torch.Tensor]:
        ranks = [{k: v for k, v in state.items() if torch.is_tensor(v)} for state in self._ranks(index, meta)]
        return merge_state(ranks, f"{self.tag_dir.name}/layer_{index:02d}",
                           layer_splits(self.shape.replace(vocab_size=self.padded_vocab)), compare=not meta)

    def read_globals(self, meta: bool = False) -> Dict[str, torch.Tensor]:
        names = names_of(self.shape)
        indices = names.layer_roles(self.shape)
        states = {role: self._merged(index, meta) for role, index in indices.items()}
        for index in indices.values():
            self._loaded.pop(index, None)
        out = {key: states[role][name] for key, (role, name) in names.global_names.items() if name in states[role]}
        for key in names.vocab_keys:
            if key in out:
                out[key] = self._unpadded(out[key])
        return out

    def _unpadded(self, embedding: torch.Tensor) -> torch.Tensor:
        if embedding.shape[0] != self.padded_vocab:
            raise ConversionError(f"{self.tag_dir}: the embedding has {embedding.shape[0]} rows over {self.tp} TP "
                                  f"rank(s), the recorded model {self.padded_vocab}")
        return embedding[:self.shape.vocab_size]

    def read_layer(self, layer: int, meta: bool = False) -> Dict[str, torch.Tensor]:
        index = family_of(self.shape).decoder_layer_index(layer)
        state = names_of(self.shape).decoder_from_opt_ds(self._merged(index, meta), self.shape)
        self._loaded.pop(index, None)
        return state

    def checkpoint(self) -> Checkpoint:
        sources = {key: describe_location(key, self.shape, lambda i: f"{self.tag_dir.name}/layer_{i:02d}-*", self.tp)
                   for key in C.expected_shapes(self.shape)}
        shapes = {k: tuple(v.shape) for k, v in self.read_globals(meta=True).items()}
        for layer in range(self.shape.num_layers):
            shapes.update({C.layer_key(layer, n, self.shape): tuple(v.shape)
                           for n, v in self.read_layer(layer, meta=True).items()})
        origin = f"opt_ds checkpoint {self.tag_dir} (TP={self.tp}, PP={self.pp})"
        optimizer = "the ZeRO optimizer state (zero_pp_rank_*_optim_states.pt)" if self.has_optimizer_state else None
        return Checkpoint(self.shape, origin, self.read_globals, self.read_layer, sources, shapes, optimizer)


def read(path, tag: Optional[str] = None, num_heads: Optional[int] = None) -> Checkpoint:
    return OptDsReader(path, tag, num_heads).checkpoint()
