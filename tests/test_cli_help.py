"""The command line a newcomer meets first: help answers at once (no torch import), says what opt_ds is, and
--version works."""
import subprocess
import sys
import time

from multiproc import child_env, REPO

BOUND_SECONDS = 3.0     # generous: it takes ~0.3 s on an idle machine; the best of three absorbs load spikes


def opt_ds_output(*args) -> tuple:
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "opt_ds", *args], cwd=REPO, env=child_env(),
                          capture_output=True, text=True, timeout=60)
    return time.perf_counter() - started, proc


def test_help_answers_quickly_without_importing_torch():
    for args in (["--help"], ["convert", "--help"], ["train", "--help"]):
        runs = [opt_ds_output(*args) for _ in range(3)]
        seconds, proc = min(runs, key=lambda r: r[0])
        assert proc.returncode == 0, proc.stderr[-2000:]
        imported = {line.split("|")[-1].strip() for line in proc.stderr.splitlines() if line.startswith("import time")}
        assert not {"torch", "deepspeed", "megatron.core"} & imported, args
        assert seconds < BOUND_SECONDS, f"opt-ds {' '.join(args)} took {seconds:.2f} s"


def test_top_level_help_describes_the_tool_and_version_works():
    _, proc = opt_ds_output("--help")
    assert proc.stdout.startswith("usage: opt-ds") and "Pre-train OPT-family language models" in proc.stdout
    assert "convert checkpoints" in proc.stdout and "--verbose" in proc.stdout
    _, proc = opt_ds_output("--version")
    assert proc.stdout.strip() == "opt-ds 0.1.0"
