import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

# A tiny OPT for multi-process tests: 4 layers so PP=2 puts two decoder layers on each stage, 4 heads so
# TP=2 splits them, a vocabulary divisible by the TP degree.
TINY_MODEL = ["model.num_layers=4", "model.hidden_size=64", "model.num_heads=4", "model.ffn_hidden_size=128",
              "model.vocab_size=512", "model.max_position_embeddings=64", "batch.seq_length=32"]
