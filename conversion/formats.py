"""The names the converter accepts, without importing torch (so `opt-ds convert --help` is instant)."""
FORMATS = ("hf", "meta", "metaseq", "opt_ds", "universal")
DTYPE_NAMES = ("fp32", "fp16", "bf16")
