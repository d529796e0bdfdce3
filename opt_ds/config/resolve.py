"""Validation of a RunConfig and everything derived from it once (DP degree, gradient accumulation)."""
from __future__ import annotations

import copy
import os
from dataclasses import dataclass, field
from typing import Optional

from opt_ds.config.deepspeed_json import deepspeed_config, merge_deepspeed_json
from opt_ds.config.ranges import check_ranges
from opt_ds.config.sections import ConfigError, RunConfig
from opt_ds.models.family import family_of


@dataclass(frozen=True)
class ResolvedConfig:
    """A validated RunConfig plus everything derived from it once."""
    run: RunConfig
    shape: object                   # the model family's shape dataclass
    tensor: int
    pipeline: int
    data_parallel: int              # the DP degree (the data section is run.data)
    gradient_accumulation_steps: int
    deepspeed_json: dict = field(compare=False)     # generated, merged with the user's JSON: read once

    @property
    def layout(self):
        from opt_ds.parallel.layout import ParallelLayout
        return ParallelLayout(self.tensor, self.pipeline, self.data_parallel)

    def deepspeed_config(self) -> dict:
        """The run's DeepSpeed JSON, a copy the caller may change (DeepSpeed itself edits the dict it gets)."""
        return copy.deepcopy(self.deepspeed_json)


def resolve(run: RunConfig, world_size: Optional[int] = None) -> ResolvedConfig:
    check_ranges(run)
    shape = run.model.shape()
    par, batch = run.parallel, run.batch
    tp, pp = par.tensor, par.pipeline
    if shape.hidden_size % shape.num_heads:
        raise ConfigError(f"model.hidden_size {shape.hidden_size} is not divisible by model.num_heads "
                          f"{shape.num_heads}")
    if shape.num_heads % tp:
        raise ConfigError(f"model.num_heads {shape.num_heads} is not divisible by parallel.tensor {tp}; "
                          f"choose a tensor-parallel degree that divides the heads "
                          f"({', '.join(str(d) for d in range(1, shape.num_heads + 1) if shape.num_heads % d == 0)})")
    for field, value in family_of(shape).tensor_parallel_divisors(shape).items():
        if field not in ("num_heads", "vocab_size") and value % tp:
            raise ConfigError(f"model.{field} {value} is not divisible by parallel.tensor {tp}; choose a "
                              f"tensor-parallel degree that divides it")
    if shape.vocab_size % tp:
        raise ConfigError(f"model.vocab_size {shape.vocab_size} is not divisible by parallel.tensor {tp}; "
                          f"pad the vocabulary to a multiple of {tp} (OPT's 50272 divides 1, 2, 4, 8, 16, 32)")
    if shape.num_layers < pp:
        raise ConfigError(f"model.num_layers {shape.num_layers} is fewer than parallel.pipeline {pp} stages; "
                          f"use at most {shape.num_layers} pipeline stages")

    if par.recompute in ("none", "selective") and par.activation_checkpoint_interval > 0:
        raise ConfigError(f"parallel.activation_checkpoint_interval {par.activation_checkpoint_interval} recomputes "
                          f"whole decoder layers, but parallel.recompute is {par.recompute}; set "
                          f"parallel.activation_checkpoint_interval=0 or parallel.recompute=full")
    if par.sequence_parallel and tp > 1 and batch.seq_length % tp:
        raise ConfigError(f"batch.seq_length {batch.seq_length} is not divisible by parallel.tensor {tp}, which "
                          f"sequence parallelism splits it by; use a multiple of {tp} or "
                          f"parallel.sequence_parallel=false")
    dp = _data_parallel_degree(par.data, tp, pp, world_size)
    micro, global_batch = batch.micro_batch_size, batch.global_batch_size
    if batch.gradient_accumulation_steps is not None:
        gas = batch.gradient_accumulation_steps
        if micro * gas * dp != global_batch:
            raise ConfigError(
                f"batch.global_batch_size {global_batch} != micro_batch_size {micro} x "
                f"gradient_accumulation_steps {gas} x data-parallel degree {dp} = {micro * gas * dp}; "
                f"fix one of them or drop gradient_accumulation_steps to derive it")
    else:
        if global_batch % (micro * dp):
            raise ConfigError(
                f"batch.global_batch_size {global_batch} is not a multiple of micro_batch_size {micro} x "
                f"data-parallel degree {dp} = {micro * dp}; use e.g. {max(1, global_batch // (micro * dp)) * micro * dp}")
        gas = global_batch // (micro * dp)
    if batch.seq_length > shape.max_position_embeddings:
        raise ConfigError(f"batch.seq_length {batch.seq_length} exceeds model.max_position_embeddings "
                          f"{shape.max_position_embeddings}")
    if len(run.optimizer.betas) != 2:
        raise ConfigError(f"optimizer.betas must be two numbers, got {run.optimizer.betas}; e.g. "
                          "optimizer.betas=[0.9, 0.95]")
    if run.data.train == []:
        raise ConfigError("data.train is empty: list the datasets to train on (- path: PREFIX, weight: 1.0), or "
                          "drop data.train to train on synthetic tokens (data.synthetic)")
    _check_fault_tolerance(run, tp * pp * dp)
    generated = deepspeed_config(run, gas)
    # a disagreeing DeepSpeed JSON fails now, not at engine start
    merged = merge_deepspeed_json(generated, run.deepspeed) if run.deepspeed else generated
    return ResolvedConfig(run, shape, tp, pp, dp, gas, merged)


FAULT_INJECTION_ENV = "OPT_DS_FAULT_INJECTION"


def _check_fault_tolerance(run: RunConfig, world_size: int) -> None:
    health = run.health
    if health.spike_warmup_steps > health.spike_window:
        raise ConfigError(f"health.spike_warmup_steps {health.spike_warmup_steps} exceeds health.spike_window "
                          f"{health.spike_window}: the window must hold the losses the warm-up waits for; raise "
                          "the window or lower the warm-up")
    armed = run.faults.armed()
    if armed and os.environ.get(FAULT_INJECTION_ENV) != "1":
        raise ConfigError(f"faults: {', '.join(f'{k}={v}' for k, v in armed.items())} would deliberately break this "
                          f"run; fault injection is for tests and is armed only when the environment sets "
                          f"{FAULT_INJECTION_ENV}=1. Remove the faults section from this config")
    if not -world_size <= run.faults.rank < world_size:
        raise ConfigError(f"faults.rank {run.faults.rank} is not a rank of this {world_size}-process world")


def _data_parallel_degree(data, tp: int, pp: int, world_size: Optional[int]) -> int:
    if data == "auto":
        if world_size is None:
            return 1
        if world_size % (tp * pp):
            raise ConfigError(f"world size {world_size} is not a multiple of TP x PP = {tp} x {pp}; launch a "
                              f"multiple of {tp * pp} processes")
        return world_size // (tp * pp)
    if not isinstance(data, int) or isinstance(data, bool) or data < 1:
        raise ConfigError(f"parallel.data must be a positive integer or 'auto', got {data!r}")
    if world_size is not None and world_size != tp * pp * data:
        raise ConfigError(f"world size {world_size} != TP x PP x DP = {tp} x {pp} x {data} = {tp * pp * data}; "
                          f"launch {tp * pp * data} processes or set parallel.data=auto")
    return data
