"""Published at-scale training runs, each with its model shape, layout and software, and the projection's
prediction beside the published figure (`opt-ds bench --project-published`).

Every run goes through the same `project()` with the same hardware profile figures; what differs is only
what the run itself did (shape, GPUs, layout, batch, recompute, attention kernel, precision, ZeRO stage,
cluster network), each stated with its source.
"""
from __future__ import annotations

from dataclasses import dataclass

from opt_ds.bench.hardware import HARDWARE, hardware_key
from opt_ds.bench.project import Projection, ProjectionInputs, project
from opt_ds.models.presets import get_preset
from opt_ds.models.family import as_decoder_shape
from opt_ds.models.shape import DecoderShape

# The convention a published figure uses: a key of opt_ds.models.flops.all_conventions, or tokens.
TOKENS = "tokens"


@dataclass(frozen=True)
class PublishedRun:
    name: str
    inputs: ProjectionInputs
    published: float
    convention: str                 # "hardware" | "model" | TOKENS (tokens/s per GPU)
    source: str
    notes: str

    @property
    def unit(self) -> str:
        return "tokens/s/GPU" if self.convention == TOKENS else f"TFLOP/s/GPU ({self.convention} FLOPs)"

    def predicted(self, proj: Projection) -> float:
        return proj.tokens_per_s_per_gpu if self.convention == TOKENS else proj.tflops[self.convention][1]


BLOOM_176B = DecoderShape(num_layers=70, hidden_size=14336, num_heads=112, ffn_hidden_size=4 * 14336,
                          vocab_size=250880, embedding_norm=True)
GPT3_175B = DecoderShape(num_layers=96, hidden_size=12288, num_heads=96, ffn_hidden_size=4 * 12288,
                         vocab_size=51200, position_rows=2048)
LLAMA_65B = as_decoder_shape(get_preset("llama-65b").shape)

SHAPES = {"bloom-176b": BLOOM_176B, "gpt3-175b": GPT3_175B, "llama-65b": LLAMA_65B}

RUNS = {r.name: r for r in [
    PublishedRun(
        "opt-175b",
        ProjectionInputs(shape=as_decoder_shape(get_preset("opt-175b").shape), model_name="OPT-175B", gpus=992, tensor=8,
                         pipeline=1, micro_batch=8, global_batch=992, recompute="full", attention="unfused",
                         dropout=True, precision="fp16", zero_stage=3, hardware=HARDWARE["a100-80gb"]),
        147.0, "hardware",
        "OPT paper (arXiv 2205.01068) §2.4: 147 TFLOP/s per GPU on 992 A100-80GB",
        "metaseq: Megatron TP 8 in a node, FSDP over the 124 replicas, fp16, activation checkpointing, "
        "Megatron's unfused softmax (2021, before FlashAttention), dropout 0.1; 2M-token batch = 992 "
        "sequences, 8 per replica in one pass (the per-replica split is not published). The paper states no "
        "FLOPs formula; compared in hardware FLOPs like the Megatron-LM and BLOOM figures of the same era"),
    PublishedRun(
        "bloom-176b",
        ProjectionInputs(shape=BLOOM_176B, model_name="BLOOM-176B", gpus=384, tensor=4, pipeline=12, micro_batch=2,
                         global_batch=2048, recompute="full", attention="unfused", dropout=False, precision="bf16",
                         grad_accumulation="separate",
                         zero_stage=1, partition="layers+embedding", hardware=HARDWARE["a100-80gb-opa"]),
        150.0, "hardware",
        "BLOOM paper (arXiv 2211.05100) §3.4 / model card: ~150 TFLOP/s per GPU on 384 A100-80GB (48 nodes)",
        "Megatron-DeepSpeed: TP 4 × PP 12 × DP 8, ZeRO-1, bf16 with fp32 gradient accumulation, micro-batch 2, "
        "global batch 2048 × 2048 tokens, full activation checkpointing, fused (not flash) softmax, dropout 0, "
        "embedding and head partitioned as layers (type:transformer|embedding); Jean Zay nodes with 4 × 100 Gb/s "
        "Omni-Path; Megatron's FLOPs formula with the recompute factor (= hardware FLOPs)"),
    PublishedRun(
        "megatron-gpt3-175b",
        ProjectionInputs(shape=GPT3_175B, model_name="GPT-3 175B (Megatron-LM)", gpus=1024, tensor=8, pipeline=16,
                         micro_batch=1, global_batch=1536, recompute="full", attention="unfused", dropout=True,
                         precision="fp16", zero_stage=0, hardware=HARDWARE["a100-80gb"]),
        138.0, "hardware",
        "Narayanan et al. 2021 (arXiv 2104.04473), GPT-3 175B on 1024 A100: 138 TFLOP/s per GPU",
        "Megatron-LM PTD-P: TP 8 × PP 16 × DP 8, batch 1536, micro-batch 1, fp16 with gradient all-reduce "
        "(no ZeRO), full activation recompute, fused softmax, dropout 0.1, 1F1B schedule, vocab 51200; Selene "
        "DGX A100 nodes with 8 HDR HCAs; the paper's eq. 3 counts the recomputed forward (= hardware FLOPs)"),
    PublishedRun(
        "llama-65b",
        ProjectionInputs(shape=LLAMA_65B, model_name="LLaMA-65B", gpus=2048, tensor=8, pipeline=1, micro_batch=8,
                         global_batch=2048, recompute="selective", attention="flash", sequence_parallel=True,
                         dropout=False, precision="bf16", zero_stage=3, hardware=HARDWARE["a100-80gb"]),
        380.0, TOKENS,
        "LLaMA paper (arXiv 2302.13971) §2.4: ~380 tokens/s per GPU on 2048 A100-80GB for the 65B model",
        "xformers memory-efficient causal attention, selective activation checkpointing (linear-layer outputs "
        "kept), model and sequence parallelism, no dropout, 4M-token batch = 2048 sequences of 2048; the layout "
        "is not published: TP 8 inside a node with sharded data parallelism over the 256 replicas, 8 sequences "
        "per replica in one pass. Tokens per second need no FLOPs convention"),
]}


def command_for(run) -> str:
    """The `opt-ds bench --project` command line that projects `run` with every input spelled out."""
    inp = run.inputs
    hardware = hardware_key(inp.hardware)
    return " ".join([
        "opt-ds bench --project", f"--shape {inp.shape.spec()}", f"--seq {inp.seq}",
        f"--project-gpus {inp.gpus}", f"--project-tp {inp.tensor}", f"--project-pp {inp.pipeline}",
        f"--project-micro-batch {inp.micro_batch}", f"--project-global-batch {inp.global_batch}",
        f"--project-recompute {inp.recompute}", f"--project-attention {inp.attention}",
        f"--project-sequence-parallel {'on' if inp.sequence_parallel else 'off'}",
        f"--project-dropout {'on' if inp.dropout else 'off'}", f"--project-precision {inp.precision}",
        f"--project-grad-accumulation {inp.grad_accumulation}",
        f"--project-zero {inp.zero_stage}", f"--project-partition {inp.partition}",
        f"--project-hardware {hardware}"])


def comparison_rows() -> list:
    """(run, projection, predicted, ratio) for every published run."""
    rows = []
    for run in RUNS.values():
        proj = project(run.inputs)
        value = run.predicted(proj)
        rows.append((run, proj, value, value / run.published))
    return rows


def format_comparison() -> str:
    lines = ["Projection vs published at-scale runs (one set of hardware assumptions for all; each run's own "
             "shape, layout and software)", "",
             f"  {'run':<20} {'GPUs':>5} {'layout':<16} {'predicted':>10} {'published':>10} {'ratio':>7}  unit"]
    for run, proj, value, ratio in comparison_rows():
        inp = run.inputs
        layout = f"{inp.tensor}×{inp.pipeline}×{proj.data} Z{inp.zero_stage}"
        lines.append(f"  {run.name:<20} {inp.gpus:>5} {layout:<16} {value:10.1f} {run.published:10.1f} "
                     f"{ratio:7.3f}  {run.unit}")
    lines += ["", "  layout = TP×PP×DP, Z = ZeRO stage (3 = FSDP). Sources, run details, and the command that "
              "projects each run (the same as --project --project-run NAME):"]
    for run in RUNS.values():
        lines += [f"  {run.name}: {run.source}.", f"    {run.notes}.", f"    {command_for(run)}"]
    return "\n".join(lines)
