"""The opt_ds LLaMA computes what Hugging Face's LlamaForCausalLM (the independent reference) computes, with
and without grouped-query attention, in one process and through a TP=2 x PP=2 DeepSpeed engine."""
import pytest
import torch

from hf_llama_reference import load_into, pipeline_state, random_hf_llama
from multiproc import torchrun
from opt_ds.models.llama.shape import LlamaShape
from opt_ds.parallel.layout import ParallelLayout
from opt_ds.parallel.pipe import build_pipeline

SHAPES = {
    "mha": LlamaShape(num_layers=3, hidden_size=64, num_heads=4, ffn_hidden_size=176, vocab_size=512,
                      max_position_embeddings=64),
    "gqa": LlamaShape(num_layers=4, hidden_size=64, num_heads=8, ffn_hidden_size=176, vocab_size=512,
                      max_position_embeddings=64, num_kv_heads=2, rope_theta=500000.0, rms_norm_eps=1e-5),
}
INPUT = torch.randint(0, 512, (2, 48), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def layout():
    layout = ParallelLayout(1, 1, 1)
    layout.initialize()
    return layout


@pytest.mark.parametrize("name", SHAPES)
def test_logits_match_transformers(layout, name):
    shape = SHAPES[name]
    hf = random_hf_llama(shape)
    ours = build_pipeline(shape, layout).eval()
    load_into(ours, pipeline_state(hf, shape))
    with torch.no_grad():
        expected = hf(INPUT).logits
        got = ours(INPUT)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


def test_copy_is_not_vacuous(layout):
    """Different weights must give different logits, or the comparison above proves nothing."""
    shape = SHAPES["gqa"]
    ours = build_pipeline(shape, layout).eval()
    load_into(ours, pipeline_state(random_hf_llama(shape, seed=0), shape))
    other = random_hf_llama(shape, seed=1)
    with torch.no_grad():
        assert (ours(INPUT) - other(INPUT).logits).abs().max() > 1e-2


def test_tp2_pp2_engine_matches_transformers(tmp_path):
    shape = SHAPES["gqa"]
    out = tmp_path / "logits.pt"
    torchrun(4, "tests/workers/llama_hf_run.py", out, timeout=240)
    with torch.no_grad():
        expected = random_hf_llama(shape)(INPUT).logits
    torch.testing.assert_close(torch.load(out), expected, rtol=0, atol=1e-6)
