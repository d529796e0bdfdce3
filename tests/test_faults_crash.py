"""Crash safety in real multi-process runs: a rank killed while writing a checkpoint leaves the previous one
loadable and the resume exact; a damaged checkpoint is named with its file and the fix; SIGTERM reaching one
rank under launchers/slurm.sbatch stops every rank after the same step with a checkpoint and exit 0, the job
is requeued and resumes exactly."""
import os
import sys
from pathlib import Path

from fault_runs import BASE, FAULT_INJECTION, clean_run, events, train, trajectory
from multiproc import REPO, run
from opt_ds.ports import free_port

WORKERS = Path(__file__).resolve().parent / "workers"


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


def test_crash_while_resaving_a_step_keeps_a_complete_copy_and_the_resume_exact(tmp_path):
    """Re-saving a published step (here: resuming global_step10 and saving it again, as a stop signal right
    after an interval save does) and dying between setting the old copy aside and renaming the new one in: the
    next start puts a complete copy back and resumes from it bit for bit."""
    one_stage = [a for a in BASE if a != "parallel.pipeline=2"] + ["train.eval_interval=0"]
    train(tmp_path / "straight", "train.steps=20", base=one_stage, nproc=1)     # global_step10, 20
    ckpt = tmp_path / "straight" / "ckpt"
    # child_env: never the rendezvous an earlier in-process test left in os.environ (its port may be taken).
    proc = run([sys.executable, WORKERS / "resave_run.py", *one_stage, f"train.save_dir={ckpt}", "train.steps=10",
                "train.load_tag=global_step10", f"train.log_dir={tmp_path}", "faults.kill_in_publish_gap_at_step=10"],
               check=False, timeout=240, **FAULT_INJECTION)
    assert proc.returncode == 137 and "killed while publishing global_step10" in proc.stdout, proc.stdout[-3000:]
    assert not (ckpt / "global_step10").exists() and (ckpt / "latest").read_text() == "global_step10"
    assert (ckpt / ".replaced-global_step10" / "manifest.json").is_file()
    assert (ckpt / ".tmp-global_step10" / "manifest.json").is_file()

    resumed = tmp_path / "resumed"
    proc = train(tmp_path / "straight", "train.steps=20", f"train.log_dir={resumed}", base=one_stage, nproc=1)
    assert "restored global_step10 from .tmp-global_step10, its complete copy" in proc.stdout
    assert "deleted .replaced-global_step10" in proc.stdout
    [resume] = events(resumed, "resume")
    assert resume["tag"] == "global_step10"
    assert sorted(p.name for p in ckpt.iterdir() if p.name.startswith(".")) == [".lock"]
    straight = trajectory(tmp_path / "straight")
    assert [trajectory(resumed)[s] for s in range(11, 21)] == [straight[s] for s in range(11, 21)]


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


def sbatch(tmp_path, *overrides, restart: int = 0, **env):
    """Run launchers/slurm.sbatch as SLURM would on a one-node allocation of 2 ranks (fake srun/scontrol)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for tool in ("srun", "scontrol"):
        (bin_dir / tool).write_text(f'#!/bin/sh\nexec {sys.executable} {REPO}/tests/fake_slurm.py {tool} "$@"\n')
        (bin_dir / tool).chmod(0o755)
    (tmp_path / "run.yaml").write_text("{}\n")
    return run(["bash", REPO / "launchers" / "slurm.sbatch", tmp_path / "run.yaml", *BASE, f"train.log_dir={tmp_path}",
                *overrides], check=False, timeout=240, PATH=f"{bin_dir}:{Path(sys.executable).parent}:{os.environ['PATH']}",
               SLURM_JOB_NODELIST="localhost", SLURM_JOB_ID=4242, SLURM_JOB_NAME="t", SLURM_NTASKS_PER_NODE=2,
               SLURM_RESTART_COUNT=restart, SAVE_DIR=tmp_path / "ckpt", MASTER_PORT=free_port("127.0.0.1"),
               FAKE_SLURM_LOG=tmp_path / "scontrol.log", **env)


def test_preemption_signal_to_one_rank_saves_exits_0_requeues_and_resumes_exactly(tmp_path):
    """launchers/slurm.sbatch end to end: SIGTERM reaches one rank only, mid-training. Every rank stops after
    the same step with a checkpoint, srun exits 0, the script requeues; the requeued job resumes exactly."""
    first = sbatch(tmp_path, "train.steps=12", "train.save_interval=0",
                   FAKE_SLURM_SIGNAL=f"SIGTERM:1:{tmp_path / 'metrics.jsonl'}:2")
    assert first.returncode == 0, first.stdout[-3000:]
    assert (tmp_path / "ckpt" / "hostfile.4242").read_text() == "localhost slots=2\n"
    assert "srun --ntasks=2 --nodes=1 --ntasks-per-node=2 --nodelist=localhost" in first.stdout
    [stop] = events(tmp_path, "stop")
    stopped = stop["step"]
    assert stop["signal"] == "SIGTERM" and 2 <= stopped < 12
    assert (tmp_path / "ckpt" / "latest").read_text() == f"global_step{stopped}"
    assert f'"step": {stopped}' in (tmp_path / "ckpt" / "preempted.json").read_text()
    assert (tmp_path / "scontrol.log").read_text() == "requeue 4242\n"

    requeued = sbatch(tmp_path, "train.steps=12", "train.save_interval=0", restart=1)
    assert requeued.returncode == 0, requeued.stdout[-3000:]
    assert (tmp_path / "scontrol.log").read_text() == "requeue 4242\n", "a finished run is not requeued"
    assert not (tmp_path / "ckpt" / "preempted.json").exists()
    resumed, straight = trajectory(tmp_path), trajectory(clean_run())
    assert [resumed[s] for s in range(1, 13)] == [straight[s] for s in range(1, 13)]
