"""The throughput projection: one set of hardware assumptions lands within 15 % of every published at-scale
run (OPT-175B, BLOOM-176B, Megatron-LM's GPT-3 175B, LLaMA-65B), each run is expressible on the command line,
every assumption is printed, and the model responds to its inputs the way physics says it should."""
import dataclasses
import json
import shlex

import pytest

from opt_ds.bench.hardware import HARDWARE
from opt_ds.bench.project import (ProjectionError, ProjectionInputs, assumptions, format_projection,
                                  layer_compute_seconds, memory_bound_bytes, project, sensitivity, stage_layers)
from opt_ds.bench.published import RUNS, comparison_rows, format_comparison
from opt_ds.models.presets import get_preset
from opt_ds.models.family import as_decoder_shape
from opt_ds.models.shape import DecoderShape

BASE = ProjectionInputs()           # opt_ds running OPT-175B on 992 A100-80GB, TP 8 × PP 4 × DP 31


@pytest.mark.parametrize("name", RUNS)
def test_every_published_run_is_predicted_within_15_percent(name):
    run = RUNS[name]
    ratio = run.predicted(project(run.inputs)) / run.published
    assert abs(ratio - 1) <= 0.15, f"{name}: predicted / published = {ratio:.3f}"


@pytest.mark.parametrize("name", RUNS)
def test_every_published_run_fits_in_its_gpus_by_the_memory_model(name):
    from opt_ds.bench.memory import estimate_memory
    inputs = RUNS[name].inputs
    assert estimate_memory(inputs).total_gib <= inputs.hardware.memory_gib      # they did run


def test_the_runs_share_every_hardware_figure():
    # Only what each run did differs (shape, layout, software, its cluster's network); the GPU is one profile.
    figures = {dataclasses.replace(run.inputs.hardware, name="", ib_gb_s_per_gpu=0, why={}) for run in RUNS.values()}
    assert len(figures) == 1
    assert {run.inputs.hbm_efficiency for run in RUNS.values()} == {BASE.hbm_efficiency}


def test_the_gemm_efficiency_is_the_one_fitted_on_a_one_gpu_measurement():
    # A compiled OPT-1.3B step on one H100 measured 537 model TFLOP/s (b=8, s=2048, bf16, no communication;
    # autograd wrote the gradients in place: no accumulation pass, which `fused` stands for).
    one_gpu = ProjectionInputs(shape=as_decoder_shape(get_preset("opt-1.3b").shape), gpus=1, tensor=1, pipeline=1,
                               micro_batch=8, global_batch=8, recompute="none", dropout=False, zero_stage=0,
                               grad_accumulation="fused", hardware=HARDWARE["h100-80gb"])
    assert project(one_gpu).model_tflops == pytest.approx(537, rel=0.03)


def test_each_published_command_line_reproduces_its_prediction(tmp_path, capsys):
    from opt_ds.cli import main
    text = format_comparison()
    for run, _, value, ratio in comparison_rows():
        assert f"{value:10.1f} {run.published:10.1f} {ratio:7.3f}  {run.unit}" in text
        command = next(line.strip() for line in text.splitlines() if line.strip().startswith("opt-ds bench")
                       and f"--project-gpus {run.inputs.gpus} " in line and f"--project-tp {run.inputs.tensor} " in line
                       and f"--project-pp {run.inputs.pipeline} " in line)
        out = tmp_path / run.name
        assert main([*shlex.split(command)[1:], "--out", str(out)]) == 0
        record = json.loads((out / "results.jsonl").read_text().splitlines()[-1])
        predicted = record["tokens_per_s_per_gpu"] if run.convention == "tokens" else record["tflops"][run.convention]
        assert predicted == pytest.approx(value, rel=1e-9)
    capsys.readouterr()


def test_a_published_run_prints_predicted_over_published(tmp_path, capsys):
    from opt_ds.cli import main
    assert main(["bench", "--project", "--project-run", "bloom-176b", "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "vs published" in printed and "TFLOP/s/GPU (hardware FLOPs)" in printed and "/ published 150" in printed
    assert "TP=4 × PP=12 × DP=8" in printed and "V=250880" in printed


def test_optimism_fixes_are_physics_not_factors():
    megatron = RUNS["megatron-gpt3-175b"].inputs
    # The s² scores of unfused attention go through HBM; flash attention keeps them on chip.
    flash = megatron.replace(attention="flash")
    assert memory_bound_bytes(megatron)["forward"] > 1.5 * memory_bound_bytes(flash)["forward"]
    # Without sequence parallelism every TP rank repeats the LayerNorm/dropout/residual traffic.
    assert sum(memory_bound_bytes(megatron.replace(sequence_parallel=True)).values()) < \
        sum(memory_bound_bytes(megatron).values())
    # The bubble follows the real micro-batch count: (p − 1)/(m + p − 1) for equal stages.
    even = project(megatron.replace(shape=megatron.shape.replace(vocab_size=8), partition="layers"))
    assert even.bubble == pytest.approx(15 / (192 + 15), rel=0.05)       # ends carry embedding and head
    # Overlapped communication is not free.
    assert project(BASE.replace(dp_overlap=1.0)).times["DP exchange (exposed)"] > 0


def test_stage_partitions():
    bloom = RUNS["bloom-176b"].inputs.shape
    assert stage_layers(bloom, 12, "layers+embedding") == [5] + [6] * 10 + [5]       # 72 units over 12 stages
    assert stage_layers(bloom, 12, "layers") == [5] * 2 + [6] * 10
    assert sum(stage_layers(bloom, 7, "layers")) == 70


def test_roofline_layer_time_by_hand():
    # TP shard of one 175B layer, b=1, s=2048, 4 passes with recompute:
    # GEMM 2·b·s·(4h² + 2hF)/8·4 = 3.7108e12 FLOP at 0.65·312 TFLOP/s = 18.30 ms
    parts = layer_compute_seconds(BASE)
    gemm = 2 * 2048 * (4 * 12288 ** 2 + 2 * 12288 * 49152) / 8 * 4
    assert parts["gemm"] == pytest.approx(gemm / (0.65 * 312e12))
    assert parts["gemm"] > 5 * (parts["attention"] + parts["memory-bound kernels"])


def test_a_measured_layer_time_replaces_the_roofline():
    roofline = sum(layer_compute_seconds(BASE).values()) * 1e3
    same = project(BASE.replace(layer_ms=roofline, layer_source="test"))
    slower = project(BASE.replace(layer_ms=2 * roofline, layer_source="test"))
    assert same.hardware_tflops == pytest.approx(project(BASE).hardware_tflops)
    assert slower.hardware_tflops < 0.6 * same.hardware_tflops


def test_the_projection_moves_the_way_physics_says():
    base = project(BASE).hardware_tflops
    faster_gemm = dataclasses.replace(BASE.hardware, gemm_efficiency=0.8)
    assert project(BASE.replace(hardware=faster_gemm)).hardware_tflops > base
    assert project(BASE.replace(dp_overlap=1.0)).hardware_tflops > base
    bf16 = project(BASE.replace(precision="bf16")).hardware_tflops
    assert project(BASE.replace(precision="fp16")).hardware_tflops > bf16            # 4 instead of 10 B/param
    slow_ib = dataclasses.replace(BASE.hardware, ib_gb_s_per_gpu=5)
    assert project(BASE.replace(hardware=slow_ib)).hardware_tflops < base
    assert project(BASE.replace(attention="unfused")).hardware_tflops < base
    assert project(BASE.replace(recompute="none")).model_tflops > project(BASE).model_tflops
    gated = BASE.replace(shape=BASE.shape.replace(gated_mlp=True, ffn_hidden_size=32768))
    assert project(gated).global_batch == project(BASE).global_batch


def test_a_general_shape_counts_like_opt_where_they_agree():
    for name in ("opt-125m", "opt-350m", "opt-175b"):
        from opt_ds.models.presets import analytic_parameter_count
        shape = get_preset(name).shape
        assert as_decoder_shape(shape).parameter_count() == analytic_parameter_count(shape)
    llama = DecoderShape.parse("layers=80,hidden=8192,heads=64,ffn=22016,gated=1,vocab=32000,tied=0,bias=0,rmsnorm=1")
    assert llama.parameter_count() == pytest.approx(65.2e9, rel=0.01)     # the LLaMA paper's 65.2B
    assert DecoderShape.parse(llama.spec()) == llama
    gqa = llama.replace(num_kv_heads=8)
    assert gqa.layer_matmul_weights() == llama.layer_matmul_weights() - 2 * 8192 * (8192 - 8 * 128)


@pytest.mark.parametrize("spec, words", [
    ("layers=2,hidden=64", "also give heads, ffn, vocab"),
    ("layers=2,hidden=64,heads=4,ffn=256,vocab=100,colour=3", "key=value with a key among"),
    ("layers=two,hidden=64,heads=4,ffn=256,vocab=100", "expected a positive integer"),
    ("layers=2,hidden=64,heads=4,ffn=256,vocab=100,gated=maybe", "use gated=1 or gated=0"),
    ("layers=2,hidden=65,heads=4,ffn=256,vocab=100", "multiple of heads"),
])
def test_bad_shapes_are_refused_in_one_line(spec, words):
    from opt_ds.errors import UserError
    with pytest.raises(UserError, match=words):
        DecoderShape.parse(spec)


def test_impossible_layouts_are_refused():
    with pytest.raises(ProjectionError, match="not a multiple of TP × PP"):
        project(BASE.replace(pipeline=3))
    with pytest.raises(ProjectionError, match="smaller than DP"):
        project(BASE.replace(global_batch=8))
    with pytest.raises(ProjectionError, match="must divide the heads"):
        project(BASE.replace(tensor=5, gpus=1000, pipeline=1))


def test_every_assumption_is_printed_next_to_the_result():
    proj = project(BASE)
    rows = sensitivity(BASE)
    text = format_projection(proj, rows)
    for name, value, why in assumptions(BASE, proj):
        assert name in text and value in text and why in text
    for words in ("TP=8 × PP=4 × DP=31", "GEMM efficiency", "0.65", "312 TFLOP/s", "190 GB/s", "20 GB/s",
                  "1F1B", "pipeline bubble", "memory per GPU", "hardware FLOPs, with recompute",
                  "model FLOPs, no recompute", "6N + attention", "Sensitivity", "no activation recompute",
                  "PP=2 (DP=62)", "attention unfused"):
        assert words in text, words
    labels = [label for label, _ in rows]
    assert len(labels) >= 10 and len(set(labels)) == len(labels)


def test_cli_projection_writes_text_and_a_json_line(tmp_path, capsys):
    from opt_ds.cli import main
    assert main(["bench", "--project", "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert (tmp_path / "projection-a100-80gb.txt").read_text().strip() in printed
    record = json.loads((tmp_path / "results.jsonl").read_text().splitlines()[-1])
    assert record["kind"] == "projection"
    assert record["layout"] == {"tensor": 8, "pipeline": 4, "data": 31, "zero_stage": 1}


@pytest.mark.parametrize("args, words", [
    (["--project-run", "gpt-5"], "--project-run 'gpt-5': choose one of"),
    (["--project-model", "opt-9b"], "--project-model 'opt-9b': choose one of"),
    (["--shape", "layers=2"], "--shape: shape 'layers=2': also give"),
    (["--project-hardware", "tpu"], "--project-hardware: hardware 'tpu'"),
    (["--project-pp", "3"], "not a multiple of TP × PP"),
    (["--project-model", "llama-65b", "--measure-layer"], "not an OPT shape"),
])
def test_cli_refuses_bad_projection_input_in_one_line(tmp_path, capsys, args, words):
    from opt_ds.cli import main
    assert main(["bench", "--project", *args, "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert words in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x").exists()


def test_cli_refuses_to_measure_a_175b_layer_on_cpu(tmp_path, capsys):
    from opt_ds.cli import main
    assert main(["bench", "--project", "--measure-layer", "--out", str(tmp_path / "x")]) == 2
    assert "--layer-ms" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_the_table_in_the_docs_is_the_one_the_command_prints():
    from multiproc import REPO
    docs = (REPO / "docs" / "bench.md").read_text()
    for run, _, value, ratio in comparison_rows():
        assert f"| {value:.1f} | {run.published:g} | {ratio:.3f} |" in docs, run.name


def test_each_step_cost_option_moves_time_and_memory_the_right_way():
    """Sequence parallelism, selective recompute and the bf16 accumulation modes, at OPT-175B TP8 × PP4 bf16."""
    from opt_ds.bench.memory import estimate_memory
    base = BASE.replace(precision="bf16", recompute="full", sequence_parallel=False, grad_accumulation="separate")

    def step(inp):
        return project(inp).times["step"]

    def memory(inp):
        return estimate_memory(inp).total

    sp = base.replace(sequence_parallel=True)
    assert step(sp) < step(base) and memory(sp) < memory(base)          # norms/dropout/residual on s/t tokens
    selective, none = base.replace(recompute="selective"), base.replace(recompute="none")
    assert step(none) < step(selective) < step(base)                    # recompute the core only, then nothing
    assert memory(base) < memory(selective) < memory(none)
    immediate, fused = base.replace(grad_accumulation="immediate"), base.replace(grad_accumulation="fused")
    assert step(fused) < step(immediate) < step(base)                   # no Python loop, then no pass at all
    assert memory(immediate) < memory(base)                             # the bf16 gradient is freed as it is added
    labels = [label for label, _ in sensitivity(base)]
    for wanted in ("sequence parallelism on", "selective recompute", "bf16 accumulation immediate",
                   "bf16 accumulation fused"):
        assert wanted in labels
