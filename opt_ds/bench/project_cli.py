"""Command-line inputs of the projection (`opt-ds bench --project ...`) and the model/shape resolution that
`opt-ds plan` shares. Every published run's inputs can be written as these flags (`command_for`)."""
from __future__ import annotations

import argparse
import dataclasses

from opt_ds.bench.hardware import HARDWARE, get_hardware
from opt_ds.config import ConfigError
from opt_ds.errors import UserError

SWITCHES = {"on": True, "off": False}


def named_shapes() -> dict:
    """Model names accepted by --project-model / --model: OPT presets, bench cases, published shapes."""
    from opt_ds.bench.cases import NAMED_CASES
    from opt_ds.bench.published import SHAPES
    from opt_ds.models.presets import PRESETS
    from opt_ds.models.family import as_decoder_shape
    names = {name: as_decoder_shape(case.shape) for name, case in NAMED_CASES.items()}
    names.update({name: as_decoder_shape(preset.shape) for name, preset in PRESETS.items()})
    names.update(SHAPES)
    return names


def resolve_shape(model, spec, flag_model: str = "--project-model", default: str = "opt-175b"):
    """(DecoderShape, display name) from a model name and/or a `key=value,...` shape."""
    from opt_ds.models.shape import DecoderShape
    names = named_shapes()
    if model is not None and model not in names:
        raise ConfigError(f"{flag_model} {model!r}: choose one of {', '.join(names)}, or give the shape "
                          "with --shape layers=...,hidden=...,heads=...,ffn=...,vocab=...")
    try:
        if spec is None:
            name = model or default
            return names[name], name.upper()
        if model is None:
            return DecoderShape.parse(spec), "custom shape"
        return DecoderShape.parse(spec, names[model]), f"{model.upper()} with {spec}"
    except UserError as err:
        raise ConfigError(f"--shape: {err}") from None


def add_projection_arguments(parser: argparse.ArgumentParser) -> None:
    from opt_ds.bench.project import ATTENTION, GRAD_ACCUMULATION, PARTITIONS, PRECISION_BYTES, RECOMPUTE
    from opt_ds.bench.published import RUNS
    proj = parser.add_argument_group("projection of a large run (see docs/bench.md; unset flags come from "
                                     "--project-run, else opt_ds running OPT-175B on 992 A100s)")
    proj.add_argument("--project", action="store_true", help="print the projection (cases run only if named)")
    proj.add_argument("--project-published", action="store_true",
                      help="print the projection of every published run beside its published figure")
    proj.add_argument("--project-run", metavar="RUN", help="start from a published run: " + ", ".join(RUNS))
    proj.add_argument("--project-model", help="preset, case or published shape (opt-175b, bloom-176b, gpt3-175b, "
                                              "llama-65b, ...)")
    proj.add_argument("--shape", metavar="KEY=VALUE,...",
                      help="the model's shape, or changes to --project-model's: layers hidden heads kv_heads ffn "
                           "gated relu vocab tied bias rmsnorm positions embed embed_norm final_norm")
    proj.add_argument("--project-hardware", help=" | ".join(HARDWARE))
    proj.add_argument("--project-gpus", type=int)
    proj.add_argument("--project-tp", type=int)
    proj.add_argument("--project-pp", type=int)
    proj.add_argument("--project-micro-batch", type=int)
    proj.add_argument("--project-global-batch", type=int, help="target sequences per step")
    proj.add_argument("--project-recompute", choices=RECOMPUTE)
    proj.add_argument("--project-no-recompute", action="store_true", help="same as --project-recompute none")
    proj.add_argument("--project-attention", choices=ATTENTION)
    proj.add_argument("--project-sequence-parallel", choices=tuple(SWITCHES))
    proj.add_argument("--project-dropout", choices=tuple(SWITCHES))
    proj.add_argument("--project-precision", choices=tuple(PRECISION_BYTES))
    proj.add_argument("--project-grad-accumulation", choices=GRAD_ACCUMULATION,
                      help="bf16: how fp32 gradients accumulate the bf16 ones (default immediate, opt_ds's)")
    proj.add_argument("--project-zero", type=int, choices=(0, 1, 3))
    proj.add_argument("--project-partition", choices=PARTITIONS)
    proj.add_argument("--layer-ms", type=float,
                      help="measured compute of one layer's TP shard per micro-batch (fwd+bwd[+recompute]), ms")
    proj.add_argument("--measure-layer", action="store_true",
                      help="measure the model's decoder layer on this device and use it (÷ TP; OPT shapes)")
    proj.add_argument("--gemm-efficiency", type=float)
    proj.add_argument("--nvlink-gbps", type=float, help="NVLink all-reduce bus bandwidth, GB/s")
    proj.add_argument("--ib-gbps", type=float, help="inter-node bandwidth per GPU, GB/s")
    proj.add_argument("--dp-overlap", type=float)
    proj.add_argument("--tp-overlap", type=float)


def projection_inputs_from(args):
    from opt_ds.bench.project import ProjectionInputs, check_inputs
    from opt_ds.bench.published import RUNS

    if args.project_run is not None and args.project_run not in RUNS:
        raise ConfigError(f"--project-run {args.project_run!r}: choose one of {', '.join(RUNS)}")
    inputs = RUNS[args.project_run].inputs if args.project_run else ProjectionInputs()
    changes = {}
    if args.project_model is not None or args.shape is not None:
        changes["shape"], changes["model_name"] = resolve_shape(args.project_model, args.shape)
    hardware = inputs.hardware
    if args.project_hardware is not None:
        try:
            hardware = get_hardware(args.project_hardware)
        except UserError as err:
            raise ConfigError(f"--project-hardware: {err}") from None
    for flag, field in (("nvlink_gbps", "nvlink_busbw_gb_s"), ("ib_gbps", "ib_gb_s_per_gpu"),
                        ("gemm_efficiency", "gemm_efficiency")):
        if getattr(args, flag) is not None:
            hardware = dataclasses.replace(hardware, **{field: getattr(args, flag)})
    changes["hardware"] = hardware
    for flag, field in (("seq", "seq"), ("project_gpus", "gpus"), ("project_tp", "tensor"),
                        ("project_pp", "pipeline"), ("project_micro_batch", "micro_batch"),
                        ("project_global_batch", "global_batch"), ("project_recompute", "recompute"),
                        ("project_attention", "attention"), ("project_precision", "precision"),
                        ("project_grad_accumulation", "grad_accumulation"),
                        ("project_zero", "zero_stage"), ("project_partition", "partition"),
                        ("dp_overlap", "dp_overlap"), ("tp_overlap", "tp_overlap")):
        if getattr(args, flag, None) is not None:
            changes[field] = getattr(args, flag)
    for flag, field in (("project_sequence_parallel", "sequence_parallel"), ("project_dropout", "dropout")):
        if getattr(args, flag) is not None:
            changes[field] = SWITCHES[getattr(args, flag)]
    if args.project_no_recompute:
        changes["recompute"] = "none"
    inputs = inputs.replace(**changes)
    if args.layer_ms is not None:
        inputs = inputs.replace(layer_ms=args.layer_ms, layer_source="given with --layer-ms")
    check_inputs(inputs)
    return inputs
