"""Real DeepSpeed engines for the conversion tests, run under torchrun (one process per rank).

    logits --ckpt DIR --tp T --pp P --out FILE
        build the engine at TP x PP, load a (converted) opt_ds checkpoint with load_module_only, run the
        fixed prompt through engine.eval_batch and save the full-vocabulary logits of the last stage.
    train --tp T --pp P --save DIR --steps K --out FILE
        train K steps from the seeded initialisation, save a checkpoint (with opt_ds's client state),
        then record the loss on a fixed evaluation batch and the losses of training steps K+1, K+2.
    resume --tp T --pp P --load DIR --how weights|universal --steps K --out FILE
        load the converted checkpoint at this layout, record the same evaluation loss and the losses of
        training steps K+1, K+2 (load_module_only for weights, "load_universal" for universal checkpoints).
The loss of step K+1 depends on the weights only; step K+2 also shows the optimizer state and LR schedule.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os

import torch

from opt_ds.config import ResolvedConfig, load_config
from opt_ds.data.synthetic import SyntheticTokens
from opt_ds.parallel.layout import shutdown_distributed
from opt_ds.train.contract import checkpoint_client_state, shape_from_client_state
from opt_ds.train.batches import ReplicaBatches, collate
from opt_ds.train.engine import build_engine

GLOBAL_BATCH, SEQ, VOCAB = 4, 16, 96


@dataclasses.dataclass(frozen=True)
class LoadUniversal(ResolvedConfig):
    """The same run, with DeepSpeed told to load a universal checkpoint."""

    def deepspeed_config(self) -> dict:
        return {**super().deepspeed_config(), "checkpoint": {"load_universal": True}}


def model_overrides(shape) -> list:
    """`model.*` config overrides for this shape (the config has no layer_norm_eps key: OPT uses 1e-5)."""
    fields = {k: v for k, v in dataclasses.asdict(shape).items() if k != "layer_norm_eps"}
    fields.update(dropout=0.0, attention_dropout=0.0)
    return [f"model.{k}={'null' if v is None else str(v).lower() if isinstance(v, bool) else v}"
            for k, v in fields.items()]


def make_engine(shape, tp: int, pp: int, universal: bool = False):
    world = int(os.environ["WORLD_SIZE"])
    cfg = load_config(None, model_overrides(shape) + [
        f"parallel.tensor={tp}", f"parallel.pipeline={pp}", f"batch.seq_length={SEQ}",
        f"batch.global_batch_size={GLOBAL_BATCH}", "batch.micro_batch_size=1", "optimizer.lr=0.01",
        "optimizer.warmup_steps=2", "train.steps=10"], world_size=world)
    if universal:
        cfg = LoadUniversal(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)})
    return build_engine(cfg)


def resume_shape():
    from opt_ds.models.presets import OPTShape
    return OPTShape(num_layers=4, hidden_size=32, num_heads=4, ffn_hidden_size=64, vocab_size=VOCAB,
                    max_position_embeddings=32, dropout=0.0, attention_dropout=0.0)


def eval_loss(engine) -> float:
    batch = collate([SyntheticTokens(VOCAB, SEQ, seed=7)[0]])
    return float(engine.eval_batch(iter([batch]), num_micro_batches=1))


def train_steps(engine, start: int, steps: int) -> list:
    data = SyntheticTokens(VOCAB, SEQ, seed=3)
    batches = ReplicaBatches(data, global_batch=GLOBAL_BATCH, micro_batch=1,
                             data_parallel_size=engine.grid.data_parallel_size,
                             data_parallel_rank=engine.grid.data_parallel_id, start_step=start)
    return [float(engine.train_batch(batches)) for _ in range(steps)]


def write_json(path: str, value) -> None:
    if torch.distributed.get_rank() == 0:
        with open(path, "w") as f:
            json.dump(value, f)


def cmd_logits(args):
    from megatron.core import parallel_state
    from conversion.opt_ds_format import OptDsReader
    from conversion.verify import prompt_for
    reader = OptDsReader(args.ckpt)
    shape = shape_from_client_state(reader.meta)
    engine = make_engine(shape, args.tp, args.pp)
    engine.load_checkpoint(args.ckpt, tag=reader.tag_dir.name, load_module_only=True, load_optimizer_states=False,
                           load_lr_scheduler_states=False)
    ids = torch.tensor([prompt_for(reader.shape)])
    batch = (ids, (torch.zeros_like(ids), torch.ones(ids.shape)))
    # compute_loss=False: megatron's vocab_parallel_cross_entropy subtracts the row max from fp32 logits in
    # place, so logits returned next to a loss are shifted (softmax-equal, not equal)
    _, logits = engine.eval_batch(iter([batch]), return_logits=True, compute_loss=False, num_micro_batches=1)
    if engine.is_last_stage():
        group = parallel_state.get_tensor_model_parallel_group()
        pieces = [torch.empty_like(logits) for _ in range(args.tp)]
        torch.distributed.all_gather(pieces, logits.contiguous(), group=group)
        if parallel_state.get_tensor_model_parallel_rank() == 0:
            torch.save(torch.cat(pieces, dim=-1)[0, :, :reader.shape.vocab_size].clone(), args.out)


def cmd_train(args):
    shape = resume_shape()
    engine = make_engine(shape, args.tp, args.pp)
    losses = train_steps(engine, 0, args.steps)
    engine.save_checkpoint(args.save, tag=f"global_step{args.steps}", client_state=checkpoint_client_state(shape))
    result = {"losses": losses, "eval": eval_loss(engine), "next": train_steps(engine, args.steps, 2)}
    write_json(args.out, result)


def cmd_resume(args):
    engine = make_engine(resume_shape(), args.tp, args.pp, universal=args.how == "universal")
    if args.how == "weights":
        engine.load_checkpoint(args.load, load_module_only=True, load_optimizer_states=False,
                               load_lr_scheduler_states=False)
    else:
        engine.load_checkpoint(args.load)
    result = {"eval": eval_loss(engine), "global_steps": engine.global_steps}
    result["next"] = train_steps(engine, args.steps, 2)
    write_json(args.out, result)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("command", choices=["logits", "train", "resume"])
    parser.add_argument("--ckpt")
    parser.add_argument("--save")
    parser.add_argument("--load")
    parser.add_argument("--how", choices=["weights", "universal"])
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--out")
    args = parser.parse_args()
    {"logits": cmd_logits, "train": cmd_train, "resume": cmd_resume}[args.command](args)


if __name__ == "__main__":
    main()
    shutdown_distributed()
