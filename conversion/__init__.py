"""Checkpoint conversion for OPT: metaseq <-> opt_ds (any TP/PP) <-> Hugging Face, and DeepSpeed universal
checkpoints to change the layout of a training run with its optimizer state. See docs/conversion.md.

    from conversion.convert import Options, convert
    convert("facebook-opt-125m/", "ckpt/", Options(to="opt_ds", tp=2, pp=2))
"""
