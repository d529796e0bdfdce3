"""The OPT-175B projection: A100 inputs land within 15 % of the published 147 TFLOP/s, every assumption is
printed, and the model responds to its inputs the way physics says it should."""
import dataclasses
import json

import pytest

from opt_ds.bench.project import (CLUSTERS, ProjectionError, ProjectionInputs, assumptions,
                                  format_projection, layer_compute_seconds, project, sensitivity)

BASE = ProjectionInputs()


def test_a100_projection_is_within_15_percent_of_147():
    proj = project(BASE)
    assert abs(proj.hardware_tflops / 147 - 1) <= 0.15
    assert proj.model_tflops < proj.hardware_tflops            # recompute is counted only in hardware FLOPs
    assert proj.hardware_tflops / proj.model_tflops == pytest.approx(1.434 / 1.0764, rel=2e-3)


def test_layout_and_bubble():
    proj = project(BASE)
    assert (proj.data, proj.micro_batches, proj.global_batch) == (31, 33, 1023)      # 992 = 8 × 4 × 31
    assert proj.bubble == pytest.approx(3 / 36)
    assert proj.times["pipeline (m + p − 1 slots)"] == pytest.approx(36 * proj.times["stage (per micro-batch)"])
    parts = ("pipeline (m + p − 1 slots)", "DP gradient/parameter exchange", "tied-embedding all-reduce",
             "Adam update")
    assert proj.times["step"] == pytest.approx(sum(proj.times[p] for p in parts))


def test_roofline_layer_time_by_hand():
    # TP shard of one 175B layer, b=1, s=2048, 4 passes with recompute:
    # GEMM 2·b·s·(4h² + 2hF)/8·4 = 3.7108e12 FLOP at 0.78·312 TFLOP/s = 15.25 ms
    parts = layer_compute_seconds(BASE)
    gemm = 2 * 2048 * (4 * 12288 ** 2 + 2 * 12288 * 49152) / 8 * 4
    assert parts["gemm"] == pytest.approx(gemm / (0.78 * 312e12))
    assert parts["gemm"] * 1e3 == pytest.approx(15.25, abs=0.01)
    assert parts["gemm"] > 5 * (parts["attention"] + parts["elementwise"])


def test_a_measured_layer_time_replaces_the_roofline():
    roofline = sum(layer_compute_seconds(BASE).values()) * 1e3
    same = project(BASE.replace(layer_ms=roofline, layer_source="test"))
    slower = project(BASE.replace(layer_ms=2 * roofline, layer_source="test"))
    assert same.hardware_tflops == pytest.approx(project(BASE).hardware_tflops)
    assert slower.hardware_tflops < 0.6 * same.hardware_tflops


def test_the_projection_moves_the_way_physics_says():
    base = project(BASE).hardware_tflops
    assert project(BASE.replace(gemm_efficiency=0.9)).hardware_tflops > base
    assert project(BASE.replace(dp_overlap=1.0)).hardware_tflops > base
    assert project(BASE.replace(dp_bytes_per_param=10)).hardware_tflops < base
    slow_ib = BASE.replace(cluster=dataclasses.replace(CLUSTERS["a100-80gb"], ib_gb_s_per_gpu=5))
    assert project(slow_ib).hardware_tflops < base
    no_recompute = project(BASE.replace(recompute=False))
    assert no_recompute.model_tflops > project(BASE).model_tflops
    assert no_recompute.memory_gib > project(BASE).memory_gib


def test_impossible_layouts_are_refused():
    with pytest.raises(ProjectionError, match="not a multiple of TP × PP"):
        project(BASE.replace(pipeline=3))
    with pytest.raises(ProjectionError, match="smaller than DP"):
        project(BASE.replace(global_batch=8))


def test_every_assumption_is_printed_next_to_the_result():
    proj = project(BASE)
    rows = sensitivity(BASE)
    text = format_projection(proj, rows)
    for name, value, why in assumptions(BASE, proj):
        assert name in text and value in text and why in text
    for words in ("TP=8 × PP=4 × DP=31", "GEMM efficiency", "0.78", "312 TFLOP/s", "200 GB/s", "20 GB/s",
                  "1F1B", "pipeline bubble", "memory per GPU", "hardware FLOPs, with recompute",
                  "model FLOPs, no recompute", "6N + attention", "vs OPT paper 147", "within ±15 %",
                  "Sensitivity", "GEMM efficiency 0.65", "no activation checkpointing", "PP=2 (DP=62)"):
        assert words in text, words
    labels = [label for label, _ in rows]
    assert len(labels) >= 10 and len(set(labels)) == len(labels)


def test_cli_projection_writes_text_and_a_json_line(tmp_path, capsys):
    from opt_ds.cli import main
    assert main(["bench", "--project", "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "vs OPT paper 147 TFLOP/s" in printed
    assert (tmp_path / "projection-a100-80gb.txt").read_text().strip() in printed
    record = json.loads((tmp_path / "results.jsonl").read_text().splitlines()[-1])
    assert record["kind"] == "projection" and record["layout"] == {"tensor": 8, "pipeline": 4, "data": 31}
    assert abs(record["tflops"]["hardware"] / 147 - 1) <= 0.15


def test_cli_refuses_to_measure_a_175b_layer_on_cpu(tmp_path, capsys):
    from opt_ds.cli import main
    assert main(["bench", "--project", "--measure-layer", "--out", str(tmp_path / "x")]) == 2
    assert "--layer-ms" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
