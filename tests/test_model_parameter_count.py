"""Parameter counts computed from the single-device model definition (meta device, no process group) match
the analytic formulas and the published sizes (OPT: Hugging Face's checkpoints; LLaMA: Hugging Face's
LlamaForCausalLM on the same config)."""
import pytest
import torch
import torch.distributed as dist

from opt_ds.models.presets import PRESETS, analytic_parameter_count
from opt_ds.parallel.layout import shutdown_distributed
from opt_ds.parallel.pipe import single_device_model

PUBLISHED = {"opt-125m": 125_239_296, "opt-350m": 331_196_416, "opt-1.3b": 1_315_758_080,
             "opt-2.7b": 2_651_596_800, "opt-6.7b": 6_658_473_984, "opt-13b": 12_853_473_280,
             "llama-7b": 6_738_415_616, "llama-13b": 13_015_864_320, "llama-33b": 32_528_943_616,
             "llama-65b": 65_285_660_672, "llama2-70b": 68_976_648_192}


def count_parameters(shape) -> int:
    """Parameters of the full model, counted on the meta device (nothing is allocated, so opt-175b is
    counted in milliseconds). No process group is needed."""
    with torch.device("meta"):
        model = single_device_model(shape)
    return sum(p.numel() for p in model.parameters())


@pytest.fixture(autouse=True, scope="module")
def no_process_group():
    """Start without the process group an earlier in-process test may have left, so the check below sees
    whether counting itself needs one."""
    shutdown_distributed(wait=False)


@pytest.mark.parametrize("name", PRESETS)
def test_model_definition_matches_formula(name):
    shape = PRESETS[name].shape
    assert count_parameters(shape) == analytic_parameter_count(shape)
    assert not dist.is_initialized(), "counting must not need a process group"


@pytest.mark.parametrize("name", PUBLISHED)
def test_matches_hugging_face_sizes(name):
    assert count_parameters(PRESETS[name].shape) == PUBLISHED[name]


def test_175b_is_about_175_billion():
    assert 174.5e9 < count_parameters(PRESETS["opt-175b"].shape) < 175.5e9
