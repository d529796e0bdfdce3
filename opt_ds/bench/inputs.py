"""What a projection (opt_ds.bench.project) and a memory estimate (opt_ds.bench.memory) are computed from."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

from opt_ds.bench.hardware import HARDWARE, Hardware
from opt_ds.models.family import as_decoder_shape
from opt_ds.models.presets import get_preset
from opt_ds.models.shape import DecoderShape

PRECISION_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}


@dataclass(frozen=True)
class ProjectionInputs:
    shape: DecoderShape = as_decoder_shape(get_preset("opt-175b").shape)
    model_name: str = "OPT-175B"
    seq: int = 2048
    gpus: int = 992
    tensor: int = 8
    pipeline: int = 4
    micro_batch: int = 1
    global_batch: int = 1024            # target sequences per step; rounded down to a multiple of d·b
    recompute: str = "full"             # full | selective (attention core only) | none
    attention: str = "flash"            # flash (fused, causal) | unfused (s² scores in HBM)
    sequence_parallel: bool = False     # LayerNorm/dropout/residual work split over TP ranks
    dropout: bool = True
    precision: str = "fp16"             # fp16 (ds_configs/opt-175b.yaml) | bf16 | fp32: weights, gradients, DP traffic
    grad_accumulation: str = "immediate"    # bf16: immediate (opt_ds) | separate (DeepSpeed default) | fused
    zero_stage: int = 1                 # 0, 1, or 3 (FSDP: parameters sharded and gathered per layer)
    partition: str = "layers"           # layers | layers+embedding (embedding and head count as a layer)
    hardware: Hardware = HARDWARE["a100-80gb"]
    hbm_efficiency: float = 0.8
    tp_overlap: float = 0.0
    dp_overlap: float = 0.0
    layer_ms: Optional[float] = None    # measured compute of one layer's TP shard per micro-batch
    layer_source: str = ""

    def replace(self, **changes) -> "ProjectionInputs":
        return dataclasses.replace(self, **changes)

    @property
    def activation_bytes(self) -> int:
        return PRECISION_BYTES[self.precision]
