"""The three outputs of a benchmark run: a terminal table (also table.txt), JSON lines, a PNG chart.

JSON lines are appended (one per case and peer, each with the run id, versions, device, commit and
command line); the table and the chart show the current run and are replaced atomically after every
case, so an interrupted run keeps what it had measured.
"""
from __future__ import annotations

import json
import textwrap
from pathlib import Path
from typing import Optional

from opt_ds.durable import replacing
from opt_ds.models.flops import OPT_175B_A100_TFLOPS
from opt_ds.bench.metrics import NOISY_SPREAD, peer_key

REFERENCE_LABEL = "OPT-175B, 992×A100 (paper): 147"
REFERENCE_NOTE = ("bars: model FLOPs (no recompute); black marks: hardware FLOPs (recompute counted), the convention "
                  "the 147 TFLOP/s of OPT-175B is compared with")
RESULTS, TABLE, CHART = "results.jsonl", "table.txt", "tflops.png"

COLUMNS = [("case", 22), ("impl", 12), ("layout", 14), ("mb×gas", 6), ("seq", 5), ("dtype", 5), ("AC", 2),
           ("step s", 8), ("min–max s", 13), ("spread", 9), ("tok/s", 8), ("tok/s/GPU", 9), ("model", 7), ("hw", 7), ("6N+att", 7), ("MFU", 6),
           ("mem GiB", 7), ("util%", 5), ("W/GPU", 5), ("J/step", 7), ("gCO2e/st", 8), ("vs hf", 5),
           ("vs hf-ds", 8)]


def _num(value: Optional[float]) -> str:
    if value is None:
        return "n/a"
    magnitude = abs(value)
    if magnitude >= 1000:
        return f"{value:,.0f}"
    if magnitude >= 100:
        return f"{value:.0f}"
    if magnitude >= 10:
        return f"{value:.1f}"
    if magnitude >= 1:
        return f"{value:.2f}"
    return f"{value:.3g}"


def _layout(row: dict) -> str:
    lay = row["layout"]
    return f"TP{lay['tensor']}·PP{lay['pipeline']}·DP{lay['data']}"


def _cells(row: dict) -> list:
    head = [row["case"], row["impl"], _layout(row),
            f"{row['micro_batch']}×{row['grad_accum']}", str(row["seq"]), row["precision"], str(row["ac_interval"])]
    if row["status"] != "ok":
        return head + [row["status"].upper()] + [""] * (len(COLUMNS) - len(head) - 1)
    t, gpu, ratios = row["tflops"], row["gpu"], row.get("vs_peer", {})
    mfu = f"{row['mfu'] * 100:.1f}%" if row["mfu"] is not None else "n/a"
    return head + [
        f"{row['step_time_s']:.4g}", f"{row['step_time_min_s']:.3g}–{row['step_time_max_s']:.3g}",
        spread_text(row), _num(row["tokens_per_s"]), _num(row["tokens_per_s_per_gpu"]),
        _num(t["model"]["tflops_per_gpu"]), _num(t["hardware"]["tflops_per_gpu"]),
        _num(t["6n_attention"]["tflops_per_gpu"]), mfu, f"{row['peak_memory_gib']:.2f}",
        _num(gpu.get("utilization_pct_mean")), _num(gpu.get("power_w_mean_per_gpu")),
        _num(gpu.get("energy_j_per_step")), _num(gpu.get("carbon_g_per_step")),
        _num(ratios.get("hf")), _num(ratios.get("hf-deepspeed")),
    ]


def spread_text(row: dict) -> str:
    """The step-time spread of an ok row, e.g. `4%` or `50% NOISY`."""
    return f"{row['step_time_spread']:.0%}" + (" NOISY" if row["noisy"] else "")


def table(rows: list) -> str:
    def line(cells):
        return " ".join(str(c).ljust(w) if i < 7 else str(c).rjust(w)
                        for i, (c, (_, w)) in enumerate(zip(cells, COLUMNS)))
    header = line([name for name, _ in COLUMNS])
    out = [header, "-" * len(header)] + [line(_cells(r)) for r in rows]
    out.append("step s = median of the timed steps; spread = (slowest − fastest) / median, NOISY above "
               f"{NOISY_SPREAD:.0%} (rerun on an idle machine or with more --steps)")
    out.append("TFLOP/s per GPU: model = no recompute, hw = recompute counted, 6N+att = torchtitan; "
               "vs hf / vs hf-ds = opt_ds tokens/s per GPU ÷ peer's on the same shape, batch, seq, dtype")
    return "\n".join(out)


def formulas(rows: list) -> str:
    """Every number of the table with the formula that produced it."""
    out = []
    for row in rows:
        if row["status"] != "ok":
            out.append(f"{row['case']} / {row['impl']}: {row['status']}\n{_indent(row.get('log_tail', '')[-1500:])}")
            continue
        world = row["layout"]["world_size"]
        step = row["step_time_s"]
        out.append(f"{row['case']} / {row['impl']} ({row['layout']['world_size']} rank(s), "
                   f"B={row['global_batch']} sequences × s={row['seq']} per step, median step {step:.4g} s "
                   f"of {row['steps']} after {row['warmup']} warm-up; min {row['step_time_min_s']:.4g} s, max "
                   f"{row['step_time_max_s']:.4g} s" + (f"; NOISY: the steps differ by {row['step_time_spread']:.0%} "
                                                       "of the median, rerun on an idle machine or with more "
                                                       "--steps" if row["noisy"] else "") + "):")
        out.append(f"  tokens/s = B·s / step = {row['global_batch']}·{row['seq']} / {step:.4g} = "
                   f"{_num(row['tokens_per_s'])}  ({_num(row['tokens_per_s_per_gpu'])} per GPU)")
        for key, value in row["tflops"].items():
            out.append(f"  {value['label']:<32} {value['formula']}\n"
                       f"  {'':<32} = {value['worked']} FLOP/step → ÷ {step:.4g} s ÷ {world} GPU = "
                       f"{_num(value['tflops_per_gpu'])} TFLOP/s/GPU")
        if row["mfu"] is not None:
            out.append(f"  MFU = model TFLOP/s / peak = {_num(row['tflops']['model']['tflops_per_gpu'])} / "
                       f"{row['peak_source']} = {row['mfu'] * 100:.1f}%")
        else:
            out.append(f"  MFU {row['peak_source']}")
        out.append(f"  peak memory {row['peak_memory_gib']:.2f} GiB ({row['peak_memory_kind']}, max over ranks)")
        gpu = row["gpu"]
        if gpu.get("energy_j_per_step") is not None:
            out.append(f"  energy {_num(gpu['energy_j_per_step'])} J/step ({gpu['energy_source']}, all GPUs); "
                       f"carbon = {gpu['carbon_formula']} = {_num(gpu['carbon_g_per_step'])} g CO2eq/step "
                       f"= {_num(gpu['carbon_kg_per_billion_tokens'])} kg per 1e9 tokens; "
                       f"utilisation {_num(gpu.get('utilization_pct_mean'))}%, "
                       f"power {_num(gpu.get('power_w_mean_per_gpu'))} W/GPU mean")
        else:
            out.append(f"  GPU utilisation, power, energy, carbon: n/a ({gpu.get('reason', 'no energy reading')})")
        if row.get("vs_peer"):
            out.append("  vs peer (tokens/s/GPU ratio): " +
                       ", ".join(f"{k} {v:.3f}" for k, v in row["vs_peer"].items()))
    return "\n".join(out)


def _indent(text: str) -> str:
    return "\n".join("    " + line for line in text.splitlines())


def append_jsonl(path: Path, rows: list, context: dict) -> None:
    with open(path, "a") as f:
        for row in rows:
            f.write(json.dumps({**context, **row}, default=str) + "\n")


def chart(rows: list, path: Path, title: str) -> Optional[str]:
    """Bar chart of model TFLOP/s per GPU per case beside its peers, hardware TFLOP/s as markers, and
    the 147 TFLOP/s reference line. Returns why no chart was drawn, or None."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install 'opt_ds[bench]')"
    ours = [r for r in rows if r["kind"] == "opt_ds"]
    peers = [r for r in rows if r["kind"] == "peer" and r["status"] == "ok"]
    if not ours:
        return "no opt_ds rows to draw"
    impls = ["opt_ds"] + sorted({p["impl"] for p in peers})
    width = 0.8 / len(impls)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.6 * len(ours) + 3), 4.8))
    values = []
    for i, impl in enumerate(impls):
        xs, model, hardware = [], [], []
        for x, row in enumerate(ours):
            match = row if impl == "opt_ds" else _peer_for(row, peers, impl)
            if match is None or match["status"] != "ok":
                continue
            xs.append(x + (i - (len(impls) - 1) / 2) * width)
            model.append(match["tflops"]["model"]["tflops_per_gpu"])
            hardware.append(match["tflops"]["hardware"]["tflops_per_gpu"])
        if xs:
            ax.bar(xs, model, width, label=impl)
            ax.scatter(xs, hardware, marker="_", s=300, color="black", zorder=3,
                       label="hardware FLOPs" if i == 0 else None)
            values += model + hardware
    ax.axhline(OPT_175B_A100_TFLOPS, color="red", linestyle="--", label=REFERENCE_LABEL)
    if values and max(values) < OPT_175B_A100_TFLOPS / 10:
        ax.set_yscale("log")
    ax.set_xticks(range(len(ours)))
    ax.set_xticklabels([f"{r['case']}\n{_layout(r)} {r['precision']}" + ("" if r["status"] == "ok" else f"\n{r['status']}")
                        for r in ours], fontsize=8)
    ax.set_ylabel("TFLOP/s per GPU")
    ax.set_title(textwrap.fill(title, 90), fontsize=8)
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=3, frameon=False)
    fig.text(0.01, 0.005, textwrap.fill(REFERENCE_NOTE, 120), fontsize=6.5)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    with replacing(path) as tmp:
        fig.savefig(tmp, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return None


def _peer_for(row: dict, peers: list, impl: str) -> Optional[dict]:
    return next((p for p in peers if p["impl"] == impl and peer_key(p) == peer_key(row)), None)
