"""Finding lm-evaluation-harness tasks offline, and saying plainly when one cannot be found or loaded.

Tasks are the harness's own (its YAML registry), plus YAML folders given with `--include-path`, plus the
small local tasks shipped in `opt_ds/eval/local_tasks/`. The registry of the harness's ~15k tasks takes a
while to index, so it is only indexed when a requested name is not among the local ones. Datasets are
loaded with the hub switched off (`HF_DATASETS_OFFLINE=1` unless the caller set it): a task whose data is
neither local nor in the datasets cache is refused before any model is built.
"""
from __future__ import annotations

import difflib
import logging
import os
from pathlib import Path
from typing import Optional, Sequence

from opt_ds.errors import UserError

NOT_METRICS = ("alias", "sample_len", "sample_count")
LOCAL_TASKS = Path(__file__).resolve().parent / "local_tasks"


class TaskError(UserError):
    """A task that is unknown or whose data cannot be loaded; the message says how to fix it."""


def offline() -> None:
    """No dataset hub: the harness and `datasets` read local files and their cache only."""
    for name in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"):
        os.environ.setdefault(name, "1")
    logging.getLogger("lm_eval").setLevel(logging.ERROR)


def task_manager(names: Sequence[str], include_paths: Sequence[str | os.PathLike] = ()):
    """A harness TaskManager that knows every name in `names`, or a TaskError listing the close ones."""
    offline()
    from lm_eval.tasks import TaskManager
    for path in include_paths:
        if not Path(path).is_dir():
            raise TaskError(f"--include-path {path} is not a folder of task YAML files")
    paths = [str(LOCAL_TASKS), *map(str, include_paths)]
    manager = TaskManager(include_path=paths, include_defaults=False)
    if not set(names) <= set(manager.all_tasks):
        manager = TaskManager(include_path=paths)
    unknown = [name for name in names if name not in manager.all_tasks]
    if unknown:
        hints = "; ".join(f"{name!r}: {', '.join(difflib.get_close_matches(name, manager.all_tasks, n=5)) or 'none'}"
                          for name in unknown)
        raise TaskError(f"unknown task(s) {', '.join(unknown)} (close names: {hints}); `lm-eval ls tasks` lists "
                        "them all, and --include-path DIR adds your own YAML tasks")
    return manager


def check_loadable(manager, names: Sequence[str]) -> None:
    """Load every task's data now (from local files or the datasets cache), so a missing one fails here."""
    try:
        manager.load(list(names))
    except Exception as err:        # datasets raises many kinds (ConnectionError, FileNotFoundError, ValueError)
        cache = os.environ.get("HF_DATASETS_CACHE", str(Path.home() / ".cache" / "huggingface" / "datasets"))
        raise TaskError(
            f"the data of task(s) {', '.join(names)} cannot be loaded offline ({type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else ''}); looked in the datasets cache {cache} and the task "
            "YAML's local files. Copy the dataset into that cache (run the task once on a machine with hub "
            "access and copy ~/.cache/huggingface), or point the task at local JSONL with --include-path "
            "(docs/eval.md)") from None


def flat_metrics(results: dict, prefix: str = "") -> dict:
    """{'task/metric': value} of a harness results dict (numbers only, the filter suffix dropped)."""
    flat = {}
    for task, metrics in results.get("results", {}).items():
        for key, value in metrics.items():
            metric, _, _ = key.partition(",")
            if isinstance(value, (int, float)) and not isinstance(value, bool) and metric not in NOT_METRICS:
                flat[f"{prefix}{task}/{metric}"] = float(value)
    return flat


def table(results: dict) -> str:
    """The papers' table: task, metric, value, stderr (one row per task and metric)."""
    rows = [("task", "metric", "value", "stderr")]
    for task, metrics in results.get("results", {}).items():
        for key, value in metrics.items():
            metric, _, _ = key.partition(",")
            if metric.endswith("_stderr") or metric in NOT_METRICS or not isinstance(value, (int, float)) or \
                    isinstance(value, bool):
                continue
            stderr = metrics.get(key.replace(metric, f"{metric}_stderr", 1))
            stderr = f"{stderr:.4f}" if isinstance(stderr, (int, float)) else "-"
            rows.append((task, metric, f"{value:.4f}", stderr))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    lines = [" | ".join(cell.ljust(w) for cell, w in zip(row, widths)) for row in rows]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(lines)


def evaluate(lm, manager, names: Sequence[str], *, num_fewshot: Optional[int] = None, limit: Optional[int] = None,
             bootstrap_iters: int = 1000, log_samples: bool = False) -> Optional[dict]:
    """The harness's simple_evaluate on `lm` (every rank calls it; the results come back on local rank 0)."""
    from lm_eval import simple_evaluate
    return simple_evaluate(model=lm, tasks=list(names), num_fewshot=num_fewshot, limit=limit,
                           bootstrap_iters=bootstrap_iters, log_samples=log_samples, task_manager=manager)
