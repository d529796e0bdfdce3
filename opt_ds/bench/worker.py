"""One measurement in its own process (group): `python -m opt_ds.bench.worker --job case|peer|layer ...`.

The suite starts one worker per case, under torchrun when the layout has several ranks, because a
DeepSpeed/megatron process group cannot be re-initialised for another layout inside one process; peers
and the layer measurement get a fresh process too, so their memory peaks are their own. Rank 0 writes
the raw measurement as JSON to --result (temp name, then rename); derived metrics are computed by
opt_ds.bench.metrics from that record.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Optional

import torch

from opt_ds.bench.cases import BenchCase
from opt_ds.bench.provenance import device_name
from opt_ds.bench.telemetry import combine_gpu_windows
from opt_ds.bench.timing import slowest_rank_per_step, time_steps
from opt_ds.durable import write_atomically
from opt_ds.parallel.layout import shutdown_distributed


def measure_case(case: BenchCase, steps: int, warmup: int) -> Optional[dict]:
    """Time the real opt_ds training step on every rank of the current launch; rank 0 gets the record."""
    from megatron.core import parallel_state

    from opt_ds.data.synthetic import SyntheticTokens
    from opt_ds.parallel.pipe import recomputed_decoder_layers   # here: the peers' workers never need megatron-core
    from opt_ds.train.batches import ReplicaBatches
    from opt_ds.train.engine import build_engine

    cfg = case.config(world_size=int(os.environ.get("WORLD_SIZE", "1")), steps=steps + warmup)
    engine = build_engine(cfg)
    if case.compile:
        engine.module.compile()
    batches = ReplicaBatches(SyntheticTokens(case.shape.vocab_size, case.seq), global_batch=case.global_batch,
                             micro_batch=case.micro_batch, data_parallel_size=cfg.data_parallel,
                             data_parallel_rank=parallel_state.get_data_parallel_rank())
    mine = time_steps(lambda: engine.train_batch(batches), steps, warmup)
    mine["stage"] = engine.stage_id
    mine["recomputed_layers"] = recomputed_decoder_layers(engine.module)

    ranks = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(ranks, mine)
    if torch.distributed.get_rank() != 0:
        return None
    per_stage = {r["stage"]: r["recomputed_layers"] for r in ranks}
    return {
        "job": "case", "impl": "opt_ds", "case": case.to_dict(), "world_size": len(ranks),
        "steps": steps, "warmup": warmup,
        "step_times_s": slowest_rank_per_step([r["step_times_s"] for r in ranks]),
        "memory": max((r["memory"] for r in ranks), key=lambda m: m["bytes"]),
        "gpu": combine_gpu_windows([r["gpu"] for r in ranks]),
        "loss": mine["loss"],
        "recomputed_layers": sum(per_stage.values()),
        "device": device_name(), "tf32": _tf32_allowed(),
    }


def _tf32_allowed() -> bool:
    return torch.get_float32_matmul_precision() != "highest"


def write_result(path: str, record: dict) -> None:
    write_atomically(path, json.dumps(record))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m opt_ds.bench.worker", description=__doc__.splitlines()[0])
    parser.add_argument("--job", choices=("case", "peer", "layer"), required=True)
    parser.add_argument("--case", required=True, help="the BenchCase as JSON")
    parser.add_argument("--impl", default="opt_ds", help="peer implementation: hf | hf-deepspeed")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--recompute", action="store_true", help="layer job: time with activation recompute")
    parser.add_argument("--result", required=True)
    args = parser.parse_args(argv)
    case = BenchCase.from_dict(json.loads(args.case))

    if args.job == "case":
        record = measure_case(case, args.steps, args.warmup)
    elif args.job == "peer":
        from opt_ds.bench.peer import measure_peer
        record = measure_peer(case, args.impl, args.steps, args.warmup)
    else:
        from opt_ds.bench.layer import measure_layer
        record = measure_layer(case, args.recompute, args.steps, args.warmup)
    if record is not None:
        write_result(args.result, record)
    shutdown_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
