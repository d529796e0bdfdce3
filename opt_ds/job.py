"""Run DeepSpeed's runner as one job that a SIGTERM or SIGINT stops gracefully, leaving no process behind.

DeepSpeed alone does not: on one node its runner dies to SIGTERM at once while the ranks train on, and its
per-node launcher answers a signal by terminating the ranks with a 30 s grace before SIGKILL, mid-save for a
large model; a Ctrl-C reaches every rank of the terminal's process group as a KeyboardInterrupt. So the
runner starts in its own session (the terminal's Ctrl-C reaches only this process), and a SIGTERM or SIGINT
here becomes a SIGTERM to each rank process: each finishes its step, saves and exits 0 (opt_ds.train.signals),
then DeepSpeed's launcher and runner exit with the ranks' status, which this process returns. A second signal
kills the whole job at once if it is a SIGINT (Ctrl-C twice); a repeated SIGTERM changes nothing. When the
runner exits, whatever it started and left running is ended.

Ranks on other nodes hang off pdsh/ssh, not off this process: for a multi-node hostfile the signal goes to
DeepSpeed's runner, which kills them without a checkpoint (`--launcher slurm` stops them gracefully).
"""
from __future__ import annotations

import os
import signal
import subprocess

import psutil

FORWARDED = (signal.SIGTERM, signal.SIGINT)
LEFTOVER_GRACE_SECONDS = 10


def is_rank(process: psutil.Process) -> bool:
    """A training rank as DeepSpeed's launcher starts it: `python -u -m opt_ds --local_rank=N train ...`."""
    try:
        cmdline = process.cmdline()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return False
    return any(a == "-m" and b == "opt_ds" for a, b in zip(cmdline, cmdline[1:]))


class Job:
    def __init__(self, cmd: list, ranks_here: bool):
        self.cmd = cmd
        self.ranks_here = ranks_here    # the ranks are descendants of the runner (one node: no pdsh)
        self.runner: subprocess.Popen = None
        self.stop_signal = None
        self.signalled = set()          # pids of the ranks asked to stop

    def run(self) -> int:
        """Start the runner, wait for it, return its exit status (128 + N when it died to signal N)."""
        previous = {s: signal.getsignal(s) for s in FORWARDED}
        for signum in FORWARDED:
            signal.signal(signum, self._on_signal)
        try:
            self.runner = subprocess.Popen(self.cmd, start_new_session=True)
            status = self._wait()
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)
        self._end_leftovers()
        status = status if status >= 0 else 128 - status
        if self.stop_signal is not None:
            print(f"[opt_ds] launch: the job stopped on {self.stop_signal}; exit status {status}", flush=True)
        return status

    def _wait(self) -> int:
        while True:
            try:
                return self.runner.wait(timeout=0.5)
            except subprocess.TimeoutExpired:
                if self.stop_signal is not None and self.ranks_here:
                    self._stop_ranks()          # ranks that started after the signal

    def _stop_ranks(self) -> None:
        """SIGTERM to the ranks not asked yet."""
        try:
            descendants = psutil.Process(self.runner.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return
        for process in descendants:
            if process.pid not in self.signalled and is_rank(process):
                try:
                    process.send_signal(signal.SIGTERM)
                except psutil.NoSuchProcess:
                    continue
                self.signalled.add(process.pid)

    def _on_signal(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self.stop_signal is not None:
            if signum != signal.SIGINT:         # a repeated SIGTERM (a scheduler, a wrapper) must not lose the save
                print(f"[opt_ds] launch: {name} again: already stopping (Ctrl-C kills the job at once)", flush=True)
                return
            print(f"[opt_ds] launch: {name} again: killing the job now, without a checkpoint", flush=True)
            if self.runner is not None:
                self._kill_group(signal.SIGKILL)
            return
        self.stop_signal = name
        if self.runner is None:
            return                              # the wait loop asks the ranks once they exist
        if self.ranks_here:
            self._stop_ranks()
            print(f"[opt_ds] launch: {name}: asked the {len(self.signalled)} rank(s) to finish their step, save "
                  "and stop; waiting for them (Ctrl-C again kills the job at once)", flush=True)
        else:
            print(f"[opt_ds] launch: {name}: passed to DeepSpeed's runner, which stops the ranks on the other "
                  "nodes without a checkpoint (--launcher slurm stops them gracefully)", flush=True)
            self.runner.send_signal(signum)

    def _left_in_group(self) -> list:
        """The processes left in the runner's process group (its pid)."""
        found = []
        for process in psutil.process_iter():
            try:
                if os.getpgid(process.pid) == self.runner.pid and process.status() != psutil.STATUS_ZOMBIE:
                    found.append(process)
            except (ProcessLookupError, PermissionError, psutil.NoSuchProcess):
                pass
        return found

    def _kill_group(self, signum) -> None:
        try:
            os.killpg(self.runner.pid, signum)
        except ProcessLookupError:
            pass

    def _end_leftovers(self) -> None:
        """The runner exited: nothing it started may outlive it (a rank left behind would keep training
        and writing the save folder)."""
        left = self._left_in_group()
        if not left:
            return
        print(f"[opt_ds] launch: the runner exited but {len(left)} of its processes still run; terminating them",
              flush=True)
        self._kill_group(signal.SIGTERM)
        _, alive = psutil.wait_procs(left, timeout=LEFTOVER_GRACE_SECONDS)
        if alive:
            self._kill_group(signal.SIGKILL)
            psutil.wait_procs(alive, timeout=LEFTOVER_GRACE_SECONDS)
