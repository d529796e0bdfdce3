"""Build the DeepSpeed pipeline engine for a resolved config: model, AdamW, LR schedule, ZeRO, precision."""
from __future__ import annotations

import functools

import torch

from opt_ds.config import ResolvedConfig
from opt_ds.parallel.pipe import build_pipeline
from opt_ds.train.schedule import lr_multiplier


def parameter_groups(module: torch.nn.Module, weight_decay: float) -> list:
    """Weight decay on matrices and embeddings; none on biases and LayerNorm parameters."""
    decay, no_decay = [], []
    for param in module.parameters():
        if param.requires_grad:
            (decay if param.dim() >= 2 else no_decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def make_optimizer(module: torch.nn.Module, cfg: ResolvedConfig) -> torch.optim.Optimizer:
    opt = cfg.run.optimizer
    fused = torch.cuda.is_available()
    return torch.optim.AdamW(parameter_groups(module, opt.weight_decay), lr=opt.lr, betas=tuple(opt.betas),
                             eps=opt.eps, fused=fused, foreach=None if fused else False)


def make_scheduler(optimizer, cfg: ResolvedConfig):
    opt = cfg.run.optimizer
    multiplier = functools.partial(
        lr_multiplier, warmup_steps=opt.warmup_steps, decay_steps=opt.decay_steps or cfg.run.train.steps,
        min_ratio=opt.min_lr_ratio, style=opt.schedule)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, multiplier)


def build_engine(cfg: ResolvedConfig):
    """Initialise the process groups for the layout and return the DeepSpeed PipelineEngine."""
    import deepspeed

    layout = cfg.layout
    layout.initialize()
    run = cfg.run
    module = build_pipeline(cfg.shape, layout, seed=run.train.seed,
                            activation_checkpoint_interval=run.parallel.activation_checkpoint_interval,
                            partition_method=run.parallel.partition_method)
    engine, _, _, _ = deepspeed.initialize(
        model=module,
        optimizer=make_optimizer(module, cfg),
        lr_scheduler=lambda optimizer: make_scheduler(optimizer, cfg),
        config=cfg.deepspeed_config(),
    )
    return engine
