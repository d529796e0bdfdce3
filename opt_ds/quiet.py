"""Third-party start-up noise, filtered in one place.

Each entry below is a warning (or log line) that torch, DeepSpeed or megatron-core prints on every start and
that asks nothing of the user, with the reason it is safe to hide. Everything else is shown: on global rank 0
only (the other ranks would repeat it), once per place. `--verbose` (or OPT_DS_VERBOSE=1, which a launch passes
on to its ranks) shows everything, on every rank.
"""
from __future__ import annotations

import logging
import os
import re
import sys
import warnings
from dataclasses import dataclass
from typing import Optional

VERBOSE_ENV = "OPT_DS_VERBOSE"


@dataclass(frozen=True)
class Noise:
    message: str                        # regular expression matched at the start of the message
    reason: str
    category: type = Warning            # a Python warning of this class ...
    logger: Optional[str] = None        # ... or a record of this logger instead


NOISE = (
    Noise("Transformer Engine and Apex are not installed", category=UserWarning,
          reason="megatron-core falls back to its plain-PyTorch kernels, which are the ones opt_ds uses; neither "
                 "library is needed"),
    Noise("Warning. tp_group is None", category=DeprecationWarning,
          reason="megatron-core's layers find the tensor-parallel group in parallel_state, which opt_ds sets up "
                 "(opt_ds/parallel/layout.py); the deprecation is of megatron's own calling convention"),
    Noise(r"`torch\.distributed\.all_gather_into_tensor` is deprecated", category=FutureWarning,
          reason="called inside DeepSpeed and megatron-core, not by opt_ds; nothing for a user to change"),
    Noise(r"c10d::broadcast_: an autograd kernel was not registered .* may lead to silently incorrect behavior",
          category=UserWarning,
          reason="raised when backward passes a tensor a broadcast wrote into (the pipeline's tied-embedding and "
                 "TP-replica synchronisation); no gradient is meant to flow through that broadcast, and the "
                 "parity tests (tests/test_model_parity.py) prove the gradients equal a single process's"),
    Noise("Setting accelerator to CPU", logger="DeepSpeed",
          reason="on a machine without GPUs the CPU is the intended device (the demo and tests run there)"),
    Noise("Unable to find hostfile, will proceed with training with local resources only", logger="DeepSpeed",
          reason="`opt-ds launch --num-gpus N` runs on this machine on purpose; with --hostfile, opt-ds launch "
                 "refuses a missing file before DeepSpeed starts"),
)


class _DropNoise(logging.Filter):
    def __init__(self, patterns):
        super().__init__()
        self.patterns = [re.compile(p) for p in patterns]

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(p.match(message) for p in self.patterns)


def _rank() -> int:
    return int(os.environ.get("RANK", "0") or 0)


def install(verbose: bool = False) -> None:
    """Hide the NOISE (call before torch, DeepSpeed or megatron-core are imported; idempotent)."""
    if verbose:
        os.environ[VERBOSE_ENV] = "1"          # the ranks a launch starts inherit it
        warnings.simplefilter("default")
        return
    if _rank() != 0:
        warnings.simplefilter("ignore")
    for noise in NOISE:
        if noise.logger is None:
            warnings.filterwarnings("ignore", message=noise.message, category=noise.category)
    by_logger = {}
    for noise in NOISE:
        if noise.logger is not None:
            by_logger.setdefault(noise.logger, []).append(noise.message)
    for name, patterns in by_logger.items():
        logger = logging.getLogger(name)        # the same object the library configures when it is imported
        logger.filters = [f for f in logger.filters if not isinstance(f, _DropNoise)]
        logger.addFilter(_DropNoise(patterns))


DEEPSPEED_RUNNER = "deepspeed.launcher.runner"


def run_deepspeed_runner(args: list) -> None:
    """`python -m opt_ds.quiet ARGS...`: DeepSpeed's runner (`python -m deepspeed.launcher.runner ARGS...`)
    with the noise hidden. For a run on this machine the accelerator is named for the per-node launcher it
    starts, which would otherwise log its detection once more (the same choice DeepSpeed makes itself)."""
    import runpy
    install(os.environ.get(VERBOSE_ENV) == "1")
    if "--hostfile" not in args and "DS_ACCELERATOR" not in os.environ:
        import torch
        os.environ["DS_ACCELERATOR"] = "cuda" if torch.cuda.is_available() else "cpu"
    sys.argv = [DEEPSPEED_RUNNER, *args]
    runpy.run_module(DEEPSPEED_RUNNER, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    run_deepspeed_runner(sys.argv[1:])
