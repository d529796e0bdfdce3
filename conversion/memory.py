"""The converter's peak memory, estimated before it starts (`--max-memory`), from the streaming formula
fitted on the measurements in bench_results/conversion-cpu.md and stated in docs/conversion.md:

    peak ≈ LAYER_COPIES × one decoder layer + GLOBAL_COPIES × the non-layer tensors + OVERHEAD
    (layer and non-layer tensors counted in fp32, the largest dtype a conversion or its proof holds them in)

Every reader and writer holds one decoder layer at a time (read, converted, cut into the target's pieces),
plus the non-layer tensors (embedding, positions, final norm, LLaMA's head) and their cut pieces;
verification holds one layer of one side plus the non-layer tensors in fp32. Nothing grows with the number
of layers. OVERHEAD is what a conversion allocates whatever the model (process group, model classes, logits).
"""
from __future__ import annotations

import math
import re

from conversion import canonical as C
from conversion.files import ConversionError

LAYER_COPIES = 2
GLOBAL_COPIES = 2
OVERHEAD = 64 * 2 ** 20
FP32_BYTES = 4
UNITS = {"": 1, "K": 2 ** 10, "M": 2 ** 20, "G": 2 ** 30, "T": 2 ** 40}
SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:i?B)?\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """'64G', '1.5T', '500MiB', '800000000' -> bytes (K, M, G, T are powers of 1024)."""
    match = SIZE.match(str(text))
    if not match:
        raise ConversionError(f"--max-memory {text!r} is not a size; give a number with an optional unit K, M, G "
                              "or T (powers of 1024), e.g. --max-memory 64G")
    return int(float(match.group(1)) * UNITS[match.group(2).upper()])


def estimated_peak_bytes(shape) -> int:
    """Peak memory of a conversion of a model of `shape` beyond the imports, verification included (any format,
    layout or dtype: the fp32 sizes bound them)."""
    layer = sum(math.prod(s) for s in C.layer_shapes(shape).values()) * FP32_BYTES
    outside = sum(math.prod(s) for s in C.global_shapes(shape).values()) * FP32_BYTES
    return LAYER_COPIES * layer + GLOBAL_COPIES * outside + OVERHEAD


def check_max_memory(shape, max_memory: str) -> None:
    limit = parse_size(max_memory)
    need = estimated_peak_bytes(shape)
    if need > limit:
        raise ConversionError(f"this conversion needs about {need / 2 ** 30:.2f} GiB of memory ({LAYER_COPIES} x one "
                              f"decoder layer + {GLOBAL_COPIES} x the embeddings and other non-layer tensors, fp32; "
                              f"see docs/conversion.md), more than --max-memory {max_memory} "
                              f"({limit / 2 ** 30:.2f} GiB); run it on a machine with more memory or raise --max-memory")
