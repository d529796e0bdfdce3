"""`opt-ds launch` as one job: a SIGTERM to it mid-training stops every rank gracefully (one checkpoint at the
stop step, ranks exit 0, the launch exits 0, no process left), and while it runs a second job on the same save
folder is refused before it does anything. (A killed job's stale lock not blocking a restart is shown by
test_faults_crash.py: every resume there follows a run killed with exit 137.)"""
import signal
import subprocess
import sys
import time

import psutil

from fault_runs import BASE, events
from multiproc import REPO, child_env, opt_ds
from opt_ds.job import is_rank
from opt_ds.train import checkpoint
from test_faults_crash import _free_port


def wait_for(condition, timeout: float, what: str, proc):
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            raise AssertionError(f"launch exited {proc.returncode} while waiting for {what}:\n{proc.stdout.read()[-4000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.5)


def test_sigterm_to_launch_stops_every_rank_with_one_checkpoint_and_a_second_job_is_refused(tmp_path):
    ckpt = tmp_path / "ckpt"
    job = subprocess.Popen(
        [sys.executable, "-m", "opt_ds", "launch", "-", *BASE, "train.steps=10000", "train.save_interval=0",
         f"train.save_dir={ckpt}", f"train.log_dir={tmp_path}", "--num-gpus", "4", "--master-port", str(_free_port())],
        cwd=REPO, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for(lambda: len(events(tmp_path, "train")) >= 2, 300, "two training steps", job)
        processes = psutil.Process(job.pid).children(recursive=True)    # runner, DeepSpeed's launcher, ranks
        ranks = [p for p in processes if is_rank(p)]
        assert len(ranks) == 4 and len(processes) >= 6
        [rank0] = [p for p in ranks if "--local_rank=0" in p.cmdline()]

        second = opt_ds("train", "-", *[a for a in BASE if a != "parallel.pipeline=2"], "train.steps=2",
                        f"train.save_dir={ckpt}", f"train.log_dir={tmp_path / 'second'}", check=False, timeout=120)
        assert second.returncode == 2 and "Traceback" not in second.stdout, second.stdout[-3000:]
        [refusal] = [line for line in second.stdout.splitlines() if line.startswith("opt-ds train: error:")]
        assert refusal.startswith(f"opt-ds train: error: train.save_dir={ckpt} is in use by another running job "
                                  f"(pid {rank0.pid} on "), refusal
        assert not (tmp_path / "second").exists()

        job.send_signal(signal.SIGTERM)
        out, _ = job.communicate(timeout=300)
    finally:
        if job.poll() is None:
            job.kill()
    assert job.returncode == 0, out[-4000:]
    assert "launch: SIGTERM: asked the 4 rank(s) to finish their step, save and stop" in out
    for rank in range(4):
        assert f"rank {rank}: SIGTERM received" in out
    for rank in ranks:
        assert f"Process {rank.pid} exits successfully" in out, "DeepSpeed's launcher saw every rank exit 0"
    [stop] = events(tmp_path, "stop")
    assert stop["signal"] == "SIGTERM"
    assert [c.tag for c in checkpoint.published(ckpt)] == [f"global_step{stop['step']}"]
    assert (ckpt / "latest").read_text() == f"global_step{stop['step']}"
    assert "launch: the job stopped on SIGTERM; exit status 0" in out
    assert [p.pid for p in processes if p.is_running()] == [], "no process of the job is left"
