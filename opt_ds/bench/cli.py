"""Measure opt_ds training throughput (tokens/s, TFLOP/s under three conventions, MFU, memory, energy)
beside Hugging Face peers, sweep micro-batch × activation checkpointing, and project large runs.

  opt-ds bench tiny tiny-pp2                      CPU smoke run with the HF peers
  opt-ds bench opt-1.3b opt-2.7b:mb=2,ac=1        GPU cases; `name:key=value,...` adjusts one case
  opt-ds bench opt-1.3b --sweep                   micro-batch × checkpoint-interval grid, fastest first
  opt-ds bench --project                          OPT-175B on 992 A100s, assumptions and sensitivity
  opt-ds bench --project --project-run bloom-176b a published run, predicted beside published
  opt-ds bench --project-published                every published run: predicted / published
  torchrun --nproc_per_node 8 -m opt_ds bench 175b-slice   one case under your own launcher

Case keys: tp pp dp mb gas seq precision ac layers dropout compile peer. Reports go to --out:
results.jsonl (appended), table.txt, tflops.png, projection-<hardware>.txt, workers.log.
"""
from __future__ import annotations

import argparse
import importlib.util
import itertools
import json
import os
import sys
from pathlib import Path

from opt_ds.bench.cases import NAMED_CASES, PRECISIONS, BenchCase, parse_case, with_changes
from opt_ds.bench.project_cli import add_projection_arguments, projection_inputs_from
from opt_ds.config import ConfigError
from opt_ds.durable import write_atomically


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("cases", nargs="*", metavar="CASE",
                        help="named case, optionally adjusted (opt-2.7b:mb=2,ac=1); default: tiny on CPU, "
                             "opt-1.3b opt-2.7b on GPU. --list shows them")
    parser.add_argument("--list", action="store_true", help="list the named cases and exit")
    case = parser.add_argument_group("case settings (for every case; a CASE's own keys win)")
    case.add_argument("--layout", metavar="TPxPPxDP", help="parallel layout, e.g. 2x2x1")
    case.add_argument("--micro-batch", type=int, metavar="N")
    case.add_argument("--grad-accum", type=int, metavar="N", help="micro-batches per optimizer step per replica")
    case.add_argument("--seq", type=int, metavar="N", help="sequence length (also the projection's)")
    case.add_argument("--precision", choices=PRECISIONS, help="auto = bf16 on GPU, fp32 on CPU")
    case.add_argument("--ac", type=int, metavar="N", help="activation checkpoint interval in layers (0 = off)")
    case.add_argument("--layers", type=int, metavar="N", help="number of decoder layers")
    case.add_argument("--dropout", type=float, metavar="P", help="dropout (cases use 0.0; OPT trained with 0.1)")
    case.add_argument("--compile", action="store_true", default=None,
                      help="torch.compile every pipeline layer (peers stay eager)")
    run = parser.add_argument_group("measurement")
    run.add_argument("--steps", type=int, default=10, help="timed steps (median reported)")
    run.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    run.add_argument("--peer", dest="peer", action="store_true", default=None,
                     help="also run the Hugging Face peers (default: when transformers is installed)")
    run.add_argument("--no-peer", dest="peer", action="store_false")
    run.add_argument("--peers", default="hf,hf-deepspeed", help="which peers: hf, hf-deepspeed")
    run.add_argument("--peak-tflops", type=float, help="device peak for MFU when it is not in the table")
    run.add_argument("--timeout", type=float, default=1800, help="seconds per case before it is killed")
    run.add_argument("--out", type=Path, default=Path("runs/bench"), help="report directory")
    sweep = parser.add_argument_group("sweep")
    sweep.add_argument("--sweep", action="store_true", help="run each case over the micro-batch × AC grid")
    sweep.add_argument("--sweep-micro-batch", default="1,2,4,8")
    sweep.add_argument("--sweep-ac", default="0,1", help="activation checkpoint intervals")
    add_projection_arguments(parser)


def run(args) -> int:
    """Bad input raises ConfigError (a UserError): opt_ds.cli prints it as one line and exits with 2."""
    if args.list:
        print(list_cases())
        return 0
    if args.project_published:
        from opt_ds.bench.published import format_comparison
        print(format_comparison())
        return 0
    check_measurement(args)
    if _launched():
        return run_launched(args)
    return run_driver(args)


def check_measurement(args) -> None:
    if args.steps < 1:
        raise ConfigError(f"--steps {args.steps} must be >= 1: the timed steps whose median is reported, e.g. 10")
    if args.warmup < 0:
        raise ConfigError(f"--warmup {args.warmup} must be >= 0: untimed steps before the timed ones, e.g. 3")
    if not args.timeout > 0:
        raise ConfigError(f"--timeout {args.timeout} must be > 0: seconds per case before it is killed, e.g. 1800")


# --- cases ---------------------------------------------------------------------------------------------

def list_cases() -> str:
    lines = [f"{'case':<12} {'layers':>6} {'hidden':>6} {'layout':<14} {'mb×gas':>6} {'seq':>5} {'AC':>2}  note"]
    for c in NAMED_CASES.values():
        lines.append(f"{c.name:<12} {c.shape.num_layers:>6} {c.shape.hidden_size:>6} {c.layout:<14} "
                     f"{c.micro_batch}×{c.grad_accum:<4} {c.seq:>5} {c.ac_interval:>2}  {c.note}")
    return "\n".join(lines)


def flag_changes(args) -> dict:
    changes = {}
    if args.layout:
        try:
            tp, pp, dp = (int(x) for x in args.layout.lower().split("x"))
        except ValueError:
            raise ConfigError(f"--layout {args.layout!r}: expected TPxPPxDP, e.g. 2x2x1") from None
        changes.update(tp=tp, pp=pp, dp=dp)
    for flag, key in (("micro_batch", "mb"), ("grad_accum", "gas"), ("seq", "seq"), ("precision", "precision"),
                      ("ac", "ac"), ("layers", "layers"), ("dropout", "dropout"), ("compile", "compile")):
        if getattr(args, flag) is not None:
            changes[key] = getattr(args, flag)
    return changes


def resolve_cases(specs: list, changes: dict, cuda: bool, gpus: int) -> list:
    """Parse, resolve precision and validate every case before anything runs."""
    cases = [parse_case(spec, changes).resolve_precision(cuda) for spec in specs]
    for case in cases:
        resolved = case.config()        # raises ConfigError naming the bad key
        if not cuda:
            check_cpu_sized(case, resolved)
        if cuda and case.world_size > gpus:
            raise ConfigError(f"case {case.label()} needs {case.world_size} GPUs ({case.layout}) but {gpus} "
                              f"{'is' if gpus == 1 else 'are'} visible; shrink its layout (e.g. "
                              f"{case.name}:tp=1,pp=1,dp=1) or run on a larger machine")
    return cases


TRAINING_BYTES_PER_PARAMETER = 16      # fp32 weights, gradients and Adam's two moments (activations extra)
# Model FLOPs of one optimizer step above which a case is GPU-sized: at the ~0.1 TFLOP/s a few CPU cores
# reach in fp32, its 13 default steps would take minutes.
CPU_STEP_FLOPS_LIMIT = 2e12


def _available_memory_bytes() -> int:
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def check_cpu_sized(case, resolved) -> None:
    """On a CPU, refuse up front a GPU-sized case: one whose training state exceeds the free memory (it would
    swap or be killed after minutes) or whose step is too much work for a CPU (it would run into --timeout)."""
    from opt_ds.models.flops import model_flops
    from opt_ds.models.presets import analytic_parameter_count
    parameters = analytic_parameter_count(resolved.shape)
    needed = parameters * TRAINING_BYTES_PER_PARAMETER
    available = _available_memory_bytes()
    step_flops = model_flops(resolved.shape, case.global_batch, case.seq).flops
    if needed <= available and step_flops <= CPU_STEP_FLOPS_LIMIT:
        return
    why = (f"{available / 2 ** 30:.1f} GiB are free" if needed > available else
           f"{step_flops / 1e12:.3g} TFLOP per step is minutes per step on a CPU (limit {CPU_STEP_FLOPS_LIMIT / 1e12:g})")
    raise ConfigError(f"case {case.label()} needs about {needed / 2 ** 30:.1f} GiB ({parameters / 1e9:.2f}B parameters "
                      f"x {TRAINING_BYTES_PER_PARAMETER} bytes: fp32 weights, gradients, Adam state; activations "
                      f"extra) and {why}: it is a GPU case; run it on a GPU machine (opt_ds/bench/gpu_session.sh), "
                      f"choose a CPU case (tiny, tiny-pp2) or shrink it ({case.name}:layers=1,mb=1,seq=128)")


def sweep_variants(cases: list, micro_batches: str, intervals: str) -> list:
    def ints(text, flag):
        try:
            return [int(x) for x in text.split(",") if x.strip()]
        except ValueError:
            raise ConfigError(f"{flag} {text!r}: expected comma-separated integers, e.g. 1,2,4") from None
    grid = list(itertools.product(ints(micro_batches, "--sweep-micro-batch"), ints(intervals, "--sweep-ac")))
    variants = [with_changes(c, {"mb": mb, "ac": ac, "peer": False}) for c in cases for mb, ac in grid]
    for variant in variants:
        variant.config()
    return variants


def _cuda_devices() -> tuple:
    import torch
    available = torch.cuda.is_available()
    return available, torch.cuda.device_count() if available else 0


def _peer_impls(args) -> tuple:
    from opt_ds.bench.peer import PEER_IMPLS
    impls = tuple(x.strip() for x in args.peers.split(",") if x.strip())
    unknown = [i for i in impls if i not in PEER_IMPLS]
    if unknown:
        raise ConfigError(f"--peers: unknown peer {', '.join(unknown)}; choose from {', '.join(PEER_IMPLS)}")
    have = importlib.util.find_spec("transformers") is not None
    if args.peer is None:
        return impls if have else ()
    if args.peer and not have:
        raise ConfigError("--peer needs transformers (pip install 'opt_ds[dev]'), or pass --no-peer")
    return impls if args.peer else ()


# --- driver mode: one worker process per measurement ----------------------------------------------------

def run_driver(args) -> int:
    from opt_ds.bench.suite import Suite, SuiteOptions

    cuda, gpus = _cuda_devices()
    specs = args.cases or ([] if args.project else (["opt-1.3b", "opt-2.7b"] if cuda else ["tiny"]))
    cases = resolve_cases(specs, flag_changes(args), cuda, gpus)
    if args.sweep:
        cases = sweep_variants(cases, args.sweep_micro_batch, args.sweep_ac)
    projection_inputs = projection_inputs_from(args) if args.project else None
    if projection_inputs is not None and args.measure_layer:
        check_layer_measurable(projection_inputs, cuda)
    options = SuiteOptions(out_dir=args.out, steps=args.steps, warmup=args.warmup, peers=_peer_impls(args),
                           timeout_s=args.timeout, peak_tflops=args.peak_tflops, command=_command_line())
    suite = Suite(options)
    for case in cases:
        suite.run_case(case)
    if cases:
        print("\n" + suite.text())
        if suite.chart_note:
            print(f"\nno chart: {suite.chart_note}")
        if args.sweep:
            print("\n" + sweep_summary(suite.rows))
        print(f"\nreports in {args.out}/: {', '.join(_written(args.out))}")
    if projection_inputs is not None:
        run_projection(args, suite, projection_inputs, cuda)
    return 0 if all(r["status"] == "ok" for r in suite.rows) else 1


def _written(out: Path) -> list:
    from opt_ds.bench import report
    return [name for name in (report.RESULTS, report.TABLE, report.CHART, "workers.log") if (out / name).exists()]


def sweep_summary(rows: list) -> str:
    ok = [r for r in rows if r["status"] == "ok"]
    lines = ["Sweep: fastest first (tokens/s per GPU; model TFLOP/s per GPU)"]
    for base in dict.fromkeys(r["case_spec"]["name"] for r in rows):
        mine = sorted((r for r in ok if r["case_spec"]["name"] == base), key=lambda r: -r["tokens_per_s_per_gpu"])
        for rank, r in enumerate(mine):
            lines.append(f"  {'*' if rank == 0 else ' '} {r['case']:<28} mb={r['micro_batch']:<3} ac={r['ac_interval']:<2} "
                         f"{r['tokens_per_s_per_gpu']:>12,.1f} tok/s/GPU {r['tflops']['model']['tflops_per_gpu']:>9.4g} TFLOP/s "
                         f"{r['peak_memory_gib']:>7.2f} GiB")
        failed = [r for r in rows if r["case_spec"]["name"] == base and r["status"] != "ok"]
        for r in failed:
            lines.append(f"    {r['case']:<28} mb={r['micro_batch']:<3} ac={r['ac_interval']:<2} {r['status']}")
        if mine:
            best = mine[0]
            lines.append(f"  fastest for {base}: micro-batch {best['micro_batch']}, activation checkpoint interval "
                         f"{best['ac_interval']}")
    return "\n".join(lines)


# --- launched mode: this process is one rank of a torchrun / deepspeed launch --------------------------

def _launched() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def run_launched(args) -> int:
    """Run exactly one case in this launch's process group; rank 0 writes the reports (no peers)."""
    import torch

    from opt_ds.bench.metrics import derive
    from opt_ds.bench.suite import Suite, SuiteOptions
    from opt_ds.bench.worker import measure_case
    from opt_ds.parallel.layout import shutdown_distributed

    if len(args.cases) != 1 or args.sweep or args.project:
        raise ConfigError("under a launcher, opt-ds bench runs exactly one CASE (no --sweep, --project or peers); "
                          "run it without a launcher to let it start one process group per case")
    cuda = torch.cuda.is_available()
    case = parse_case(args.cases[0], flag_changes(args)).resolve_precision(cuda)
    world = int(os.environ["WORLD_SIZE"])
    if case.world_size != world:
        raise ConfigError(f"case {case.label()} needs {case.world_size} rank(s) ({case.layout}) but this launch "
                          f"has {world}; launch {case.world_size} processes or change the layout")
    resolved = case.config()
    if not cuda:
        check_cpu_sized(case, resolved)
    raw = measure_case(case, args.steps, args.warmup)
    status = 0
    if raw is not None:                 # rank 0
        suite = Suite(SuiteOptions(out_dir=args.out, steps=args.steps, warmup=args.warmup,
                                   peak_tflops=args.peak_tflops, command=_command_line()))
        suite.rows.append(derive(raw, args.peak_tflops))
        suite.write(suite.rows)
        print("\n" + suite.text())
        status = 0 if suite.rows[0]["status"] == "ok" else 1
    shutdown_distributed()
    return status


def _command_line() -> str:
    return " ".join(["opt-ds", *sys.argv[1:]]) if Path(sys.argv[0]).name in ("opt-ds", "__main__.py") \
        else " ".join(sys.argv)


# --- projection ---------------------------------------------------------------------------------------

def check_layer_measurable(inputs, cuda: bool) -> None:
    from opt_ds.models.flops import layer_flops_per_token
    from opt_ds.models.family import to_opt

    if to_opt(inputs.shape) is None:
        raise ConfigError("--measure-layer times opt_ds's OPT decoder layer; this shape is not an OPT shape "
                          "(pass a measured --layer-ms instead)")
    work = inputs.micro_batch * inputs.seq * layer_flops_per_token(inputs.shape, inputs.seq)
    if not cuda and work > 5e11:
        raise ConfigError(f"measuring a {inputs.model_name} layer on the CPU would take minutes; run "
                          "--measure-layer on a GPU or pass a measured --layer-ms")


def run_projection(args, suite, inputs, cuda: bool) -> None:
    from opt_ds.bench import report
    from opt_ds.bench.hardware import hardware_key
    from opt_ds.bench.project import format_projection, project, sensitivity
    from opt_ds.bench.published import RUNS

    if args.measure_layer:
        inputs = _with_measured_layer(args, suite, inputs, cuda)
    base, rows = project(inputs), sensitivity(inputs)
    text = format_projection(base, rows)
    record = {"kind": "projection", "run_id": suite.run_id, "command": suite.context["command"],
              "git_commit": suite.context["git_commit"], "model": inputs.model_name, "shape": inputs.shape.spec(),
              "layout": {"tensor": inputs.tensor, "pipeline": inputs.pipeline, "data": base.data,
                         "zero_stage": inputs.zero_stage},
              "gpus": inputs.gpus, "hardware": inputs.hardware.name,
              "layer_ms": inputs.layer_ms, "layer_source": inputs.layer_source,
              "times_s": base.times, "tflops": {k: v for k, (_, v) in base.tflops.items()},
              "tokens_per_s_per_gpu": base.tokens_per_s_per_gpu,
              "sensitivity": {label: p.hardware_tflops for label, p in rows}}
    run = RUNS.get(args.project_run) or next((r for r in RUNS.values() if r.inputs.shape == inputs.shape), None)
    if run is not None:
        value = run.predicted(base)
        same = "" if args.project_run else f" (that run's own layout: --project-run {run.name})"
        ratio = value / run.published
        text += (f"\n\nvs published ({run.source}){same}: predicted {value:.1f} / published {run.published:g} "
                 f"{run.unit} = {ratio:.3f}, {'within' if abs(ratio - 1) <= 0.15 else 'outside'} ±15 %")
        record["published"] = {"run": run.name, "value": run.published, "convention": run.convention,
                               "predicted": value}
    print("\n" + text)
    write_atomically(args.out / f"projection-{hardware_key(inputs.hardware)}.txt", text + "\n")
    with open(args.out / report.RESULTS, "a") as f:
        f.write(json.dumps(record) + "\n")


def _with_measured_layer(args, suite, inputs, cuda: bool):
    from opt_ds.models.family import to_opt

    opt_shape = to_opt(inputs.shape)
    layer_case = BenchCase("layer", opt_shape, micro_batch=inputs.micro_batch, seq=inputs.seq,
                           precision=args.precision or "auto").resolve_precision(cuda)
    recompute = inputs.recompute == "full"
    raw = suite.launch("layer", layer_case, extra=["--recompute"] if recompute else [])
    if "error" in raw:
        raise ConfigError(f"--measure-layer failed ({raw['error']}):\n{raw['log_tail'][-2000:]}")
    return inputs.replace(
        layer_ms=raw["layer_ms"] / inputs.tensor,
        layer_source=(f"{raw['layer_ms']:.3f} ms for the full-width layer ({raw['layer_tflops']:.3g} TFLOP/s, "
                      f"{layer_case.precision}) on {raw['device']} ÷ TP {inputs.tensor}: assumes a TP shard "
                      f"runs at the full layer's efficiency"))
