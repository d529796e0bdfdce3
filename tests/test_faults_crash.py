"""Crash safety in real multi-process runs: a rank killed while writing a checkpoint leaves the previous one
loadable and the resume exact; a damaged checkpoint is named with its file and the fix; SIGTERM reaching one
rank of an srun-style launch stops every rank after the same step with a checkpoint, exit 0, exact resume."""
import os
import signal
import socket
import subprocess
import sys
import time

from fault_runs import BASE, clean_run, events, train, trajectory
from multiproc import REPO, child_env


def test_rank_killed_mid_save_leaves_the_previous_checkpoint_and_an_exact_resume(tmp_path):
    proc = train(tmp_path, "train.steps=30", "faults.kill_during_save_at_step=20", check=False)
    assert proc.returncode != 0 and "killed half-way through writing" in proc.stdout
    ckpt = tmp_path / "ckpt"
    assert (ckpt / "latest").read_text() == "global_step10"
    assert (ckpt / ".tmp-global_step20").is_dir() and not (ckpt / "global_step20").exists()

    train(tmp_path, "train.steps=30")
    [resume] = events(tmp_path, "resume")
    assert resume["tag"] == "global_step10"
    assert not (ckpt / ".tmp-global_step20").exists(), "the partial staging folder is cleared by the next save"
    resumed, straight = trajectory(tmp_path), trajectory(clean_run())
    assert [resumed[s] for s in range(11, 31)] == [straight[s] for s in range(11, 31)]


def test_damaged_checkpoint_is_named_with_the_file_and_the_fix(tmp_path):
    one_stage = [a for a in BASE if a != "parallel.pipeline=2"]
    train(tmp_path, "train.steps=20", "faults.corrupt_checkpoint_at_step=20", base=one_stage, nproc=1)
    proc = train(tmp_path, "train.steps=30", base=one_stage, nproc=1, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stdout
    [message] = [line for line in proc.stdout.splitlines() if line.startswith("opt-ds train: error:")]
    assert "global_step20 is damaged (layer_00-model_00-model_states.pt: size" in message
    assert "the previous healthy checkpoint is global_step10: resume with train.load_tag=global_step10" in message

    train(tmp_path, "train.steps=30", "train.load_tag=global_step10", base=one_stage, nproc=1)
    assert (tmp_path / "ckpt" / "abandoned" / "global_step20").is_dir(), "the damaged one is kept, set aside"
    assert (tmp_path / "ckpt" / "latest").read_text() == "global_step30"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _srun_style_ranks(run_dir, nranks: int, overrides: list) -> list:
    """Start the ranks as `opt-ds launch --launcher slurm` has srun start them: one process per rank, told its
    rank by SLURM's task variables only. Each rank is a separate process that a signal can reach alone."""
    port = _free_port()
    procs = []
    for rank in range(nranks):
        env = child_env(OPT_DS_SLURM_RANKS=1, SLURM_PROCID=rank, SLURM_NTASKS=nranks, SLURM_LOCALID=rank,
                        MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
        log = open(run_dir / f"rank{rank}.log", "w")
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "opt_ds", "train", "-", *BASE, f"train.save_dir={run_dir}/ckpt",
             f"train.log_dir={run_dir}", *overrides], cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT))
    return procs


def _wait_for_steps(run_dir, steps: int, procs, timeout: float = 180) -> None:
    metrics = run_dir / "metrics.jsonl"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if metrics.exists() and metrics.read_text().count('"event": "train"') >= steps:
            return
        if any(p.poll() is not None for p in procs):
            break
        time.sleep(0.05)
    for p in procs:
        p.kill()
    raise AssertionError(f"no step {steps} in {metrics}: " + (run_dir / "rank0.log").read_text()[-3000:])


def test_sigterm_to_one_rank_stops_all_after_the_same_step_with_a_checkpoint(tmp_path):
    procs = _srun_style_ranks(tmp_path, 2, ["train.steps=1000", "train.save_interval=0"])
    _wait_for_steps(tmp_path, 2, procs)
    os.kill(procs[1].pid, signal.SIGTERM)       # the last pipeline stage only, mid-training
    codes = [p.wait(timeout=120) for p in procs]
    assert codes == [0, 0], (tmp_path / "rank0.log").read_text()[-3000:]
    [stop] = events(tmp_path, "stop")
    stopped = stop["step"]
    assert stop["signal"] == "SIGTERM" and stopped >= 2
    ckpt = tmp_path / "ckpt"
    assert (ckpt / "latest").read_text() == f"global_step{stopped}"
    assert f'"step": {stopped}' in (ckpt / "preempted.json").read_text()

    train(tmp_path, f"train.steps={stopped + 3}")
    assert not (ckpt / "preempted.json").exists()
    resumed, straight = trajectory(tmp_path), trajectory(clean_run())
    assert [resumed[s] for s in range(1, stopped + 4)] == [straight[s] for s in range(1, stopped + 4)]
