"""transformers' model of a checkpoint, streamed layer by layer: the independent reference implementation that
`conversion.verify` runs a converted checkpoint through. Each family module builds its model class and config
and calls `streamed_hf_model`; this module knows no family.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

LM_HEAD = "lm_head.weight"      # the output layer of transformers' *ForCausalLM models


def streamed_hf_model(model_class, config, ckpt, layer_prefix: str, tied_embedding: Optional[str] = None,
                      on_cpu=()) -> Callable[[torch.Tensor], torch.Tensor]:
    """transformers' `model_class(config)` holding the Checkpoint `ckpt` (fp32) with its decoder layers on the meta
    device, each given its weights from the checkpoint just before it runs and dropped after, as forward(ids) ->
    logits. `layer_prefix`: the canonical key of decoder layer N is f"{layer_prefix}{N}.*"; `tied_embedding`: the
    canonical key of the embedding the head shares (None: the head is a tensor of its own); `on_cpu`: names of
    weightless submodules to build for real (buffers computed at init, e.g. the rotary embedding's frequencies)."""
    with torch.device("meta"):
        model = model_class(config).eval()
    for name in on_cpu:
        parent, _, child = name.rpartition(".")
        module = model.get_submodule(name)
        model.get_submodule(parent).add_module(child, type(module)(config=config))
    state = {k: v.float() for k, v in ckpt.globals().items()}
    if tied_embedding is not None:
        state[LM_HEAD] = state[tied_embedding]
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    if unexpected or any(not k.startswith(layer_prefix) for k in missing):
        raise RuntimeError(f"{model_class.__name__} does not take the checkpoint's tensors: missing "
                           f"{[k for k in missing if not k.startswith(layer_prefix)]}, unexpected {unexpected}")
    for layer in range(ckpt.shape.num_layers):
        def load(module, args, layer=layer):
            module.load_state_dict({k: v.float() for k, v in ckpt.layer(layer).items()}, strict=True, assign=True)

        def drop(module, args, output):
            module.to("meta")
        decoder_layer = model.get_submodule(f"{layer_prefix}{layer}")
        decoder_layer.register_forward_pre_hook(load)
        decoder_layer.register_forward_hook(drop)
    return lambda ids: model(input_ids=ids, use_cache=False).logits
