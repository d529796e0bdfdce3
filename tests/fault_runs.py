"""Runs shared by the fault-tolerance tests: the tiny OPT on two pipeline stages learning `arithmetic` data
(vocabulary 128, so the loss falls from 4.85 to ~2.6 in 60 steps and "final loss" means something), plus one
uninterrupted reference run made once per test session; and the demo's model and corpus, shortened, for the
loss-spike detector on real text."""
from __future__ import annotations

import atexit
import functools
import shutil
import tempfile
from pathlib import Path

from conftest import TINY_MODEL
from multiproc import REPO, opt_ds
from opt_ds.train.metrics import read_metrics

STEPS = 60
BASE = TINY_MODEL + [
    "model.vocab_size=128", "parallel.pipeline=2", "data.synthetic=arithmetic", "batch.global_batch_size=8",
    "batch.micro_batch_size=2", "optimizer.lr=0.01", "optimizer.warmup_steps=5", f"optimizer.decay_steps={STEPS}",
    "train.save_interval=10", "train.eval_interval=1000", "train.eval_iters=4", "train.tensorboard=false"]
FAULT_INJECTION = {"OPT_DS_FAULT_INJECTION": "1"}


def train(run_dir, *overrides, nproc: int = 2, base=BASE, config: str = "-", check: bool = True, timeout: float = 240):
    """`opt-ds train` with the shared config, saving and logging under run_dir; returns the process result."""
    return opt_ds("train", config, *base, f"train.save_dir={run_dir}/ckpt", f"train.log_dir={run_dir}", *overrides,
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


DEMO_STEPS = 50
# ds_configs/demo.yaml (its model, LR schedule and 16x128-token batches on the bundled Shakespeare with its 8k
# BPE) on one process for 50 steps: the loss falls from 9.0 to ~6.1, steeply over the first 20 steps.
DEMO = ["parallel.tensor=1", "parallel.pipeline=1", f"train.steps={DEMO_STEPS}", "train.save_interval=10",
        "train.eval_interval=1000", "train.log_interval=1", "train.tensorboard=false", "sample.prompt=null"]


def demo_train(run_dir, *overrides, **kwargs):
    data = f"data.train=[{{path: {demo_corpus()}}}]"
    return train(run_dir, *overrides, base=DEMO + [data], config=str(REPO / "ds_configs/demo.yaml"), nproc=1,
                 **kwargs)


@functools.lru_cache(maxsize=None)
def demo_corpus() -> Path:
    """The demo's dataset, as launchers/demo.sh makes it."""
    folder = Path(tempfile.mkdtemp(prefix="opt_ds_demo_data_"))
    atexit.register(shutil.rmtree, folder, True)
    opt_ds("preprocess", "--bundled-corpus", "--output-prefix", folder / "shakespeare", "--vocab-size", "8192",
           "--no-progress", timeout=300)
    return folder / "shakespeare"


@functools.lru_cache(maxsize=None)
def demo_clean_run() -> Path:
    run_dir = Path(tempfile.mkdtemp(prefix="opt_ds_demo_clean_"))
    atexit.register(shutil.rmtree, run_dir, True)
    demo_train(run_dir, timeout=1200)
    return run_dir
