"""metaseq (fairseq lineage) OPT checkpoints.

Read: `reshard-model_part-K.pt` MP parts (fused `qkv_proj`, K,V,Q per part; or separate q/k/v), single
files (`restored.pt`, `reshard.pt`, `*consolidated*.pt`), and FSDP-flattened training shards
`checkpoint_*-model_part-K-shardD.pt` (unflattened with their `shard_metadata`, as metaseq's
reshard_fsdp does). Write: `reshard-model_part-K.pt` parts as metaseq's model-parallel model loads them
(fused K,V,Q per part, which `reshard_mp` re-cuts without knowing the order), or a `restored.pt`
singleton with separate q/k/v as `convert_to_singleton` writes (the input HF's converter expects).

`decoder.output_projection.weight` is the tied head: metaseq re-creates it from `embed_tokens` when it is
missing and reshard_mp would treat an MP-split copy as replicated, so the writer leaves it out, as
`convert_to_singleton` does; the reader accepts it when it equals the embedding.
"""
from __future__ import annotations

import argparse
import re
import warnings
from collections import OrderedDict
from pathlib import Path
from typing import Dict, Iterator, List, Optional

import torch

from opt_ds.models.presets import OPTShape

from conversion import canonical as C
from conversion import opt as O
from conversion.canonical import Checkpoint
from conversion.files import ConversionError, StreamedTorchFile, drop_file_pages, load_torch
from conversion.progress import progress
from conversion.sharding import chunk, merge_metaseq_kvq, metaseq_kvq_parts

PART_FILE = re.compile(r"^(?P<prefix>.+?)-model_part-(?P<part>\d+)(?:-shard(?P<shard>\d+))?\.pt$")
TIED_HEAD = "decoder.output_projection.weight"
VERSION = "decoder.version"
GLOBAL_KEYS = {
    "decoder.embed_tokens.weight": O.EMBED_TOKENS,
    "decoder.embed_positions.weight": O.EMBED_POSITIONS,
    "decoder.project_in_dim.weight": O.PROJECT_IN,
    "decoder.project_out_dim.weight": O.PROJECT_OUT,
    "decoder.layer_norm.weight": O.FINAL_NORM_WEIGHT,
    "decoder.layer_norm.bias": O.FINAL_NORM_BIAS,
}
CANONICAL_TO_METASEQ = {v: k for k, v in GLOBAL_KEYS.items()}
LAYER_KEY = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")
FUSED_QKV = ("self_attn.qkv_proj.weight", "self_attn.qkv_proj.bias")


class ReplicaMismatchWarning(UserWarning):
    """A tensor that should be replicated over MP parts differs between them (metaseq tolerates this)."""


def split_dim(name: str) -> Optional[int]:
    """MP split dimension of a metaseq tensor (name inside a layer, or a global key); None = replicated."""
    if re.search(r"embed_tokens|fc1|(^|\.)(q|k|v)_proj", name):
        return 0
    if re.search(r"(fc2|out_proj)\.weight$", name):
        return 1
    return None


# --- finding the files ---------------------------------------------------------------------------------

def find_parts(path: Path) -> List[List[Path]]:
    """The files of one checkpoint: one list per MP part, holding that part's FSDP shards (or one file)."""
    path = Path(path)
    if path.is_file():
        match = PART_FILE.match(path.name)
        if not match:
            return [[path]]
        return _part_set(path.parent, match.group("prefix"), match.group("shard") is not None)
    if not path.is_dir():
        raise ConversionError(f"{path}: no such file or directory")
    sets = {}
    for p in sorted(path.glob("*.pt")):
        match = PART_FILE.match(p.name)
        key = (match.group("prefix"), match.group("shard") is not None) if match else p.name
        sets.setdefault(key, p)
    if not sets:
        raise ConversionError(f"{path}: no .pt files; not a metaseq checkpoint directory")
    if len(sets) > 1:
        examples = ", ".join(str(p) for p in sets.values())
        raise ConversionError(f"{path} holds several metaseq checkpoints ({examples}); pass the one to convert "
                              "as the source path (for MP parts, any one part file; its siblings are found)")
    (key, first), = sets.items()
    return [[first]] if isinstance(key, str) else _part_set(path, *key)


def _part_set(directory: Path, prefix: str, sharded: bool) -> List[List[Path]]:
    found: Dict[int, Dict[int, Path]] = {}
    for p in directory.glob(f"{glob_escape(prefix)}-model_part-*.pt"):
        match = PART_FILE.match(p.name)
        if match and match.group("prefix") == prefix and (match.group("shard") is not None) == sharded:
            found.setdefault(int(match.group("part")), {})[int(match.group("shard") or 0)] = p
    parts = sorted(found)
    if parts != list(range(len(parts))):
        missing = sorted(set(range(parts[-1] + 1)) - set(parts))
        raise ConversionError(f"{directory}: {prefix}-model_part-{missing[0]}*.pt is missing (found parts {parts}); "
                              "copy every model-parallel part")
    shard_sets = {tuple(sorted(found[k])) for k in parts}
    if len(shard_sets) > 1 or sorted(found[0]) != list(range(len(found[0]))):
        raise ConversionError(f"{directory}: the FSDP shard files of {prefix} are incomplete (shards per part: "
                              f"{ {k: sorted(v) for k, v in found.items()} }); copy every -shardD file of every part")
    return [[found[k][d] for d in sorted(found[k])] for k in parts]


def glob_escape(text: str) -> str:
    return re.sub(r"([\[\]*?])", r"[\1]", text)


# --- one MP part: plain or FSDP-flattened ---------------------------------------------------------------

class _Part:
    """The unflattened state dict of one MP part, built lazily from its file(s)."""

    def __init__(self, files: List[Path]):
        self.files = files
        self.states = [load_torch(p) for p in files]
        for p, state in zip(files, self.states):
            if not isinstance(state, dict):
                raise ConversionError(f"{p}: holds a {type(state).__name__}, not a metaseq checkpoint dict")
        first = self.states[0]
        self.model = first["model"] if isinstance(first.get("model"), dict) else first
        self.cfg = first.get("cfg") if "model" in first else None
        self.shared: Dict[str, str] = {}
        self.flat: Dict[str, tuple] = {}
        self._cached: tuple = (None, {})
        flat_keys = set()
        if any("flat_param" in k for k in self.model):
            if "shard_metadata" not in first:
                raise ConversionError(f"{files[0]}: FSDP-flattened weights (flat_param_*) without the shard_metadata "
                                      "needed to unflatten them (metaseq #691, #695); use the training shards "
                                      "checkpoint_*-model_part-K-shardD.pt, which carry it")
            self.flat = self._flat_index()
            flat_keys = {".".join(filter(None, [entry["fsdp_path"], name])) for entry in self._metadata(0)
                         for name in entry["params"]}
        elif len(files) > 1:
            raise ConversionError(f"{files[0].parent}: several -shardD files of unflattened weights; pass one "
                                  "consolidated file per part")
        self.shapes = {**{k: tuple(v.shape) for k, v in self.model.items() if torch.is_tensor(v) and k not in flat_keys},
                       **{k: shape for k, (_, _, shape) in self.flat.items()}}

    def release(self) -> None:
        """Let go of what one layer's reads touched (called after each layer): the unflattened cache, and the
        memory-mapped pages, which would otherwise stay resident until the conversion ends."""
        self._cached = (None, {})
        for path in self.files:
            drop_file_pages(path)

    def _metadata(self, shard: int) -> list:
        return self.states[shard]["shard_metadata"]["param_metadata"]

    def _flat_index(self) -> Dict[str, tuple]:
        """Parameter name -> (metadata entry index, flat param name, shape), from shard 0's metadata."""
        index = {}
        for i, entry in enumerate(self._metadata(0)):
            for flat_name, info in entry["params"].items():
                for name, shape in zip(info["names"], info["shapes"]):
                    index[".".join(filter(None, [entry["fsdp_path"], name]))] = (i, flat_name, tuple(shape))
        self.shared = {dst: src for entry in self._metadata(0) for src, dst in entry.get("shared_param_info", [])
                       if src in index}
        index.update({dst: index[src] for dst, src in self.shared.items()})
        return index

    def get(self, key: str) -> torch.Tensor:
        if key not in self.flat:
            return self.model[key]
        key = self.shared.get(key, key)
        entry, flat_name, _ = self.flat[key]
        if self._cached[0] != (entry, flat_name):      # a layer's tensors are read together: unflatten once
            self._cached = ((entry, flat_name), self._unflatten(entry, flat_name))
        return self._cached[1][key]

    def _unflatten(self, entry: int, flat_name: str) -> Dict[str, torch.Tensor]:
        """Concatenate the DP shards of one flat parameter (padding removed) and cut it into its tensors."""
        meta = self._metadata(0)[entry]
        full_key = ".".join(filter(None, [meta["fsdp_path"], flat_name]))
        pieces = []
        for shard, state in enumerate(self.states):
            flat = state["model"][full_key]
            pad = state["shard_metadata"]["param_metadata"][entry]["params"][flat_name]["padding"]
            pieces.append(flat[:flat.numel() - pad] if pad else flat)
        full = torch.cat(pieces)
        info = meta["params"][flat_name]
        if sum(info["numels"]) != full.numel():
            raise ConversionError(f"{self.files[0]}: flat parameter {full_key} has {full.numel()} elements over "
                                  f"{len(self.states)} shard(s) but its metadata lists {sum(info['numels'])}; "
                                  "a -shardD file is missing or from another run")
        return {".".join(filter(None, [meta["fsdp_path"], name])): piece.view(tuple(shape))
                for name, piece, shape in zip(info["names"], full.split(info["numels"]), info["shapes"])}


def _cfg_get(section, name, default=None):
    if section is None:
        return default
    if isinstance(section, dict):
        return section.get(name, default)
    return getattr(section, name, default)


# --- reading -------------------------------------------------------------------------------------------

class MetaseqReader:
    def __init__(self, path, num_heads: Optional[int] = None):
        part_files = find_parts(Path(path))
        self.where = f"{part_files[0][0].parent}/{part_files[0][0].name}" + \
            (f" (+{sum(map(len, part_files)) - 1} more files)" if sum(map(len, part_files)) > 1 else "")
        self.files_label = files_label(part_files)
        self.parts = [_Part(files) for files in progress(part_files, desc="metaseq parts")]
        model_cfg = _cfg_get(self.parts[0].cfg, "model")
        declared = _cfg_get(model_cfg, "model_parallel_size")
        if declared is not None and declared != len(self.parts):
            raise ConversionError(
                f"{self.where}: the checkpoint's cfg says model_parallel_size={declared} but {len(self.parts)} "
                f"part file(s) were found; the missing -model_part-K files must be copied too")
        self.shape = self._shape(model_cfg, num_heads)

    def _shape(self, model_cfg, num_heads: Optional[int]) -> OPTShape:
        heads = _cfg_get(model_cfg, "decoder_attention_heads", num_heads)
        if heads is None:
            raise ConversionError(f"{self.where}: no cfg with decoder_attention_heads in the file; pass --num-heads N")
        if num_heads is not None and num_heads != heads:
            raise ConversionError(f"--num-heads {num_heads} contradicts decoder_attention_heads={heads} in "
                                  f"{self.where}; drop --num-heads")
        shapes = self.parts[0].shapes
        try:
            rows = {p.shapes["decoder.embed_tokens.weight"][0] for p in self.parts}
            if len(rows) > 1:
                raise ConversionError(f"{self.where}: the MP parts hold different numbers of vocabulary rows "
                                      f"({sorted(rows)}); they come from different checkpoints")
            vocab = rows.pop() * len(self.parts)
            embed = shapes["decoder.embed_tokens.weight"][1]
            positions, hidden = shapes["decoder.embed_positions.weight"]
            ffn = sum(p.shapes["decoder.layers.0.fc1.weight"][0] for p in self.parts)
        except KeyError as err:
            raise ConversionError(f"{self.where}: no {err.args[0]} tensor; not an OPT checkpoint with learned "
                                  "positions (or an FSDP-flattened file whose shard_metadata is missing)") from None
        layers = 1 + max((int(m.group(1)) for k in shapes if (m := LAYER_KEY.match(k))), default=-1)
        if _cfg_get(model_cfg, "decoder_layers", layers) != layers:
            raise ConversionError(f"{self.where}: cfg says decoder_layers={_cfg_get(model_cfg, 'decoder_layers')} but "
                                  f"the weights have {layers} layers")
        pre_ln = _cfg_get(model_cfg, "decoder_normalize_before", "decoder.layer_norm.weight" in shapes)
        return OPTShape(num_layers=layers, hidden_size=hidden, num_heads=heads, ffn_hidden_size=ffn,
                        vocab_size=vocab, max_position_embeddings=positions - 2,
                        word_embed_proj_dim=embed if embed != hidden else None, pre_layer_norm=bool(pre_ln),
                        dropout=_cfg_get(model_cfg, "dropout", 0.1),
                        attention_dropout=_cfg_get(model_cfg, "attention_dropout", 0.0))

    def _merged(self, key: str, dim: Optional[int], meta: bool) -> torch.Tensor:
        pieces = [p.get(key) for p in self.parts]
        if meta:
            pieces = [t.to("meta") for t in pieces]
        if dim is not None:
            return torch.cat(pieces, dim=dim)
        for k, other in enumerate(pieces[1:], start=1):
            if not meta and (other.shape != pieces[0].shape or not torch.equal(other, pieces[0])):
                diff = (other.float() - pieces[0].float()).abs().max().item() if other.shape == pieces[0].shape else None
                warnings.warn(f"{key} differs between MP part 0 and part {k} (max |diff| {diff}); using part 0, as "
                              "metaseq's reshard_mp does", ReplicaMismatchWarning)
        return pieces[0]

    def read_globals(self, meta: bool = False) -> Dict[str, torch.Tensor]:
        keys = self.parts[0].shapes
        out = {canon: self._merged(key, split_dim(key), meta) for key, canon in GLOBAL_KEYS.items() if key in keys}
        if TIED_HEAD in keys and not meta and O.EMBED_TOKENS in out:
            head = self._merged(TIED_HEAD, 0, meta)
            if head.shape != out[O.EMBED_TOKENS].shape or not torch.equal(head, out[O.EMBED_TOKENS]):
                raise ConversionError(f"{self.where}: {TIED_HEAD} differs from decoder.embed_tokens.weight; OPT ties "
                                      "them and an untied output layer cannot convert")
        self._release()
        return out

    def _release(self) -> None:
        for part in self.parts:
            part.release()

    def read_layer(self, layer: int, meta: bool = False) -> Dict[str, torch.Tensor]:
        prefix = f"decoder.layers.{layer}."
        out = {}
        for name in self.read_layer_names(layer):
            if name in FUSED_QKV:
                fused = [p.get(prefix + name) for p in self.parts]
                q, k, v = merge_metaseq_kvq([t.to("meta") for t in fused] if meta else fused)
                kind = name.rsplit(".", 1)[1]
                out.update({f"self_attn.q_proj.{kind}": q, f"self_attn.k_proj.{kind}": k, f"self_attn.v_proj.{kind}": v})
            else:
                out[name] = self._merged(prefix + name, split_dim(name), meta)
        self._release()
        return out

    def unexpected_keys(self) -> List[str]:
        known = set(GLOBAL_KEYS) | {TIED_HEAD, VERSION}
        return [k for k in self.parts[0].shapes if k not in known and not LAYER_KEY.match(k)]

    def checkpoint(self) -> Checkpoint:
        unexpected = self.unexpected_keys()
        if unexpected:
            raise ConversionError(f"{self.where}: unexpected tensors {', '.join(unexpected[:5])}; this is not an OPT "
                                  "checkpoint metaseq wrote (sinusoidal positions? another architecture?)")
        shapes = {k: tuple(v.shape) for k, v in self.read_globals(meta=True).items()}
        for layer in range(self.shape.num_layers):
            shapes.update({C.layer_key(layer, n, self.shape): tuple(v.shape)
                           for n, v in self.read_layer(layer, meta=True).items()})
        fused = FUSED_QKV[0] in self.read_layer_names(0)
        sources = {key: self._describe(key, fused) for key in shapes}
        origin = f"metaseq checkpoint {self.where} ({len(self.parts)} MP part(s))"
        optimizer = "the FSDP optimizer state (last_optimizer_state)" \
            if any(s.get("last_optimizer_state") is not None for p in self.parts for s in p.states) else None
        return Checkpoint(self.shape, origin, self.read_globals, self.read_layer, sources, shapes, optimizer)

    def read_layer_names(self, layer: int) -> List[str]:
        prefix = f"decoder.layers.{layer}."
        return [k[len(prefix):] for k in self.parts[0].shapes if k.startswith(prefix)]

    def _describe(self, key: str, fused: bool) -> str:
        return describe_location(key, len(self.parts), fused, self.files_label)


def files_label(part_files: List[List[Path]]) -> str:
    """`reshard-model_part-{0..1}.pt`-style name for a set of part (and shard) files."""
    match = PART_FILE.match(part_files[0][0].name)
    if not match:
        return part_files[0][0].name
    shards = f"-shard{{0..{len(part_files[0]) - 1}}}" if match.group("shard") is not None else ""
    parts = f"{{0..{len(part_files) - 1}}}" if len(part_files) > 1 else "0"
    return f"{match.group('prefix')}-model_part-{parts}{shards}.pt"


def describe_location(key: str, parts: int, fused: bool, files: str) -> str:
    if key in CANONICAL_TO_METASEQ:
        name = CANONICAL_TO_METASEQ[key]
    else:
        layer, rel = key[len(O.LAYER_PREFIX):].split(".", 1)
        name = f"decoder.layers.{layer}.{rel}"
        if fused and rel.split(".")[1] in O.ATTENTION_INPUTS:
            name = f"decoder.layers.{layer}.self_attn.qkv_proj.{rel.rsplit('.', 1)[1]} ({rel.split('.')[1][0]} block " \
                   "of each part's [K;V;Q])"
    dim = split_dim(name.split(" ")[0].replace("qkv_proj", "q_proj"))
    how = "whole" if parts == 1 else "replicated" if dim is None else f"split dim {dim} over {parts} parts"
    return f"{files}: {name} [{how}]"


def read(path, num_heads: Optional[int] = None) -> Checkpoint:
    return MetaseqReader(path, num_heads).checkpoint()


# --- writing -------------------------------------------------------------------------------------------

LAYOUTS = ("parts", "restored")


def model_config(shape: OPTShape, parts: int) -> argparse.Namespace:
    """cfg["model"]: attribute-accessible, as metaseq's tools expect (reshard_mp sets .model_parallel_size)."""
    return argparse.Namespace(
        _name="transformer_lm_megatron", arch="transformer_lm_megatron", activation_fn="relu",
        dropout=shape.dropout, attention_dropout=shape.attention_dropout,
        decoder_embed_dim=shape.hidden_size, decoder_ffn_embed_dim=shape.ffn_hidden_size,
        decoder_layers=shape.num_layers, decoder_attention_heads=shape.num_heads,
        decoder_input_dim=shape.embed_dim, decoder_output_dim=shape.embed_dim,
        decoder_normalize_before=shape.pre_layer_norm, decoder_learned_pos=True, decoder_learned_sinusoidal=False,
        share_decoder_input_output_embed=True, no_scale_embedding=True, max_target_positions=shape.max_position_embeddings,
        tokens_per_sample=shape.max_position_embeddings, add_bos_token=False, model_parallel_size=parts,
        checkpoint_activations=False, offload_activations=False, no_emb_dropout=False, disable_bias=False,
        disable_affine_ln=False, alibi=False, full_megatron_init=False, megatron_init_sigma=shape.init_std,
    )


def checkpoint_dict(model: Dict[str, torch.Tensor], shape: OPTShape, parts: int) -> dict:
    """The top-level dict of a released metaseq file (optimizer state left out, as in the releases)."""
    return {
        "model": model,
        "cfg": {"_name": None, "common": {"model_parallel_size": parts},
                "distributed_training": {"distributed_world_size": parts},
                "model": model_config(shape, parts),
                "task": {"_name": "streaming_language_modeling", "vocab_filename": "gpt2-vocab.json",
                         "merges_filename": "gpt2-merges.txt", "tokens_per_sample": shape.max_position_embeddings},
                "checkpoint": {}, "optimization": {}},
        "args": None,
        "criterion": None,
        "optimizer_history": [{"criterion_name": "VocabParallelCrossEntropyCriterion",
                               "optimizer_name": "MemoryEfficientFP16Adam", "lr_scheduler_state": {}, "num_updates": 0}],
        "task_state": {},
        "extra_state": {"metrics": {}, "previous_training_time": 0,
                        "train_iterator": {"epoch": 1, "iterations_in_epoch": 0, "shuffle": False}},
    }


def part_pieces(ckpt: Checkpoint, parts: int, fused: bool) -> Iterator[List[Dict[str, torch.Tensor]]]:
    """Each MP part's tensors in metaseq's module order, one group at a time (the embedding and positions,
    then each decoder layer, then the final norm / project_out): each source layer is read once, whatever
    the number of parts, and only one group is in memory."""
    take = lambda name, t: chunk(t, parts, split_dim(name)) if split_dim(name) is not None else [t] * parts  # noqa: E731
    globals_ = ckpt.globals()
    embedding = globals_.pop(O.EMBED_TOKENS)
    head = [{VERSION: torch.tensor([3.0], dtype=embedding.dtype)} for _ in range(parts)]
    for piece, part in zip(take("embed_tokens", embedding), head):
        part["decoder.embed_tokens.weight"] = piece
    del embedding
    for key in (O.PROJECT_IN, O.EMBED_POSITIONS):
        if key in globals_:
            tensor = globals_.pop(key)
            for part in head:
                part[CANONICAL_TO_METASEQ[key]] = tensor
    yield head
    del head
    for layer in progress(range(ckpt.shape.num_layers), desc="metaseq layers"):
        tensors = ckpt.layer(layer)
        prefix = f"decoder.layers.{layer}."
        pieces: List[Dict[str, torch.Tensor]] = [{} for _ in range(parts)]
        for kind in ("weight", "bias"):
            qkv = [tensors[f"self_attn.{p}.{kind}"] for p in O.ATTENTION_INPUTS]
            if fused:
                for part, fused_qkv in zip(pieces, metaseq_kvq_parts(*qkv, parts)):
                    part[prefix + f"self_attn.qkv_proj.{kind}"] = fused_qkv
            else:
                for p, t in zip(O.ATTENTION_INPUTS, qkv):
                    for part, piece in zip(pieces, take(p, t)):
                        part[prefix + f"self_attn.{p}.{kind}"] = piece
        for name in ("self_attn.out_proj.weight", "self_attn.out_proj.bias", "self_attn_layer_norm.weight",
                     "self_attn_layer_norm.bias", "fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias",
                     "final_layer_norm.weight", "final_layer_norm.bias"):
            for part, piece in zip(pieces, take(name, tensors[name])):
                part[prefix + name] = piece
        del tensors
        yield pieces
        del pieces
    yield [{CANONICAL_TO_METASEQ[key]: globals_[key] for key in (O.FINAL_NORM_WEIGHT, O.FINAL_NORM_BIAS, O.PROJECT_OUT)
            if key in globals_} for _ in range(parts)]


def check_parts(shape: OPTShape, parts: int) -> None:
    if not isinstance(shape, OPTShape):
        raise ConversionError("metaseq checkpoints hold OPT models only; convert a LLaMA to hf, meta or opt_ds")
    for what, size in (("attention heads", shape.num_heads), ("FFN size", shape.ffn_hidden_size),
                       ("vocabulary rows", shape.vocab_size)):
        if size % parts:
            raise ConversionError(f"--tp {parts} (metaseq MP parts) does not divide the {size} {what}; choose a "
                                  f"divisor of {size}")


def write(ckpt: Checkpoint, dst: Path, *, parts: int = 1, layout: str = "parts") -> None:
    """Write `ckpt` as metaseq MP parts (`reshard-model_part-K.pt`) or a `restored.pt` singleton, every part
    file at once as the source's layers stream through (each tensor is written as soon as it is cut)."""
    if layout not in LAYOUTS:
        raise ConversionError(f"unknown metaseq layout {layout!r}; choose one of {', '.join(LAYOUTS)}")
    if layout == "restored" and parts != 1:
        raise ConversionError("restored.pt is a single file (MP=1); drop --tp or use --metaseq-layout parts")
    check_parts(ckpt.shape, parts)
    names = ["restored.pt"] if layout == "restored" else [f"reshard-model_part-{part}.pt" for part in range(parts)]
    files = [StreamedTorchFile(Path(dst) / name) for name in names]
    models = [OrderedDict() for _ in range(parts)]
    for group in part_pieces(ckpt, parts, fused=layout == "parts"):
        for file, model, tensors in zip(files, models, group):
            model.update((key, file.put(tensor)) for key, tensor in tensors.items())
    for file, model in zip(files, models):
        file.close(checkpoint_dict(model, ckpt.shape, parts))


def target_locations(shape: OPTShape, parts: int, layout: str) -> Dict[str, str]:
    files = "restored.pt" if layout == "restored" else f"reshard-model_part-{{0..{parts - 1}}}.pt"
    return {key: describe_location(key, parts, layout == "parts", files) for key in C.expected_shapes(shape)}
