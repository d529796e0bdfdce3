"""megatron-core's data modules without the noise: importing megatron.core warns that Transformer Engine and
Apex are absent (irrelevant for data), and its dataset builders log every index they build or load at INFO."""
from __future__ import annotations

import importlib
import logging
import warnings
from contextlib import contextmanager


def import_quietly(module: str):
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")
        return importlib.import_module(module)


@contextmanager
def quiet_dataset_logs(level: int = logging.WARNING):
    logger = logging.getLogger("megatron.core.datasets")
    previous = logger.level
    logger.setLevel(level)
    try:
        yield
    finally:
        logger.setLevel(previous)
