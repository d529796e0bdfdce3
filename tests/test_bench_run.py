"""Real CPU runs of `opt-ds bench`: DeepSpeed pipeline engines in worker processes (one rank, and two
ranks under torchrun), the Hugging Face peers beside them, and the table / JSON lines / PNG they produce."""
import importlib.util
import json

import pytest

from tests.multiproc import opt_ds

pytest.importorskip("transformers")
HAVE_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None


def rows_of(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_suite_runs_cases_and_peers(tmp_path):
    out = tmp_path / "bench"
    proc = opt_ds("bench", "tiny:ac=1", "tiny-pp2:ac=3", "--steps", "2", "--warmup", "1", "--out", out,
                  timeout=300)
    rows = rows_of(out / "results.jsonl")
    assert [(r["case"], r["impl"]) for r in rows] == [
        ("tiny:ac=1", "opt_ds"), ("tiny:ac=1", "hf"), ("tiny:ac=1", "hf-deepspeed"), ("tiny-pp2:ac=3", "opt_ds")]
    for row in rows:
        assert row["status"] == "ok", row
        assert row["tokens_per_s"] > 0 and row["loss"] == pytest.approx(6.93, abs=0.1)   # ln(1024)
        assert row["versions"]["torch"] and row["versions"]["deepspeed"] and row["versions"]["transformers"]
        assert row["device"] == "cpu" and row["git_commit"] and "bench tiny:ac=1" in row["command"]
        assert row["mfu"] is None and row["gpu"] == {"available": False, "reason": "no CUDA device"}
        assert set(row["tflops"]) == {"model", "hardware", "6n_attention"}
    ours, hf, hf_ds, pipe = rows
    # DeepSpeed recomputes all 4 decoder layers at interval 1; at interval 3 on 2 stages only the block
    # [d1] of stage 0 qualifies ([embed, pos, d0] and [d2, d3, final] hold non-checkpointable layers).
    assert ours["recomputed_layers"] == 4 and pipe["recomputed_layers"] == 1
    assert ours["tflops"]["hardware"]["flops_per_step"] / ours["tflops"]["model"]["flops_per_step"] > 1.2
    assert hf["recomputed_layers"] == 4                                    # HF gradient checkpointing
    assert pipe["layout"] == {"tensor": 1, "pipeline": 2, "data": 1, "world_size": 2}
    assert pipe["tokens_per_step"] == 2 * 4 * 64                          # micro-batch 2 × 4 micro-batches
    assert ours["vs_peer"]["hf"] == pytest.approx(ours["tokens_per_s_per_gpu"] / hf["tokens_per_s_per_gpu"])
    assert set(pipe["vs_peer"]) == {"hf", "hf-deepspeed"}                 # same shape, batch and seq

    table = (out / "table.txt").read_text()
    for words in ("tiny:ac=1", "tiny-pp2:ac=3", "hf-deepspeed", "TP1·PP2·DP1", "72·B·s·l·h²", "96·B·s·l·h²",
                  "B·s·(6·N + 12·l·h·s)", "MFU n/a: CPU", "GPU utilisation, power, energy, carbon: n/a"):
        assert words in table, words
    assert table.splitlines()[2].split()[:2] == ["case", "impl"]
    assert "tiny-pp2:ac=3" in proc.stdout and "reports in" in proc.stdout
    if HAVE_MATPLOTLIB:
        assert (out / "tflops.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_launched_mode_measures_one_case_across_ranks(tmp_path):
    out = tmp_path / "bench"
    opt_ds("bench", "tiny-tp2", "--steps", "2", "--warmup", "1", "--out", out, nproc=2, timeout=300)
    (row,) = rows_of(out / "results.jsonl")
    assert row["status"] == "ok" and row["kind"] == "opt_ds"
    assert row["layout"] == {"tensor": 2, "pipeline": 1, "data": 1, "world_size": 2}
    assert len(row["step_times_s"]) == 2 and row["tokens_per_s_per_gpu"] == pytest.approx(row["tokens_per_s"] / 2)
    assert "tiny-tp2" in (out / "table.txt").read_text()


def test_launched_mode_refuses_a_case_of_another_size(tmp_path):
    proc = opt_ds("bench", "tiny", "--out", tmp_path / "x", nproc=2, timeout=120, check=False)
    assert proc.returncode != 0 and "needs 1 rank(s)" in proc.stdout
    assert not (tmp_path / "x").exists()


def test_llama_case_runs_beside_its_hugging_face_peer(tmp_path):
    out = tmp_path / "bench"
    opt_ds("bench", "tiny-llama", "--steps", "2", "--warmup", "1", "--out", out, timeout=300)
    rows = rows_of(out / "results.jsonl")
    assert [(r["case"], r["impl"]) for r in rows] == [
        ("tiny-llama", "opt_ds"), ("tiny-llama", "hf"), ("tiny-llama", "hf-deepspeed")]
    for row in rows:
        assert row["status"] == "ok", row
        assert row["loss"] == pytest.approx(6.93, abs=0.1)        # ln(1024): both models start uniform
    assert "gated" in rows[0]["tflops"]["model"]["worked"]
