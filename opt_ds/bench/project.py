"""Projected per-GPU throughput of a large opt_ds run from a per-layer time and a communication model.

Per optimizer step, for one GPU, with DeepSpeed's 1F1B pipeline schedule (t = TP, p = PP, d = DP,
b = micro-batch, m = micro-batches per replica, s = sequence, h = hidden, l = layers):

  t_layer  compute of one decoder layer's TP shard for one micro-batch: forward + backward (+ the
           recomputed forward under activation checkpointing). Measured (--layer-ms, --measure-layer) or a
           roofline: GEMM FLOPs / (peak·e_gemm) + attention FLOPs / (peak·e_attn)
                     + activation traffic / (HBM·e_hbm)
  t_tp     Megatron TP all-reduces of b·s·h activations: 2 forward + 2 backward (+ 2 recompute) per layer,
           each 2(t−1)/t · bytes / NVLink bus bandwidth, × (1 − TP overlap)
  t_stage  l/p · (t_layer + t_tp) + embedding or LM head + 2 pipeline transfers over InfiniBand
  t_pipe   (m + p − 1) · t_stage                      bubble fraction (p − 1)/(m + p − 1)
  t_dp     ZeRO-1 reduce-scatter of gradients + all-gather of parameters: bytes/param · P_gpu · (d − 1)/d
           / InfiniBand bus bandwidth, × (1 − DP overlap)
  t_step   t_pipe + t_dp + tied-embedding all-reduce + Adam on the ZeRO-1 shard
  TFLOP/s per GPU = FLOPs per step (each convention) / (t_step · GPUs)
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Optional

from opt_ds.models.flops import OPT_175B_A100_TFLOPS, all_conventions
from opt_ds.errors import UserError
from opt_ds.models.presets import PRESETS, OPTShape, get_preset

GB = 1e9


@dataclass(frozen=True)
class Cluster:
    name: str
    peak_tflops: float          # dense fp16/bf16
    hbm_tb_s: float
    nvlink_busbw_gb_s: float    # NCCL all-reduce bus bandwidth inside a node
    ib_gb_s_per_gpu: float      # achieved InfiniBand bandwidth per GPU (one HCA per GPU)
    memory_gib: float
    why: dict = field(default_factory=dict, compare=False, hash=False)


CLUSTERS = {
    "a100-80gb": Cluster(
        "A100-SXM4-80GB, NVLink3 + NVSwitch, one 200 Gb/s HDR InfiniBand HCA per GPU", 312, 2.039, 200, 20, 80,
        why={"peak_tflops": "A100 dense fp16/bf16 tensor-core peak (datasheet; OPT trained in fp16)",
             "hbm_tb_s": "A100-80GB HBM2e bandwidth (datasheet)",
             "nvlink_busbw_gb_s": "NCCL all-reduce bus bandwidth in an 8×A100 NVSwitch node at ~50 MB messages; "
                                  "NVLink3 carries 300 GB/s per direction, nccl-tests reach ~230 at GB sizes",
             "ib_gb_s_per_gpu": "200 Gb/s HDR = 25 GB/s per GPU (DGX A100 / Azure NDm A100 v4 design) at 80 %",
             "memory_gib": "A100-80GB"}),
    "h100-sxm": Cluster(
        "H100-SXM5-80GB, NVLink4 + NVSwitch, one 400 Gb/s NDR InfiniBand HCA per GPU", 989, 3.35, 360, 40, 80,
        why={"peak_tflops": "H100 SXM dense bf16 peak (datasheet)",
             "hbm_tb_s": "H100 SXM HBM3 bandwidth (datasheet)",
             "nvlink_busbw_gb_s": "NCCL all-reduce bus bandwidth in an 8×H100 node at ~50 MB messages; "
                                  "NVLink4 carries 450 GB/s per direction",
             "ib_gb_s_per_gpu": "400 Gb/s NDR = 50 GB/s per GPU at 80 %",
             "memory_gib": "H100 80GB"}),
}


@dataclass(frozen=True)
class ProjectionInputs:
    shape: OPTShape = get_preset("opt-175b").shape
    model_name: str = "OPT-175B"
    seq: int = 2048
    gpus: int = 992
    tensor: int = 8
    pipeline: int = 4
    micro_batch: int = 1
    global_batch: int = 1024            # target sequences per step; rounded down to a multiple of d·b
    recompute: bool = True
    cluster: Cluster = CLUSTERS["a100-80gb"]
    gemm_efficiency: float = 0.78
    attention_efficiency: float = 0.5
    hbm_efficiency: float = 0.8
    dp_bytes_per_param: float = 4.0
    tp_overlap: float = 0.0
    dp_overlap: float = 0.0
    layer_ms: Optional[float] = None    # measured compute of one layer's TP shard per micro-batch
    layer_source: str = ""

    def replace(self, **changes) -> "ProjectionInputs":
        return dataclasses.replace(self, **changes)


ACTIVATION_BYTES = 2                    # fp16/bf16 activations and messages
ADAM_BYTES_PER_PARAM = 30               # HBM traffic of one Adam update (fp32 master/grad/m/v + 16-bit copy)


@dataclass
class Projection:
    inputs: ProjectionInputs
    data: int
    micro_batches: int
    global_batch: int
    stage_layers: int
    times: dict                         # name -> seconds
    tflops: dict                        # convention key -> (label, TFLOP/s per GPU)
    tokens_per_s_per_gpu: float
    bubble: float
    memory_gib: float

    @property
    def hardware_tflops(self) -> float:
        return self.tflops["hardware"][1]

    @property
    def model_tflops(self) -> float:
        return self.tflops["model"][1]


class ProjectionError(UserError, ValueError):
    """A layout that cannot be projected; the message says why and what to change."""


def _layer_parameters(shape: OPTShape) -> int:
    h, f = shape.hidden_size, shape.ffn_hidden_size
    return 4 * h * h + 4 * h + 2 * h * f + f + h + 4 * h


def _ring(bytes_: float, ranks: int, busbw_gb_s: float) -> float:
    """Seconds of a ring all-reduce of `bytes_` over `ranks` at NCCL bus bandwidth `busbw`."""
    return 0.0 if ranks <= 1 else 2 * (ranks - 1) / ranks * bytes_ / (busbw_gb_s * GB)


def layer_compute_seconds(inp: ProjectionInputs) -> dict:
    """Roofline time of one layer's TP shard for one micro-batch, by part."""
    s, b, t = inp.seq, inp.micro_batch, inp.tensor
    h, f = inp.shape.hidden_size, inp.shape.ffn_hidden_size
    passes = 4 if inp.recompute else 3          # forward = 1, backward = 2, recomputed forward = 1
    peak = inp.cluster.peak_tflops * 1e12
    gemm = 2 * b * s * (4 * h * h + 2 * h * f) / t * passes
    attention = 4 * b * s * s * h / t * passes
    # Korthikanti et al. 2022: 34·s·b·h bytes stored per layer (without the s² terms that flash attention
    # removes), of which 24·s·b·h split over TP ranks; each stored byte is written then read once per pass.
    stored = b * s * h * (10 + 24 / t)
    traffic = 2 * stored * passes
    hbm = inp.cluster.hbm_tb_s * 1e12 * inp.hbm_efficiency
    return {"gemm": gemm / (peak * inp.gemm_efficiency),
            "attention": attention / (peak * inp.attention_efficiency),
            "elementwise": traffic / hbm}


def project(inp: ProjectionInputs) -> Projection:
    shape, c = inp.shape, inp.cluster
    t, p, b, s = inp.tensor, inp.pipeline, inp.micro_batch, inp.seq
    if inp.gpus % (t * p):
        raise ProjectionError(f"{inp.gpus} GPUs is not a multiple of TP × PP = {t} × {p}; change --project-pp "
                              f"or --project-tp (PP must divide {inp.gpus // t if inp.gpus % t == 0 else 'GPUs/TP'})")
    d = inp.gpus // (t * p)
    m = inp.global_batch // (d * b)
    if m < 1:
        raise ProjectionError(f"global batch {inp.global_batch} is smaller than DP × micro-batch = {d} × {b}")
    global_batch = m * d * b
    stage_layers = math.ceil(shape.num_layers / p)
    h, v, e = shape.hidden_size, shape.vocab_size, shape.embed_dim
    hbm = c.hbm_tb_s * 1e12 * inp.hbm_efficiency
    peak = c.peak_tflops * 1e12

    compute = sum(layer_compute_seconds(inp).values()) if inp.layer_ms is None else inp.layer_ms / 1e3
    activation = b * s * h * ACTIVATION_BYTES
    all_reduce = _ring(activation, t, c.nvlink_busbw_gb_s)
    tp = (6 if inp.recompute else 4) * all_reduce * (1 - inp.tp_overlap)
    head = (6 * b * s * v * e / t + (12 * b * s * e * h if shape.has_projections else 0)) / (peak * inp.gemm_efficiency)
    cross_entropy = 6 * 4 * b * s * v / t / hbm        # fp32 logits: upcast, softmax, gradient
    embed_side = all_reduce                              # vocab-parallel embedding output
    head_side = head + cross_entropy + all_reduce        # gradient of the head's input
    if p > 1:
        # DeepSpeed splits the sent activation over the TP ranks (pipe_partitioned) and all-gathers it after.
        p2p = 2 * (activation / t / (c.ib_gb_s_per_gpu * GB) + _ring(activation, t, c.nvlink_busbw_gb_s) / 2)
        stage = stage_layers * (compute + tp) + max(embed_side, head_side) + p2p
    else:
        p2p = 0.0
        stage = stage_layers * (compute + tp) + embed_side + head_side
    pipe = (m + p - 1) * stage

    params_per_gpu = (stage_layers * _layer_parameters(shape) + v * e) / t
    dp = (inp.dp_bytes_per_param * params_per_gpu * (d - 1) / d / (c.ib_gb_s_per_gpu * GB)
          * (1 - inp.dp_overlap)) if d > 1 else 0.0
    tied = v * e / t * ACTIVATION_BYTES / (c.ib_gb_s_per_gpu * GB) if p > 1 else 0.0
    optimizer = params_per_gpu / d * ADAM_BYTES_PER_PARAM / hbm
    step = pipe + dp + tied + optimizer

    recomputed = shape.num_layers if inp.recompute else 0
    tflops = {cv.key: (cv.label, cv.flops / step / inp.gpus / 1e12)
              for cv in all_conventions(shape, global_batch, s, recomputed)}
    return Projection(
        inputs=inp, data=d, micro_batches=m, global_batch=global_batch, stage_layers=stage_layers,
        times={"layer compute": compute, "layer TP all-reduces": tp, "stage (per micro-batch)": stage,
               "pipeline transfers per micro-batch": p2p, "pipeline (m + p − 1 slots)": pipe,
               "DP gradient/parameter exchange": dp, "tied-embedding all-reduce": tied,
               "Adam update": optimizer, "step": step},
        tflops=tflops, tokens_per_s_per_gpu=global_batch * s / step / inp.gpus,
        bubble=(p - 1) / (m + p - 1), memory_gib=_memory_gib(inp, d, stage_layers, params_per_gpu))


def _memory_gib(inp: ProjectionInputs, d: int, stage_layers: int, params_per_gpu: float) -> float:
    """Per-GPU memory of the first stage: 16-bit weights and gradients, ZeRO-1-sharded fp32 master
    weights, gradient partition and Adam moments, and the activations of the micro-batches in flight."""
    b, s, t, h = inp.micro_batch, inp.seq, inp.tensor, inp.shape.hidden_size
    state = params_per_gpu * (2 + 2 + 16 / d)
    in_flight = min(inp.pipeline, inp.global_batch // (d * b))
    stored = b * s * h * (10 + 24 / t)
    if inp.recompute:
        activations = b * s * h * ACTIVATION_BYTES * stage_layers * in_flight + stored
    else:
        activations = stored * stage_layers * in_flight
    logits = b * s * inp.shape.vocab_size / t * (2 + 4 + 4)
    return (state + activations + logits) / 2 ** 30


# --- what the user sees --------------------------------------------------------------------------------

def assumptions(inp: ProjectionInputs, proj: Projection) -> list:
    """(name, value, why) for every input of the projection."""
    c = inp.cluster
    layer = (f"{inp.layer_ms:.3f} ms measured: {inp.layer_source}" if inp.layer_ms is not None else
             f"{proj.times['layer compute'] * 1e3:.3f} ms from the roofline below")
    rows = [
        ("model", f"{inp.model_name}: l={inp.shape.num_layers}, h={inp.shape.hidden_size}, "
                  f"F={inp.shape.ffn_hidden_size}, V={inp.shape.vocab_size}, s={inp.seq}",
         "OPT paper table 1" if inp.shape in (p.shape for p in PRESETS.values()) else "a bench case's shape"),
        ("GPUs", f"{inp.gpus} × {c.name}", "OPT-175B ran on 992 A100-80GB (124 nodes × 8)"),
        ("layout", f"TP={inp.tensor} × PP={inp.pipeline} × DP={proj.data}",
         "TP=8 inside a node as OPT did (NVLink); OPT used FSDP over the other axis, opt_ds uses pipeline "
         "stages × ZeRO-1 replicas across nodes; 124 nodes = PP 4 × DP 31 (PP must divide 124)"),
        ("micro-batch × micro-batches", f"b={inp.micro_batch} × m={proj.micro_batches} per replica",
         "b=1 keeps activations small; m = global batch / (DP·b)"),
        ("global batch", f"{proj.global_batch} sequences = {proj.global_batch * inp.seq / 1e6:.2f} M tokens",
         f"OPT's 2M tokens; {inp.global_batch} sequences rounded down to a multiple of DP·b = {proj.data * inp.micro_batch}"),
        ("activation checkpointing", "every layer" if inp.recompute else "off",
         "OPT trained with activation checkpointing" if inp.recompute else "off: more memory, no recompute"),
        ("peak", f"{c.peak_tflops:g} TFLOP/s", c.why.get("peak_tflops", "")),
        ("per-layer compute", layer, "one decoder layer's TP shard, one micro-batch, fwd+bwd"
         + (" + recomputed fwd" if inp.recompute else "")),
        ("GEMM efficiency", f"{inp.gemm_efficiency:.2f} of peak",
         "cuBLAS on large 16-bit GEMMs: 776/989 = 0.78 measured on H100 at 8192³; "
         "A100 runs whole GPT steps at up to 72 % of peak (FlashAttention-2 paper), so its GEMMs sit above that"),
        ("attention efficiency", f"{inp.attention_efficiency:.2f} of peak",
         "FlashAttention-2 reaches 50–73 % of A100 peak (its paper; backward lower); counted on full s² FLOPs"),
        ("HBM", f"{c.hbm_tb_s:g} TB/s × {inp.hbm_efficiency:.2f}",
         c.why.get("hbm_tb_s", "") + "; element-wise kernels reach ~80 % of it"),
        ("NVLink all-reduce bus bandwidth", f"{c.nvlink_busbw_gb_s:g} GB/s", c.why.get("nvlink_busbw_gb_s", "")),
        ("InfiniBand per GPU", f"{c.ib_gb_s_per_gpu:g} GB/s", c.why.get("ib_gb_s_per_gpu", "")),
        ("TP communication overlap", f"{inp.tp_overlap:.0%}",
         "Megatron TP all-reduces sit on the critical path (the next GEMM needs their result)"),
        ("DP exchange", f"{inp.dp_bytes_per_param:g} B/param, overlap {inp.dp_overlap:.0%}",
         "fp16 as OPT trained: ZeRO-1 reduce-scatter of 2-byte gradients + all-gather of 2-byte parameters; "
         "DeepSpeed's pipeline schedule reduces after the last backward (ReduceGrads), so nothing overlaps"),
        ("pipeline schedule", "1F1B (DeepSpeed TrainSchedule)", "bubble = (p − 1)/(m + p − 1)"),
        ("147 TFLOP/s comparison", "hardware FLOPs (recompute counted)",
         "the OPT paper does not give its formula; Megatron-LM's 138 and BLOOM's 150 TFLOP/s of the same era use "
         "Narayanan eq. 3 with the recompute factor, and OPT trained with full activation checkpointing"),
    ]
    return rows


def format_projection(proj: Projection, sensitivity_rows: Optional[list] = None) -> str:
    inp = proj.inputs
    out = [f"Projection: {inp.model_name} on {inp.gpus} × {inp.cluster.name.split(',')[0]} with opt_ds "
           f"(TP={inp.tensor} × PP={inp.pipeline} × DP={proj.data})", "", "Assumptions"]
    for name, value, why in assumptions(inp, proj):
        out.append(f"  {name:<32} {value}")
        if why:
            out.append(f"  {'':<32}   ({why})")
    out += ["", "Derived (per GPU, one optimizer step)"]
    if inp.layer_ms is None:
        for part, sec in layer_compute_seconds(inp).items():
            out.append(f"  layer {part:<26} {sec * 1e3:9.3f} ms")
    for name, sec in proj.times.items():
        out.append(f"  {name:<32} {sec * 1e3 if sec < 1 else sec:9.3f} {'ms' if sec < 1 else 's'}")
    out.append(f"  {'pipeline bubble':<32} {proj.bubble:9.1%}   (p − 1)/(m + p − 1) = "
               f"{inp.pipeline - 1}/{proj.micro_batches + inp.pipeline - 1}")
    fits = "fits" if proj.memory_gib <= inp.cluster.memory_gib else "DOES NOT FIT"
    out.append(f"  {'memory per GPU (first stage)':<32} {proj.memory_gib:9.1f} GiB   ({fits} in "
               f"{inp.cluster.memory_gib:g} GiB)")
    out += ["", "Result (TFLOP/s per GPU = FLOPs per step / (step time × GPUs))"]
    for key, (label, value) in proj.tflops.items():
        extra = f"   MFU {value / inp.cluster.peak_tflops:.1%}" if key == "model" else ""
        out.append(f"  {label:<32} {value:9.1f}{extra}")
    out.append(f"  {'tokens/s per GPU':<32} {proj.tokens_per_s_per_gpu:9.1f}")
    if inp.shape == get_preset("opt-175b").shape:
        delta = proj.hardware_tflops / OPT_175B_A100_TFLOPS - 1
        out.append(f"  vs OPT paper {OPT_175B_A100_TFLOPS:g} TFLOP/s (A100, hardware FLOPs): {delta:+.1%} "
                   f"({'within' if abs(delta) <= 0.15 else 'outside'} ±15 %)")
    if sensitivity_rows:
        out += ["", "Sensitivity (one assumption changed at a time)",
                f"  {'change':<52} {'hw TFLOP/s':>10} {'model':>7} {'Δ hw':>7}  memory"]
        for label, p in sensitivity_rows:
            fits = "fits" if p.memory_gib <= p.inputs.cluster.memory_gib else "does NOT fit"
            out.append(f"  {label:<52} {p.hardware_tflops:10.1f} {p.model_tflops:7.1f} "
                       f"{p.hardware_tflops / proj.hardware_tflops - 1:+7.1%}  {p.memory_gib:.0f} GiB {fits}")
    return "\n".join(out)


def sensitivity(inp: ProjectionInputs) -> list:
    """The projection with one assumption changed at a time: (label, Projection)."""
    c = inp.cluster
    variants = [
        ("GEMM efficiency 0.65", inp.replace(gemm_efficiency=0.65)),
        ("GEMM efficiency 0.85", inp.replace(gemm_efficiency=0.85)),
        ("attention efficiency 0.3", inp.replace(attention_efficiency=0.3)),
        ("HBM efficiency 0.5 (slow element-wise kernels)", inp.replace(hbm_efficiency=0.5)),
        (f"NVLink bus bandwidth {c.nvlink_busbw_gb_s * 0.75:g} GB/s",
         inp.replace(cluster=dataclasses.replace(c, nvlink_busbw_gb_s=c.nvlink_busbw_gb_s * 0.75))),
        ("TP all-reduces 50 % overlapped", inp.replace(tp_overlap=0.5)),
        (f"InfiniBand {c.ib_gb_s_per_gpu / 2:g} GB/s per GPU",
         inp.replace(cluster=dataclasses.replace(c, ib_gb_s_per_gpu=c.ib_gb_s_per_gpu / 2))),
        ("DP 10 B/param (bf16 + fp32 gradient all-reduce)", inp.replace(dp_bytes_per_param=10.0)),
        ("DP exchange fully overlapped", inp.replace(dp_overlap=1.0)),
        ("micro-batch 2", inp.replace(micro_batch=2)),
        ("no activation checkpointing", inp.replace(recompute=False)),
    ]
    for pp in (2, 1):
        if pp != inp.pipeline and inp.gpus % (inp.tensor * pp) == 0:
            variants.append((f"PP={pp} (DP={inp.gpus // (inp.tensor * pp)})", inp.replace(pipeline=pp)))
    rows = []
    for label, variant in variants:
        try:
            rows.append((label, project(variant)))
        except ProjectionError:
            continue
    return rows
