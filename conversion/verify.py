"""Prove a conversion by running both checkpoints: logits on a fixed prompt and a greedy continuation.

Every model runs through opt_ds's own model (the pipeline layers at TP=1 in this one process), in fp32 on the
CPU, streamed from what is on disk one layer at a time (build the layer on the meta device, load its weights,
apply it to the activations, drop it), so a proof needs memory for one layer plus the activations whatever
the model's size; each forward pass reads the checkpoint again. Only the source decodes greedily (a pass
over the prompt, then one per greedy token but the last, without a KV cache): its last pass reads the
prompt and the continuation, so its logits at every position and its greedy tokens (the argmax at each
prefix) come from that one sequence. The target then runs once on the same sequence (teacher forcing): the
same logits within tolerance and the same argmax at every prefix is the same greedy continuation, in one
pass instead of one per token. When `transformers` is installed, the target also runs once through Hugging
Face's `OPTForCausalLM` / `LlamaForCausalLM` on that sequence (streamed the same way), the independent
reference implementation, which catches an error the two opt_ds runs would share (e.g. a QKV order that is
wrong in the same way on both sides).

Tolerances (max |logit difference|, relative to the largest |logit| of the source, floor 1):
  lossless conversion (no tensor lost precision)    1e-5, and the greedy tokens must be identical
  to fp16 / bf16 (--dtype lowered the precision)    5e-3 / 3e-2; greedy tokens are reported, not required
  opt_ds vs transformers on the same weights        1e-4 (two implementations: kernel order differs)
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable, List, Optional

import torch
import torch.nn.functional as F

from opt_ds.models.presets import BOS_ID

from conversion.canonical import Checkpoint
from conversion.families import names_of

OPT_PROMPT = [BOS_ID, 31414, 6, 127, 2335, 16, 11962]      # "</s>Hello, my dog is cute" in OPT's vocabulary
NEW_TOKENS = 8
LOSSLESS_TOLERANCE = 1e-5
LOSSY_TOLERANCE = {torch.float16: 5e-3, torch.bfloat16: 3e-2}
REFERENCE_TOLERANCE = 1e-4
TRAINING_ONLY_FIELDS = ("dropout", "attention_dropout", "init_std")


def prompt_for(shape) -> List[int]:
    if shape.vocab_size > max(OPT_PROMPT):
        return list(OPT_PROMPT)
    return [BOS_ID] + [(7919 * i + 13) % (shape.vocab_size - 3) + 3 for i in range(6)]


@dataclass
class Run:
    """One model's pass over a sequence: the prompt and a greedy continuation but its last token."""
    sequence: List[int]         # what the pass read
    prompt_length: int
    logits: torch.Tensor        # [len(sequence), vocab], fp32

    @property
    def tokens(self) -> List[int]:
        """The argmax after each prefix that ends in or after the prompt: the greedy continuation when the
        sequence is this model's own (greedy), the next token it would choose at each step otherwise."""
        return self.logits[self.prompt_length - 1:].argmax(-1).tolist()


def greedy(forward: Callable[[torch.Tensor], torch.Tensor], prompt: List[int], new_tokens: int = NEW_TOKENS) -> Run:
    """`new_tokens` greedy tokens after the prompt, a full forward per token (no KV cache: simple and exact); the
    Run holds the last pass, whose logits cover the prompt and every token but the last."""
    if new_tokens < 1:
        raise ValueError(f"greedy decoding needs at least one new token, not {new_tokens}")
    sequence = list(prompt)
    with torch.no_grad():
        while True:
            logits = forward(torch.tensor([sequence]))[0].float()
            if len(sequence) == len(prompt) + new_tokens - 1:
                return Run(sequence, len(prompt), logits)
            sequence.append(int(logits[-1].argmax()))


def teacher_forced(forward: Callable[[torch.Tensor], torch.Tensor], source: Run) -> Run:
    """One pass over the sequence `source` read: its logits at every position and the next token it would
    choose after each prefix, comparable with the source's position by position."""
    with torch.no_grad():
        return Run(source.sequence, source.prompt_length, forward(torch.tensor([source.sequence]))[0].float())


class StreamedModel:
    """opt_ds's model of `ckpt` (TP=1, fp32, eval), run one pipeline layer at a time: each call streams the
    checkpoint from disk, and each layer is built on the meta device, given its weights (cast to fp32),
    applied to the activations and dropped. Memory: the non-layer tensors plus one layer plus activations.
    `dtypes` records the dtype each tensor had on disk."""

    def __init__(self, ckpt: Checkpoint):
        from opt_ds.models.family import family_of
        from opt_ds.parallel.layout import ParallelLayout
        from opt_ds.parallel.pipe import seed_all
        layout = ParallelLayout(1, 1, 1)
        layout.initialize()
        seed_all(0)         # the RNG tracker attention's dropout forks (dropout is off: the seed does not matter)
        shape = ckpt.shape.replace(dropout=0.0, attention_dropout=0.0)
        self.specs = family_of(shape).layer_specs(shape, layout.megatron_config(), layout.tensor_group())
        self.ckpt = ckpt
        self.dtypes = {}
        self._modules = {}

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        from deepspeed.pipe import TiedLayerSpec
        from conversion.opt_ds_format import full_layer_states
        states = full_layer_states(self.ckpt, self.ckpt.shape.vocab_size)
        tied, x = {}, ids
        for index, spec in enumerate(self.specs):
            if isinstance(spec, TiedLayerSpec) and spec.key in tied:
                state = tied.pop(spec.key)          # the tied head: the embedding's weights again
            else:
                found, state = next(states)
                assert found == index, (found, index)
                self.dtypes.update({(index, name): t.dtype for name, t in state.items()})
                if isinstance(spec, TiedLayerSpec):
                    tied[spec.key] = state
            module = self._module(spec)
            module.load_state_dict({k: v.float() for k, v in state.items()}, strict=True, assign=True)
            forward_fn = getattr(spec, "forward_fn", None)
            x = forward_fn(module, x) if forward_fn is not None else module(x)
            module.to("meta")                       # drop the weights
            del state
        return x

    def _module(self, spec) -> torch.nn.Module:
        """The layer `spec` builds, on the meta device: built once per kind (every decoder layer has the same
        structure; only the weights loaded into it differ)."""
        key = (spec.typename, *map(id, spec.module_args), *((k, id(v)) for k, v in sorted(spec.module_kwargs.items())))
        if key not in self._modules:
            with torch.device("meta"):
                self._modules[key] = spec.build().eval()
        return self._modules[key]


def hf_forward(ckpt: Checkpoint) -> Optional[Callable[[torch.Tensor], torch.Tensor]]:
    """transformers' model of `ckpt`'s family holding it (fp32), or None when transformers is not installed."""
    return names_of(ckpt.shape).hf_reference(ckpt)


def difference(reference: Run, other: Run) -> tuple:
    """(max |difference|, mean KL(reference || other) per position, reference scale, |difference| per position)."""
    per_position = (reference.logits - other.logits).abs().amax(-1)
    kl = F.kl_div(F.log_softmax(other.logits.double(), -1), F.log_softmax(reference.logits.double(), -1),
                  log_target=True, reduction="batchmean").item()
    return per_position.max().item(), kl, max(1.0, reference.logits.abs().max().item()), per_position


def first_over(per_position: torch.Tensor, tolerance: float, prompt_length: int) -> str:
    """Where the logits first differ by more than `tolerance`, in words ('' when nowhere)."""
    over = (per_position > tolerance).nonzero()
    if not len(over):
        return ""
    position = int(over[0])
    where = "in the prompt" if position < prompt_length else f"after greedy token {position - prompt_length + 1}"
    return f"; first over it at position {position}, {where}"


def first_token_difference(expected: Run, got: Run, expected_name: str, got_name: str) -> str:
    """' (DIFFERENT from token N: ...)' naming the first greedy token that differs, '' when none does."""
    index = next((i for i, (a, b) in enumerate(zip(expected.tokens, got.tokens)) if a != b), None)
    if index is None:
        return ""
    return (f" (DIFFERENT from token {index + 1}: {expected_name} {expected.tokens[index]}, "
            f"{got_name} {got.tokens[index]})")


@dataclass
class Report:
    ok: bool
    lines: List[str]

    def __str__(self) -> str:
        return "\n".join(self.lines)


def architecture(shape) -> dict:
    fields = dataclasses.asdict(shape)
    return {"family": type(shape).__name__, **{k: v for k, v in fields.items() if k not in TRAINING_ONLY_FIELDS}}


def precision_lost(source_dtypes: dict, target_dtypes: dict) -> Optional[torch.dtype]:
    """The half-precision dtype (fp16 / bf16) on either side of a tensor whose dtype changed, or None when no
    tensor changed dtype (a lossless conversion)."""
    lost = {d for key, t in target_dtypes.items() if t != source_dtypes.get(key)
            for d in (t, source_dtypes.get(key)) if d in LOSSY_TOLERANCE}
    return max(lost, key=lambda d: LOSSY_TOLERANCE[d]) if lost else None


def verify(source: Checkpoint, target: Checkpoint, *, reference: bool = True) -> Report:
    """Compare `target` with `source`, both opened from disk."""
    lines = []
    if architecture(source.shape) != architecture(target.shape):
        return Report(False, [f"verify: FAILED: the target's architecture {architecture(target.shape)} differs from "
                              f"the source's {architecture(source.shape)}"])
    prompt = prompt_for(source.shape)
    source_model, target_model = StreamedModel(source), StreamedModel(target)
    src = greedy(source_model, prompt)
    tgt = teacher_forced(target_model, src)
    lossy_dtype = precision_lost(source_model.dtypes, target_model.dtypes)
    max_abs, kl, scale, per_position = difference(src, tgt)
    tolerance = (LOSSY_TOLERANCE[lossy_dtype] if lossy_dtype in LOSSY_TOLERANCE else LOSSLESS_TOLERANCE) * scale
    ok = max_abs <= tolerance
    lines.append(f"verify: logits on a {len(prompt)}-token prompt and the source's greedy continuation "
                 f"({len(src.sequence)} positions), source vs target (opt_ds model, fp32): max |diff| {max_abs:.3e} "
                 f"(tolerance {tolerance:.1e}{first_over(per_position, tolerance, len(prompt))}), KL {kl:.3e}")
    token_difference = first_token_difference(src, tgt, "source", "target")
    lines.append(f"verify: greedy {NEW_TOKENS} tokens: source {src.tokens}, target {tgt.tokens}{token_difference}")
    if lossy_dtype is None and token_difference:
        ok = False
    if reference:
        hf = hf_forward(target)
        if hf is None:
            lines.append("verify: transformers is not installed; skipped the Hugging Face reference check")
        else:
            ref = teacher_forced(hf, src)
            ref_abs, ref_kl, ref_scale, ref_per_position = difference(ref, tgt)
            ref_tolerance = REFERENCE_TOLERANCE * ref_scale
            ref_token_difference = first_token_difference(tgt, ref, "opt_ds", "transformers")
            ok = ok and ref_abs <= ref_tolerance and not ref_token_difference
            lines.append(f"verify: target in transformers' {names_of(target.shape).hf_class} vs opt_ds: max |diff| "
                         f"{ref_abs:.3e} (tolerance {ref_tolerance:.1e}"
                         f"{first_over(ref_per_position, ref_tolerance, len(prompt))}), KL {ref_kl:.3e}, greedy "
                         + (f"DIFFERENT {ref.tokens}{ref_token_difference}" if ref_token_difference else "identical"))
    lines.append("verify: " + ("OK" if ok else "FAILED: the converted checkpoint does not reproduce the source"))
    return Report(ok, lines)

