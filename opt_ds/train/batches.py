"""Micro-batches for one data-parallel replica, addressed by global sample index.

Optimizer step `s` consumes samples [s*G, (s+1)*G) of the dataset (G = global batch). Replica r takes the
contiguous slice [r*G/DP, (r+1)*G/DP) of it, cut into gradient-accumulation micro-batches. The data
position is therefore just the step number, which makes resume exact and independent of the layout.
"""
from __future__ import annotations

import torch


def collate(samples: list) -> tuple:
    """Stack samples into DeepSpeed's pipeline format: (input_ids, (labels, loss_mask))."""
    tokens = torch.stack([torch.as_tensor(s["tokens"], dtype=torch.long) for s in samples])
    labels = torch.stack([torch.as_tensor(s["labels"], dtype=torch.long) for s in samples])
    mask = torch.stack([torch.as_tensor(s["loss_mask"], dtype=torch.float32) for s in samples])
    return tokens, (labels, mask)


class ReplicaBatches:
    """Iterator over this replica's micro-batches, starting at optimizer step `start_step`."""

    def __init__(self, dataset, *, global_batch: int, micro_batch: int, data_parallel_size: int,
                 data_parallel_rank: int, start_step: int = 0):
        self.dataset = dataset
        self.global_batch, self.micro_batch = global_batch, micro_batch
        self.per_replica = global_batch // data_parallel_size
        self.rank = data_parallel_rank
        self.step = start_step
        self.micro = 0

    def sample_indices(self, step: int, micro: int) -> range:
        start = step * self.global_batch + self.rank * self.per_replica + micro * self.micro_batch
        return range(start, start + self.micro_batch)

    def __iter__(self):
        return self

    def __next__(self) -> tuple:
        indices = self.sample_indices(self.step, self.micro)
        self.micro += 1
        if self.micro * self.micro_batch == self.per_replica:
            self.step, self.micro = self.step + 1, 0
        return collate([self.dataset[i % len(self.dataset)] for i in indices])
