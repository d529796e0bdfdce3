"""Projected per-GPU throughput of a large training run from a per-layer time and a communication model.

Per optimizer step, for one GPU (t = TP, p = PP, d = DP, b = micro-batch, m = micro-batches per replica,
T = b·s tokens of one micro-batch, h = hidden, F = MLP width, a = heads):

  t_layer   one decoder layer's TP shard for one micro-batch, forward + backward (+ what is recomputed):
            GEMM FLOPs / (peak·e_gemm) + attention (flash: causal FLOPs / (peak·e_attn); unfused: full s²
            FLOPs / (peak·e_gemm)) + memory-bound kernel bytes / (HBM·e_hbm) — LayerNorm, residual adds,
            dropout, activation function, softmax (unfused attention: s² scores), head transposes;
            counted kernel by kernel in `memory_bound_bytes`. Or measured (--layer-ms).
  t_tp      TP collectives of T·h activations: 2 forward + 2 backward (+ 2 with full recompute), each
            latency + 2(t−1)/t · bytes / NVLink bus bandwidth, × (1 − TP overlap)
  stage i   its layers × (t_layer + t_tp) + embedding (first) or LM head + loss (last) + 2 transfers
            + bf16 gradient accumulation: the fp32 gradient += the bf16 one after every micro-batch, 18 B/param
            of HBM traffic (upcast copy written and read, fp32 read and written); DeepSpeed's default runs it
            as a pass over every parameter after the backward (+ a launch per tensor from a Python loop),
            `immediate` in backward hooks as each gradient is ready (same bytes, no loop, bf16 gradient
            freed); `fused` is Megatron's accumulation inside the weight-gradient GEMM (no pass: needs
            APEX's fused kernels, which opt_ds does not use — listed for comparison)
  t_pipe    (m − 1) · slowest stage + Σ stages       1F1B; = (m + p − 1)·t_stage for equal stages
  t_dp      ZeRO 0/1: gradient reduction + parameter all-gather after the last backward (not overlapped
            in DeepSpeed's pipeline engine nor Megatron-LM 2021); ZeRO-3 (FSDP): gathers and
            reduce-scatters per micro-batch, overlapped with compute, exposed only beyond it
  t_step    t_pipe + t_dp + tied-embedding all-reduce + optimizer step (HBM-bound, on the ZeRO shard)
  TFLOP/s per GPU = FLOPs per step (each convention) / (t_step · GPUs)
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Optional

from opt_ds.bench.hardware import GB, IB_LATENCY_S, NVLINK_LATENCY_S
from opt_ds.bench.inputs import ProjectionInputs
from opt_ds.bench.memory import PRECISION_BYTES, estimate_memory, stage_layers, stage_parameters
from opt_ds.errors import UserError
from opt_ds.models.flops import all_conventions

RECOMPUTE = ("full", "selective", "none")
ATTENTION = ("flash", "unfused")
GRAD_ACCUMULATION = ("separate", "immediate", "fused")
ACCUMULATION_BYTES_PER_PARAM = 18   # hp += lp.to(fp32): write + read the fp32 upcast, read + write hp, read lp
LAUNCH_S = 10e-6                    # one kernel launch from Python (DeepSpeed's per-parameter loop)
TENSORS_PER_LAYER = 16              # OPT: 4 weights + 4 biases of QKV/out/fc1/fc2, 2 LayerNorms × 2 (+ slack)
PARTITIONS = ("layers", "layers+embedding")
# Bytes per parameter each GPU sends through its data-parallel collectives in one step (ZeRO 0/1):
# fp16 (Megatron-LM, DeepSpeed fp16): 2-byte gradient all-reduce (ring: 2 × 2) or ZeRO-1 reduce-scatter +
# all-gather of 2-byte parameters; bf16 (DeepSpeed BF16_Optimizer, used by BLOOM and opt_ds): fp32 gradient
# all-reduce (2 × 4) + 2-byte parameter all-gather; fp32: 4-byte reduction + 4-byte all-gather.
DP_BYTES_PER_PARAM = {"fp16": 4.0, "bf16": 10.0, "fp32": 8.0}
OPTIMIZER_BYTES_PER_PARAM = 34      # HBM traffic of Adam on fp32 master/grad/m/v + 16-bit copy + grad norm
LOSS_BYTES_PER_LOGIT = 24           # fp32 cross-entropy: upcast, softmax, gradient (read + write each)
# Communication hidden behind compute still costs: NCCL's kernels hold SMs (one per channel, 8–32 of the
# 108–132) and HBM bandwidth while they run, so compute slows by this fraction of the overlapped time.
OVERLAP_SLOWDOWN = 0.1


class ProjectionError(UserError, ValueError):
    """A layout that cannot be projected; the message says why and what to change."""


@dataclass
class Projection:
    inputs: ProjectionInputs
    data: int
    micro_batches: int
    global_batch: int
    stage_layers: list                  # decoder layers of each pipeline stage
    times: dict                         # name -> seconds
    tflops: dict                        # convention key -> (label, TFLOP/s per GPU)
    tokens_per_s_per_gpu: float
    bubble: float

    @property
    def hardware_tflops(self) -> float:
        return self.tflops["hardware"][1]

    @property
    def model_tflops(self) -> float:
        return self.tflops["model"][1]


def check_inputs(inp: ProjectionInputs) -> None:
    for name, value, allowed in (("recompute", inp.recompute, RECOMPUTE), ("attention", inp.attention, ATTENTION),
                                 ("precision", inp.precision, tuple(PRECISION_BYTES)),
                                 ("partition", inp.partition, PARTITIONS), ("zero", inp.zero_stage, (0, 1, 3)),
                                 ("grad_accumulation", inp.grad_accumulation, GRAD_ACCUMULATION)):
        if value not in allowed:
            raise ProjectionError(f"{name}={value!r}: choose one of {', '.join(map(str, allowed))}")
    shape, t, p = inp.shape, inp.tensor, inp.pipeline
    if min(t, p, inp.micro_batch, inp.gpus, inp.seq) < 1:
        raise ProjectionError("GPUs, TP, PP, micro-batch and sequence length must be positive")
    if inp.gpus % (t * p):
        raise ProjectionError(f"{inp.gpus} GPUs is not a multiple of TP × PP = {t} × {p}; change --project-pp "
                              f"or --project-tp")
    if shape.num_heads % t or shape.kv_heads % t or shape.ffn_hidden_size % t:
        raise ProjectionError(f"TP={t} must divide the heads ({shape.num_heads}), kv heads ({shape.kv_heads}) "
                              f"and the MLP width ({shape.ffn_hidden_size})")
    if p > shape.num_layers:
        raise ProjectionError(f"PP={p} is more than the {shape.num_layers} layers")
    d = inp.gpus // (t * p)
    if inp.global_batch < d * inp.micro_batch:
        raise ProjectionError(f"global batch {inp.global_batch} is smaller than DP × micro-batch = "
                              f"{d} × {inp.micro_batch}")


# --- one decoder layer ----------------------------------------------------------------------------------

def _passes(inp: ProjectionInputs) -> int:
    return 4 if inp.recompute == "full" else 3          # forward 1, backward 2, recomputed forward 1


def memory_bound_bytes(inp: ProjectionInputs) -> dict:
    """HBM bytes of one layer's memory-bound kernels per TP rank and micro-batch, forward / backward /
    recomputed forward. 16-bit activations; each kernel reads its inputs and writes its outputs once:

      per hidden-sized element (T·h; ÷ t with sequence parallelism, else every TP rank repeats it)
        forward   2 LayerNorms (read + write: 4 each) + 2 residual adds (read 2 inputs, write: 6 each)
                  + 2 dropout masks (1 each)
        backward  2 LayerNorms (read x and dy, write dx: 6 each) + 2 residual gradient adds (6 each)
                  + 2 dropouts (read dy and mask, write: 5 each)
      per MLP element (T·F/t): activation read + write (4; gated: read 2, write 1 = 6); backward 6 (10)
      per head-layout element (T·h/t): q, k, v and context transposed to and from heads (8 each pass)
      per score element (b·a/t·s², unfused attention only)
        forward   QKᵀ write 2, softmax read + write 4, dropout read + write + mask 5, read by ·V 2
        backward  dP write 2, softmax backward 6, dropout backward 5, P and dS re-read 6
    """
    shape, t, b, s = inp.shape, inp.tensor, inp.micro_batch, inp.seq
    tokens = b * s
    hidden = tokens * shape.hidden_size / (t if inp.sequence_parallel else 1)
    mlp = tokens * shape.ffn_hidden_size / t
    heads = tokens * shape.hidden_size / t
    scores = b * shape.num_heads / t * s * s if inp.attention == "unfused" else 0.0
    drop = 1 if inp.dropout else 0
    forward_attention = (8 + 5 * drop) * scores
    forward = (20 + 2 * drop) * hidden + (6 if shape.gated_mlp else 4) * mlp + 8 * heads + forward_attention
    backward = (24 + 10 * drop) * hidden + (10 if shape.gated_mlp else 6) * mlp + 8 * heads + (14 + 5 * drop) * scores
    recomputed = {"full": forward, "selective": forward_attention, "none": 0.0}[inp.recompute]
    return {"forward": forward, "backward": backward, "recompute": recomputed}


def layer_compute_seconds(inp: ProjectionInputs) -> dict:
    """Roofline time of one layer's TP shard for one micro-batch, by part."""
    shape, hw, t = inp.shape, inp.hardware, inp.tensor
    tokens = inp.micro_batch * inp.seq
    peak = hw.peak_tflops * 1e12
    gemm = 2 * tokens * shape.layer_matmul_weights() / t * _passes(inp)
    core = 4 * tokens * inp.seq * shape.hidden_size / t          # QKᵀ and ·V forward, full s²
    core_passes = 3 + (1 if inp.recompute in ("full", "selective") else 0)
    if inp.attention == "flash":
        # causal kernels skip the masked half; the backward recomputes P (2.5 × the forward's matmuls)
        attention = core / 2 * (3.5 + (1 if inp.recompute != "none" else 0)) / (peak * hw.attention_efficiency)
    else:
        attention = core * core_passes / (peak * hw.gemm_efficiency)
    memory = sum(memory_bound_bytes(inp).values()) / (hw.hbm_tb_s * 1e12 * inp.hbm_efficiency)
    return {"gemm": gemm / (peak * hw.gemm_efficiency), "attention": attention, "memory-bound kernels": memory}


def collective_seconds(bytes_: float, ranks: int, busbw_gb_s: float, latency_s: float) -> float:
    """A ring all-reduce (or reduce-scatter + all-gather pair) of `bytes_` at NCCL bus bandwidth."""
    return 0.0 if ranks <= 1 else latency_s + 2 * (ranks - 1) / ranks * bytes_ / (busbw_gb_s * GB)


def tp_seconds_per_layer(inp: ProjectionInputs) -> float:
    activation = inp.micro_batch * inp.seq * inp.shape.hidden_size * inp.activation_bytes
    one = collective_seconds(activation, inp.tensor, inp.hardware.nvlink_busbw_gb_s, NVLINK_LATENCY_S)
    return (6 if inp.recompute == "full" else 4) * _exposed(one, inp.tp_overlap)


def _exposed(seconds: float, overlap: float) -> float:
    """Cost of a collective of which the fraction `overlap` runs behind compute."""
    return seconds * (1 - overlap) + seconds * overlap * OVERLAP_SLOWDOWN


# --- stages and the step --------------------------------------------------------------------------------

def _embedding_seconds(inp: ProjectionInputs) -> tuple:
    """(first-stage, last-stage) seconds per micro-batch outside the decoder layers."""
    shape, hw, t = inp.shape, inp.hardware, inp.tensor
    tokens = inp.micro_batch * inp.seq
    peak = hw.peak_tflops * 1e12 * hw.gemm_efficiency
    hbm = hw.hbm_tb_s * 1e12 * inp.hbm_efficiency
    activation = tokens * shape.hidden_size * inp.activation_bytes
    all_reduce = collective_seconds(activation, t, hw.nvlink_busbw_gb_s, NVLINK_LATENCY_S)
    projections = 12 * tokens * shape.embedding_width * shape.hidden_size if shape.has_projections else 0
    head = (6 * tokens * shape.vocab_size * shape.embedding_width / t + projections) / peak
    loss = LOSS_BYTES_PER_LOGIT * tokens * shape.vocab_size / t / hbm
    return all_reduce, head + loss + all_reduce


def _p2p_seconds(inp: ProjectionInputs) -> float:
    """Forward activation and backward gradient between stages, per micro-batch: split over the TP ranks,
    sent over InfiniBand, all-gathered over NVLink (Megatron's scatter-gather, DeepSpeed pipe_partitioned)."""
    hw, t = inp.hardware, inp.tensor
    activation = inp.micro_batch * inp.seq * inp.shape.hidden_size * inp.activation_bytes
    gather = collective_seconds(activation, t, hw.nvlink_busbw_gb_s, NVLINK_LATENCY_S) / 2
    return 2 * (IB_LATENCY_S + activation / t / (hw.ib_gb_s_per_gpu * GB) + gather)


def _accumulation_seconds(inp: ProjectionInputs, params: list, layers: list) -> list:
    """Per stage and micro-batch: bf16 gradient accumulation into the fp32 gradients (see the module doc)."""
    if inp.precision != "bf16" or inp.grad_accumulation == "fused" or inp.zero_stage == 3:    # FSDP: its own
        return [0.0] * len(params)
    hbm = inp.hardware.hbm_tb_s * 1e12 * inp.hbm_efficiency
    loop = LAUNCH_S * TENSORS_PER_LAYER if inp.grad_accumulation == "separate" else 0.0
    return [n * ACCUMULATION_BYTES_PER_PARAM / hbm + loop * layers_here for n, layers_here in zip(params, layers)]


def project(inp: ProjectionInputs) -> Projection:
    check_inputs(inp)
    shape, hw = inp.shape, inp.hardware
    t, p, b, s = inp.tensor, inp.pipeline, inp.micro_batch, inp.seq
    d = inp.gpus // (t * p)
    m = inp.global_batch // (d * b)
    global_batch = m * d * b
    layers = stage_layers(shape, p, inp.partition)
    ib = hw.ib_gb_s_per_gpu * GB

    parts = layer_compute_seconds(inp)
    compute = sum(parts.values()) if inp.layer_ms is None else inp.layer_ms / 1e3
    tp = tp_seconds_per_layer(inp)
    first, last = _embedding_seconds(inp)
    p2p = _p2p_seconds(inp) if p > 1 else 0.0
    accumulate = _accumulation_seconds(inp, stage_parameters(inp, layers), layers)
    stages = [n * (compute + tp) + p2p + (first if i == 0 else 0) + (last if i == p - 1 else 0) + accumulate[i]
              for i, n in enumerate(layers)]
    pipe = (m - 1) * max(stages) + sum(stages)

    params = max(stage_parameters(inp, layers))
    grad_bytes = 4 if inp.precision in ("bf16", "fp32") else 2
    if d == 1:
        dp = 0.0
    elif inp.zero_stage == 3:
        # per micro-batch: gather the parameters for the forward and again for the backward, reduce-scatter
        # the gradients; prefetching hides them behind the compute except the first layer's gather
        per_pass = (2 * inp.activation_bytes + grad_bytes) * params * (d - 1) / d / ib
        window = pipe / m * (1 - 1 / max(layers))
        hidden = min(per_pass, window)
        dp = m * (per_pass - hidden + hidden * OVERLAP_SLOWDOWN) + per_pass / max(layers)
    else:
        dp = (_exposed(DP_BYTES_PER_PARAM[inp.precision] * params * (d - 1) / d / ib, inp.dp_overlap)
              + IB_LATENCY_S * math.log2(d))
    tied = (shape.vocab_size * shape.embedding_width / t * grad_bytes / ib + IB_LATENCY_S
            if p > 1 and shape.tied_head else 0.0)
    shard = params / d if inp.zero_stage >= 1 else params
    optimizer = shard * OPTIMIZER_BYTES_PER_PARAM / (hw.hbm_tb_s * 1e12 * inp.hbm_efficiency)
    step = pipe + dp + tied + optimizer

    recomputed = shape.num_layers if inp.recompute == "full" else 0
    tflops = {cv.key: (cv.label, cv.flops / step / inp.gpus / 1e12)
              for cv in all_conventions(shape, global_batch, s, recomputed)}
    return Projection(
        inputs=inp, data=d, micro_batches=m, global_batch=global_batch, stage_layers=layers,
        times={"layer compute": compute, "layer TP collectives": tp, "slowest stage (per micro-batch)": max(stages),
               "pipeline transfers per micro-batch": p2p, "pipeline ((m − 1)·slowest + Σ stages)": pipe,
               "bf16 accumulation (slowest stage, per micro-batch)": max(accumulate),
               "DP exchange (exposed)": dp, "tied-embedding all-reduce": tied, "optimizer step": optimizer,
               "step": step},
        tflops=tflops, tokens_per_s_per_gpu=global_batch * s / step / inp.gpus,
        bubble=1 - m * sum(stages) / p / pipe if p > 1 else 0.0)


# --- what the user sees --------------------------------------------------------------------------------

def assumptions(inp: ProjectionInputs, proj: Projection) -> list:
    """(name, value, why) for every input of the projection."""
    hw = inp.hardware
    layer = (f"{inp.layer_ms:.3f} ms measured: {inp.layer_source}" if inp.layer_ms is not None else
             f"{proj.times['layer compute'] * 1e3:.3f} ms from the roofline below")
    return [
        ("model", f"{inp.model_name}: {inp.shape.describe()}, s={inp.seq}", f"--shape {inp.shape.spec()}"),
        ("GPUs", f"{inp.gpus} × {hw.name}", ""),
        ("layout", f"TP={inp.tensor} × PP={inp.pipeline} × DP={proj.data}, ZeRO-{inp.zero_stage}",
         f"decoder layers per stage {_runs(proj.stage_layers)}; partition by {inp.partition}"),
        ("micro-batch × micro-batches", f"b={inp.micro_batch} × m={proj.micro_batches} per replica",
         "m = global batch / (DP·b)"),
        ("global batch", f"{proj.global_batch} sequences = {proj.global_batch * inp.seq / 1e6:.2f} M tokens",
         f"{inp.global_batch} rounded down to a multiple of DP·b = {proj.data * inp.micro_batch}"),
        ("activation recompute", inp.recompute, {"full": "every layer's forward runs again in its backward",
                                                 "selective": "only the attention core is recomputed",
                                                 "none": "all activations stored"}[inp.recompute]),
        ("attention kernel", inp.attention, "flash: fused, causal half skipped; unfused: s² scores through HBM"),
        ("sequence parallelism", "on" if inp.sequence_parallel else "off",
         "LayerNorm, dropout and residual work split over TP ranks" if inp.sequence_parallel else
         "LayerNorm, dropout and residual work repeated on every TP rank"),
        ("dropout", "on" if inp.dropout else "off", ""),
        ("precision", inp.precision, f"DP traffic {DP_BYTES_PER_PARAM[inp.precision]:g} B/param at ZeRO 0/1"),
        ("bf16 gradient accumulation", inp.grad_accumulation if inp.precision == "bf16" else "n/a",
         {"separate": f"a pass after every micro-batch, {ACCUMULATION_BYTES_PER_PARAM} B/param + a launch per tensor",
          "immediate": f"in backward hooks, {ACCUMULATION_BYTES_PER_PARAM} B/param, bf16 gradient freed",
          "fused": "inside the weight-gradient GEMM (Megatron + APEX; not opt_ds)"}[inp.grad_accumulation]
         if inp.precision == "bf16" else ""),
        ("peak", f"{hw.peak_tflops:g} TFLOP/s", hw.why.get("peak_tflops", "")),
        ("per-layer compute", layer, "one decoder layer's TP shard, one micro-batch, fwd+bwd"
         + {"full": " + recomputed fwd", "selective": " + recomputed attention", "none": ""}[inp.recompute]),
        ("GEMM efficiency", f"{hw.gemm_efficiency:.2f} of peak", hw.why.get("gemm_efficiency", "")),
        ("attention efficiency", f"{hw.attention_efficiency:.2f} of peak (flash kernels)",
         hw.why.get("attention_efficiency", "")),
        ("HBM", f"{hw.hbm_tb_s:g} TB/s × {inp.hbm_efficiency:.2f}", hw.why.get("hbm_tb_s", "")),
        ("NVLink all-reduce bus bandwidth", f"{hw.nvlink_busbw_gb_s:g} GB/s + {NVLINK_LATENCY_S * 1e6:g} µs",
         hw.why.get("nvlink_busbw_gb_s", "")),
        ("inter-node per GPU", f"{hw.ib_gb_s_per_gpu:g} GB/s + {IB_LATENCY_S * 1e6:g} µs",
         hw.why.get("ib_gb_s_per_gpu", "")),
        ("TP communication overlap", f"{inp.tp_overlap:.0%}",
         "Megatron TP all-reduces sit on the critical path (the next GEMM needs their result)"),
        ("DP exchange overlap", "FSDP prefetch: hidden behind compute" if inp.zero_stage == 3 else
         f"{inp.dp_overlap:.0%}", "" if inp.zero_stage == 3 else
         "DeepSpeed's pipeline schedule and Megatron-LM 2021 reduce after the last backward"),
        ("pipeline schedule", "1F1B", "(m − 1)·slowest stage + Σ stages"),
    ]


def _runs(values: list) -> str:
    if len(set(values)) == 1:
        return f"{values[0]} × {len(values)}"
    return ", ".join(map(str, values)) if len(values) <= 8 else f"{values[0]}, …, {values[-1]}"


def format_projection(proj: Projection, sensitivity_rows: Optional[list] = None) -> str:
    inp = proj.inputs
    out = [f"Projection: {inp.model_name} on {inp.gpus} × {inp.hardware.name.split(',')[0]} "
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
    out.append(f"  {'pipeline bubble':<32} {proj.bubble:9.1%}   (idle share of the pipeline: fill, drain, uneven "
               "stages)")
    memory = estimate_memory(inp)
    fits = "fits" if memory.total_gib <= inp.hardware.memory_gib else "DOES NOT FIT"
    out.append(f"  {'memory per GPU (fullest stage)':<32} {memory.total_gib:9.1f} GiB   ({fits} in "
               f"{inp.hardware.memory_gib:g} GiB: {memory.describe()})")
    out += ["", "Result (TFLOP/s per GPU = FLOPs per step / (step time × GPUs))"]
    for key, (label, value) in proj.tflops.items():
        extra = f"   MFU {value / inp.hardware.peak_tflops:.1%}" if key == "model" else ""
        out.append(f"  {label:<32} {value:9.1f}{extra}")
    out.append(f"  {'tokens/s per GPU':<32} {proj.tokens_per_s_per_gpu:9.1f}")
    if sensitivity_rows:
        out += ["", "Sensitivity (one assumption changed at a time)",
                f"  {'change':<52} {'hw TFLOP/s':>10} {'model':>7} {'Δ hw':>7} {'GiB/GPU':>8}"]
        for label, p in sensitivity_rows:
            out.append(f"  {label:<52} {p.hardware_tflops:10.1f} {p.model_tflops:7.1f} "
                       f"{p.hardware_tflops / proj.hardware_tflops - 1:+7.1%} {estimate_memory(p.inputs).total_gib:8.1f}")
    return "\n".join(out)


def sensitivity(inp: ProjectionInputs) -> list:
    """The projection with one assumption changed at a time: (label, Projection)."""
    hw = inp.hardware
    variants = [
        ("GEMM efficiency 0.55", inp.replace(hardware=dataclasses.replace(hw, gemm_efficiency=0.55))),
        ("GEMM efficiency 0.85", inp.replace(hardware=dataclasses.replace(hw, gemm_efficiency=0.85))),
        ("HBM efficiency 0.5 (slow element-wise kernels)", inp.replace(hbm_efficiency=0.5)),
        (f"NVLink bus bandwidth {hw.nvlink_busbw_gb_s * 0.75:g} GB/s",
         inp.replace(hardware=dataclasses.replace(hw, nvlink_busbw_gb_s=hw.nvlink_busbw_gb_s * 0.75))),
        ("TP collectives 50 % overlapped", inp.replace(tp_overlap=0.5)),
        (f"inter-node {hw.ib_gb_s_per_gpu / 2:g} GB/s per GPU",
         inp.replace(hardware=dataclasses.replace(hw, ib_gb_s_per_gpu=hw.ib_gb_s_per_gpu / 2))),
        ("DP exchange fully overlapped", inp.replace(dp_overlap=1.0)),
        ("attention unfused" if inp.attention == "flash" else "attention flash",
         inp.replace(attention="unfused" if inp.attention == "flash" else "flash")),
        ("sequence parallelism " + ("off" if inp.sequence_parallel else "on"),
         inp.replace(sequence_parallel=not inp.sequence_parallel)),
        ("micro-batch 2", inp.replace(micro_batch=2)),
        ("selective recompute", inp.replace(recompute="selective")),
        ("no activation recompute", inp.replace(recompute="none")),
    ]
    if inp.precision == "bf16":
        variants += [(f"bf16 accumulation {mode}", inp.replace(grad_accumulation=mode))
                     for mode in GRAD_ACCUMULATION if mode != inp.grad_accumulation]
    for pp in (2, 1):
        if pp != inp.pipeline and inp.gpus % (inp.tensor * pp) == 0:
            variants.append((f"PP={pp} (DP={inp.gpus // (inp.tensor * pp)})", inp.replace(pipeline=pp)))
    rows = []
    for label, variant in variants:
        if variant == inp:
            continue
        try:
            rows.append((label, project(variant)))
        except ProjectionError:
            continue
    return rows
