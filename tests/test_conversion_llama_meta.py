"""Meta's LLaMA release layout (params.json + consolidated.NN.pth, interleaved RoPE rows, Meta's shard dims):
a checkpoint written here by hand imports to the logits of its Hugging Face twin, Meta (2 shards) -> opt_ds
(TP=2 x PP=2) -> Meta is bit-exact, and broken releases are refused with one line."""
import json
import shutil

import pytest
import torch

from conversion.convert import Options, convert
from conversion.files import ConversionError
from conversion.verify import StreamedModel, greedy, prompt_for, teacher_forced
from conversion.convert import open_checkpoint
from hf_llama_reference import random_hf_llama
from opt_ds.models.llama.shape import LlamaShape

SHAPE = LlamaShape(num_layers=2, hidden_size=64, num_heads=8, ffn_hidden_size=176, vocab_size=250,
                   max_position_embeddings=64, num_kv_heads=2, rms_norm_eps=1e-5)
SHARDS = 2


def to_interleaved(w, heads):
    """HF's rotate-half rows -> Meta's interleaved pairs: per head, rows (0, d/2, 1, d/2+1, ...)."""
    d = w.shape[0] // heads
    order = torch.stack([torch.arange(d // 2), torch.arange(d // 2) + d // 2], dim=1).reshape(-1)
    return w.reshape(heads, d, -1)[:, order].reshape(w.shape)


def write_meta(hf, path):
    """The Meta layout of an HF LlamaForCausalLM, from the format description (not conversion/ code)."""
    path.mkdir()
    m = hf.model
    full = {"tok_embeddings.weight": (m.embed_tokens.weight, 1), "norm.weight": (m.norm.weight, None),
            "output.weight": (hf.lm_head.weight, 0), "rope.freqs": (torch.ones(4), None)}
    for i, layer in enumerate(m.layers):
        a, f = layer.self_attn, layer.mlp
        full.update({f"layers.{i}.attention.wq.weight": (to_interleaved(a.q_proj.weight, SHAPE.num_heads), 0),
                     f"layers.{i}.attention.wk.weight": (to_interleaved(a.k_proj.weight, SHAPE.kv_heads), 0),
                     f"layers.{i}.attention.wv.weight": (a.v_proj.weight, 0),
                     f"layers.{i}.attention.wo.weight": (a.o_proj.weight, 1),
                     f"layers.{i}.feed_forward.w1.weight": (f.gate_proj.weight, 0),
                     f"layers.{i}.feed_forward.w2.weight": (f.down_proj.weight, 1),
                     f"layers.{i}.feed_forward.w3.weight": (f.up_proj.weight, 0),
                     f"layers.{i}.attention_norm.weight": (layer.input_layernorm.weight, None),
                     f"layers.{i}.ffn_norm.weight": (layer.post_attention_layernorm.weight, None)})
    for rank in range(SHARDS):
        shard = {k: (t if dim is None else t.chunk(SHARDS, dim)[rank]).detach().clone() for k, (t, dim) in full.items()}
        torch.save(shard, path / f"consolidated.{rank:02d}.pth")
    (path / "params.json").write_text(json.dumps({"dim": 64, "n_layers": 2, "n_heads": 8, "n_kv_heads": 2,
                                                  "multiple_of": 16, "norm_eps": 1e-5, "vocab_size": -1,
                                                  "max_seq_len": 64}))


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    hf = random_hf_llama(SHAPE)
    root = tmp_path_factory.mktemp("meta")
    write_meta(hf, root / "meta")
    return hf, root / "meta"


def test_meta_imports_to_the_logits_of_its_hugging_face_twin(release, tmp_path):
    hf, meta = release
    lines = []
    assert convert(meta, tmp_path / "ods", Options(to="opt_ds", tp=2, pp=2), out=lines.append) == 0, lines
    ckpt = open_checkpoint(tmp_path / "ods", "opt_ds")
    with torch.no_grad():
        reference = greedy(lambda ids: hf(input_ids=ids).logits, prompt_for(ckpt.shape))
    ours = teacher_forced(StreamedModel(ckpt), reference)      # the argmax after each of its prefixes
    assert (ours.logits - reference.logits).abs().max().item() <= 1e-5
    assert ours.tokens == reference.tokens


def test_meta_to_opt_ds_to_meta_is_bit_exact(release, tmp_path):
    _, meta = release
    assert convert(meta, tmp_path / "ods", Options(to="opt_ds", tp=2, pp=2), out=lambda _: None) == 0
    lines = []
    assert convert(tmp_path / "ods", tmp_path / "back", Options(to="meta", tp=SHARDS), out=lines.append) == 0, lines
    assert "verify: OK" in "\n".join(lines)
    for rank in range(SHARDS):
        original = torch.load(meta / f"consolidated.{rank:02d}.pth")
        back = torch.load(tmp_path / "back" / f"consolidated.{rank:02d}.pth")
        original.pop("rope.freqs")
        assert original.keys() == back.keys()
        for key in original:
            assert torch.equal(original[key], back[key]), key
    params = json.loads((tmp_path / "back" / "params.json").read_text())
    assert (params["dim"], params["n_kv_heads"], params["vocab_size"]) == (64, 2, 250)


def broken_copy(meta, tmp_path, edit):
    broken = tmp_path / "broken"
    shutil.copytree(meta, broken)
    edit(broken)
    return broken


@pytest.mark.parametrize("edit, message", [
    (lambda d: (d / "consolidated.01.pth").unlink(), "a shard is missing or extra"),
    (lambda d: (d / "consolidated.01.pth").rename(d / "consolidated.02.pth"), "consolidated.01.pth is missing"),
    (lambda d: shutil.copy(d / "consolidated.01.pth", d / "consolidated.2.pth"), "a shard is missing or extra"),
    (lambda d: shutil.copy(d / "consolidated.01.pth", d / "consolidated.1.pth"), "are the same shard number twice"),
    (lambda d: shutil.copy(d / "consolidated.00.pth", d / "consolidated.01.pth"), "a shard is duplicated"),
    (lambda d: torch.save({k: v[:, :4] if k == "layers.0.attention.wo.weight" else v
                           for k, v in torch.load(d / "consolidated.01.pth").items()}, d / "consolidated.01.pth"),
     "the shards' shapes disagree"),
])
def test_broken_releases_are_refused(release, tmp_path, edit, message):
    broken = broken_copy(release[1], tmp_path, edit)
    with pytest.raises(ConversionError, match=message):
        convert(broken, tmp_path / "out", Options(to="opt_ds"), out=lambda _: None)
    assert not (tmp_path / "out").exists()
