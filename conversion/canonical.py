"""The one in-memory form every format converts to and from.

A `Checkpoint` is the full (unsharded) model: a model family's shape plus tensors named as in Hugging
Face's model of that family (OPT: `OPTForCausalLM`'s `model.decoder.*`, no `lm_head`: the head is tied to
`embed_tokens`, see conversion.opt; LLaMA: `LlamaForCausalLM`, see conversion.llama), on the CPU, with the
vocabulary at its true size (TP padding removed). Readers build one from files; writers take one. Tensors are
produced lazily, one decoder layer at a time, so converting a large model needs about one layer of memory
beyond what the formats force (a metaseq MP part is one pickle).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Callable, Dict, Optional

import torch

from conversion.families import names_of
from conversion.files import ConversionError


def layer_key(layer: int, name: str, shape) -> str:
    """Canonical key of tensor `name` of decoder layer `layer` of a model of this shape."""
    return f"{names_of(shape).layer_prefix}{layer}.{name}"


def layer_shapes(shape) -> Dict[str, tuple]:
    return names_of(shape).layer_shapes(shape)


def global_shapes(shape) -> Dict[str, tuple]:
    return names_of(shape).global_shapes(shape)


def describe_shape(shape) -> str:
    return names_of(shape).describe(shape)


def expected_shapes(shape) -> Dict[str, tuple]:
    """Every canonical key of a model of this shape, with its tensor shape, in a stable order."""
    shapes = dict(global_shapes(shape))
    for layer in range(shape.num_layers):
        shapes.update({layer_key(layer, n, shape): s for n, s in layer_shapes(shape).items()})
    return shapes


def check_model_shape(shape) -> None:
    if shape.hidden_size % shape.num_heads:
        raise ConversionError(f"hidden size {shape.hidden_size} is not divisible by {shape.num_heads} heads; "
                              "the head count recorded with the checkpoint is wrong")


@dataclass
class Checkpoint:
    """A full model, read lazily from some source.

    `read_globals()` returns the non-layer tensors by canonical key; `read_layer(i)` those of decoder layer
    `i` by name inside the layer. `sources` maps each canonical key to a description of where it comes
    from (file and key), and `source_shapes` to the shape the reader will produce; both are checked
    against `shape` when the checkpoint is opened, before anything is written.
    """
    shape: object                               # the family's shape dataclass
    origin: str
    read_globals: Callable[[], Dict[str, torch.Tensor]]
    read_layer: Callable[[int], Dict[str, torch.Tensor]]
    sources: Dict[str, str]
    source_shapes: Dict[str, tuple]
    optimizer_state: Optional[str] = None       # what optimizer state the source holds (not carried over)
    dtype_override: Optional[torch.dtype] = field(default=None)

    def __post_init__(self):
        check_model_shape(self.shape)
        check_shapes(self.source_shapes, self.shape, self.origin)

    def globals(self) -> Dict[str, torch.Tensor]:
        return self._checked(self.read_globals(), global_shapes(self.shape), "")

    def layer(self, layer: int) -> Dict[str, torch.Tensor]:
        return self._checked(self.read_layer(layer), layer_shapes(self.shape), layer_key(layer, "", self.shape))

    def state_dict(self) -> Dict[str, torch.Tensor]:
        state = dict(self.globals())
        for layer in range(self.shape.num_layers):
            state.update({layer_key(layer, n, self.shape): t for n, t in self.layer(layer).items()})
        return state

    def with_dtype(self, dtype: Optional[torch.dtype]) -> "Checkpoint":
        """The same checkpoint, every floating tensor cast to `dtype` as it is read (None: unchanged)."""
        return dataclasses.replace(self, dtype_override=dtype)

    def _checked(self, tensors: Dict[str, torch.Tensor], shapes: Dict[str, tuple], prefix: str):
        if set(tensors) != set(shapes):
            missing, extra = sorted(set(shapes) - set(tensors)), sorted(set(tensors) - set(shapes))
            raise ConversionError(f"{self.origin}: tensors {prefix}{missing or ''} missing, unexpected "
                                  f"{extra or 'none'}")
        out = {}
        for name in shapes:     # canonical order
            tensor = tensors[name]
            if tuple(tensor.shape) != shapes[name]:
                raise ConversionError(f"{self.origin}: {prefix}{name} has shape {tuple(tensor.shape)}, the model "
                                      f"needs {shapes[name]}")
            if self.dtype_override is not None and tensor.is_floating_point():
                tensor = tensor.to(self.dtype_override)
            out[name] = tensor
        return out


def check_shapes(found: Dict[str, tuple], shape, origin: str) -> None:
    """One error listing what does not fit: missing tensors, unexpected ones, wrong shapes."""
    expected = expected_shapes(shape)
    problems = []
    missing = [k for k in expected if k not in found]
    if missing:
        problems.append(f"missing {_some(missing)}")
    extra = [k for k in found if k not in expected]
    if extra:
        problems.append(f"unexpected {_some(extra)}")
    wrong = [f"{k} is {tuple(found[k])}, expected {expected[k]}" for k in expected
             if k in found and tuple(found[k]) != tuple(expected[k])]
    if wrong:
        problems.append("shape mismatch: " + _some(wrong))
    if problems:
        raise ConversionError(
            f"{origin}: the tensors do not match the model configuration ({describe_shape(shape)}): "
            + "; ".join(problems) + ". Check that the configuration belongs to these weights and that no "
            "file is missing")


def _some(items, limit: int = 4) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")
