"""Round trips through the opt_ds format must give back the very same bytes-level tensors."""
from __future__ import annotations

import pytest
import torch

from conversion.convert import Options, convert
from conversion_helpers import (KINDS, METASEQ_VOCAB, assert_same_tensors, hf_state, load_tensors, tiny_hf_model,
                                write_metaseq_parts)


def run(src, dst, **options):
    """One conversion through the library entry point (the CLI's code path), without logit verification:
    these tests compare tensors exactly, and test_conversion_parity covers the logits."""
    assert convert(src, dst, Options(verify=False, **options), out=lambda _: None) == 0


def layer_files(tag_dir):
    return {p.name: torch.load(p, weights_only=False) for p in sorted(tag_dir.glob("layer_*"))}


@pytest.mark.parametrize("kind", KINDS)
def test_hf_to_opt_ds_tp2_pp2_and_back_is_bit_exact(tmp_path, kind):
    model = tiny_hf_model(kind)
    model.save_pretrained(tmp_path / "hf")
    run(tmp_path / "hf", tmp_path / "ods", to="opt_ds", tp=2, pp=2)
    run(tmp_path / "ods", tmp_path / "hf2", to="hf")

    assert_same_tensors(load_tensors(tmp_path / "hf" / "model.safetensors"),
                        load_tensors(tmp_path / "hf2" / "model.safetensors"))
    files = sorted(p.name for p in (tmp_path / "ods" / "global_step0").iterdir())
    assert "layer_00-model_01-model_states.pt" in files and "mp_rank_03_model_states.pt" in files
    assert (tmp_path / "ods" / "latest").read_text() == "global_step0"


def test_metaseq_parts_to_opt_ds_tp1_pp2_and_back_is_bit_exact(tmp_path):
    """fp16 matrices next to fp32 LayerNorms: every tensor keeps its own dtype."""
    model = tiny_hf_model("pre_ln", vocab_size=METASEQ_VOCAB)
    write_metaseq_parts(model, tmp_path / "ms", parts=2, dtype=torch.float16, fp32_norms=True)
    run(tmp_path / "ms", tmp_path / "ods", to="opt_ds", tp=1, pp=2)
    run(tmp_path / "ods", tmp_path / "ms2", to="metaseq", tp=2)

    for k in range(2):
        original = torch.load(tmp_path / "ms" / f"reshard-model_part-{k}.pt", weights_only=False)["model"]
        written = torch.load(tmp_path / "ms2" / f"reshard-model_part-{k}.pt", weights_only=False)["model"]
        assert_same_tensors(dict(original), dict(written))


def test_opt_ds_resharding_tp2_pp2_to_tp1_pp1_to_tp2_pp1_is_bit_exact(tmp_path):
    tiny_hf_model("opt_350m_style").save_pretrained(tmp_path / "hf")
    run(tmp_path / "hf", tmp_path / "a", to="opt_ds", tp=2, pp=2)
    run(tmp_path / "a", tmp_path / "b", to="opt_ds", tp=1, pp=1)
    run(tmp_path / "b", tmp_path / "c", to="opt_ds", tp=2, pp=1, tag="resharded")

    a, c = layer_files(tmp_path / "a" / "global_step0"), layer_files(tmp_path / "c" / "resharded")
    assert sorted(a) == sorted(c)       # layer files do not depend on PP
    for name in a:
        assert_same_tensors(a[name], c[name])
    assert len(list((tmp_path / "c" / "resharded").glob("mp_rank_*"))) == 2
    assert len(list((tmp_path / "b" / "global_step0").glob("layer_*-model_00-model_states.pt"))) == 4 + 3


def test_vocabulary_is_padded_for_tp_and_restored_on_export(tmp_path):
    model = tiny_hf_model("pre_ln")             # 127 rows: TP=4 needs 128
    model.save_pretrained(tmp_path / "hf")
    run(tmp_path / "hf", tmp_path / "ods", to="opt_ds", tp=4)
    ranks = [torch.load(tmp_path / "ods" / "global_step0" / f"layer_00-model_{r:02d}-model_states.pt")
             for r in range(4)]
    rows = torch.cat([r["word_embeddings.weight"] for r in ranks])
    assert rows.shape[0] == 128 and torch.equal(rows[127], torch.zeros_like(rows[127]))
    meta = torch.load(tmp_path / "ods" / "global_step0" / "mp_rank_00_model_states.pt", weights_only=False)
    assert meta["opt_model_shape"]["vocab_size"] == 128
    assert meta["universal_checkpoint_info"]["original_vocab_size"] == 127

    run(tmp_path / "ods", tmp_path / "hf2", to="hf")
    assert_same_tensors(hf_state(model), load_tensors(tmp_path / "hf2" / "model.safetensors"))


def test_hf_writer_shards_large_models_and_reader_follows_the_index(tmp_path):
    model = tiny_hf_model("pre_ln")
    model.save_pretrained(tmp_path / "hf")
    run(tmp_path / "hf", tmp_path / "sharded", to="hf", max_shard_bytes=40_000)
    shards = sorted((tmp_path / "sharded").glob("model-*.safetensors"))
    assert len(shards) > 2 and (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    run(tmp_path / "sharded", tmp_path / "single", to="hf")
    assert_same_tensors(hf_state(model), load_tensors(tmp_path / "single" / "model.safetensors"))


def test_dtype_option_casts_every_tensor(tmp_path):
    model = tiny_hf_model("pre_ln")
    model.save_pretrained(tmp_path / "hf")
    run(tmp_path / "hf", tmp_path / "bf16", to="hf", dtype="bf16")
    written = load_tensors(tmp_path / "bf16" / "model.safetensors")
    assert {t.dtype for t in written.values()} == {torch.bfloat16}
    assert torch.equal(written["model.decoder.layers.0.fc1.weight"],
                       hf_state(model)["model.decoder.layers.0.fc1.weight"].bfloat16())


def test_hf_reader_accepts_pytorch_bin_with_opt_model_keys(tmp_path):
    """What HF's own metaseq converter saves: an OPTModel (keys without `model.`), here as pytorch_model.bin."""
    model = tiny_hf_model("opt_350m_style")
    (tmp_path / "hf").mkdir()
    model.config.to_json_file(tmp_path / "hf" / "config.json")
    torch.save({k[len("model."):]: v for k, v in hf_state(model).items()}, tmp_path / "hf" / "pytorch_model.bin")
    run(tmp_path / "hf", tmp_path / "out", to="hf")
    assert_same_tensors(hf_state(model), load_tensors(tmp_path / "out" / "model.safetensors"))
