"""`opt-ds train` runs the same way in one process, under torchrun and under DeepSpeed's launcher with a
hostfile; a bad hostfile is refused before anything starts."""
import shutil
import subprocess

import pytest

from conftest import TINY_MODEL
from multiproc import opt_ds
from opt_ds.train.metrics import read_metrics

ARGS = TINY_MODEL + ["data.synthetic=arithmetic", "model.dropout=0.0", "batch.global_batch_size=4",
                     "batch.micro_batch_size=2", "train.steps=3", "train.seed=3"]


def losses(log_dir):
    return [r["loss"] for r in read_metrics(log_dir / "metrics.jsonl", "train")]


@pytest.fixture(scope="module")
def single_process(tmp_path_factory):
    log_dir = tmp_path_factory.mktemp("single")
    opt_ds("train", "-", *ARGS, f"train.log_dir={log_dir}", timeout=120)
    return log_dir


def test_single_process_without_launcher_writes_jsonl_and_tensorboard(single_process):
    assert len(losses(single_process)) == 3
    events = list((single_process / "tensorboard").glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0


def localhost_ssh_works() -> bool:
    return subprocess.run(["ssh", "-o", "BatchMode=yes", "-o", "ConnectTimeout=5", "localhost", "true"],
                          capture_output=True).returncode == 0 and shutil.which("pdsh") is not None


@pytest.mark.skipif(not localhost_ssh_works(), reason="needs pdsh and ssh to localhost: run .ci/setup-localhost-ssh.sh")
def test_deepspeed_hostfile_launch_matches_single_process(tmp_path, single_process):
    """DeepSpeed's multi-node path for real: its ssh check, then pdsh starting the ranks over ssh."""
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("# one node, two ranks\nlocalhost slots=2\n")
    proc = opt_ds("launch", "-", *ARGS, "parallel.pipeline=2", f"train.log_dir={tmp_path}", "--hostfile", hostfile,
                  "--master-port", "29613", "--runner-arg=--force_multi", timeout=180)
    assert "launching TP=1 x PP=2 x DP=1 on 2 processes over 1 node(s)" in proc.stdout
    assert "cmd = pdsh" in proc.stdout, "the ranks must have been started by pdsh over ssh"
    assert losses(tmp_path) == pytest.approx(losses(single_process), rel=1e-5)


PP2 = ["parallel.pipeline=2", "parallel.data=1"]


@pytest.mark.parametrize("text, layout, message", [
    (None, PP2, "does not exist"),
    ("", PP2, "lists no hosts"),
    ("worker-0 slot=8\n", PP2, "is not `hostname slots=N`"),
    ("worker-0 slots=2\nworker-0 slots=2\n", PP2, "host worker-0 is listed twice"),
    ("worker-0 slots=2\nworker-1 slots=2\n", PP2, "world size 4 != TP x PP x DP = 1 x 2 x 1 = 2"),
    ("worker-0 slots=1\nworker-1 slots=1\n", ["parallel.tensor=2"],
     "host worker-0 has 1 slots, not a multiple of parallel.tensor=2"),
])
def test_bad_hostfile(tmp_path, text, layout, message):
    hostfile = tmp_path / "hostfile"
    if text is not None:
        hostfile.write_text(text)
    proc = opt_ds("launch", "-", *ARGS, *layout, "--hostfile", hostfile, check=False, timeout=60)
    assert proc.returncode == 2, proc.stdout
    assert message in proc.stdout
    assert "launching" not in proc.stdout
