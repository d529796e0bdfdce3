"""The peer a user would pick instead: Hugging Face's model of the family (`OPTForCausalLM`,
`LlamaForCausalLM`) on the same shape, batch and precision.

Two ways to train it, measured as a plain training script would on one device:
  hf            plain PyTorch step: bf16/fp16 autocast on GPU (fp32 on CPU), AdamW, gradient clipping
  hf-deepspeed  the same model inside a DeepSpeed ZeRO-1 engine with opt_ds's own DeepSpeed config
                (bf16 weights, fp32 gradient accumulation), so only the model and pipeline code differ
Both use opt_ds's optimizer (same AdamW settings and parameter groups, fused on CUDA) and the
same synthetic token stream. With activation checkpointing on in the case, HF recomputes every layer.
"""
from __future__ import annotations

import contextlib

import torch

from opt_ds.bench.cases import BenchCase, with_changes
from opt_ds.bench.provenance import device_name
from opt_ds.bench.timing import time_steps

PEER_IMPLS = ("hf", "hf-deepspeed")
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def single_device(case: BenchCase) -> BenchCase:
    """The case as one device runs it: no TP/PP/DP, one micro-batch per optimizer step, eager."""
    return with_changes(case, {"tp": 1, "pp": 1, "dp": 1, "gas": 1, "compile": False})


def build_hf_model(case: BenchCase, device: torch.device):
    from opt_ds.models.family import family_of
    with device:
        model = family_of(case.shape).hf_model(case.shape)
    if case.ac_interval > 0:
        model.gradient_checkpointing_enable()
    return model.train()


def token_stream(case: BenchCase, device: torch.device):
    from opt_ds.data.synthetic import SyntheticTokens
    from opt_ds.train.batches import ReplicaBatches

    batches = ReplicaBatches(SyntheticTokens(case.shape.vocab_size, case.seq), global_batch=case.micro_batch,
                             micro_batch=case.micro_batch, data_parallel_size=1, data_parallel_rank=0)
    for tokens, _ in batches:
        yield tokens.to(device, non_blocking=True)


def plain_step(case: BenchCase, cfg, device: torch.device):
    from opt_ds.train.engine import make_optimizer

    model = build_hf_model(case, device)
    optimizer = make_optimizer(model, cfg)
    tokens = token_stream(case, device)
    dtype = AUTOCAST_DTYPES.get(case.precision)
    autocast = (lambda: torch.autocast(device.type, dtype=dtype)) if dtype else contextlib.nullcontext
    scaler = torch.amp.GradScaler(device.type) if case.precision == "fp16" else None
    clip = cfg.run.optimizer.clip_grad

    def step():
        x = next(tokens)
        with autocast():
            loss = model(input_ids=x, labels=x).loss
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()
    return step


def deepspeed_step(case: BenchCase, cfg, device: torch.device):
    import deepspeed

    from opt_ds.train.engine import make_optimizer

    cfg.layout.initialize()          # one-process world (gloo on CPU), CPU adaptations
    ds_config = cfg.deepspeed_config()
    ds_config.pop("pipeline")
    model = build_hf_model(case, device)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=make_optimizer(model, cfg), config=ds_config)
    tokens = token_stream(case, device)

    def step():
        x = next(tokens)
        loss = engine(input_ids=x, labels=x).loss
        engine.backward(loss)
        engine.step()
        return loss.detach()
    return step


def measure_peer(case: BenchCase, impl: str, steps: int, warmup: int) -> dict:
    if impl not in PEER_IMPLS:
        raise ValueError(f"unknown peer {impl!r}; choose one of {', '.join(PEER_IMPLS)}")
    case = single_device(case)
    cfg = case.config(world_size=1, steps=steps + warmup)
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    torch.manual_seed(cfg.run.train.seed)
    step = plain_step(case, cfg, device) if impl == "hf" else deepspeed_step(case, cfg, device)
    record = time_steps(step, steps, warmup)
    record.update({
        "job": "peer", "impl": impl, "case": case.to_dict(), "world_size": 1, "steps": steps, "warmup": warmup,
        "recomputed_layers": case.shape.num_layers if case.ac_interval > 0 else 0,
        "device": device_name(), "tf32": torch.get_float32_matmul_precision() != "highest",
    })
    return record
