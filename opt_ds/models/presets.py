"""Every named model size of every family (opt-125m ... opt-175b, llama-7b ... llama2-70b).

The presets themselves live with their family (`opt_ds.models.<family>.shape`); this module is the one
place that lists them all.
"""
from __future__ import annotations

from opt_ds.models.family import Preset, all_presets, family_of, get_preset  # noqa: F401
# OPT's constants, where code written before the family seam looks for them.
from opt_ds.models.opt.shape import (BOS_ID, EOS_ID, OPT_MAX_POSITIONS, OPT_VOCAB_SIZE,  # noqa: F401
                                     PAD_ID, POSITION_OFFSET, OPTShape)

PRESETS = all_presets()


def analytic_parameter_count(shape) -> int:
    """Parameters of the model of `shape`, from its family's formula (no tensors)."""
    return family_of(shape).analytic_parameter_count(shape)
