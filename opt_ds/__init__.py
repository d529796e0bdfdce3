"""opt_ds: pre-train OPT-family language models with DeepSpeed pipeline x megatron-core TP x ZeRO-1."""
__version__ = "0.1.0"
