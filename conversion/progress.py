"""Progress bars for long conversions (tqdm ships with deepspeed); silent when output is not a terminal."""
from __future__ import annotations


def progress(iterable, *, total=None, desc=None):
    from tqdm import tqdm
    return tqdm(iterable, total=total, desc=desc, unit="layer", leave=False, disable=None)
