"""Wall time and peak memory of conversions, measured (not a timed test; its output is kept in
bench_results/conversion-cpu.md):

    .venv/bin/python -m conversion.bench_memory --models opt-350m opt-1.3b --out bench_results/conversion-cpu.md

Each model is a random OPT of the preset's shape (fp32), written once as an opt_ds checkpoint at TP=2 (one
file per layer and TP rank, as training writes it), then converted to each target in a fresh process with
verification on. Peak memory is the process's peak RSS (ru_maxrss) minus its RSS after the imports, with
glibc told to return large blocks to the system at once (MALLOC_MMAP_THRESHOLD_), so freed tensors do
not linger in the figure. tests/test_conversion_memory.py measures the same way on tiny widths.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List

import torch

from conversion import canonical as C
from conversion.canonical import Checkpoint
from opt_ds.ports import without_rendezvous

# (target, options): the conversions measured for every model
TARGETS = (("opt_ds", {"to": "opt_ds", "tp": 4, "pp": 2}), ("metaseq", {"to": "metaseq", "tp": 4}),
           ("hf", {"to": "hf"}))
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": str(1 << 17)}     # static threshold: big blocks are mmap'd, freed at once


def random_checkpoint(shape, seed: int = 0) -> Checkpoint:
    """A full model of `shape` with random weights, made one layer at a time as a writer reads it."""
    def tensors(shapes: Dict[str, tuple], salt: int) -> Dict[str, torch.Tensor]:
        generator = torch.Generator().manual_seed(seed * 100003 + salt)
        return {name: torch.randn(size, generator=generator) * (0.02 if len(size) > 1 else 0.1)
                + (1.0 if name.endswith("norm.weight") else 0.0) for name, size in shapes.items()}
    expected = C.expected_shapes(shape)
    return Checkpoint(shape, f"random {C.describe_shape(shape)}", lambda: tensors(C.global_shapes(shape), 0),
                      lambda layer: tensors(C.layer_shapes(shape), layer + 1), {k: "random" for k in expected},
                      expected)


def write_source(shape, directory: Path, tp: int = 2) -> Path:
    from conversion import opt_ds_format
    opt_ds_format.write(random_checkpoint(shape), directory, tp=tp)
    return directory


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measure(src: Path, dst: Path, options: dict, timeout: float = 3600) -> dict:
    """Convert in a fresh process: {"exit", "wall_s", "peak_bytes" (beyond the imports), "base_bytes"}."""
    out = subprocess.run([sys.executable, "-m", "conversion.bench_memory", "--child", str(src), str(dst),
                          json.dumps(options)], capture_output=True, text=True, timeout=timeout,
                         env={**without_rendezvous(os.environ), **MALLOC_ENV})
    if out.returncode != 0:
        raise RuntimeError(f"conversion {options} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _child(src: str, dst: str, options: str) -> None:
    import conversion.convert as convert_module
    import conversion.verify  # noqa: F401 - imported before the baseline, as everything the run loads
    import deepspeed  # noqa: F401
    import opt_ds.parallel.pipe  # noqa: F401
    import safetensors.torch  # noqa: F401
    try:
        import transformers  # noqa: F401
        from transformers import LlamaForCausalLM, OPTForCausalLM  # noqa: F401
    except ImportError:
        pass
    base = rss_bytes()
    start = time.perf_counter()
    lines: List[str] = []
    code = convert_module.convert(src, dst, convert_module.Options(**json.loads(options)), out=lines.append)
    wall = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print("\n".join(lines))
    print(json.dumps({"exit": code, "wall_s": round(wall, 2), "peak_bytes": max(0, peak - base),
                      "base_bytes": base}))


def sizes(shape) -> dict:
    """fp32 bytes of the whole model, of one decoder layer, and of the tensors outside the layers."""
    count = lambda shapes: sum(torch.Size(s).numel() for s in shapes.values()) * 4  # noqa: E731
    return {"checkpoint_bytes": count(C.expected_shapes(shape)), "layer_bytes": count(C.layer_shapes(shape)),
            "global_bytes": count(C.global_shapes(shape))}


def run_models(models: List[str], work: Path, targets=None, verify: bool = True) -> List[dict]:
    from opt_ds.models.presets import PRESETS
    rows = []
    for name in models:
        shape = PRESETS[name].shape
        src = write_source(shape, work / name / "src")
        for target, options in TARGETS:
            if targets and target not in targets:
                continue
            options = {**options, "verify": verify}
            result = measure(src, work / name / target, options)
            rows.append({"model": name, "target": target, "options": options, **result, **sizes(shape)})
            print(json.dumps(rows[-1]), flush=True)
            subprocess.run(["rm", "-rf", str(work / name / target)], check=True)
        subprocess.run(["rm", "-rf", str(work / name)], check=True)
    return rows


def report(rows: List[dict], command: str) -> str:
    gib = lambda n: f"{n / 2 ** 30:.2f}"  # noqa: E731
    import deepspeed
    lines = ["# Conversion wall time and peak memory (CPU)", "",
             f"Command: `{command}`", "",
             f"Machine: {platform.machine()}, {os.cpu_count()} CPUs, "
             f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2 ** 30:.0f} GiB RAM, shared with other "
             f"jobs; Python {platform.python_version()}, torch {torch.__version__}, deepspeed {deepspeed.__version__}.",
             "", "Source: a random fp32 model of the preset's shape, as an opt_ds checkpoint at TP=2; verification on "
             "unless the row says --no-verify. Peak = peak RSS of the converting process minus its RSS after the "
             "imports.", "",
             "| model | target | checkpoint GiB | one layer GiB | non-layer GiB | wall s | peak GiB | peak / checkpoint |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        opts = [f"--{k} {v}" for k, v in r["options"].items() if k not in ("to", "verify")]
        opts = " ".join(opts + ([] if r["options"].get("verify", True) else ["--no-verify"]))
        lines.append(f"| {r['model']} | {r['target']} {opts} | {gib(r['checkpoint_bytes'])} | {gib(r['layer_bytes'])} | "
                     f"{gib(r['global_bytes'])} | {r['wall_s']} | {gib(r['peak_bytes'])} | "
                     f"{r['peak_bytes'] / r['checkpoint_bytes']:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    if argv is None and len(sys.argv) > 1 and sys.argv[1] == "--child":
        _child(*sys.argv[2:5])
        return 0
    parser = argparse.ArgumentParser(prog="python -m conversion.bench_memory", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["opt-350m", "opt-1.3b"])
    parser.add_argument("--targets", nargs="+", choices=[t for t, _ in TARGETS], help="default: all")
    parser.add_argument("--no-verify", dest="verify", action="store_false", help="convert without verification")
    parser.add_argument("--out", type=Path, help="write the markdown report here")
    parser.add_argument("--work", type=Path, help="scratch folder (default: a temporary one)")
    args = parser.parse_args(argv)
    command = "python -m conversion.bench_memory " + " ".join(sys.argv[1:] if argv is None else argv)
    with tempfile.TemporaryDirectory(dir=args.work) as work:
        rows = run_models(args.models, Path(work), args.targets, args.verify)
    text = report(rows, command)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
