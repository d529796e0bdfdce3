"""The README's first command end to end, shortened: launchers/demo.sh preprocesses the bundled corpus,
trains TP=2 x PP=2 through DeepSpeed's launcher on it, saves a checkpoint, samples text and summarises."""
import sys
from pathlib import Path

from multiproc import opt_ds, run
from opt_ds.train.metrics import read_metrics


def test_demo_script(tmp_path):
    proc = run(["bash", "launchers/demo.sh", "train.steps=16", "train.eval_interval=8", "train.save_interval=8",
                "sample.max_new_tokens=8"], timeout=400, DEMO_RUN_DIR=tmp_path, BIN=Path(sys.executable).parent)
    records = read_metrics(tmp_path / "metrics.jsonl")
    evals = [r for r in records if r["event"] == "eval"]
    assert [r["step"] for r in evals] == [0, 8, 16]
    assert evals[-1]["loss"] < evals[0]["loss"] - 1.0, "validation loss must fall clearly on the real corpus"
    start = next(r for r in records if r["event"] == "start")
    assert start["layout"] == "TP=2 x PP=2 x DP=1"
    assert (tmp_path / "checkpoints" / "global_step16").is_dir()
    assert (tmp_path / "checkpoints" / "latest").read_text() == "global_step16"
    assert any(r["event"] == "sample" for r in records)
    assert "validation loss: " in proc.stdout and "sample at step 16:" in proc.stdout
    check_generate_from(tmp_path / "checkpoints")


def check_generate_from(checkpoints):
    """`opt-ds generate` rebuilds the model from the checkpoint's saved config: a TP=2 checkpoint needs a
    multiple of 2 processes (one clear error otherwise) and may run with another pipeline depth (here 1)."""
    proc = opt_ds("generate", checkpoints, "--prompt", "ROMEO. ", check=False, timeout=60)
    assert proc.returncode == 2 and "tensor-parallel with TP=2: run a multiple of 2 processes" in proc.stdout
    proc = opt_ds("generate", checkpoints, "--prompt", "ROMEO. ", "--max-new-tokens", "8", "--top-p", "0",
                  nproc=2, timeout=180)
    assert "ROMEO. " in proc.stdout
