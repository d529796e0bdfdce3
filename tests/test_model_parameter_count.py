"""Parameter counts computed from the model definition (meta device) match OPT's published sizes."""
import pytest

from opt_ds.models.presets import PRESETS, analytic_parameter_count
from opt_ds.parallel.layout import ParallelLayout
from opt_ds.parallel.pipe import count_parameters

PUBLISHED = {"opt-125m": 125_239_296, "opt-350m": 331_196_416, "opt-1.3b": 1_315_758_080,
             "opt-2.7b": 2_651_596_800, "opt-6.7b": 6_658_473_984, "opt-13b": 12_853_473_280}


@pytest.fixture(scope="module", autouse=True)
def single_process_world():
    ParallelLayout(1, 1, 1).initialize()


@pytest.mark.parametrize("name", PRESETS)
def test_model_definition_matches_formula(name):
    shape = PRESETS[name].shape
    assert count_parameters(shape) == analytic_parameter_count(shape)


@pytest.mark.parametrize("name", PUBLISHED)
def test_matches_hugging_face_sizes(name):
    assert count_parameters(PRESETS[name].shape) == PUBLISHED[name]


def test_175b_is_about_175_billion():
    assert 174.5e9 < count_parameters(PRESETS["opt-175b"].shape) < 175.5e9
