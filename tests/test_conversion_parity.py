"""Converted weights run in opt_ds give the logits of transformers' OPTForCausalLM (fp32, CPU, <= 1e-5)."""
from __future__ import annotations

import pytest
import torch

from conversion.convert import Options, convert, open_checkpoint
from conversion.verify import StreamedModel, greedy, prompt_for, teacher_forced
from conversion_helpers import KINDS, METASEQ_VOCAB, hf_logits, tiny_hf_model, write_metaseq_parts
from multiproc import REPO, torchrun

TOLERANCE = 1e-5


def to_opt_ds(src, dst, **options):
    assert convert(src, dst, Options(to="opt_ds", verify=False, **options), out=lambda _: None) == 0


def opt_ds_model(path, fmt="opt_ds"):
    return StreamedModel(open_checkpoint(path, fmt))


@pytest.mark.parametrize("kind", KINDS)
def test_opt_ds_model_reproduces_transformers(tmp_path, kind):
    model = tiny_hf_model(kind)
    model.save_pretrained(tmp_path / "hf")
    to_opt_ds(tmp_path / "hf", tmp_path / "ods")

    with torch.no_grad():
        reference = greedy(lambda ids: model(input_ids=ids).logits, prompt_for(ours_shape(tmp_path / "ods")))
    ours = teacher_forced(opt_ds_model(tmp_path / "ods"), reference)    # the argmax after each of its prefixes
    assert (ours.logits - reference.logits).abs().max().item() <= TOLERANCE
    assert ours.tokens == reference.tokens
    assert len(set(reference.logits.argmax(-1).tolist())) > 1, "the fixture model should not be degenerate"


def ours_shape(path):
    return open_checkpoint(path, "opt_ds").shape


def test_metaseq_kvq_parts_reproduce_transformers(tmp_path):
    """Parts assembled with metaseq's K,V,Q order read back to the same model (pitfall: reading them as Q,K,V)."""
    model = tiny_hf_model("pre_ln", vocab_size=METASEQ_VOCAB)
    write_metaseq_parts(model, tmp_path / "ms", parts=2)
    ours = opt_ds_model(tmp_path / "ms", fmt="metaseq")
    prompt = prompt_for(ours.ckpt.shape)
    with torch.no_grad():
        logits = ours(torch.tensor([prompt]))[0]
    assert (logits - hf_logits(model, prompt)).abs().max().item() <= TOLERANCE


def test_tp2_pp2_engine_reproduces_transformers(tmp_path):
    """opt-350m style (post-LN, projections, no final LayerNorm), vocabulary 127 padded to 128 for TP=2, run by a
    real 4-process DeepSpeed PipelineEngine built by opt_ds.train.engine.build_engine."""
    model = tiny_hf_model("opt_350m_style")
    model.save_pretrained(tmp_path / "hf")
    to_opt_ds(tmp_path / "hf", tmp_path / "ods", tp=2, pp=2)

    out = tmp_path / "logits.pt"
    torchrun(4, REPO / "tests" / "conversion_engine.py", "logits", "--ckpt", tmp_path / "ods", "--tp", "2",
             "--pp", "2", "--out", out, timeout=240)
    engine_logits = torch.load(out)
    reference = hf_logits(model, prompt_for(ours_shape(tmp_path / "ods")))
    assert engine_logits.shape == reference.shape
    assert (engine_logits - reference).abs().max().item() <= TOLERANCE

