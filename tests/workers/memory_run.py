"""Measure the tensor memory of each rank of a real opt_ds engine on CPU; rank 0 writes the JSON.

`python tests/workers/memory_run.py OUT.json CASE_SPEC` (under torchrun for several ranks).

What is measured (the planner's memory model is checked against it):
- held: the unique storages of every live CPU tensor (found through the garbage collector), sampled
  before and after every instruction of DeepSpeed's pipeline schedule during the second `train_batch`;
  the sample with the largest total is the peak (between instructions; transients inside one kernel
  or one backward are not seen). Split into weights (the module's parameters), gradients (their .grad),
  optimizer state (the optimizer's state and its own parameter/gradient copies), DeepSpeed's gradient
  bucket and the rest.
- activations: the peak, over the same `train_batch`, of the unique storages autograd saves for
  backward (saved_tensors_hooks), parameters excluded. Activation checkpointing keeps its layer inputs
  outside autograd's saved tensors, so this measures layouts without it.
"""
import gc
import json
import os
import sys

import torch


def unique_storages(tensors) -> dict:
    found = {}
    for tensor in tensors:
        if isinstance(tensor, torch.Tensor) and tensor.device.type == "cpu":
            storage = tensor.untyped_storage()
            if storage.nbytes():
                found[storage.data_ptr()] = storage.nbytes()
    return found


def live_storages() -> dict:
    def tensors():
        for obj in gc.get_objects():
            try:
                if isinstance(obj, torch.Tensor):
                    yield obj
            except ReferenceError:
                continue
    return unique_storages(tensors())


def held_by_kind(engine) -> dict:
    live = live_storages()
    inner = getattr(engine.optimizer, "optimizer", engine.optimizer)
    owners = {
        "weights": unique_storages(engine.module.parameters()),
        "grads": unique_storages(p.grad for p in engine.module.parameters()),
        "optimizer": {**unique_storages(v for s in inner.state.values() for v in s.values()),
                      **unique_storages(p for g in inner.param_groups for p in g["params"]),
                      **unique_storages(p.grad for g in inner.param_groups for p in g["params"])},
        # DeepSpeedZeroOptimizer's gradient reduction bucket (reduce_bucket_size elements)
        "bucket": unique_storages(t for b in getattr(engine.optimizer, "ipg_buckets", {}).values() for t in b.buffer),
    }
    kinds, claimed = {}, set()
    for kind, found in owners.items():
        mine = {k: v for k, v in found.items() if k in live and k not in claimed}
        claimed.update(mine)
        kinds[kind] = sum(mine.values())
    kinds["rest"] = sum(v for k, v in live.items() if k not in claimed)
    kinds["total"] = sum(live.values())
    return kinds


class SavedActivations:
    """Peak bytes of the distinct storages autograd holds for backward, parameters excluded."""

    def __init__(self, parameters):
        self.live, self.now, self.peak = {}, 0, 0
        self.parameters = set(unique_storages(parameters))

    def pack(self, tensor):
        storage = tensor.untyped_storage()
        key = storage.data_ptr()
        if key in self.parameters:
            return None, tensor
        count, size = self.live.get(key, (0, storage.nbytes()))
        if count == 0:
            self.now += size
            self.peak = max(self.peak, self.now)
        self.live[key] = (count + 1, size)
        return key, tensor

    def unpack(self, packed):
        key, tensor = packed
        if key is None:
            return tensor
        count, size = self.live.pop(key, (1, 0))
        if count > 1:
            self.live[key] = (count - 1, size)
        else:
            self.now -= size
        return tensor


def sample_every_instruction(engine, peak: dict) -> None:
    """Keep in `peak` the largest sample of held_by_kind taken around each pipeline instruction."""
    def sampled(method):
        def run(self, *args, **kwargs):
            for when in ("before", "after"):
                if when == "after":
                    method(self, *args, **kwargs)
                kinds = held_by_kind(self)
                if kinds["total"] > peak.get("total", -1):
                    peak.update(kinds)
        return run
    engine._INSTRUCTION_MAP = {cmd: sampled(method) for cmd, method in type(engine)._INSTRUCTION_MAP.items()}


def main(out: str, spec: str) -> None:
    from megatron.core import parallel_state

    from opt_ds.bench.cases import parse_case
    from opt_ds.data.synthetic import SyntheticTokens
    from opt_ds.parallel.layout import shutdown_distributed
    from opt_ds.train.batches import ReplicaBatches
    from opt_ds.train.engine import build_engine

    case = parse_case(spec).resolve_precision(False)
    cfg = case.config(world_size=int(os.environ.get("WORLD_SIZE", "1")), steps=4)
    engine = build_engine(cfg)
    batches = ReplicaBatches(SyntheticTokens(case.shape.vocab_size, case.seq), global_batch=case.global_batch,
                             micro_batch=case.micro_batch, data_parallel_size=cfg.data_parallel,
                             data_parallel_rank=parallel_state.get_data_parallel_rank())
    engine.train_batch(batches)             # first step: DeepSpeed allocates its buffers and Adam state
    peak, saved = {}, SavedActivations(engine.module.parameters())
    sample_every_instruction(engine, peak)
    with torch.autograd.graph.saved_tensors_hooks(saved.pack, saved.unpack):
        engine.train_batch(batches)
    record = {"rank": torch.distributed.get_rank(), "stage": engine.stage_id, "peak": peak,
              "activations": saved.peak}
    records = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(records, record)
    if torch.distributed.get_rank() == 0:
        with open(out, "w") as f:
            json.dump({"case": spec, "ranks": records}, f)
    shutdown_distributed()


if __name__ == "__main__":
    main(*sys.argv[1:3])
