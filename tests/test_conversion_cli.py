"""`opt-ds convert`: dry runs, the verification it prints, and that the verification can fail."""
from __future__ import annotations

import sys

import torch
from safetensors.torch import load_file, save_file

from conversion.cli import main
from conversion.convert import open_checkpoint
from conversion.verify import prompt_for, verify
from conversion_helpers import tiny_hf_model
from multiproc import run


def test_convert_prints_a_passing_verification(tmp_path, capsys):
    tiny_hf_model("opt_350m_style").save_pretrained(tmp_path / "hf")
    assert main([str(tmp_path / "hf"), str(tmp_path / "ods"), "--to", "opt_ds", "--tp", "2", "--pp", "2"]) == 0
    out = capsys.readouterr().out
    assert "source vs target (opt_ds model, fp32): max |diff| 0.000e+00" in out
    assert "target in transformers' OPTForCausalLM vs opt_ds" in out
    assert out.rstrip().endswith("verify: OK")


def test_dry_run_prints_the_mapping_and_writes_nothing(tmp_path, capsys):
    tiny_hf_model("pre_ln").save_pretrained(tmp_path / "hf")
    assert main([str(tmp_path / "hf"), str(tmp_path / "ods"), "--to", "opt_ds", "--tp", "2", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "model.decoder.layers.3.self_attn.k_proj.weight [32, 32]" in out
    assert "from model.safetensors: model.decoder.layers.3.self_attn.k_proj.weight" in out
    assert "to   layer_05-model_{00..01}: self_attn.qkv.weight (k rows of each head, [np,3,hn]) [split dim 0 over 2 TP ranks]" in out
    assert not (tmp_path / "ods").exists()


def test_verification_catches_swapped_attention_projections(tmp_path):
    """The classic conversion bug (QKV order): swap q and k of one layer in an otherwise correct target."""
    tiny_hf_model("pre_ln").save_pretrained(tmp_path / "hf")
    assert main([str(tmp_path / "hf"), str(tmp_path / "out"), "--to", "hf", "--no-verify"]) == 0
    path = tmp_path / "out" / "model.safetensors"
    tensors = load_file(str(path))
    q, k = "model.decoder.layers.2.self_attn.q_proj.weight", "model.decoder.layers.2.self_attn.k_proj.weight"
    tensors[q], tensors[k] = tensors[k], tensors[q]
    save_file(tensors, str(path), metadata={"format": "pt"})

    report = verify(open_checkpoint(tmp_path / "hf", "hf"), open_checkpoint(tmp_path / "out", "hf"))
    assert not report.ok
    assert str(report).endswith("FAILED: the converted checkpoint does not reproduce the source")
    # position 0 attends to itself alone (q and k cancel out), so the logits first differ at position 1
    assert "first over it at position 1, in the prompt)" in report.lines[0], report.lines[0]


def test_half_precision_target_is_verified_with_the_stated_tolerance(tmp_path, capsys):
    tiny_hf_model("pre_ln").save_pretrained(tmp_path / "hf")
    assert main([str(tmp_path / "hf"), str(tmp_path / "fp16"), "--to", "metaseq", "--dtype", "fp16"]) == 0
    out = capsys.readouterr().out
    assert "verify: OK" in out
    line = next(l for l in out.splitlines() if "source vs target" in l)
    max_diff = float(line.split("max |diff| ")[1].split(" ")[0])
    assert 0 < max_diff < 5e-3 * 10, "fp16 rounding shows, within the fp16 tolerance"
    written = torch.load(tmp_path / "fp16" / "reshard-model_part-0.pt", weights_only=False)["model"]
    assert {t.dtype for t in written.values()} == {torch.float16}


def test_module_entry_point_runs():
    proc = run([sys.executable, "-m", "conversion.cli", "--help"], timeout=120)
    assert "--to {hf,meta,metaseq,opt_ds,universal}" in proc.stdout


def test_verification_catches_a_different_greedy_token_within_the_logit_tolerance(tmp_path):
    """A target whose logits stay within the lossless tolerance but whose argmax differs after one prefix still
    fails: the source's head rows a < b are equal (a tie its greedy decoding breaks to a, the first index), the
    target's row b is 3e-6 larger, so after the prompt it would choose b."""
    model = tiny_hf_model("pre_ln")
    model.save_pretrained(tmp_path / "source")
    prompt = prompt_for(open_checkpoint(tmp_path / "source", "hf").shape)
    with torch.no_grad():
        first = int(model(input_ids=torch.tensor([prompt])).logits[0, -1].argmax())
        second = next(t for t in range(first + 1, model.config.vocab_size) if t not in prompt)
        embedding = model.get_input_embeddings().weight     # OPT's head is tied to it
        embedding[second] = embedding[first]
        model.save_pretrained(tmp_path / "source")
        embedding[second] = embedding[first] * (1 + 3e-6)
        model.save_pretrained(tmp_path / "target")

    report = verify(open_checkpoint(tmp_path / "source", "hf"), open_checkpoint(tmp_path / "target", "hf"),
                    reference=False)
    assert not report.ok
    logits_line, tokens_line = report.lines[0], report.lines[1]
    assert "first over it" not in logits_line, "the logits agree within the tolerance"
    assert tokens_line.endswith(f"(DIFFERENT from token 1: source {first}, target {second})"), tokens_line
