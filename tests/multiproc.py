"""Launch real multi-process runs from tests, with a timeout so a hung rank fails instead of hanging CI."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from opt_ds.ports import without_rendezvous

REPO = Path(__file__).resolve().parent.parent


def child_env(**extra) -> dict:
    # A test process that initialised its own one-rank world must not hand its rendezvous to children.
    env = without_rendezvous(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["OMP_NUM_THREADS"] = "1"
    # Scripts that call `opt-ds` (launchers/*.sh) must find the one installed beside this interpreter.
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env.setdefault("PYTHONUNBUFFERED", "1")
    env.update({k: str(v) for k, v in extra.items()})
    return env


def run(cmd, *, timeout: float = 300, check: bool = True, cwd=None, **env) -> subprocess.CompletedProcess:
    """Run a command; on failure (or timeout) raise with the tail of its output."""
    try:
        proc = subprocess.run([str(c) for c in cmd], cwd=cwd or REPO, env=child_env(**env), timeout=timeout,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    except subprocess.TimeoutExpired as err:
        out = err.stdout.decode() if isinstance(err.stdout, bytes) else (err.stdout or "")
        raise AssertionError(f"timed out after {timeout}s: {' '.join(map(str, cmd))}\n{out[-6000:]}") from None
    if check and proc.returncode != 0:
        raise AssertionError(f"exit code {proc.returncode}: {' '.join(map(str, cmd))}\n{proc.stdout[-6000:]}")
    return proc


def torchrun(nproc: int, *args, **kwargs) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc_per_node=N <script or -m module> args...`"""
    return run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                *args], **kwargs)


def opt_ds(*args, nproc: int = 1, **kwargs) -> subprocess.CompletedProcess:
    """`opt-ds ARGS` in one process, or under torchrun with `nproc` ranks."""
    if nproc == 1:
        return run([sys.executable, "-m", "opt_ds", *args], **kwargs)
    return torchrun(nproc, "--module", "opt_ds", *args, **kwargs)
