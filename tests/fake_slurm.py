"""Stand-ins for `srun` and `scontrol`, which do not exist on this machine, to run launchers/slurm.sbatch end
to end. The fake srun starts the real ranks as local processes with SLURM's task variables (what srun gives
each task) and, like `#SBATCH --signal` or a pre-emption, can signal one task once training is under way:
FAKE_SLURM_SIGNAL=NAME:TASK:METRICS_JSONL:STEPS. The fake scontrol expands a comma-separated node list and
appends `requeue JOBID` calls to $FAKE_SLURM_LOG.

    python tests/fake_slurm.py srun|scontrol ARGS...
"""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path


def _signal_when_training(procs: list, plan: str) -> None:
    name, task, metrics, steps = plan.split(":")
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and all(p.poll() is None for p in procs):
        path = Path(metrics)
        if path.exists() and path.read_text().count('"event": "train"') >= int(steps):
            procs[int(task)].send_signal(getattr(signal, name))
            return
        time.sleep(0.05)


def srun(args: list) -> int:
    ntasks, exports, i = 1, {}, 0
    while args[i].startswith("--"):
        key, _, value = args[i][2:].partition("=")
        if key == "ntasks":
            ntasks = int(value)
        elif key == "export":
            exports = dict(item.split("=", 1) for item in value.split(",") if item != "ALL")
        i += 1
    procs = [subprocess.Popen(args[i:], env={**os.environ, **exports, "SLURM_PROCID": str(rank),
                                             "SLURM_NTASKS": str(ntasks), "SLURM_LOCALID": str(rank)})
             for rank in range(ntasks)]
    if os.environ.get("FAKE_SLURM_SIGNAL"):
        _signal_when_training(procs, os.environ["FAKE_SLURM_SIGNAL"])
    codes = [p.wait() for p in procs]
    return next((c for c in codes if c != 0), 0)


def scontrol(args: list) -> int:
    if args[:2] == ["show", "hostnames"]:
        print("\n".join(args[2].split(",")))
    elif args[:1] == ["requeue"]:
        with open(os.environ["FAKE_SLURM_LOG"], "a") as log:
            log.write(" ".join(args) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit({"srun": srun, "scontrol": scontrol}[sys.argv[1]](sys.argv[2:]))
