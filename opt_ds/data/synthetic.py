"""Deterministic synthetic token samples, for parity tests and benchmarks that need no corpus."""
from __future__ import annotations

import torch

KINDS = ("random", "arithmetic")


class SyntheticTokens:
    """Sample i is a fixed function of (seed, i): the same tokens whatever the layout or process.

    kind="random": uniform tokens (nothing to learn; for throughput).
    kind="arithmetic": t_k = (a + b k) mod V with random a and b in [1, 8): learnable, so losses fall and a
    parity comparison exercises a model that is really changing.
    """

    def __init__(self, vocab_size: int, seq_length: int, num_samples: int = 10 ** 9, seed: int = 0,
                 kind: str = "random"):
        if kind not in KINDS:
            raise ValueError(f"unknown synthetic data kind {kind!r}; choose one of {KINDS}")
        self.vocab_size, self.seq_length, self.num_samples = vocab_size, seq_length, num_samples
        self.seed, self.kind = seed, kind

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, index: int) -> dict:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + int(index))
        if self.kind == "random":
            tokens = torch.randint(3, self.vocab_size, (self.seq_length + 1,), generator=generator)
        else:
            start, stride = (int(x) for x in torch.randint(1, 8, (2,), generator=generator))
            start *= int(torch.randint(0, self.vocab_size // 8, (1,), generator=generator))
            tokens = (start + stride * torch.arange(self.seq_length + 1)) % self.vocab_size
        return {"tokens": tokens[:-1], "labels": tokens[1:], "loss_mask": torch.ones(self.seq_length)}
