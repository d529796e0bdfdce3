"""Typed run configuration, loaded from YAML with `key=value` overrides.

Strict by design: an unknown key, a wrong type or an impossible combination raises ConfigError with a
message that names the key and the fix, before any process group exists. Every derived number
(gradient accumulation, DP degree, the DeepSpeed JSON) is computed once, in `resolve`.

    sections.py        the dataclasses (every key and its default)
    loading.py         YAML + overrides -> RunConfig
    resolve.py         validation -> ResolvedConfig
    deepspeed_json.py  the generated DeepSpeed JSON, and merging a hand-written one
    shipped.py         the run configs in ds_configs/: each preset's paper recipe
"""
from opt_ds.config.deepspeed_json import deepspeed_config, merge_deepspeed_json
from opt_ds.config.loading import apply_overrides, build_dataclass, load_config
from opt_ds.config.resolve import ResolvedConfig, resolve
from opt_ds.config.sections import (BatchConfig, BlendEntry, CheckpointConfig, ConfigError, DataConfig, FaultsConfig,
                                    HealthConfig, ModelConfig, OptimizerConfig, ParallelConfig, PrecisionConfig,
                                    RecoveryConfig, RunConfig, SampleConfig, TrainConfig, WandbConfig)

__all__ = ["BatchConfig", "BlendEntry", "CheckpointConfig", "ConfigError", "DataConfig", "FaultsConfig",
           "HealthConfig", "ModelConfig", "OptimizerConfig", "ParallelConfig", "PrecisionConfig", "RecoveryConfig",
           "ResolvedConfig", "RunConfig", "SampleConfig", "TrainConfig", "WandbConfig", "apply_overrides",
           "build_dataclass", "deepspeed_config", "load_config", "merge_deepspeed_json", "resolve"]
