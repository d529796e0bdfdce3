"""Sample text from a pipeline-parallel model, at the layout it was trained with.

Each new token is one forward pass of a fixed-shape [micro_batch, seq_length] batch through the pipeline
(the prompt left-aligned and padded, causal attention makes the padding irrelevant); the last stage
gathers the vocabulary-parallel logits, picks the token (greedy or nucleus sampling with a seeded
generator, so every TP rank picks the same one) and broadcasts it to every rank.
No KV cache: this is for looking at what a model learned, not for serving.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

from opt_ds.data.tokenizer import EOS_ID, PAD_ID
from opt_ds.errors import UserError
from opt_ds.patches import forget_last_loss


class GenerationError(UserError):
    """A prompt or sampling setting that cannot run; the message names the argument and the fix."""


def prompt_ids(tokenizer, prompt: str, *, seq_length: int, max_new_tokens: int,
               max_new_tokens_name: str = "--max-new-tokens") -> list:
    """The prompt's ids (OPT prepends </s> as BOS), checked to leave room for `max_new_tokens` in the
    context of `seq_length` tokens: a longer prompt is an error, never silently cut."""
    ids = tokenizer.encode(prompt, add_bos=True)
    room = seq_length - len(ids)
    if room < 1:
        raise GenerationError(f"the prompt is {len(ids)} tokens (with BOS), but the model's context is {seq_length} "
                              f"tokens: shorten the prompt to at most {seq_length - 2} tokens so at least one new "
                              "token fits")
    if max_new_tokens > room:
        raise GenerationError(f"{max_new_tokens_name} {max_new_tokens}: the {len(ids)}-token prompt leaves room for "
                              f"{room} new tokens in the model's context of {seq_length}; use "
                              f"{max_new_tokens_name} {room} or less, or a shorter prompt")
    return ids


def pick_token(logits: torch.Tensor, *, top_p: float, temperature: float, generator) -> int:
    """Greedy when top_p <= 0, else nucleus sampling over the smallest set of tokens with mass >= top_p."""
    if top_p <= 0:
        return int(logits.argmax())
    probs = torch.softmax(logits.float() / max(temperature, 1e-6), dim=-1)
    sorted_probs, order = probs.sort(descending=True)
    keep = sorted_probs.cumsum(0) - sorted_probs < top_p
    sorted_probs = sorted_probs * keep
    choice = torch.multinomial(sorted_probs / sorted_probs.sum(), 1, generator=generator)
    return int(order[choice])


def _last_stage_source(engine) -> int:
    """Global rank of the last stage's first TP rank in data-parallel replica 0."""
    topo = engine.module.topology()
    return topo.get_rank(pipe=engine.num_stages - 1, data=0, model=0)


def generate(engine, prompt_ids: list, *, max_new_tokens: int, seq_length: int, micro_batch: int,
             top_p: float = 0.0, temperature: float = 1.0, seed: int = 0, stop_at_eos: bool = True,
             eos_id: int = EOS_ID, pad_id: int = PAD_ID, should_stop=None) -> list:
    """Collective over all ranks; returns prompt + generated ids on every rank (special ids: the tokenizer's,
    OPT's by default). `should_stop(tokens)`, if given, ends generation early (every rank sees the same
    tokens, so all decide alike)."""
    tokens = list(prompt_ids)
    if not tokens or len(tokens) >= seq_length:
        raise ValueError(f"prompt must hold 1..{seq_length - 1} tokens, got {len(tokens)}")
    generator = torch.Generator().manual_seed(seed)
    source = _last_stage_source(engine)
    device = engine.device
    for _ in range(max_new_tokens):
        if len(tokens) >= seq_length:
            break
        batch = torch.full((micro_batch, seq_length), pad_id, dtype=torch.long)
        batch[:, :len(tokens)] = torch.tensor(tokens)
        dummy_labels = (torch.zeros_like(batch), torch.zeros(batch.shape))
        forget_last_loss(engine)
        _, logits = engine.eval_batch(iter([(batch, dummy_labels)]), return_logits=True, compute_loss=False,
                                      reduce_output=None, bcast_loss=False, num_micro_batches=1)
        choice = torch.zeros(1, dtype=torch.long, device=device)
        if engine.is_last_stage():
            full = gather_from_tensor_model_parallel_region(logits[0, len(tokens) - 1].float().contiguous())
            choice[0] = pick_token(full.cpu(), top_p=top_p, temperature=temperature, generator=generator)
        dist.broadcast(choice, src=source)
        token = int(choice.item())
        tokens.append(token)
        if (stop_at_eos and token == eos_id) or (should_stop is not None and should_stop(tokens)):
            break
    return tokens


def sample_text(engine, tokenizer, prompt: str, *, seq_length: int, micro_batch: int, max_new_tokens: int,
                top_p: float, temperature: float, seed: int) -> str:
    """Continue `prompt` (after the tokenizer's BOS; OPT's is </s>) and return the decoded continuation."""
    ids = prompt_ids(tokenizer, prompt, seq_length=seq_length, max_new_tokens=max_new_tokens)
    out = generate(engine, ids, max_new_tokens=max_new_tokens, seq_length=seq_length,
                   micro_batch=micro_batch, top_p=top_p, temperature=temperature, seed=seed,
                   eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id)
    return tokenizer.decode(out[len(ids):])
