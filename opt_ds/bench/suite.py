"""Run benchmark cases one process group at a time and write the reports as results arrive.

Each case runs in a fresh worker (`python -m opt_ds.bench.worker`, under `torchrun --standalone` for
several ranks), then each peer once per distinct shape/batch/precision. The driver itself never starts
CUDA or a process group, so it holds no GPU memory while workers run. Worker output is collected in
workers.log; a worker that fails, runs out of memory or times out becomes a row saying so.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from opt_ds.bench import report
from opt_ds.bench.cases import BenchCase
from opt_ds.durable import write_atomically
from opt_ds.bench.metrics import add_peer_ratios, classify_failure, derive
from opt_ds.bench.provenance import REPO_ROOT, git_commit, versions
from opt_ds.ports import without_rendezvous


@dataclass
class SuiteOptions:
    out_dir: Path
    steps: int = 10
    warmup: int = 3
    peers: tuple = ()
    timeout_s: float = 1800
    peak_tflops: Optional[float] = None
    command: str = ""


def worker_env(nproc: int, tensor: int = 1, fused: bool = True) -> dict:
    env = without_rendezvous(os.environ)     # a worker starts its own world (torchrun's, or one process)
    if not fused:
        env["OPT_DS_FUSED"] = "0"       # opt_ds.models.fused: plain element-wise expressions
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    env["PYTHONUNBUFFERED"] = "1"
    if tensor > 1:
        # megatron's TP layers overlap their gradient all-reduce with the weight-gradient GEMM only when
        # kernels leave the GPU in issue order; it must be set before CUDA starts, i.e. before the worker.
        env.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")
    return env


def worker_command(job: str, case: BenchCase, impl: str, opts: SuiteOptions, result: Path, extra=()) -> list:
    args = ["-m", "opt_ds.bench.worker", "--job", job, "--impl", impl, "--case", case.to_json(),
            "--steps", str(opts.steps), "--warmup", str(opts.warmup), "--result", str(result), *extra]
    nproc = case.world_size if job == "case" else 1
    if nproc == 1:
        return [sys.executable, *args]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *args]


class Suite:
    def __init__(self, opts: SuiteOptions):
        self.opts = opts
        self.rows: list = []
        self._peers_done: set = set()
        opts.out_dir.mkdir(parents=True, exist_ok=True)
        self.run_id = time.strftime("%Y%m%d-%H%M%S") + f"-{os.getpid()}"
        self.context = {"run_id": self.run_id, "command": opts.command, "git_commit": git_commit(),
                        "versions": versions()}
        self.log = opts.out_dir / "workers.log"
        self.chart_note: Optional[str] = None

    # --- running ---------------------------------------------------------------------------------

    def launch(self, job: str, case: BenchCase, impl: str = "opt_ds", extra=()) -> dict:
        """Run one worker to completion; its raw record, or a record of how it failed."""
        with tempfile.TemporaryDirectory(prefix="opt_ds_bench_") as tmp:
            result = Path(tmp) / "result.json"
            cmd = worker_command(job, case, impl, self.opts, result, extra)
            nproc = case.world_size if job == "case" else 1
            started = time.time()
            output, code = self._run(cmd, worker_env(nproc, case.tensor if job == "case" else 1, case.fused))
            with open(self.log, "a") as log:
                log.write(f"\n===== {case.label()} / {impl} ({job}) rc={code} {time.time() - started:.1f}s\n"
                          f"$ {' '.join(cmd)}\n{output}")
            if code == 0 and result.exists():
                return json.loads(result.read_text())
        return {"job": job, "impl": impl, "case": case.to_dict(), "world_size": nproc,
                "error": classify_failure(output),
                "log_tail": output[-4000:]}

    def _run(self, cmd: list, env: dict):
        """Run in a new session so that a timeout can kill torchrun and all its ranks together."""
        proc = subprocess.Popen(cmd, env=env, cwd=os.getcwd(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, start_new_session=True)
        try:
            output, _ = proc.communicate(timeout=self.opts.timeout_s)
            return output, proc.returncode
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            output, _ = proc.communicate()
            return output + f"\n[bench] timed out after {self.opts.timeout_s:.0f} s", "timeout"

    def run_case(self, case: BenchCase) -> list:
        """The case, then any peer not yet measured on its shape; appends the rows and redraws."""
        new = [derive(self.launch("case", case), self.opts.peak_tflops)]
        _progress(new[-1])
        if case.peer:
            for impl in self.opts.peers:
                key = (case.peer_key(), impl)
                if key in self._peers_done:
                    continue
                self._peers_done.add(key)
                new.append(derive(self.launch("peer", case, impl), self.opts.peak_tflops))
                _progress(new[-1])
        self.rows += new
        add_peer_ratios(self.rows)
        self.write(new)
        return new

    # --- reporting -------------------------------------------------------------------------------

    def write(self, new_rows: list) -> None:
        """Append the new rows to results.jsonl; rewrite table.txt and the chart for the whole run."""
        report.append_jsonl(self.opts.out_dir / report.RESULTS, new_rows, self.context)
        write_atomically(self.opts.out_dir / report.TABLE, self.text())
        self.chart_note = report.chart(self.rows, self.opts.out_dir / report.CHART, self.title())

    def title(self) -> str:
        devices = sorted({r["device"] for r in self.rows if r.get("device")})
        v = self.context["versions"]
        return (f"opt_ds bench {self.run_id} on {', '.join(devices) or 'unknown device'} — torch {v['torch']}, "
                f"deepspeed {v['deepspeed']}, commit {self.context['git_commit']}")

    def text(self) -> str:
        return "\n".join([self.title(), "", report.table(self.rows), "", report.formulas(self.rows)])


def _progress(row: dict) -> None:
    if row["status"] != "ok":
        print(f"[bench] {row['case']} / {row['impl']}: {row['status'].upper()}", flush=True)
        return
    print(f"[bench] {row['case']} / {row['impl']}: {row['step_time_s']:.4g} s/step (median; min "
          f"{row['step_time_min_s']:.4g}, max {row['step_time_max_s']:.4g}, spread {report.spread_text(row)}), "
          f"{row['tokens_per_s_per_gpu']:,.0f} tokens/s/GPU, "
          f"{row['tflops']['model']['tflops_per_gpu']:.4g} TFLOP/s/GPU (model FLOPs)", flush=True)
