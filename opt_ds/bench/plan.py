"""List the opt_ds layouts of a model on N GPUs that fit in memory, fastest first, each with its memory per
GPU and the config overrides that run it.

  opt-ds plan --model opt-175b --gpus 992 --hardware a100-80gb
  opt-ds plan --model llama-65b --gpus 512 --hardware h100-80gb --top 5
  opt-ds plan --shape layers=32,hidden=4096,heads=32,ffn=11008,gated=1,vocab=32000,tied=0 --gpus 64

Layouts: TP (dividing a node's GPUs, the heads and the MLP width) × PP (up to the layers) × DP (the rest),
micro-batch 1/2/4/8, activation recompute full / selective / none, sequence parallelism on or off (TP > 1),
ZeRO stage 0 or 1 — what opt_ds runs (DeepSpeed pipeline engine, megatron-core TP, flash attention through
SDPA, bf16 gradients accumulated in backward hooks). Each is projected with the
model of `opt-ds bench --project` and sized with the memory model in docs/bench.md.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass

from opt_ds.bench.hardware import HARDWARE
from opt_ds.config import ConfigError

MICRO_BATCHES = (1, 2, 4, 8)
# Memory a GPU cannot give to tensors: CUDA context, NCCL buffers, allocator fragmentation.
RESERVED_FRACTION = 0.05
# The global batch of a model without a shipped recipe (ds_configs/<model>.yaml): 4M tokens, LLaMA's.
DEFAULT_BATCH_TOKENS = 4 * 2 ** 20


@dataclass
class PlannedLayout:
    inputs: object          # ProjectionInputs
    projection: object      # Projection
    memory: object          # MemoryEstimate

    def overrides(self) -> list:
        inp = self.inputs
        return [f"parallel.tensor={inp.tensor}", f"parallel.pipeline={inp.pipeline}",
                f"parallel.data={self.projection.data}", f"parallel.zero_stage={inp.zero_stage}",
                f"parallel.recompute={inp.recompute}",
                f"parallel.sequence_parallel={'true' if inp.sequence_parallel else 'false'}",
                f"batch.micro_batch_size={inp.micro_batch}", f"batch.global_batch_size={self.projection.global_batch}",
                f"batch.seq_length={inp.seq}", f"precision.dtype={inp.precision}"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("--model", help="preset, bench case or published shape (default opt-175b unless --shape)")
    parser.add_argument("--shape", metavar="KEY=VALUE,...",
                        help="the model's shape, or changes to --model's (keys as in `opt-ds bench --project`)")
    parser.add_argument("--gpus", type=int, required=True, help="GPUs in the run")
    parser.add_argument("--hardware", default="a100-80gb", help=" | ".join(HARDWARE))
    parser.add_argument("--seq", type=int, default=2048, help="sequence length")
    parser.add_argument("--global-batch", type=int,
                        help="sequences per step (default: the recipe of --model, ds_configs/<model>.yaml, else 4M tokens)")
    parser.add_argument("--precision", default="bf16", choices=("bf16", "fp16", "fp32"))
    parser.add_argument("--dropout", default="on", choices=("on", "off"))
    parser.add_argument("--top", type=int, default=10, help="how many layouts to list")


def _divisors(n: int) -> list:
    return [k for k in range(1, n + 1) if n % k == 0]


def candidate_inputs(base, gpus_per_node: int) -> list:
    """Every opt_ds layout of `base.gpus` GPUs, as ProjectionInputs."""
    shape = base.shape
    found = []
    for tp in _divisors(min(gpus_per_node, base.gpus)):
        if shape.num_heads % tp or shape.kv_heads % tp or shape.ffn_hidden_size % tp or base.gpus % tp:
            continue
        for pp in _divisors(base.gpus // tp):
            if pp > shape.num_layers:
                continue
            dp = base.gpus // (tp * pp)
            for mb in MICRO_BATCHES:
                if dp * mb > base.global_batch:
                    continue
                for recompute in ("full", "selective", "none"):
                    for sp in ((False, True) if tp > 1 else (False,)):
                        for zero in (1, 0):
                            found.append(base.replace(tensor=tp, pipeline=pp, micro_batch=mb, recompute=recompute,
                                                      sequence_parallel=sp, zero_stage=zero))
    return found


def plan(base) -> tuple:
    """(layouts that fit, fastest first; how many were considered)."""
    from opt_ds.bench.memory import estimate_memory
    from opt_ds.bench.project import project

    usable = base.hardware.memory_gib * (1 - RESERVED_FRACTION)
    candidates = candidate_inputs(base, base.hardware.gpus_per_node)
    fitting = []
    for inp in candidates:
        memory = estimate_memory(inp)
        if memory.total_gib <= usable:
            fitting.append(PlannedLayout(inp, project(inp), memory))
    fitting.sort(key=lambda p: -p.projection.tokens_per_s_per_gpu)
    return fitting, len(candidates)


def base_inputs(args):
    from opt_ds.bench.hardware import get_hardware
    from opt_ds.bench.project import ProjectionInputs
    from opt_ds.bench.project_cli import resolve_shape
    from opt_ds.config.shipped import recipe_batch_tokens
    from opt_ds.errors import UserError

    if args.gpus < 1 or args.seq < 1 or args.top < 1:
        raise ConfigError("--gpus, --seq and --top must be positive")
    shape, name = resolve_shape(args.model, args.shape, flag_model="--model")
    try:
        hardware = get_hardware(args.hardware)
    except UserError as err:
        raise ConfigError(f"--hardware: {err}") from None
    recipe_tokens = recipe_batch_tokens(args.model) if args.model and args.shape is None else None
    if args.global_batch is not None:
        global_batch = args.global_batch
    else:
        global_batch = (recipe_tokens or DEFAULT_BATCH_TOKENS) // args.seq
    if global_batch < 1:
        raise ConfigError(f"--global-batch {global_batch}: must be at least 1")
    return ProjectionInputs(shape=shape, model_name=name, seq=args.seq, gpus=args.gpus, global_batch=global_batch,
                            attention="flash", sequence_parallel=False, dropout=args.dropout == "on",
                            precision=args.precision, grad_accumulation="immediate", partition="layers",
                            hardware=hardware)


def format_plan(base, layouts: list, considered: int, top: int) -> str:
    hw = base.hardware
    lines = [f"Layouts for {base.model_name} ({base.shape.describe()}, s={base.seq}) on {base.gpus} × "
             f"{hw.name.split(',')[0]}: {len(layouts)} of {considered} fit in {hw.memory_gib:g} GiB "
             f"(less {RESERVED_FRACTION:.0%} reserved); global batch ≈ {base.global_batch} sequences; "
             f"{base.precision}, flash attention, opt_ds's DeepSpeed pipeline + megatron-core TP", ""]
    if not layouts:
        lines.append("Nothing fits: use more GPUs, a shorter sequence, or a smaller micro-batch/global batch.")
        return "\n".join(lines)
    lines.append(f"  {'#':>2} {'TP':>3} {'PP':>3} {'DP':>5} {'mb':>3} {'m':>5} {'recompute':>9} {'SP':>3} {'ZeRO':>4} "
                 f"{'tok/s/GPU':>10} {'model':>6} {'hw':>6} {'idle':>6}  memory GiB/GPU: total = weights + "
                 "grads + optimizer + activations + buffers")
    for rank, p in enumerate(layouts[:top], 1):
        inp, proj, mem = p.inputs, p.projection, p.memory
        parts = " + ".join(f"{mem.parts[k] / 2 ** 30:.1f}" for k in ("weights", "gradients", "optimizer",
                                                                      "activations", "buffers"))
        lines.append(f"  {rank:>2} {inp.tensor:>3} {inp.pipeline:>3} {proj.data:>5} {inp.micro_batch:>3} "
                     f"{proj.micro_batches:>5} {inp.recompute:>9} {'on' if inp.sequence_parallel else 'off':>3} "
                     f"{inp.zero_stage:>4} "
                     f"{proj.tokens_per_s_per_gpu:10.1f} {proj.model_tflops:6.1f} {proj.hardware_tflops:6.1f} "
                     f"{proj.bubble:6.1%}  {mem.total_gib:.1f} = {parts}")
        lines.append(f"       opt-ds train CONFIG {' '.join(p.overrides())}")
    lines += ["", "model / hw: TFLOP/s per GPU in model FLOPs (no recompute) / hardware FLOPs (recompute counted); "
              "m: micro-batches per replica; recompute: of every layer (full), of the attention core (selective); SP: "
              "sequence parallelism; idle: pipeline fill/drain "
              "and uneven stages. "
              "`opt-ds bench --project` with the same layout prints every assumption."]
    return "\n".join(lines)


def run(args) -> int:
    base = base_inputs(args)
    layouts, considered = plan(base)
    print(format_plan(base, layouts, considered, args.top))
    return 0 if layouts else 1
