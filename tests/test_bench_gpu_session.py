"""Rehearse opt_ds/bench/gpu_session.sh on the CPU: the same script, with tiny cases and a tiny projection,
through its wheel installation, preflight, cases with peers and both projections."""
import json
import re
import sys
import zipfile

import pytest

from opt_ds.bench import cli
from tests.multiproc import REPO, run

SCRIPT = REPO / "opt_ds" / "bench" / "gpu_session.sh"
PROBE = "opt_ds_rehearsal_probe"


def make_wheel(directory):
    """A minimal pure-Python wheel standing in for the carried .whl/ files."""
    directory.mkdir()
    path = directory / f"{PROBE}-0.1-py3-none-any.whl"
    info = f"{PROBE}-0.1.dist-info"
    files = {f"{PROBE}.py": "VALUE = 1\n",
             f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {PROBE}\nVersion: 0.1\n",
             f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    files[f"{info}/RECORD"] = "".join(f"{name},,\n" for name in [*files, f"{info}/RECORD"])
    with zipfile.ZipFile(path, "w") as wheel:
        for name, text in files.items():
            wheel.writestr(name, text)
    return directory


def test_default_cases_fit_one_gpu():
    cases = re.search(r'CASES="\$\{BENCH_CASES:-([^}]*)\}"', SCRIPT.read_text()).group(1).split()
    resolved = cli.resolve_cases(cases, {}, cuda=True, gpus=1)
    assert {c.name for c in resolved} >= {"opt-1.3b", "opt-2.7b", "175b-slice"}
    assert all(c.world_size == 1 and c.seq == 2048 and c.precision == "bf16" for c in resolved)


def test_rehearsal_on_cpu(tmp_path):
    pytest.importorskip("transformers")
    out, site = tmp_path / "out", tmp_path / "site"
    run(["bash", SCRIPT], timeout=400, OUT=out, PYTHON=sys.executable, BENCH_WHEELS=make_wheel(tmp_path / "whl"),
        BENCH_SITE=site, BENCH_CASES="tiny", BENCH_STEPS=2, BENCH_WARMUP=1,
        BENCH_PROJECT_ARGS="--project-model tiny --seq 64 --project-tp 1 --project-pp 2 --project-gpus 8 "
                           "--project-global-batch 64")
    log = (out / "session.log").read_text()
    assert "installing 1 wheel(s)" in log and (site / f"{PROBE}.py").exists()
    assert "deepspeed" in log and "FATAL" not in log
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [(r.get("case"), r.get("impl", r.get("kind"))) for r in rows] == [
        ("tiny", "opt_ds"), ("tiny", "hf"), ("tiny", "hf-deepspeed"), (None, "projection"), (None, "projection")]
    assert all(r.get("status", "ok") == "ok" for r in rows)
    assert "within ±15 %" in (out / "projection-a100-80gb.txt").read_text()
    measured = (out / "projection-h100-80gb.txt").read_text()
    assert "measured" in measured and "on cpu ÷ TP 1" in measured
    assert rows[-1]["layer_ms"] > 0
    names = {p.name for p in out.iterdir()}
    assert names <= {"results.jsonl", "table.txt", "tflops.png", "workers.log", "session.log",
                     "projection-a100-80gb.txt", "projection-h100-80gb.txt"}       # ≤ 8 files come back
    assert "== done" in log
