"""Build the DeepSpeed pipeline engine for a resolved config: model, AdamW, LR schedule, ZeRO, precision."""
from __future__ import annotations

import torch

from opt_ds.config import ResolvedConfig
from opt_ds.patches import check_engine, replace_fp32_clipping, set_global_grad_norm
from opt_ds.train.schedule import LearningRateSchedule


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


def make_scheduler(optimizer, cfg: ResolvedConfig) -> LearningRateSchedule:
    opt = cfg.run.optimizer
    return LearningRateSchedule(optimizer, warmup_steps=opt.warmup_steps,
                                decay_steps=opt.decay_steps or cfg.run.train.steps, min_ratio=opt.min_lr_ratio,
                                style=opt.schedule)


def global_grad_norm(engine) -> torch.Tensor:
    """The 2-norm of all gradients of the model, each parameter counted once.

    TP-split parameters count on every TP rank, replicated ones on TP rank 0 only, and the tied
    embedding's second copy (DeepSpeed marks it `ds_pipe_replicated`) not at all; the squares are summed
    over the stages and TP ranks of one replica (DP replicas hold the same reduced gradients).
    """
    from deepspeed.runtime.utils import is_model_parallel_parameter
    grid = engine.grid
    first_tp_rank = grid.get_slice_parallel_rank() == 0
    squares = torch.zeros((), dtype=torch.float32, device=engine.device)
    for param in engine.module.parameters():
        if param.grad is None or getattr(param, "ds_pipe_replicated", False):
            continue
        if is_model_parallel_parameter(param) or first_tp_rank:
            squares += param.grad.detach().float().pow(2).sum()
    torch.distributed.all_reduce(squares, group=grid.get_model_parallel_group())
    return squares.sqrt()


def _clip_fp32_gradients(engine) -> None:
    """Replaces DeepSpeed's ZeRO-0 fp32 clipping, which under pipeline parallelism drops the replicated
    parameters of every stage but the first and counts the tied embedding twice (deepspeed 0.19.8
    runtime/utils.clip_grad_norm_); ZeRO-1 has its own, correct, norm."""
    norm = global_grad_norm(engine)
    coefficient = torch.clamp(engine.gradient_clipping() / (norm + 1e-6), max=1.0)
    for param in engine.module.parameters():
        if param.grad is not None:
            param.grad.mul_(coefficient)
    set_global_grad_norm(engine, norm.item())


def build_engine(cfg: ResolvedConfig, for_training: bool = True, load_universal: bool = False):
    """Initialise the process groups for the layout and return the DeepSpeed PipelineEngine.

    For inference (`for_training=False`) no optimizer or ZeRO state is allocated. `load_universal` prepares
    the engine to resume from a universal checkpoint (`opt-ds convert --to universal`) at this layout."""
    import deepspeed

    from opt_ds.parallel.pipe import build_pipeline    # megatron-core: not for the optimizer alone (bench peers)

    layout = cfg.layout
    layout.initialize()
    run = cfg.run
    module = build_pipeline(cfg.shape, layout, seed=run.train.seed,
                            activation_checkpoint_interval=run.parallel.full_recompute_interval(),
                            recompute_attention=run.parallel.recompute_mode() == "selective",
                            sequence_parallel=run.parallel.sequence_parallel,
                            partition_method=run.parallel.partition_method)
    if not for_training:
        config = {**cfg.deepspeed_config(), "zero_optimization": {"stage": 0}}
        engine = deepspeed.initialize(model=module, config=config)[0]
        check_engine(engine)
        return engine
    config = cfg.deepspeed_config()
    if load_universal:
        config["checkpoint"] = {**config.get("checkpoint", {}), "load_universal": True}
    engine, _, _, _ = deepspeed.initialize(
        model=module,
        optimizer=make_optimizer(module, cfg),
        lr_scheduler=lambda optimizer: make_scheduler(optimizer, cfg),
        config=config,
    )
    if run.parallel.zero_stage == 0:
        replace_fp32_clipping(engine, _clip_fp32_gradients)
    check_engine(engine)
    return engine
