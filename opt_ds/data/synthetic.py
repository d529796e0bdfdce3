"""Deterministic random-token samples: for parity tests and benchmarks that need no corpus."""
from __future__ import annotations

import torch


class SyntheticTokens:
    """Sample i is a fixed function of (seed, i): the same tokens whatever the layout or process."""

    def __init__(self, vocab_size: int, seq_length: int, num_samples: int = 10 ** 9, seed: int = 0):
        self.vocab_size, self.seq_length, self.num_samples, self.seed = vocab_size, seq_length, num_samples, seed

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, index: int) -> dict:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + int(index))
        tokens = torch.randint(3, self.vocab_size, (self.seq_length + 1,), generator=generator)
        return {"tokens": tokens[:-1], "labels": tokens[1:], "loss_mask": torch.ones(self.seq_length)}
