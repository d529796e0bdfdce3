"""The opt_ds model computes what Hugging Face's OPTForCausalLM (the independent reference) computes."""
import pytest
import torch

from hf_reference import copy_hf_into_pipeline, random_hf_model
from opt_ds.models.presets import OPTShape
from opt_ds.parallel.layout import ParallelLayout
from opt_ds.parallel.pipe import build_pipeline

SHAPES = {
    "pre-ln": OPTShape(num_layers=3, hidden_size=64, num_heads=4, ffn_hidden_size=256, vocab_size=512,
                       max_position_embeddings=64, dropout=0.0),
    "opt-350m-style": OPTShape(num_layers=3, hidden_size=64, num_heads=4, ffn_hidden_size=256, vocab_size=512,
                               max_position_embeddings=64, word_embed_proj_dim=32, pre_layer_norm=False, dropout=0.0),
}


@pytest.fixture(scope="module")
def layout():
    layout = ParallelLayout(1, 1, 1)
    layout.initialize()
    return layout


@pytest.mark.parametrize("name", SHAPES)
def test_logits_match_transformers(layout, name):
    shape = SHAPES[name]
    hf = random_hf_model(shape)
    ours = build_pipeline(shape, layout).eval()
    copy_hf_into_pipeline(hf, ours, shape)
    input_ids = torch.randint(3, shape.vocab_size, (2, 48), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = hf(input_ids).logits
        got = ours(input_ids)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


def test_copy_is_not_vacuous(layout):
    """Different weights must give different logits, or the comparison above proves nothing."""
    shape = SHAPES["pre-ln"]
    ours = build_pipeline(shape, layout).eval()
    copy_hf_into_pipeline(random_hf_model(shape, seed=0), ours, shape)
    other = random_hf_model(shape, seed=1)
    input_ids = torch.randint(3, shape.vocab_size, (1, 16))
    with torch.no_grad():
        assert (ours(input_ids) - other(input_ids).logits).abs().max() > 1e-2
