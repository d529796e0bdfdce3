"""Hugging Face OPT and LLaMA directories: `config.json` + safetensors (single or sharded) or pytorch_model.bin.

The family comes from config.json's model_type; its names and config live in conversion.families (OPT's
in conversion.opt, LLaMA's in conversion.llama, whose head is untied: `lm_head.weight` is a tensor of its own).

Reading accepts what circulates (HF #43159, TGI #2197, PiPPy PR #779): keys with the `model.` prefix
(OPTForCausalLM) or without it (OPTModel, as HF's own metaseq converter saves), and `lm_head.weight`
present or absent; a present head must equal the embedding, since OPT ties them. Writing produces what
`OPTForCausalLM.save_pretrained` does: `model.decoder.*` keys, no `lm_head`, `tie_word_embeddings: true`.
Safetensors files are read tensor by tensor and written in shards of at most `max_shard_bytes`, tensor by
tensor (each file's header is planned first), so neither side holds more than one layer.
"""
from __future__ import annotations

import ctypes
import json
import math
import struct
from pathlib import Path
from typing import Dict, List, Optional

import torch

from conversion import canonical as C
from conversion import opt as O
from conversion.canonical import Checkpoint
from conversion.families import names_for_hf_config, names_of
from conversion.files import ConversionError, drop_file_pages, load_torch
from conversion.hf_reference import LM_HEAD
from conversion.progress import progress

DEFAULT_MAX_SHARD_BYTES = 5 * 2 ** 30


# --- config.json <-> shape -----------------------------------------------------------------------------

def shape_from_config(config: dict, where: str):
    return names_for_hf_config(config, where).hf_shape_from_config(config, where)


def config_from_shape(shape, dtype: torch.dtype) -> dict:
    return names_of(shape).hf_config_from_shape(shape, dtype)


# --- reading -------------------------------------------------------------------------------------------

class _WeightFiles:
    """Name -> tensor access over the weight files of an HF directory, loading each tensor on demand."""

    def __init__(self, directory: Path):
        self.directory = directory
        self.files = self._weight_files()
        self.location: Dict[str, Path] = {}
        self.shapes: Dict[str, tuple] = {}
        self._torch_states: Dict[Path, dict] = {}
        for path in self.files:
            for name, shape in self._list(path).items():
                self.location[name] = path
                self.shapes[name] = shape

    def _weight_files(self) -> List[Path]:
        d = self.directory
        for single, index in (("model.safetensors", "model.safetensors.index.json"),
                              ("pytorch_model.bin", "pytorch_model.bin.index.json")):
            if (d / index).is_file():
                try:
                    weight_map = json.loads((d / index).read_text())["weight_map"]
                except (ValueError, KeyError) as err:
                    raise ConversionError(f"{d / index}: not a valid weight index ({err})") from None
                files = sorted({d / name for name in weight_map.values()})
                missing = [p.name for p in files if not p.is_file()]
                if missing:
                    raise ConversionError(f"{d}: shard file(s) {', '.join(missing)} listed in {index} are missing; "
                                          "download the complete model directory")
                return files
            if (d / single).is_file():
                return [d / single]
        raise ConversionError(f"{d}: no model.safetensors, pytorch_model.bin or their sharded index; not a "
                              "Hugging Face model directory")

    def _list(self, path: Path) -> Dict[str, tuple]:
        if path.suffix == ".safetensors":
            from safetensors import SafetensorError, safe_open
            try:
                with safe_open(str(path), "pt") as f:
                    return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
            except (SafetensorError, OSError) as err:
                raise ConversionError(f"{path}: cannot be read as safetensors ({err}); the file is truncated or "
                                      "corrupt: download it again") from None
        state = load_torch(path, weights_only=True)     # a plain state dict: no need to trust pickles
        if not isinstance(state, dict):
            raise ConversionError(f"{path}: holds a {type(state).__name__}, not a state dict")
        self._torch_states[path] = state
        return {k: tuple(v.shape) for k, v in state.items() if torch.is_tensor(v)}

    def get(self, names: List[str]) -> Dict[str, torch.Tensor]:
        """The tensors `names`, each file opened once (and not kept open: a safetensors file's memory map
        would keep every page read resident until the conversion ends)."""
        by_file: Dict[Path, List[str]] = {}
        for name in names:
            by_file.setdefault(self.location[name], []).append(name)
        out = {}
        for path, names_in_file in by_file.items():
            if path.suffix == ".safetensors":
                from safetensors import safe_open
                with safe_open(str(path), "pt") as f:
                    out.update((name, f.get_tensor(name)) for name in names_in_file)
            else:
                out.update((name, self._torch_states[path][name]) for name in names_in_file)
                drop_file_pages(path)
        return out


def canonical_name(name: str, tied_head: bool = True) -> Optional[str]:
    """HF key (with or without `model.`) -> canonical key; None for a tied head."""
    if name == LM_HEAD:
        return None if tied_head else name
    return name if name.startswith("model.") else "model." + name


class HFReader:
    def __init__(self, directory):
        self.directory = Path(directory)
        config_path = self.directory / "config.json"
        if not config_path.is_file():
            raise ConversionError(f"{self.directory}: no config.json; not a Hugging Face model directory")
        try:
            self.config = json.loads(config_path.read_text())
        except ValueError as err:
            raise ConversionError(f"{config_path}: not valid JSON ({err})") from None
        self.shape = shape_from_config(self.config, str(config_path))
        self.family = names_of(self.shape)
        self.weights = _WeightFiles(self.directory)
        tied = self.family.hf_tied_head
        self.names = {canonical_name(n, tied): n for n in self.weights.shapes if canonical_name(n, tied) is not None
                      and not n.endswith("rotary_emb.inv_freq")}     # a buffer older LLaMA files saved
        if tied and LM_HEAD in self.weights.shapes:
            self._check_tied_head()

    def _check_tied_head(self):
        head = self.weights.get([LM_HEAD])[LM_HEAD]
        embedding = self._read([O.EMBED_TOKENS])[O.EMBED_TOKENS] if O.EMBED_TOKENS in self.names else None
        if embedding is None or head.shape != embedding.shape or not torch.equal(head, embedding):
            raise ConversionError(f"{self.directory}: lm_head.weight differs from the token embedding; OPT ties them "
                                  "and opt_ds has no separate output layer, so this model cannot convert")

    def _read(self, keys) -> Dict[str, torch.Tensor]:
        """Canonical key -> tensor, for the keys this checkpoint holds."""
        names = {key: self.names[key] for key in keys if key in self.names}
        tensors = self.weights.get(list(names.values()))
        return {key: tensors[name] for key, name in names.items()}

    def read_globals(self) -> Dict[str, torch.Tensor]:
        return self._read(C.global_shapes(self.shape))

    def read_layer(self, layer: int) -> Dict[str, torch.Tensor]:
        keys = {C.layer_key(layer, n, self.shape): n for n in C.layer_shapes(self.shape)}
        return {keys[key]: tensor for key, tensor in self._read(keys).items()}

    def checkpoint(self) -> Checkpoint:
        sources = {key: f"{self.weights.location[name].name}: {name}" for key, name in self.names.items()}
        shapes = {key: self.weights.shapes[name] for key, name in self.names.items()}
        return Checkpoint(self.shape, f"Hugging Face model {self.directory}", self.read_globals, self.read_layer,
                          sources, shapes)


def read(directory) -> Checkpoint:
    return HFReader(directory).checkpoint()


# --- writing -------------------------------------------------------------------------------------------

SAFETENSORS_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
                      torch.int64: "I64", torch.int32: "I32", torch.uint8: "U8", torch.bool: "BOOL"}
HEAD_KEYS = (O.EMBED_TOKENS, O.EMBED_POSITIONS, O.PROJECT_IN)     # written before the decoder layers


def _nbytes(shape, dtype: torch.dtype) -> int:
    return math.prod(shape) * torch.empty(0, dtype=dtype).element_size()


def plan_shards(entries, max_shard_bytes: int) -> List[List[tuple]]:
    """(key, shape, dtype) in write order -> the entries of each file: a file is closed when the next tensor
    would take it past `max_shard_bytes` (a tensor larger than that gets a file of its own)."""
    shards, size = [[]], 0
    for entry in entries:
        nbytes = _nbytes(entry[1], entry[2])
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(entry)
        size += nbytes
    return shards


def write_safetensors(path: Path, entries: List[tuple], tensors) -> None:
    """A safetensors file whose header is known before its tensors: written tensor by tensor as `tensors`
    yields them (each (key, tensor) must match the next entry), so only one tensor is in memory."""
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for key, shape, dtype in entries:
        end = offset + _nbytes(shape, dtype)
        header[key] = {"dtype": SAFETENSORS_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, end]}
        offset = end
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)              # safetensors pads its header to 8 bytes, with spaces
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text)
        for key, shape, dtype in entries:
            found, tensor = next(tensors)
            if found != key or tensor.dtype != dtype or tuple(tensor.shape) != tuple(shape):
                raise ConversionError(f"{found} is {tensor.dtype} {tuple(tensor.shape)} where the export planned "
                                      f"{key} {dtype} {tuple(shape)} from decoder layer 0 (the source stores its "
                                      "layers in different dtypes); pass --dtype to store every tensor alike")
            tensor = tensor.contiguous()
            f.write((ctypes.c_char * tensor.nbytes).from_address(tensor.data_ptr()) if tensor.nbytes else b"")


def write(ckpt: Checkpoint, dst: Path, *, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> None:
    """Safetensors files of at most `max_shard_bytes`, written as the source's layers stream through: the
    files are planned from the shapes and from the dtypes of the non-layer tensors and decoder layer 0, so
    each file's header is written first and only one layer is in memory, whatever the file size."""
    dst, shape = Path(dst), ckpt.shape
    globals_ = ckpt.globals()
    first_layer = ckpt.layer(0) if shape.num_layers else {}
    head = [k for k in HEAD_KEYS if k in globals_]
    tail = [k for k in globals_ if k not in head]
    entries = [(k, tuple(globals_[k].shape), globals_[k].dtype) for k in head]
    entries += [(C.layer_key(layer, n, shape), tuple(t.shape), t.dtype) for layer in range(shape.num_layers)
                for n, t in first_layer.items()]
    entries += [(k, tuple(globals_[k].shape), globals_[k].dtype) for k in tail]
    bytes_by_dtype: Dict[torch.dtype, int] = {}
    for _, size, dtype in entries:
        bytes_by_dtype[dtype] = bytes_by_dtype.get(dtype, 0) + _nbytes(size, dtype)

    def tensors():
        nonlocal first_layer
        for k in head:
            yield k, globals_.pop(k)
        for layer in progress(range(shape.num_layers), desc="HF layers"):
            state = first_layer if layer == 0 else ckpt.layer(layer)
            first_layer = None
            while state:
                name = next(iter(state))
                yield C.layer_key(layer, name, shape), state.pop(name)
        for k in tail:
            yield k, globals_.pop(k)

    shards = plan_shards(entries, max_shard_bytes)
    names = ["model.safetensors"] if len(shards) == 1 else \
        [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    stream = tensors()
    for name, shard in zip(names, shards):
        write_safetensors(dst / name, shard, stream)
    if len(shards) > 1:
        weight_map = {key: name for name, shard in zip(names, shards) for key, _, _ in shard}
        index = {"metadata": {"total_size": sum(bytes_by_dtype.values())}, "weight_map": weight_map}
        (dst / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    main_dtype = max(bytes_by_dtype, key=bytes_by_dtype.get)
    (dst / "config.json").write_text(json.dumps(config_from_shape(shape, main_dtype), indent=2) + "\n")
    generation = names_of(shape).hf_special_ids
    (dst / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")


def target_locations(shape) -> Dict[str, str]:
    return {key: f"model*.safetensors: {key}" for key in C.expected_shapes(shape)}
