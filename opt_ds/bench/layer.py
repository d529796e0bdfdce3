"""Forward + backward time of one real opt_ds decoder layer: the input of the large-run projection.

The layer is the model family's own decoder layer (megatron-core TP layers at TP=1, SDPA attention) at
the case's full width, run on a [seq, micro-batch, hidden] activation. With `recompute` the forward runs
once more inside backward (torch.utils.checkpoint), which is what activation checkpointing costs.
"""
from __future__ import annotations

import torch

from opt_ds.bench.cases import BenchCase
from opt_ds.models.flops import layer_flops_per_token
from opt_ds.bench.provenance import device_name
from opt_ds.bench.timing import median, time_steps

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def measure_layer(case: BenchCase, recompute: bool, steps: int, warmup: int) -> dict:
    from torch.utils.checkpoint import checkpoint

    from opt_ds.models.family import family_of
    from opt_ds.parallel.layout import ParallelLayout
    from opt_ds.parallel.pipe import seed_all

    layout = ParallelLayout(1, 1, 1)
    layout.initialize()
    seed_all(1234)
    dtype = DTYPES[case.precision]
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    layer = family_of(case.shape).decoder_layer(case.shape, layout.megatron_config(params_dtype=dtype),
                                                layout.tensor_group()).to(device).train()
    shape = (case.seq, case.micro_batch, case.shape.hidden_size)     # decoder layers take [seq, batch, hidden]
    x = torch.randn(shape, device=device, dtype=dtype, requires_grad=True)
    grad = torch.randn(shape, device=device, dtype=dtype)

    def step():
        out = checkpoint(layer, x, use_reentrant=False) if recompute else layer(x)
        out.backward(grad)
        x.grad = None
        return None

    record = time_steps(step, steps, warmup)
    seconds = median(record["step_times_s"])
    flops = case.micro_batch * case.seq * layer_flops_per_token(case.shape, case.seq) * (4 / 3 if recompute else 1)
    record.update({
        "job": "layer", "case": case.to_dict(), "recompute": recompute, "steps": steps, "warmup": warmup,
        "layer_ms": seconds * 1e3, "layer_tflops": flops / seconds / 1e12, "device": device_name(),
    })
    return record
