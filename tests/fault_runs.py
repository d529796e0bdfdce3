"""Runs shared by the fault-tolerance tests: the tiny OPT on two pipeline stages learning `arithmetic` data
(vocabulary 128, so the loss falls from 4.85 to ~2.6 in 60 steps and "final loss" means something), plus one
uninterrupted reference run made once per test session."""
from __future__ import annotations

import atexit
import functools
import shutil
import tempfile
from pathlib import Path

from conftest import TINY_MODEL
from multiproc import opt_ds
from opt_ds.train.metrics import read_metrics

STEPS = 60
BASE = TINY_MODEL + [
    "model.vocab_size=128", "parallel.pipeline=2", "data.synthetic=arithmetic", "batch.global_batch_size=8",
    "batch.micro_batch_size=2", "optimizer.lr=0.01", "optimizer.warmup_steps=5", f"optimizer.decay_steps={STEPS}",
    "train.save_interval=10", "train.eval_interval=1000", "train.eval_iters=4", "train.tensorboard=false"]
FAULT_INJECTION = {"OPT_DS_FAULT_INJECTION": "1"}


def train(run_dir, *overrides, nproc: int = 2, base=BASE, check: bool = True, timeout: float = 240):
    """`opt-ds train` with the shared config, saving and logging under run_dir; returns the process result."""
    return opt_ds("train", "-", *base, f"train.save_dir={run_dir}/ckpt", f"train.log_dir={run_dir}", *overrides,
                  nproc=nproc, check=check, timeout=timeout, **FAULT_INJECTION)


def events(run_dir, event: str) -> list:
    return read_metrics(Path(run_dir) / "metrics.jsonl", event)


def trajectory(run_dir, field: str = "loss") -> dict:
    """step -> value of the run's final trajectory (after a rollback, the repeated steps replace the first)."""
    return {r["step"]: r[field] for r in events(run_dir, "train")}


def final_eval_loss(run_dir) -> float:
    return events(run_dir, "eval")[-1]["loss"]


@functools.lru_cache(maxsize=None)
def clean_run() -> Path:
    """The uninterrupted reference: STEPS steps, checkpoints every 10."""
    run_dir = Path(tempfile.mkdtemp(prefix="opt_ds_clean_"))
    atexit.register(shutil.rmtree, run_dir, True)
    train(run_dir, f"train.steps={STEPS}")
    return run_dir
