"""CPU micro-benchmark of one decoder layer's forward + backward: before (a git revision's layer code) and
after (this checkout's: Q/K/V by unbind, megatron-core's bias-dropout-add / bias-activation entry points,
the [seq, batch, hidden] layout), and after with selective recompute of the attention core.

    python benchmarks/layer_cpu.py [--baseline main] [--rounds 30] > bench_results/layer-cpu.md

The variants run in alternating order within each round (the order rotates every round) on the same
weights and input, so load on a shared machine hits them alike; the table reports, per variant, the median
and minimum time and the median over rounds of its time / the baseline's time in the same round. Absolute
times depend on the machine; the ratios are the result. Not a test: nothing here asserts a speed.
On a CPU the fused kernels fall back to the plain expressions (opt_ds.models.fused), so the measured
difference is unbind and the layout; selective recompute is expected to cost time here (it buys memory).
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
LAYER_FILES = {"opt": "opt_ds/models/opt/layers.py", "llama": "opt_ds/models/llama/layers.py"}
LAYER_CLASS = {"opt": "OPTDecoderLayer", "llama": "LlamaDecoderLayer"}


def git(*args) -> str:
    return subprocess.run(["git", *args], cwd=REPO, check=True, capture_output=True, text=True).stdout.strip()


def baseline_module(family: str, revision: str):
    """The layer module as it is at `revision`, loaded from git (not copied into this repository)."""
    source = git("show", f"{revision}:{LAYER_FILES[family]}")
    path = Path(tempfile.mkdtemp()) / f"baseline_{family}_layers.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location(f"baseline_{family}_layers", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def shapes(args):
    from opt_ds.models.llama.shape import LlamaShape
    from opt_ds.models.opt.shape import OPTShape
    common = dict(num_layers=1, hidden_size=args.hidden, num_heads=args.heads, vocab_size=512,
                  max_position_embeddings=args.seq)
    return {"opt": OPTShape(ffn_hidden_size=4 * args.hidden, dropout=0.1, **common),
            "llama": LlamaShape(ffn_hidden_size=8 * args.hidden // 3 // 64 * 64, num_kv_heads=args.heads // 2,
                                dropout=0.0, **common)}


def variants(family, shape, mp_config, baseline):
    from opt_ds.models.family import family_of
    from opt_ds.parallel.pipe import seed_all
    seed_all(1)
    before = getattr(baseline, LAYER_CLASS[family])(shape, mp_config)
    after = family_of(shape).decoder_layer(shape, mp_config)
    selective = family_of(shape).decoder_layer(shape, mp_config, recompute_attention=True)
    after.load_state_dict(before.state_dict())
    selective.load_state_dict(before.state_dict())
    # (module, takes [seq, batch, hidden]?)
    return {"before": (before, False), "after": (after, True), "after + selective recompute": (selective, True)}


def fwd_bwd(layer, seq_first, x, grad):
    from opt_ds.parallel.pipe import seed_all
    seed_all(7)
    inp = (x.transpose(0, 1).contiguous() if seq_first else x).detach().requires_grad_(True)
    out = layer(inp)
    out.backward(grad.transpose(0, 1).contiguous() if seq_first else grad)
    return out, inp.grad


def gradients_equal(models, x, grad) -> str:
    """Max |difference| / max |gradient| of the input and parameter gradients, after vs before (dropout off)."""
    found = []
    for _, (layer, seq_first) in models.items():
        layer.eval()
        for p in layer.parameters():
            p.grad = None
        _, dx = fwd_bwd(layer, seq_first, x, grad)
        dx = dx.transpose(0, 1) if seq_first else dx
        found.append([dx] + [p.grad for p in layer.parameters()])
        layer.train()
    diffs = [max(((a - b).abs().max() / a.abs().max()).item() for a, b in zip(found[0], other))
             for other in found[1:]]
    return ", ".join(f"{d:.1e}" for d in diffs)


def qkv_split(args) -> tuple:
    """Q, K, V taken from the fused projection by three selects (before) or one unbind (after): forward +
    backward of that step alone, alternating; and whether the gradients are bit-identical."""
    gen = torch.Generator().manual_seed(0)
    head_dim = args.hidden // args.heads
    qkv = torch.randn(args.seq, args.batch, args.heads, 3, head_dim, generator=gen)
    grads = [torch.randn(args.batch, args.heads, args.seq, head_dim, generator=gen) for _ in range(3)]

    def run(by_unbind):
        x = qkv.clone().requires_grad_(True)
        parts = x.unbind(3) if by_unbind else [x[:, :, :, i] for i in range(3)]
        torch.autograd.backward([p.permute(1, 2, 0, 3) for p in parts], grads)
        return x.grad

    identical = torch.equal(run(False), run(True))
    times = {False: [], True: []}
    for r in range(args.rounds * 10 + 5):
        for by_unbind in ((False, True) if r % 2 else (True, False)):
            start = time.perf_counter()
            run(by_unbind)
            if r >= 5:
                times[by_unbind].append(time.perf_counter() - start)
    ratio = statistics.median(a / b for a, b in zip(times[True], times[False]))
    return ratio, identical


def measure(models, x, grad, rounds):
    names = list(models)
    times = {n: [] for n in names}
    for r in range(rounds + 2):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            layer, seq_first = models[name]
            for p in layer.parameters():
                p.grad = None
            start = time.perf_counter()
            fwd_bwd(layer, seq_first, x, grad)
            if r >= 2:                  # two warm-up rounds
                times[name].append(time.perf_counter() - start)
    return times


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline", default="main", help="git revision whose layer code is 'before'")
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from opt_ds.parallel.layout import ParallelLayout
    layout = ParallelLayout(1, 1, 1)
    layout.initialize()
    mp_config = layout.megatron_config()
    rows = []
    for family, shape in shapes(args).items():
        models = variants(family, shape, mp_config, baseline_module(family, args.baseline))
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(args.batch, args.seq, args.hidden, generator=gen)
        grad = torch.randn(args.batch, args.seq, args.hidden, generator=gen)
        identical = gradients_equal(models, x, grad)
        times = measure(models, x, grad, args.rounds)
        base = times["before"]
        for name, ts in times.items():
            ratio = statistics.median(t / b for t, b in zip(ts, base))
            rows.append((family, name, statistics.median(ts) * 1e3, min(ts) * 1e3, ratio, identical))

    split_ratio, split_identical = qkv_split(args)
    load = os.getloadavg()
    print("# One decoder layer, forward + backward, on CPU: before / after the step-cost changes (issue 15)\n")
    print(f"Command: `python benchmarks/layer_cpu.py {' '.join(sys.argv[1:])}`  ")
    print(f"Before: the layer code at `{args.baseline}` ({git('rev-parse', '--short', args.baseline)}); "
          f"after: this checkout ({git('rev-parse', '--short', 'HEAD')}).  ")
    print(f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, {args.threads} thread(s), "
          f"load average {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f} at the end (shared machine).  ")
    import megatron.core
    print(f"Versions: Python {platform.python_version()}, torch {torch.__version__}, megatron-core "
          f"{megatron.core.__version__}.  ")
    print(f"Shape: hidden {args.hidden}, heads {args.heads} (LLaMA: {args.heads // 2} kv heads, SwiGLU), "
          f"seq {args.seq}, batch {args.batch}, fp32; OPT dropout 0.1. {args.rounds} rounds, variants "
          "alternating, order rotating each round, 2 warm-up rounds.\n")
    print("| family | variant | median ms | min ms | time / before (median over rounds) |")
    print("|---|---|---|---|---|")
    for family, name, med, low, ratio, _ in rows:
        print(f"| {family} | {name} | {med:.1f} | {low:.1f} | {ratio:.3f} |")
    print(f"\nQ/K/V extraction alone (forward + backward, OPT layout): unbind / three selects = {split_ratio:.3f} "
          f"(median over {args.rounds * 10} alternating pairs); gradients bit-identical: "
          f"{'yes' if split_identical else 'NO'}.  ")
    print("Largest gradient difference vs before, relative to the largest gradient, with dropout off (input and "
          "every parameter; after, after + selective): " + "; ".join(sorted({f"{r[0]}: {r[5]}" for r in rows}))
          + " (the [seq, batch] layout changes float summation order, nothing else).")


if __name__ == "__main__":
    main()
