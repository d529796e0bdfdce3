"""`opt-ds launch` as one job: a SIGTERM to it mid-training stops every rank gracefully (one checkpoint at the
stop step, ranks exit 0, the launch exits 0, no process left), and while it runs a second job on the same save
folder is refused before it does anything. (A killed job's stale lock not blocking a restart is shown by
test_faults_crash.py: every resume there follows a run killed with exit 137.)"""
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

from fault_runs import BASE, events
from multiproc import REPO, child_env, opt_ds
from opt_ds.job import is_rank
from opt_ds.train import checkpoint
from opt_ds.ports import free_port
from test_faults_save_folder import tree_digest

ONE_STAGE = [a for a in BASE if a != "parallel.pipeline=2"]


def wait_for(condition, timeout: float, what: str, proc):
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            raise AssertionError(f"launch exited {proc.returncode} while waiting for {what}:\n{proc.stdout.read()[-4000:]}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.5)


def kill_tree(proc) -> None:
    """A failed test must not leave the job running (its runner has a session of its own)."""
    if proc.poll() is None:
        for process in psutil.Process(proc.pid).children(recursive=True):
            process.kill()
        proc.kill()
        proc.wait()


def trained_steps(run_dir) -> int:
    return len(events(run_dir, "train")) if (run_dir / "metrics.jsonl").is_file() else 0


@dataclass
class StoppedJob:
    run_dir: Path
    output: str
    returncode: int
    processes: list             # the job's processes while it trained: runner, DeepSpeed's launcher, ranks
    ranks: list
    rank0_pid: int
    second_returncode: int      # a second job on the same save folder, started while this one trained
    second_output: str


@pytest.fixture(scope="module")
def stopped_job(tmp_path_factory) -> StoppedJob:
    """`opt-ds launch --num-gpus 4` SIGTERMed after two steps; while it trains, a second job on its folder."""
    run_dir = tmp_path_factory.mktemp("launch")
    ckpt = run_dir / "ckpt"
    job = subprocess.Popen(
        [sys.executable, "-m", "opt_ds", "launch", "-", *BASE, "train.steps=10000", "train.save_interval=0",
         f"train.save_dir={ckpt}", f"train.log_dir={run_dir}", "--num-gpus", "4", "--master-port", str(free_port("127.0.0.1"))],
        cwd=REPO, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for(lambda: trained_steps(run_dir) >= 2, 600, "two training steps", job)
        processes = psutil.Process(job.pid).children(recursive=True)
        ranks = [p for p in processes if is_rank(p)]
        rank0_pid = next((p.pid for p in ranks if "--local_rank=0" in p.cmdline()), None)
        second = opt_ds("train", "-", *ONE_STAGE, "train.steps=2", f"train.save_dir={ckpt}",
                        f"train.log_dir={run_dir / 'second'}", check=False, timeout=300)
        job.send_signal(signal.SIGTERM)
        out, _ = job.communicate(timeout=600)
    finally:
        kill_tree(job)
    return StoppedJob(run_dir, out, job.returncode, processes, ranks, rank0_pid, second.returncode, second.stdout)


def test_sigterm_to_launch_stops_every_rank_with_one_checkpoint_at_the_stop_step(stopped_job):
    job, ckpt = stopped_job, stopped_job.run_dir / "ckpt"
    out = job.output
    assert job.returncode == 0, out[-4000:]
    assert len(job.ranks) == 4 and len(job.processes) >= 6
    assert "launch: SIGTERM: asked the 4 rank(s) to finish their step, save and stop" in out
    for rank in range(4):
        assert f"rank {rank}: SIGTERM received" in out
    for rank in job.ranks:
        assert f"Process {rank.pid} exits successfully" in out, "DeepSpeed's launcher saw every rank exit 0"
    [stop] = events(job.run_dir, "stop")
    assert stop["signal"] == "SIGTERM"
    assert [c.tag for c in checkpoint.published(ckpt)] == [f"global_step{stop['step']}"]
    assert (ckpt / "latest").read_text() == f"global_step{stop['step']}"
    assert "launch: the job stopped on SIGTERM; exit status 0" in out
    assert [p.pid for p in job.processes if p.is_running()] == [], "no process of the job is left"


def test_a_second_job_on_a_held_save_folder_is_refused_before_any_work(stopped_job):
    assert stopped_job.second_returncode == 2 and "Traceback" not in stopped_job.second_output
    [refusal] = [line for line in stopped_job.second_output.splitlines() if line.startswith("opt-ds train: error:")]
    ckpt = stopped_job.run_dir / "ckpt"
    assert refusal.startswith(f"opt-ds train: error: train.save_dir={ckpt} is in use by another running job "
                              f"(pid {stopped_job.rank0_pid} on "), refusal
    assert not (stopped_job.run_dir / "second").exists()


def test_a_folder_with_checkpoints_but_an_empty_latest_is_an_error_that_changes_nothing(stopped_job, tmp_path):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(stopped_job.run_dir / "ckpt", ckpt)
    [tag] = [c.tag for c in checkpoint.published(ckpt)]
    (ckpt / "latest").write_text("")
    before = tree_digest(ckpt)
    proc = opt_ds("train", "-", *ONE_STAGE, "train.steps=20", f"train.save_dir={ckpt}",
                  f"train.log_dir={tmp_path / 'logs'}", check=False, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stdout, proc.stdout[-3000:]
    [message] = [line for line in proc.stdout.splitlines() if line.startswith("opt-ds train: error:")]
    assert message == (f"opt-ds train: error: {ckpt} holds checkpoints but 'latest' is empty; the newest intact "
                       f"checkpoint there is {tag}: resume from it with train.load_tag={tag} (or write {tag} into "
                       f"{ckpt / 'latest'}). Nothing was changed")
    assert tree_digest(ckpt) == before
