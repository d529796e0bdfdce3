"""FLOPs conventions against hand-computed values (Narayanan et al. 2021; Kaplan et al. 2020)."""
import pytest

from opt_ds.models.flops import (OPT_175B_A100_TFLOPS, all_conventions, hardware_flops, matmul_parameters,
                                model_flops, sixn_attention_flops)
from opt_ds.models.presets import PRESETS, get_preset

OPT_175B = get_preset("opt-175b").shape
S = 2048


def per_token(count, batch=1, seq=S):
    return count.flops / (batch * seq)


def test_opt_175b_per_token_conventions():
    # Hand arithmetic, l=96, h=12288, V=50272, s=2048:
    #   72·l·h² = 1.043672e12, 12·l·h·s = 2.899e10, 6·V·h = 3.7065e9  -> model 1.07637e12 per token
    #   96·l·h² = 1.391562e12, 16·l·h·s = 3.866e10, 6·V·h             -> hardware 1.43393e12 per token
    lhh = 96 * 12288 ** 2
    model = 72 * lhh + 12 * 96 * 12288 * S + 6 * 50272 * 12288
    hardware = 96 * lhh + 16 * 96 * 12288 * S + 6 * 50272 * 12288
    assert per_token(model_flops(OPT_175B, 1, S)) == pytest.approx(model, rel=1e-12)
    assert per_token(hardware_flops(OPT_175B, 1, S, recomputed_layers=96)) == pytest.approx(hardware, rel=1e-12)
    assert model == pytest.approx(1.0764e12, rel=1e-4)
    # anchors §6.4 prints 1.075 for this row; the formula gives 1.0764 (its 136.7 tokens/s also implies 1.0753).
    assert per_token(model_flops(OPT_175B, 1, S)) / 1e12 == pytest.approx(1.075, abs=2e-3)
    assert per_token(hardware_flops(OPT_175B, 1, S, 96)) / 1e12 == pytest.approx(1.434, abs=1e-3)
    # 6N over the matmul parameters alone (biases and LayerNorms add 0.01 %): 1.047 T.
    assert 6 * matmul_parameters(OPT_175B) / 1e12 == pytest.approx(1.047, abs=1e-3)
    # 6N + 12·l·h·s: the same as the model FLOPs up to the bias/LayerNorm parameters.
    assert per_token(sixn_attention_flops(OPT_175B, 1, S)) == pytest.approx(model, rel=2e-4)
    # tokens/s per GPU that 147 TFLOP/s means under each convention
    assert OPT_175B_A100_TFLOPS * 1e12 / hardware == pytest.approx(102.5, abs=0.1)
    assert OPT_175B_A100_TFLOPS * 1e12 / model == pytest.approx(136.6, abs=0.1)


@pytest.mark.parametrize("name", [n for n in PRESETS if n.startswith("opt-") and n != "opt-350m"])
def test_closed_forms_hold_for_every_standard_opt_preset(name):
    shape = PRESETS[name].shape
    l, h, v = shape.num_layers, shape.hidden_size, shape.vocab_size
    batch = 8
    closed_model = 72 * batch * S * l * h * h * (1 + S / (6 * h) + v / (12 * l * h))
    closed_hw = 96 * batch * S * l * h * h * (1 + S / (6 * h) + v / (16 * l * h))
    assert model_flops(shape, batch, S).flops == pytest.approx(closed_model, rel=1e-12)
    assert hardware_flops(shape, batch, S, l).flops == pytest.approx(closed_hw, rel=1e-12)
    assert hardware_flops(shape, batch, S, 0).flops == model_flops(shape, batch, S).flops


def test_partial_recompute_adds_one_forward_per_recomputed_layer():
    shape = get_preset("opt-1.3b").shape
    model = model_flops(shape, 4, S).flops
    full = hardware_flops(shape, 4, S, shape.num_layers).flops
    half = hardware_flops(shape, 4, S, shape.num_layers // 2).flops
    assert half - model == pytest.approx((full - model) / 2, rel=1e-12)
    assert full / model > 1.3       # ×4/3 on the layers, the LM head is not recomputed


def test_opt_350m_counts_its_512_wide_embedding_and_projections():
    shape = get_preset("opt-350m").shape          # l=24, h=1024, E=512, F=4096
    l, h, e, v = 24, 1024, 512, 50272
    by_hand = l * (72 * h * h + 12 * S * h) + 6 * v * e + 2 * 6 * e * h
    count = model_flops(shape, 1, S)
    assert per_token(count) == pytest.approx(by_hand, rel=1e-12)
    assert "E=512" in count.worked             # the report says which terms differ from the closed form
    naive = 72 * S * l * h * h * (1 + S / (6 * h) + v / (12 * l * h)) / S
    assert per_token(count) < naive             # the closed form would overcount the 1024-wide logits


def test_every_convention_prints_its_formula_and_the_numbers():
    counts = all_conventions(get_preset("opt-1.3b").shape, 8, S, recomputed_layers=24)
    assert [c.key for c in counts] == ["model", "hardware", "6n_attention"]
    assert counts[0].formula == "72·B·s·l·h²·(1 + s/(6h) + V/(12·l·h))"
    assert counts[1].formula == "96·B·s·l·h²·(1 + s/(6h) + V/(16·l·h))"
    assert counts[0].worked.startswith("72·8·2048·24·2048²")
    assert counts[1].worked.startswith("96·8·2048·24·2048²")
    for c in counts:
        assert f"{c.flops:.4g}" in c.worked


@pytest.mark.parametrize("name", ["llama-65b", "llama2-70b"])
def test_llama_swiglu_gqa_untied_head_by_hand(name):
    shape = get_preset(name).shape
    l, h, v, f, d = 80, 8192, 32000, shape.ffn_hidden_size, 128
    kv = {"llama-65b": 64, "llama2-70b": 8}[name]
    layer = 2 * h * h + 2 * h * kv * d + 3 * h * f          # q, o; k, v (GQA); gate, up, down
    model = l * (6 * layer + 12 * S * h) + 6 * v * h        # + the untied V x h head
    count = model_flops(shape, 1, S)
    assert per_token(count) == pytest.approx(model, rel=1e-12)
    assert "gated" in count.worked and "exact per-term sum" in count.worked
    assert per_token(hardware_flops(shape, 1, S, l)) == pytest.approx(model + l * (2 * layer + 4 * S * h), rel=1e-12)
    # 6N leaves out the token embedding (a lookup) but keeps the untied head; norms are counted in N.
    n = l * (layer + 2 * h) + h + v * h
    assert matmul_parameters(shape) == n
    assert per_token(sixn_attention_flops(shape, 1, S)) == pytest.approx(6 * n + 12 * l * h * S, rel=1e-12)


def test_llama_65b_paper_throughput_in_tflops():
    """LLaMA trained 65B at ~380 tokens/s per A100-80GB (paper §2.4). By hand: per layer 6·(2h² + 2h² + 3hF)
    + 12·s·h = 6·809.5M + 201.3M = 5.058e9, × 80 layers + 6·V·h 1.573e9 = 4.062e11 per token -> 154.4 TFLOP/s."""
    per_gpu = per_token(model_flops(get_preset("llama-65b").shape, 1, S)) * 380 / 1e12
    assert per_gpu == pytest.approx(154.4, abs=0.1)
