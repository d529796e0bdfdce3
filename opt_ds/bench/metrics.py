"""Derived metrics of one measured row: throughput, TFLOP/s under each convention, MFU, energy, carbon.

Every figure is computed here from the raw record a worker wrote, so the JSON line and the printed
table cannot disagree, and the arithmetic can be tested without running anything.
"""
from __future__ import annotations

from typing import Optional

from opt_ds.bench.cases import BenchCase
from opt_ds.models.flops import all_conventions
from opt_ds.bench.peaks import peak_for
from opt_ds.bench.telemetry import CARBON_FORMULA, carbon_kg
from opt_ds.bench.timing import median


def classify_failure(output: str) -> str:
    if "OutOfMemoryError" in output or "CUDA out of memory" in output:
        return "out of memory"
    if "timed out" in output:
        return "timed out"
    return "failed"


def derive(raw: dict, peak_override: Optional[float] = None) -> dict:
    """The report row for one raw worker record (or the failure it ended with)."""
    case = BenchCase.from_dict(raw["case"])
    row = {
        "kind": "opt_ds" if raw["impl"] == "opt_ds" else "peer",
        "impl": raw["impl"], "case": case.label(), "case_spec": raw["case"],
        "layout": {"tensor": case.tensor, "pipeline": case.pipeline, "data": case.data,
                   "world_size": raw.get("world_size", case.world_size)},
        "micro_batch": case.micro_batch, "grad_accum": case.grad_accum, "global_batch": case.global_batch,
        "seq": case.seq, "precision": case.precision, "ac_interval": case.ac_interval,
        "dropout": case.shape.dropout, "device": raw.get("device"),
    }
    if "error" in raw:
        row.update(status=raw["error"], log_tail=raw.get("log_tail", ""))
        return row

    world = row["layout"]["world_size"]
    step_s = median(raw["step_times_s"])
    tokens = case.global_batch * case.seq
    conventions = all_conventions(case.shape, case.global_batch, case.seq, raw["recomputed_layers"])
    tflops = {c.key: {"tflops_per_gpu": c.flops / step_s / world / 1e12, "flops_per_step": c.flops,
                      "label": c.label, "formula": c.formula, "worked": c.worked} for c in conventions}
    peak = peak_for(raw["device"], case.precision, raw.get("tf32", False), peak_override)
    model = tflops["model"]["tflops_per_gpu"]
    row.update({
        "status": "ok", "steps": raw["steps"], "warmup": raw["warmup"],
        "step_time_s": step_s, "step_times_s": raw["step_times_s"], **step_spread(raw["step_times_s"]),
        "tokens_per_step": tokens, "tokens_per_s": tokens / step_s, "tokens_per_s_per_gpu": tokens / step_s / world,
        "recomputed_layers": raw["recomputed_layers"],
        "tflops": tflops,
        "peak_tflops": peak.tflops, "peak_source": peak.source,
        "mfu": model / peak.tflops if peak.tflops else None,
        "mfu_formula": "model TFLOP/s per GPU / dense peak of the device",
        "peak_memory_gib": raw["memory"]["bytes"] / 2 ** 30, "peak_memory_kind": raw["memory"]["kind"],
        "loss": raw.get("loss"),
        "gpu": _energy(raw["gpu"], raw["steps"], tokens),
    })
    return row


def _energy(gpu: dict, steps: int, tokens_per_step: int) -> dict:
    if not gpu.get("available") or gpu.get("energy_j") is None:
        return {**gpu, "available": gpu.get("available", False)}
    per_step = gpu["energy_j"] / steps
    carbon = carbon_kg(per_step)
    return {**gpu, "energy_j_per_step": per_step, "carbon_g_per_step": carbon * 1e3,
            "carbon_kg_per_billion_tokens": carbon / tokens_per_step * 1e9, "carbon_formula": CARBON_FORMULA}


def add_peer_ratios(rows: list) -> None:
    """opt_ds tokens/s per GPU divided by each peer's on the same shape, batch, seq and precision."""
    peers = [r for r in rows if r["kind"] == "peer" and r["status"] == "ok"]
    for row in rows:
        if row["kind"] != "opt_ds" or row["status"] != "ok":
            continue
        row["vs_peer"] = {p["impl"]: row["tokens_per_s_per_gpu"] / p["tokens_per_s_per_gpu"]
                          for p in peers if peer_key(p) == peer_key(row)}


def peer_key(row: dict) -> tuple:
    """Rows with equal keys did the same work per device (see BenchCase.peer_key)."""
    return BenchCase.from_dict(row["case_spec"]).peer_key()


NOISY_SPREAD = 0.2      # (slowest - fastest) / median step above this: the measurement is noisy


def step_spread(seconds: list) -> dict:
    """Min, median and max of the timed steps, and whether they disagree enough to distrust the median."""
    fastest, slowest, middle = min(seconds), max(seconds), median(seconds)
    spread = (slowest - fastest) / middle
    return {"step_time_min_s": fastest, "step_time_max_s": slowest, "step_time_spread": spread,
            "noisy": spread > NOISY_SPREAD}
