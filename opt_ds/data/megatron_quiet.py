"""megatron-core's data modules without the noise: importing megatron.core warns (and logs) that Transformer
Engine and Apex are absent (irrelevant for data), and its dataset code logs every index it builds or loads."""
from __future__ import annotations

import importlib
import logging
import warnings
from contextlib import contextmanager


def import_quietly(module: str):
    with warnings.catch_warnings(), quiet_dataset_logs(logger_name="megatron.core"):
        warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")
        warnings.filterwarnings("ignore", category=DeprecationWarning)  # megatron/torch internals at import
        return importlib.import_module(module)


@contextmanager
def quiet_dataset_logs(level: int = logging.WARNING, logger_name: str = "megatron.core.datasets"):
    logger = logging.getLogger(logger_name)
    previous = logger.level
    logger.setLevel(level)
    try:
        yield
    finally:
        logger.setLevel(previous)
