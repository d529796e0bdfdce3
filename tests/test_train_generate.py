"""Generation through the pipeline: greedy decoding after identical training gives the same tokens at
TP=2 x PP=2 as in one process (the logits are gathered across TP ranks and the token sent from the last
stage to every rank)."""
import json

from conftest import TINY_MODEL
from multiproc import torchrun

ARGS = TINY_MODEL + ["data.synthetic=arithmetic", "train.steps=12", "optimizer.lr=0.003", "model.dropout=0.0",
                     "batch.global_batch_size=8", "batch.micro_batch_size=2", "train.tensorboard=false"]


def decode(tmp_path, tp, pp):
    out = tmp_path / f"gen-{tp}x{pp}.json"
    torchrun(tp * pp, "tests/workers/generate_run.py", out, *ARGS, f"parallel.tensor={tp}", f"parallel.pipeline={pp}",
             timeout=180)
    return json.loads(out.read_text())


def test_greedy_generation_matches_across_layouts(tmp_path):
    single, parallel = decode(tmp_path, 1, 1), decode(tmp_path, 2, 2)
    assert single["tokens"][:8] == single["prompt"]
    assert len(single["tokens"]) == 16 and all(0 <= t < 512 for t in single["tokens"])
    assert parallel["tokens"] == single["tokens"]
