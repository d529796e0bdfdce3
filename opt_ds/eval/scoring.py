"""Log-likelihoods of token sequences on the DeepSpeed pipeline engine, at any TP x PP x DP.

Every rank is handed the same requests (token sequence, number of final tokens to score) and gets every
result back. Requests are sorted by length, longest first, and cut into calls of
`micro_batches x micro_batch` rows per data-parallel replica; each replica scores its share in one
`eval_batch` of `micro_batches` micro-batches (several in flight keep the pipeline stages busy). Rows are
right-padded to the longest sequence of the call: attention is causal, so padding after a sequence does
not change its logits, and positions start at 0 in every row, as in Hugging Face's OPT without an
attention mask. The last stage gathers the vocabulary-parallel logits of the scored positions only, takes
the fp32 log-softmax, and keeps (sum of log-probabilities, whether greedy decoding gives every token); the
results are gathered to all ranks once at the end.

eval_batch quirks (see opt_ds.train.generate): the activation shapes of the pipeline are negotiated once
and cached, so they are reset whenever the row length changes (and after scoring, so training resumes with
its own); `total_loss` would otherwise accumulate logits onto the last training step's loss.
"""
from __future__ import annotations

import time
from typing import Callable, Optional, Sequence

import torch
import torch.distributed as dist

from opt_ds.models.presets import PAD_ID
from opt_ds.patches import forget_last_loss

Request = tuple  # (token ids: list[int], number of final tokens scored: int)


class PipelineScorer:
    def __init__(self, engine, *, micro_batch: int, max_length: int, micro_batches: Optional[int] = None,
                 progress: Optional[Callable[[str], None]] = None):
        self.engine = engine
        self.micro_batch = micro_batch
        self.max_length = max_length                 # longest model input (tokens fed, not scored + 1)
        self.micro_batches = micro_batches or max(2, engine.num_stages)
        grid = engine.grid
        self.replicas, self.replica = grid.get_data_parallel_world_size(), grid.get_data_parallel_rank()
        self.keeps_results = engine.is_last_stage() and grid.get_slice_parallel_rank() == 0
        self.progress = progress

    def score(self, requests: Sequence[Request], what: str = "requests") -> list[tuple[float, bool]]:
        """(log P(last n tokens | the tokens before), greedy) per request; collective over all ranks."""
        for tokens, scored in requests:
            if not 0 < scored < len(tokens) or len(tokens) - 1 > self.max_length:
                raise ValueError(f"a request of {len(tokens)} tokens scoring {scored} does not fit "
                                 f"1 <= scored < tokens <= {self.max_length + 1}")
        order = sorted(range(len(requests)), key=lambda i: -len(requests[i][0]))
        rows_per_replica = self.micro_batch * self.micro_batches
        per_call = rows_per_replica * self.replicas
        kept: dict = {}
        eta = _Eta(len(order), what, self.progress)
        try:
            for start in range(0, len(order), per_call):
                call = order[start:start + per_call]
                length = max(len(requests[i][0]) for i in call) - 1     # the same on every replica
                mine = call[self.replica * rows_per_replica:(self.replica + 1) * rows_per_replica]
                results = self._score_rows([requests[i] for i in mine], length)
                if self.keeps_results:
                    kept.update(zip(mine, results))
                eta.advance(len(call))
        finally:
            self.engine.reset_activation_shape()
            forget_last_loss(self.engine)
        everyone = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, kept)
        merged = {index: result for part in everyone for index, result in part.items()}
        return [merged[i] for i in range(len(requests))]

    def _score_rows(self, rows: list, length: int) -> list[tuple[float, bool]]:
        batches = []
        for m in range(self.micro_batches):
            tokens = torch.full((self.micro_batch, length), PAD_ID, dtype=torch.long)
            for r, (ids, _) in enumerate(rows[m * self.micro_batch:(m + 1) * self.micro_batch]):
                tokens[r, :len(ids) - 1] = torch.tensor(ids[:-1])
            batches.append((tokens, (torch.zeros_like(tokens), torch.zeros(tokens.shape))))
        self.engine.reset_activation_shape()
        forget_last_loss(self.engine)
        logits = self.engine.eval_batch(iter(batches), return_logits=False, compute_loss=False, reduce_output=None,
                                        bcast_loss=False, num_micro_batches=self.micro_batches)
        if not self.engine.is_last_stage():
            return []
        from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region
        results = []
        for r, (ids, scored) in enumerate(rows):
            inputs = len(ids) - 1
            shard = logits[r // self.micro_batch][r % self.micro_batch, inputs - scored:inputs]
            full = gather_from_tensor_model_parallel_region(shard.float().contiguous())
            logprobs = torch.log_softmax(full, dim=-1)
            target = torch.tensor(ids[-scored:], device=logprobs.device)
            picked = logprobs.gather(-1, target[:, None])[:, 0]
            results.append((float(picked.sum()), bool((logprobs.argmax(-1) == target).all())))
        return results


class _Eta:
    """A progress line with the rate and the time left, at most every 10 s (rank 0's caller prints it)."""

    def __init__(self, total: int, what: str, out: Optional[Callable[[str], None]]):
        self.total, self.what, self.out = total, what, out
        self.done, self.started, self.shown = 0, time.monotonic(), time.monotonic()

    def advance(self, count: int) -> None:
        self.done += count
        now = time.monotonic()
        if self.out is None or (now - self.shown < 10 and self.done < self.total):
            return
        self.shown = now
        rate = self.done / max(now - self.started, 1e-9)
        left = (self.total - self.done) / rate if rate else float("inf")
        self.out(f"{self.what}: {self.done}/{self.total} ({rate:.1f}/s, ETA {_clock(left)})")


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
