"""Token-weighted perplexity of a model on held-out documents, with sliding windows.

Documents come from a text file (one per line), a JSONL file (its "text" field) or an indexed dataset made
by `opt-ds preprocess` (PREFIX of PREFIX.bin/.idx). Each document is scored as OPT reads it: after its BOS
(</s>), every token of the document and its final </s> is predicted (text is tokenized, then </s> added,
as `opt-ds preprocess` does). A document longer than the window W is scored in windows: window k predicts
tokens (k-1)·S+1 .. k·S+W-S (the first W, then S new ones per window) with up to W tokens of input, so
every token is predicted exactly once with at least W-S tokens of context (S = W: disjoint windows).
Perplexity = exp(-sum of log-probabilities / number of predicted tokens), over all documents together.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from opt_ds.errors import UserError


class PerplexityError(UserError):
    """A perplexity input that cannot be read; the message says why."""


@dataclass
class Perplexity:
    source: str
    perplexity: float
    tokens: int
    documents: int
    window: int
    stride: int

    def as_dict(self) -> dict:
        return dict(self.__dict__)

    def __str__(self) -> str:
        return (f"perplexity {self.perplexity:.4f} on {self.source}: {self.tokens} tokens of {self.documents} "
                f"documents, window {self.window}, stride {self.stride}")


def check_source(path: str) -> None:
    """Refuse a source that is not there before any model is built."""
    from opt_ds.data.files import DatasetFiles
    if Path(path).is_file() or DatasetFiles.of(path).exists():
        return
    raise PerplexityError(f"--perplexity {path}: no such file, and no indexed dataset {path}.bin/.idx; give a "
                          "text file (a document per line), a JSONL file with a 'text' field or a dataset prefix")


def documents(path: str, tokenizer) -> Iterator[list[int]]:
    """The tokenizer's BOS + the tokens of each document + its EOS (OPT: </s> both)."""
    bos, eos = tokenizer.bos_id, tokenizer.eos_id
    from opt_ds.data.files import DatasetFiles
    if not Path(path).is_file() and DatasetFiles.of(path).exists():
        from opt_ds.data.megatron_quiet import import_quietly, quiet_dataset_logs
        with quiet_dataset_logs():
            indexed = import_quietly("megatron.core.datasets.indexed_dataset").IndexedDataset(str(path))
        for i in range(len(indexed)):
            ids = [int(t) for t in indexed[i]]
            yield [bos, *ids] if ids and ids[-1] == eos else [bos, *ids, eos]
        return
    with open(path, encoding="utf-8") as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            text = line.rstrip("\n")
            if path.endswith((".jsonl", ".json")):
                try:
                    text = json.loads(line)["text"]
                except (ValueError, KeyError, TypeError):
                    raise PerplexityError(f"{path}:{number}: not a JSON object with a 'text' field") from None
            yield [bos, *tokenizer.encode(text), eos]


def windows(tokens: list[int], window: int, stride: int) -> Iterator[tuple[list[int], int]]:
    """(input tokens + the next one, number of final tokens scored) covering every token after the first."""
    end = 0
    while end < len(tokens) - 1:
        new_end = min(len(tokens) - 1, window if end == 0 else end + stride)
        start = max(0, new_end - window)
        yield tokens[start:new_end + 1], new_end - end
        end = new_end


def perplexity(scorer, tokenizer, path: str, *, window: int, stride: int) -> Perplexity:
    if not 0 < stride <= window:
        raise PerplexityError(f"the stride {stride} must be in 1..window ({window})")
    requests, count = [], 0
    for doc in documents(path, tokenizer):
        requests.extend(windows(doc, window, stride))
        count += 1
    if not requests:
        raise PerplexityError(f"--perplexity {path}: no documents in it")
    scored = scorer.score(requests, what=f"perplexity windows of {Path(path).name}")
    tokens = sum(n for _, n in requests)
    loss = -sum(logprob for logprob, _ in scored) / tokens
    return Perplexity(str(path), math.exp(min(loss, 50.0)), tokens, count, window, stride)
