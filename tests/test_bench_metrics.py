"""Peak table, MFU, carbon arithmetic, NVML fallbacks, case parsing: the parts that need no process group."""
import pytest
import torch

from opt_ds.bench import cli
from opt_ds.bench.cases import NAMED_CASES, parse_case
from opt_ds.bench.metrics import add_peer_ratios, derive
from opt_ds.bench.peaks import lookup, peak_for
from opt_ds.bench.telemetry import GpuMonitor, carbon_kg, combine_gpu_windows
from opt_ds.config import ConfigError


@pytest.mark.parametrize("device, precision, tflops", [
    ("NVIDIA H100 80GB HBM3", "bf16", 989),
    ("NVIDIA H100 PCIe", "bf16", 756),
    ("NVIDIA H100 NVL", "bf16", 835),
    ("NVIDIA H200", "bf16", 989),
    ("NVIDIA GH200 480GB", "bf16", 989),
    ("NVIDIA A100-SXM4-80GB", "bf16", 312),
    ("NVIDIA A100 80GB PCIe", "fp16", 312),
    ("NVIDIA L40S", "bf16", 362),
    ("NVIDIA L4", "bf16", 121),
    ("NVIDIA A10", "bf16", 125),
    ("Tesla V100-SXM2-32GB", "fp16", 125),
    ("NVIDIA H100 80GB HBM3", "fp32", 67),
])
def test_dense_peaks(device, precision, tflops):
    assert peak_for(device, precision).tflops == tflops


def test_peak_edge_cases():
    assert peak_for("NVIDIA H100 80GB HBM3", "fp32", tf32_allowed=True).tflops == 494.5
    assert lookup("NVIDIA A100-SXM4-40GB").label == "A100" and lookup("NVIDIA L40S").label == "L40S"
    v100 = peak_for("Tesla V100-SXM2-32GB", "bf16")
    assert v100.tflops is None and "bf16" in v100.source
    cpu = peak_for("cpu", "fp32")
    assert cpu.tflops is None and "CPU" in cpu.source
    unknown = peak_for("NVIDIA GeForce GTX 1080", "fp16")
    assert unknown.tflops is None and "--peak-tflops" in unknown.source
    assert peak_for("NVIDIA GeForce GTX 1080", "fp16", override_tflops=44.0).tflops == 44.0


def test_carbon_is_energy_times_pue_times_grid_intensity():
    assert carbon_kg(3.6e6) == pytest.approx(1.1 * 0.385)          # 1 kWh
    assert carbon_kg(3.6e6, pue=1.0, kg_per_kwh=0.5) == pytest.approx(0.5)


def test_gpu_monitor_reports_unavailable_without_cuda():
    monitor = GpuMonitor()
    monitor.start()
    window = monitor.stop()
    assert window == {"available": False, "reason": "no CUDA device"}
    assert combine_gpu_windows([window, window]) == {"available": False, "reason": "no CUDA device"}


def test_gpu_windows_of_ranks_add_up():
    ranks = [{"available": True, "energy_j": 100.0, "energy_source": "counter", "power_w_mean": 500.0,
              "power_w_max": 600.0, "utilization_pct_mean": 90.0},
             {"available": True, "energy_j": 120.0, "energy_source": "counter", "power_w_mean": 600.0,
              "power_w_max": 700.0, "utilization_pct_mean": 80.0}]
    combined = combine_gpu_windows(ranks)
    assert combined["energy_j"] == 220.0 and combined["power_w_total"] == 1100.0
    assert combined["power_w_mean_per_gpu"] == 550.0 and combined["power_w_max"] == 700.0
    assert combined["utilization_pct_mean"] == 85.0


def _raw(case, impl="opt_ds", step_times=(0.40, 0.38, 0.42), energy=None):
    gpu = {"available": False, "reason": "no CUDA device"} if energy is None else \
        {"available": True, "energy_j": energy, "energy_source": "nvmlDeviceGetTotalEnergyConsumption delta",
         "power_w_mean_per_gpu": 650.0, "utilization_pct_mean": 97.0}
    return {"job": "case", "impl": impl, "case": case.to_dict(), "world_size": case.world_size,
            "steps": len(step_times), "warmup": 3, "step_times_s": list(step_times),
            "memory": {"bytes": 51 * 2 ** 30, "kind": "torch.cuda.max_memory_allocated"}, "gpu": gpu,
            "loss": 10.9, "recomputed_layers": 0, "device": "NVIDIA H100 80GB HBM3", "tf32": False}


def test_derived_row_arithmetic():
    case = parse_case("opt-1.3b").resolve_precision(cuda=True)           # mb 8, seq 2048, bf16
    row = derive(_raw(case, energy=900.0))
    flops = 72 * 8 * 2048 * 24 * 2048 ** 2 * (1 + 2048 / (6 * 2048) + 50272 / (12 * 24 * 2048))
    assert row["status"] == "ok" and row["step_time_s"] == 0.40                # median
    assert row["tokens_per_s"] == pytest.approx(8 * 2048 / 0.40)
    assert row["tflops"]["model"]["tflops_per_gpu"] == pytest.approx(flops / 0.40 / 1e12)
    assert row["tflops"]["hardware"]["tflops_per_gpu"] == row["tflops"]["model"]["tflops_per_gpu"]
    assert row["mfu"] == pytest.approx(flops / 0.40 / 989e12)
    assert row["peak_source"] == "H100 SXM dense bf16 989 TFLOP/s"
    assert row["gpu"]["energy_j_per_step"] == pytest.approx(300.0)
    assert row["gpu"]["carbon_g_per_step"] == pytest.approx(300.0 / 3.6e6 * 1.1 * 0.385 * 1e3)
    assert row["peak_memory_gib"] == pytest.approx(51.0)


def test_multi_gpu_rows_are_per_gpu_and_peer_ratios_match_work():
    ours = parse_case("opt-1.3b:tp=2").resolve_precision(cuda=True)
    peer_case = parse_case("opt-1.3b").resolve_precision(cuda=True)
    rows = [derive(_raw(ours, step_times=(0.25,))), derive(_raw(peer_case, impl="hf", step_times=(0.40,)))]
    rows[1]["kind"] = "peer"
    add_peer_ratios(rows)
    assert rows[0]["tokens_per_s_per_gpu"] == pytest.approx(8 * 2048 / 0.25 / 2)
    assert rows[0]["vs_peer"] == {"hf": pytest.approx((8 * 2048 / 0.25 / 2) / (8 * 2048 / 0.40))}


def test_failed_rows_keep_their_reason():
    case = parse_case("opt-2.7b").resolve_precision(cuda=True)
    row = derive({"job": "case", "impl": "opt_ds", "case": case.to_dict(), "world_size": 1,
                  "error": "out of memory", "log_tail": "torch.OutOfMemoryError: CUDA out of memory"})
    assert row["status"] == "out of memory" and "OutOfMemoryError" in row["log_tail"]


def test_case_specs():
    case = parse_case("opt-2.7b:mb=2,ac=1,layers=8")
    assert (case.micro_batch, case.ac_interval, case.shape.num_layers) == (2, 1, 8)
    assert case.label() == "opt-2.7b:layers=8,mb=2,ac=1"
    assert parse_case("opt-1.3b", {"mb": 4}).micro_batch == 4
    assert parse_case("opt-1.3b:mb=2", {"mb": 4}).micro_batch == 2              # the spec wins
    assert parse_case("tiny:compile=on").compile and parse_case("tiny:peer=off").peer is False
    assert NAMED_CASES["175b-slice"].shape.hidden_size == 12288 and NAMED_CASES["175b-slice"].tensor == 8
    for bad, words in [("opt-9b", "unknown benchmark case"), ("tiny:mb", "not key=value"),
                       ("tiny:foo=1", "unknown case key"), ("tiny:mb=two", "expected an integer"),
                       ("tiny:precision=fp8", "choose one of")]:
        with pytest.raises(ConfigError, match=words):
            parse_case(bad)


def test_bad_case_fails_before_any_work(tmp_path, capsys):
    from opt_ds.cli import main
    out = tmp_path / "bench"
    assert main(["bench", "tiny:tp=3", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "num_heads 4 is not divisible by parallel.tensor 3" in err and err.count("error:") == 1
    assert not out.exists()


def test_list_names_every_case():
    text = cli.list_cases()
    for name in NAMED_CASES:
        assert name in text


def test_step_time_spread_is_reported_and_a_noisy_measurement_flagged(capsys):
    from opt_ds.bench.report import formulas, table
    from opt_ds.bench.suite import _progress
    case = parse_case("opt-1.3b").resolve_precision(cuda=True)
    steady = derive(_raw(case, step_times=(0.40, 0.38, 0.42)))
    assert (steady["step_time_min_s"], steady["step_time_s"], steady["step_time_max_s"]) == (0.38, 0.40, 0.42)
    assert not steady["noisy"] and "NOISY" not in formulas([steady])
    noisy = derive(_raw(case, step_times=(0.40, 0.30, 0.50)))
    assert noisy["noisy"] and noisy["step_time_spread"] == pytest.approx(0.5)
    assert "min 0.3 s, max 0.5 s; NOISY: the steps differ by 50% of the median" in formulas([noisy])
    rows = table([steady, noisy]).splitlines()
    assert "min–max s" in rows[0] and "spread" in rows[0]
    assert "0.38–0.42" in rows[2] and rows[2].split()[rows[2].split().index("0.38–0.42") + 1] == "10%"
    assert "0.3–0.5" in rows[3] and "50% NOISY" in rows[3]
    _progress(noisy)
    assert "0.4 s/step (median; min 0.3, max 0.5, spread 50% NOISY)" in capsys.readouterr().out


@pytest.mark.parametrize("spec, why", [
    ("opt-1.3b", "GiB are free"),                                  # more state than this CPU has
    ("opt-125m", "TFLOP per step is minutes per step on a CPU"),   # fits, but each step is GPU-sized work
    ("175b-slice:tp=1", "GiB are free"),
])
def test_gpu_sized_cases_are_refused_on_a_cpu_with_the_memory_they_need(spec, why, monkeypatch):
    monkeypatch.setattr(cli, "_available_memory_bytes", lambda: 8 * 2 ** 30)
    with pytest.raises(ConfigError) as error:
        cli.resolve_cases([spec], {}, cuda=False, gpus=0)
    message = str(error.value)
    assert why in message and "it is a GPU case" in message and "\n" not in message
    needed = float(message.split(" needs about ")[1].split(" GiB")[0])
    case = parse_case(spec).resolve_precision(cuda=False)
    from opt_ds.models.presets import analytic_parameter_count
    assert needed == pytest.approx(analytic_parameter_count(case.config().shape) * 16 / 2 ** 30, abs=0.06)
    # the CPU cases and a shrunken GPU case pass; on a GPU nothing is refused for size
    cli.resolve_cases(["tiny", "tiny-pp2", "tiny-llama", "opt-125m:layers=1,mb=1,seq=128"], {}, cuda=False, gpus=0)
    cli.resolve_cases([spec.split(":")[0] + ":tp=1"], {}, cuda=True, gpus=1)


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU machine the GPU case runs")
def test_a_gpu_case_on_a_cpu_stops_before_any_work(tmp_path, capsys):
    from opt_ds.cli import main
    out = tmp_path / "bench"
    assert main(["bench", "tiny", "opt-2.7b", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and "case opt-2.7b needs about" in err and "it is a GPU case" in err
    assert not out.exists(), "nothing ran, not even the CPU case before it"
