"""SLURM launch: one `srun` task per rank (`opt-ds launch --launcher slurm`).

Why not DeepSpeed's runners: with pdsh the ranks on other nodes hang off ssh sessions outside the SLURM job
step, so `#SBATCH --signal` and pre-emption never reach them, and DeepSpeed's per-node launcher answers
SIGTERM by killing its ranks; DeepSpeed's own `slurm` runner starts `srun python script` without the rank
variables torch.distributed needs (it expects MPI discovery). Here every rank is an srun task: SLURM
signals each one directly, every rank finishes its step and saves (opt_ds.train.signals), and srun exits 0.
The tasks learn their rank from SLURM's task variables (`adopt_environment`).
"""
from __future__ import annotations

import os
import shutil
import sys

from opt_ds.errors import UserError

SLURM_RANKS_ENV = "OPT_DS_SLURM_RANKS"
_TASK_VARIABLES = {"RANK": "SLURM_PROCID", "WORLD_SIZE": "SLURM_NTASKS", "LOCAL_RANK": "SLURM_LOCALID"}


def adopt_environment(env=os.environ) -> None:
    """In a task started by `srun_command`: set RANK, WORLD_SIZE and LOCAL_RANK from SLURM's variables."""
    if env.get(SLURM_RANKS_ENV) != "1" or "RANK" in env:
        return
    needed = list(_TASK_VARIABLES.values()) + ["MASTER_ADDR", "MASTER_PORT"]
    missing = [name for name in needed if name not in env]
    if missing:
        raise UserError(f"{SLURM_RANKS_ENV}=1 but {', '.join(missing)} is not set: start the ranks with "
                        "`opt-ds launch --launcher slurm` inside an sbatch/salloc allocation")
    for ours, slurms in _TASK_VARIABLES.items():
        env[ours] = env[slurms]


def srun_command(hosts: dict, *, master_addr, master_port: int, config: str, overrides: list,
                 check_installed: bool = True) -> list:
    """srun starting sum(slots) tasks, `slots` per host, each running `opt-ds train`."""
    slots = set(hosts.values())
    if len(slots) != 1:
        raise UserError(f"--launcher slurm starts the same number of ranks on every node, but the hostfile gives "
                        f"{dict(hosts)}; give every host the same slots")
    if check_installed and shutil.which("srun") is None:
        raise UserError("--launcher slurm needs `srun` on PATH: run inside an sbatch or salloc allocation "
                        "(see launchers/slurm.sbatch), or use --launcher pdsh")
    per_node = slots.pop()
    exports = f"ALL,{SLURM_RANKS_ENV}=1,MASTER_ADDR={master_addr or next(iter(hosts))},MASTER_PORT={master_port}"
    return ["srun", f"--ntasks={per_node * len(hosts)}", f"--nodes={len(hosts)}", f"--ntasks-per-node={per_node}",
            f"--nodelist={','.join(hosts)}", "--kill-on-bad-exit=1", f"--export={exports}",
            sys.executable, "-u", "-m", "opt_ds", "train", str(config), *overrides]
