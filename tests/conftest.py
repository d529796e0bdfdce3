import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

# A tiny OPT for multi-process tests: 4 layers so PP=2 puts two decoder layers on each stage, 4 heads so
# TP=2 splits them, a vocabulary divisible by the TP degree.
TINY_MODEL = ["model.num_layers=4", "model.hidden_size=64", "model.num_heads=4", "model.ffn_hidden_size=128",
              "model.vocab_size=512", "model.max_position_embeddings=64", "batch.seq_length=32"]


@pytest.fixture(scope="session", autouse=True)
def tear_down_in_process_world():
    """Some tests start a one-rank gloo world in this process; end it before interpreter exit (see
    opt_ds.parallel.layout.shutdown_distributed for why)."""
    yield
    from opt_ds.parallel.layout import shutdown_distributed
    shutdown_distributed(wait=False)


def bundled_texts(count: int) -> list:
    """The first `count` documents of the bundled corpus, read by opt_ds's own reader."""
    import itertools
    from opt_ds.data.sources import BUNDLED_CORPUS, read_records
    return [doc.text for doc in itertools.islice(read_records([BUNDLED_CORPUS]), count)]
