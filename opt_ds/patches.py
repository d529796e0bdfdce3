"""Every use of DeepSpeed's and megatron-core's private internals, in one module.

opt_ds reads or replaces a few things that are not those libraries' public API. Each is a `Private` entry
below, naming the versions it was written for, and every patch asserts its attribute before touching it.
`check_installed()` runs when the first engine is built (and `check_engine` on every engine), so a DeepSpeed
or megatron-core upgrade that drops one fails at start-up with a message naming it, not silently mid-run.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable, Iterator

DEEPSPEED = "deepspeed 0.19.8"
MEGATRON = "megatron-core 0.16.1"


class PrivateAPIChanged(RuntimeError):
    """An installed DeepSpeed or megatron-core lacks an internal that opt_ds patches: not the user's input,
    so a traceback, but one that says which attribute and which versions opt_ds was written for."""


@dataclass(frozen=True)
class Private:
    owner: str              # "package.module" or "package.module:Class"; "engine..." = on each built engine
    attribute: str
    written_for: str
    use: str

    def find_owner(self):
        module, _, qualname = self.owner.partition(":")
        owner = importlib.import_module(module)
        for name in filter(None, qualname.split(".")):
            owner = getattr(owner, name)
        return owner

    def check(self, owner=None) -> None:
        owner = self.find_owner() if owner is None else owner
        if not hasattr(owner, self.attribute):
            raise PrivateAPIChanged(
                f"{self.owner.replace(':', '.')}.{self.attribute} is gone from the installed version; opt_ds uses "
                f"it ({self.use}) and was written for {self.written_for}: install that version, or update "
                f"opt_ds/patches.py")


PIPELINE_ENGINE = "deepspeed.runtime.pipe.engine:PipelineEngine"

INSTRUCTION_MAP = Private(PIPELINE_ENGINE, "_INSTRUCTION_MAP", DEEPSPEED,
                          "a hook right before the pipeline's gradient reduction: replica probe, fault injection")
FP32_CLIPPING = Private(PIPELINE_ENGINE, "clip_fp32_gradients", DEEPSPEED,
                        "ZeRO-0 fp32 clipping replaced by one that counts every parameter once")
GLOBAL_GRAD_NORM = Private("engine", "_global_grad_norm", DEEPSPEED,
                           "the gradient norm reported after the replaced ZeRO-0 clipping")
CONFIG = Private("engine", "_config", DEEPSPEED, "gradient clipping changed by divergence recovery")
GRADIENT_CLIPPING = Private("engine._config", "gradient_clipping", DEEPSPEED,
                            "gradient clipping changed by divergence recovery")
CHECKPOINT_WRITES = Private("engine.checkpoint_engine", "save", DEEPSPEED,
                            "fault injection: a rank dies half-way through writing a checkpoint file")
TOTAL_LOSS = Private("engine", "total_loss", DEEPSPEED,
                     "eval_batch after a training step would add the old loss to its outputs")
MICRO_OFFSET = Private("engine.module", "micro_offset", DEEPSPEED,
                       "the forward-pass count DeepSpeed seeds dropout from, saved in the run state")
HP_GRAD = Private("parameter", "_hp_grad", DEEPSPEED,
                  "the bf16 optimizer's fp32 gradient of a parameter, before the data-parallel reduction")
SHM_OP = Private("deepspeed.comm.torch", "build_shm_op", DEEPSPEED,
                 "CPU: skip JIT-compiling a shared-memory op that gloo never uses")
RNG_TRACKER = Private("megatron.core.tensor_parallel.random", "_CUDA_RNG_STATE_TRACKER", MEGATRON,
                      "CPU: a model-parallel RNG tracker that forks the CPU generator")
RNG_TRACKER_READY = Private("megatron.core.tensor_parallel.random", "_CUDA_RNG_STATE_TRACKER_INITIALIZED",
                            MEGATRON, "CPU: mark the CPU RNG tracker as set up")
DATASET_KEY = Private("megatron.core.datasets.gpt_dataset:GPTDataset", "_key_config_attributes", MEGATRON,
                      "the dataset cache key also holds opt_ds's document_split_seed (opt_ds.data.datasets)")
DS_TO_UNIVERSAL = Private("deepspeed.checkpoint.ds_to_universal", "main", DEEPSPEED,
                          "conversion to a universal checkpoint, run in-process with its command-line arguments")

# Checked by check_installed (on the installed classes and modules) and check_engine (on a built engine).
AT_IMPORT = (INSTRUCTION_MAP, FP32_CLIPPING, SHM_OP, RNG_TRACKER, RNG_TRACKER_READY, DATASET_KEY, DS_TO_UNIVERSAL)
ON_ENGINE = (GLOBAL_GRAD_NORM, CONFIG, GRADIENT_CLIPPING, CHECKPOINT_WRITES, TOTAL_LOSS, MICRO_OFFSET)

_checked = False


def check_installed() -> None:
    """Every private attribute opt_ds relies on exists in the installed DeepSpeed and megatron-core."""
    global _checked
    if not _checked:
        for entry in AT_IMPORT:
            entry.check()
        _checked = True


def check_engine(engine) -> None:
    check_installed()
    for entry in ON_ENGINE:
        entry.check(_on_engine(engine, entry.owner))


def _on_engine(engine, owner: str):
    for name in owner.split(".")[1:]:
        engine = getattr(engine, name)
    return engine


# --- the patches -------------------------------------------------------------------------------------

def before_reduce_grads(engine, hook: Callable[[], None]) -> None:
    """Run `hook()` on this rank right before the pipeline engine's gradient reduction (DeepSpeed's
    ReduceGrads instruction). Hooks chain: the one installed last runs first."""
    from deepspeed.runtime.pipe import schedule
    INSTRUCTION_MAP.check(engine)
    previous = engine._INSTRUCTION_MAP[schedule.ReduceGrads]

    def reduce_grads(self):
        hook()
        previous(self)

    engine._INSTRUCTION_MAP = {**engine._INSTRUCTION_MAP, schedule.ReduceGrads: reduce_grads}


def replace_fp32_clipping(engine, clip: Callable) -> None:
    """`clip(engine)` instead of DeepSpeed's ZeRO-0 fp32 gradient clipping; it reports its norm with
    `set_global_grad_norm`."""
    import types
    FP32_CLIPPING.check(engine)
    engine.clip_fp32_gradients = types.MethodType(clip, engine)


def set_global_grad_norm(engine, norm: float) -> None:
    GLOBAL_GRAD_NORM.check(engine)
    engine._global_grad_norm = norm


def set_gradient_clipping(engine, clip: float) -> None:
    """The clipping threshold of the next updates: DeepSpeed's config copy and, under ZeRO, its optimizer's."""
    CONFIG.check(engine)
    GRADIENT_CLIPPING.check(engine._config)
    engine._config.gradient_clipping = clip
    if hasattr(engine.optimizer, "clip_grad"):
        engine.optimizer.clip_grad = clip


def wrap_checkpoint_writes(engine, wrap: Callable[[Callable], Callable]) -> None:
    """Replace the engine's checkpoint file writer `save(state_dict, path)` by `wrap(save)`."""
    writer = engine.checkpoint_engine
    CHECKPOINT_WRITES.check(writer)
    writer.save = wrap(writer.save)


def forget_last_loss(engine) -> None:
    """Before `eval_batch`: drop the loss DeepSpeed keeps from the last step, or it is added to the outputs."""
    TOTAL_LOSS.check(engine)
    engine.total_loss = None


def forward_passes(engine) -> int:
    MICRO_OFFSET.check(engine.module)
    return engine.module.micro_offset


def set_forward_passes(engine, count: int) -> None:
    MICRO_OFFSET.check(engine.module)
    engine.module.micro_offset = count


def local_gradients(engine) -> Iterator:
    """This rank's gradients as they are before the data-parallel reduction (fp32 master copies under the
    bf16 optimizer, which accumulates there)."""
    params = [p for p in engine.module.parameters() if p.requires_grad]
    if engine.using_bf16_optimizer:
        HP_GRAD.check(params[0])
    for param in params:
        grad = getattr(param, "_hp_grad", None) if engine.using_bf16_optimizer else param.grad
        if grad is not None:
            yield grad


def use_cpu_rng_tracker(tracker) -> None:
    from megatron.core.tensor_parallel import random as megatron_random
    RNG_TRACKER.check(megatron_random)
    RNG_TRACKER_READY.check(megatron_random)
    megatron_random._CUDA_RNG_STATE_TRACKER = tracker
    megatron_random._CUDA_RNG_STATE_TRACKER_INITIALIZED = True


def skip_shm_op() -> None:
    # `import deepspeed.comm.torch as m` resolves to the function deepspeed.comm.torch, not the module.
    module = importlib.import_module("deepspeed.comm.torch")
    SHM_OP.check(module)
    module.build_shm_op = lambda: None


def run_ds_to_universal(input_folder: str, output_folder: str) -> None:
    """DeepSpeed's `ds_to_universal` in this process, one worker, with the arguments of its command line."""
    import argparse
    from deepspeed.checkpoint import ds_to_universal
    DS_TO_UNIVERSAL.check(ds_to_universal)
    ds_to_universal.main(argparse.Namespace(
        input_folder=input_folder, output_folder=output_folder, num_extract_workers=1, num_merge_workers=1,
        keep_temp_folder=False, strict=True, inject_missing_state=False))
