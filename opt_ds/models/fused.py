"""The decoder layers' element-wise work: megatron-core's fused bias-dropout-add and bias-activation on GPU.

megatron-core compiles these with torch.compile (`megatron.core.jit.jit_fuser`), which fuses each into one
kernel on a GPU. On a CPU inductor builds C++ for every new shape (150 s for the first one on 2 cores), so
there the same arithmetic runs as the plain expression. The choice is made once, here, not per call;
OPT_DS_FUSED=0 in the environment forces the plain expressions on a GPU too (the GPU A/B benchmark's "off").
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.fusions.fused_bias_swiglu import bias_swiglu_impl
from megatron.core.jit import jit_fuser

FUSED = torch.cuda.is_available() and os.environ.get("OPT_DS_FUSED", "1") != "0"


def bias_dropout_add(x: torch.Tensor, bias, residual: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """residual + dropout(x + bias): one pass over the memory instead of three."""
    return get_bias_dropout_add(training, FUSED)((x, bias), residual, p)


@jit_fuser
def _bias_relu_fused(x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    return F.relu(x + bias)


def _bias_relu_plain(x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    return F.relu(x + bias)


# megatron-core has no bias-ReLU fusion (OPT's activation): the same jit_fuser compiles ours.
bias_relu = _bias_relu_fused if FUSED else _bias_relu_plain


def _swiglu_plain(gate_up: torch.Tensor) -> torch.Tensor:
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def swiglu(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) · up of the fused [gate; up] projection (megatron's layout: the halves of the last dim).
    The fused version saves only its input for backward and recomputes silu there."""
    return bias_swiglu_impl(gate_up, None) if FUSED else _swiglu_plain(gate_up)
