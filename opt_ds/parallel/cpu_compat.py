"""The CPU adaptations that let megatron-core and DeepSpeed run without CUDA (tests, CI, the demo).

Everything CPU-specific lives here (its writes to private internals go through opt_ds.patches) and every
function is a no-op when CUDA is present:
  * megatron-core allocates communication buffers on `torch.cuda.current_device()`: point it at the CPU;
  * megatron-core's model-parallel RNG tracker saves and restores the CUDA generator: swap in a tracker
    that forks the CPU generator instead;
  * DeepSpeed JIT-compiles a shared-memory comm op (~50 s on 2 cores) that gloo never uses: skip it;
  * DeepSpeed's CPU accelerator refuses fp16 unless the CPU has native fp16 kernels, although torch
    computes fp16 on any CPU (slowly): allow it, so the fp16 loss-scaling path runs in CPU tests too.
"""
from __future__ import annotations

import contextlib

import torch

from opt_ds.patches import skip_shm_op, use_cpu_rng_tracker

_applied = False


def running_on_cpu() -> bool:
    return not torch.cuda.is_available()


class CPURNGStatesTracker:
    """Named CPU generator states with the interface of megatron's CudaRNGStatesTracker."""

    def __init__(self):
        self.states_ = {}
        self.seeds_ = set()

    def is_initialized(self):
        return bool(self.states_)

    def reset(self):
        self.states_ = {}
        self.seeds_ = set()

    def get_states(self):
        return {name: state.clone() for name, state in self.states_.items()}

    def set_states(self, states):
        self.states_ = {name: state.clone() for name, state in states.items()}

    def add(self, name, seed):
        if name in self.states_:
            raise RuntimeError(f"rng state {name} already exists")
        self.seeds_.add(seed)
        generator = torch.Generator().manual_seed(seed)
        self.states_[name] = generator.get_state()

    @contextlib.contextmanager
    def fork(self, name="model-parallel-rng"):
        if name not in self.states_:
            raise RuntimeError(f"rng state {name} is not added")
        outer = torch.get_rng_state()
        torch.set_rng_state(self.states_[name])
        try:
            yield
        finally:
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(outer)


def _cpu_current_device():
    return "cpu"


def apply_cpu_adaptations() -> None:
    """Install the CPU adaptations once per process; does nothing on a CUDA machine."""
    global _applied
    if _applied or not running_on_cpu():
        return
    torch.cuda.current_device = _cpu_current_device

    use_cpu_rng_tracker(CPURNGStatesTracker())
    skip_shm_op()

    from deepspeed.accelerator import get_accelerator
    type(get_accelerator()).is_fp16_supported = lambda self: True
    _applied = True
