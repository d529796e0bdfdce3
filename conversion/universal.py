"""DeepSpeed universal checkpoints: change TP / PP / DP on resume and keep the optimizer state.

A training checkpoint's ZeRO files hold each rank's flat partition of the fp32 master weights and Adam
moments; they only load back at the same layout. DeepSpeed's `ds_to_universal` cuts them into one folder
per parameter (`zero/<name>/{fp32,exp_avg,exp_avg_sq,step}.pt`, TP slices merged) using the patterns in
the checkpoint's `universal_checkpoint_info`; an engine started with `"checkpoint": {"load_universal":
true}` at any layout then takes its slice of every parameter and of its optimizer state.

`write` runs `ds_to_universal` itself (in this process, one worker), after adding the patterns of
`opt_ds.train.contract` to checkpoints saved without them. `read` turns the fp32 master weights
of a universal checkpoint into the canonical form, which is how a conversion to it is verified.
"""
from __future__ import annotations

import contextlib
import io
import tempfile
from pathlib import Path
from typing import Dict, Optional

import torch

from opt_ds.train.contract import (MODEL_SHAPE_KEY, UNIVERSAL_INFO_KEY, checkpoint_client_state,
                                             shape_from_client_state)
from opt_ds.models.family import family_of
from opt_ds.patches import run_ds_to_universal

from conversion import canonical as C
from conversion.canonical import Checkpoint
from conversion.files import ConversionError, load_torch, save_torch
from conversion.families import names_of
from conversion.opt_ds_format import MP_RANK_FILE, OptDsReader, special_layer_index

LATEST = "latest_universal"
LOAD_CONFIG = {"checkpoint": {"load_universal": True}}


def write(src, dst: Path, *, tag: Optional[str] = None, num_heads: Optional[int] = None) -> str:
    """Convert the opt_ds training checkpoint `src` into `dst/<tag>/` + `dst/latest_universal`.

    Returns ds_to_universal's console output (it prints progress)."""
    reader = OptDsReader(src, tag, num_heads)
    if not reader.has_optimizer_state:
        raise ConversionError(f"{reader.tag_dir} has no ZeRO optimizer files (zero_pp_rank_*_optim_states.pt), so "
                              "there is no optimizer state to keep; convert the weights with --to opt_ds instead")
    dst = Path(dst)
    with tempfile.TemporaryDirectory(prefix=".universal-input-", dir=dst) as staged:
        input_dir = with_checkpoint_info(reader, Path(staged))
        log = io.StringIO()
        with contextlib.redirect_stdout(log):
            run_ds_to_universal(str(input_dir), str(dst / reader.tag_dir.name))
    return log.getvalue()


def with_checkpoint_info(reader: OptDsReader, staged: Path) -> Path:
    """The checkpoint directory itself when its mp_rank files carry the shape and the universal patterns;
    otherwise a copy of it (links to the weight files, rewritten mp_rank files) that does."""
    if MODEL_SHAPE_KEY in reader.meta and UNIVERSAL_INFO_KEY in reader.meta:
        return reader.tag_dir
    stored = reader.shape.replace(vocab_size=reader.padded_vocab)
    extra = checkpoint_client_state(stored, reader.shape.vocab_size)
    copy = staged / reader.tag_dir.name
    copy.mkdir()
    for path in reader.tag_dir.iterdir():
        if MP_RANK_FILE.match(path.name):
            state = load_torch(path)
            save_torch({**state, **{k: v for k, v in extra.items() if k not in state}}, copy / path.name)
        else:
            (copy / path.name).symlink_to(path.resolve())
    return copy


class UniversalReader:
    """The fp32 master weights of a universal checkpoint, in canonical form."""

    def __init__(self, path):
        path = Path(path)
        latest = path / LATEST
        if not latest.is_file():
            raise ConversionError(f"{path}: no {LATEST} file; not a universal checkpoint directory")
        self.tag_dir = path / latest.read_text().strip()
        self.zero = self.tag_dir / "zero"
        mp_files = sorted(p for p in self.tag_dir.iterdir() if MP_RANK_FILE.match(p.name)) \
            if self.tag_dir.is_dir() else []
        if not self.zero.is_dir() or not mp_files:
            raise ConversionError(f"{self.tag_dir}: missing zero/ or mp_rank files; the universal checkpoint is "
                                  "incomplete")
        meta = load_torch(mp_files[0])
        stored = shape_from_client_state(meta)
        if stored is None:
            raise ConversionError(f"{mp_files[0]}: no `{MODEL_SHAPE_KEY}` entry; cannot tell the model shape")
        original = (meta.get(UNIVERSAL_INFO_KEY) or {}).get("original_vocab_size", stored.vocab_size)
        self.shape = stored.replace(vocab_size=original)

    def _param(self, name: str, meta: bool) -> torch.Tensor:
        path = self.zero / name / "fp32.pt"
        if not path.is_file():
            raise ConversionError(f"{path} is missing; the universal checkpoint is incomplete")
        tensor = load_torch(path)["param"]
        return tensor.to("meta") if meta else tensor

    def _layer_state(self, index: int, meta: bool) -> Dict[str, torch.Tensor]:
        prefix = f"{index}."
        return {p.name[len(prefix):]: self._param(p.name, meta) for p in self.zero.iterdir()
                if p.name.startswith(prefix)}

    def read_globals(self, meta: bool = False) -> Dict[str, torch.Tensor]:
        names, tied = names_of(self.shape), family_of(self.shape).tied_embedding_key
        out = {}
        for key, (role, name) in names.global_names.items():
            index = special_layer_index(role, self.shape)
            param = f"tied_modules.{tied}.{name}" if tied and index == 0 else f"{index}.{name}"
            if key in names.vocab_keys or (self.zero / param).is_dir():     # the vocabulary tensors are required
                out[key] = self._param(param, meta)
        for key in names.vocab_keys:
            out[key] = out[key][:self.shape.vocab_size]
        return out

    def read_layer(self, layer: int, meta: bool = False) -> Dict[str, torch.Tensor]:
        index = family_of(self.shape).decoder_layer_index(layer)
        return names_of(self.shape).decoder_from_opt_ds(self._layer_state(index, meta), self.shape)

    def checkpoint(self) -> Checkpoint:
        shapes = {k: tuple(v.shape) for k, v in self.read_globals(meta=True).items()}
        for layer in range(self.shape.num_layers):
            shapes.update({C.layer_key(layer, n, self.shape): tuple(v.shape)
                           for n, v in self.read_layer(layer, meta=True).items()})
        sources = {key: f"{self.tag_dir.name}/zero/<param>/fp32.pt" for key in shapes}
        return Checkpoint(self.shape, f"universal checkpoint {self.tag_dir}", self.read_globals, self.read_layer,
                          sources, shapes)


def read(path) -> Checkpoint:
    return UniversalReader(path).checkpoint()
