"""Bad input stops with one message naming the problem and the fix, before anything is written."""
from __future__ import annotations

import json

import pytest
import torch

from conversion.cli import main
from conversion.convert import Options, convert
from conversion.files import ConversionError, staged_directory
from conversion_helpers import METASEQ_VOCAB, tiny_hf_model, write_metaseq_parts


def converting(src, dst, **options):
    return convert(src, dst, Options(verify=False, **options), out=lambda _: None)


def assert_fails(src, dst, match, **options):
    with pytest.raises(ConversionError, match=match):
        converting(src, dst, **options)
    assert not dst.exists(), "nothing may be written when the input is bad"
    assert not list(dst.parent.glob(f".{dst.name}.partial-*")), "no staging directory may be left behind"


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("hf")
    tiny_hf_model("pre_ln").save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def opt_ds_dir(hf_dir, tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "ods"
    assert converting(hf_dir, path, to="opt_ds", tp=2, pp=2) == 0
    return path


def copy_tree(src, dst):
    import shutil
    shutil.copytree(src, dst)
    return dst


def test_unknown_format(tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "notes.txt").write_text("hello")
    assert_fails(tmp_path / "src", tmp_path / "out", "unknown format", to="hf")
    assert_fails(tmp_path / "src" / "notes.txt", tmp_path / "out", "unknown checkpoint file", to="hf")


def test_mixed_formats(tmp_path, hf_dir, opt_ds_dir):
    src = copy_tree(hf_dir, tmp_path / "src")
    (src / "latest").write_text("global_step0")
    assert_fails(src, tmp_path / "out", r"mixes checkpoint formats \(hf, opt_ds\)", to="opt_ds")


def test_missing_metaseq_part(tmp_path):
    model = tiny_hf_model("pre_ln", vocab_size=METASEQ_VOCAB)
    write_metaseq_parts(model, tmp_path / "ms", parts=2)
    (tmp_path / "ms" / "reshard-model_part-1.pt").unlink()
    assert_fails(tmp_path / "ms", tmp_path / "out", "model_parallel_size=2 but 1 part file", to="hf")
    write_metaseq_parts(model, tmp_path / "ms2", parts=2)
    (tmp_path / "ms2" / "reshard-model_part-0.pt").unlink()
    assert_fails(tmp_path / "ms2", tmp_path / "out", "reshard-model_part-0.*is missing", to="hf")


def test_missing_tp_rank_layer_file(tmp_path, opt_ds_dir):
    src = copy_tree(opt_ds_dir, tmp_path / "src")
    (src / "global_step0" / "layer_03-model_01-model_states.pt").unlink()
    assert_fails(src, tmp_path / "out", r"layer_03 has TP ranks \[0\].*layer_03-model_01-model_states.pt", to="hf")


def test_missing_mp_rank_file(tmp_path, opt_ds_dir):
    src = copy_tree(opt_ds_dir, tmp_path / "src")
    (src / "global_step0" / "mp_rank_03_model_states.pt").unlink()
    assert_fails(src, tmp_path / "out", "3 mp_rank files is not a multiple of the TP degree 2", to="hf")


def test_shapes_that_do_not_match_the_config(tmp_path, hf_dir):
    src = copy_tree(hf_dir, tmp_path / "src")
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**config, "ffn_dim": 128}))
    assert_fails(src, tmp_path / "out", r"do not match the model configuration.*fc1.weight is \(64, 32\), "
                                        r"expected \(128, 32\)", to="opt_ds")


@pytest.mark.parametrize("options, match", [
    (dict(to="opt_ds", tp=3), r"--tp 3 does not divide the 4 attention heads; use one of 1, 2, 4"),
    (dict(to="opt_ds", pp=5), r"--pp 5 is more pipeline stages than the 4 decoder layers"),
    (dict(to="metaseq", tp=2), r"does not divide the 127 vocabulary rows"),
    (dict(to="hf", tp=2), r"--tp/--pp do not apply to hf"),
    (dict(to="universal"), r"--to universal converts an opt_ds training checkpoint"),
])
def test_layouts_the_model_cannot_take(tmp_path, hf_dir, options, match):
    assert_fails(hf_dir, tmp_path / "out", match, **options)


def test_destination_not_empty_needs_force(tmp_path, hf_dir):
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "keep.txt").write_text("precious")
    with pytest.raises(ConversionError, match="is not empty; choose a new directory or pass --force"):
        converting(hf_dir, dst, to="opt_ds")
    assert (dst / "keep.txt").read_text() == "precious"
    assert converting(hf_dir, dst, to="opt_ds", force=True) == 0
    assert not (dst / "keep.txt").exists() and (dst / "latest").is_file()


@pytest.mark.parametrize("fmt", ["metaseq", "opt_ds", "hf"])
def test_truncated_files(tmp_path, hf_dir, opt_ds_dir, fmt):
    if fmt == "metaseq":
        write_metaseq_parts(tiny_hf_model("pre_ln", vocab_size=METASEQ_VOCAB), tmp_path / "src", parts=2)
        victim, expected = tmp_path / "src" / "reshard-model_part-1.pt", "cannot be read as a torch checkpoint"
    elif fmt == "opt_ds":
        copy_tree(opt_ds_dir, tmp_path / "src")
        victim = tmp_path / "src" / "global_step0" / "layer_04-model_01-model_states.pt"
        expected = "cannot be read as a torch checkpoint"
    else:
        copy_tree(hf_dir, tmp_path / "src")
        victim, expected = tmp_path / "src" / "model.safetensors", "cannot be read as safetensors"
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) // 2])
    assert_fails(tmp_path / "src", tmp_path / "out", f"{victim.name}: {expected}.*truncated or corrupt",
                 to="metaseq" if fmt != "metaseq" else "hf")


def test_checkpoint_without_recorded_shape_needs_num_heads(tmp_path, opt_ds_dir):
    src = copy_tree(opt_ds_dir, tmp_path / "src")
    for path in (src / "global_step0").glob("mp_rank_*"):
        meta = torch.load(path, weights_only=False)
        del meta["opt_model_shape"], meta["universal_checkpoint_info"]
        torch.save(meta, path)
    assert_fails(src, tmp_path / "out", "does not record the model shape.*pass --num-heads N", to="hf")
    assert converting(src, tmp_path / "out", to="hf", num_heads=4) == 0


def test_universal_needs_optimizer_state(tmp_path, opt_ds_dir):
    assert_fails(opt_ds_dir, tmp_path / "out", "has no ZeRO optimizer files", to="universal")


def test_untied_lm_head_is_refused(tmp_path):
    model = tiny_hf_model("pre_ln", tie_word_embeddings=False)
    model.save_pretrained(tmp_path / "hf")
    assert_fails(tmp_path / "hf", tmp_path / "out", "lm_head.weight differs from the token embedding", to="opt_ds")


def test_destination_overlapping_the_source_is_refused(tmp_path, opt_ds_dir):
    src = copy_tree(opt_ds_dir, tmp_path / "src")
    for dst in (src, src / "global_step0" / "out", tmp_path):
        with pytest.raises(ConversionError, match="overlaps the source"):
            converting(src, dst, to="opt_ds", tp=1, force=True)
    assert (src / "latest").is_file()


def test_failed_write_leaves_destination_untouched(tmp_path):
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "old.txt").write_text("previous checkpoint")
    with pytest.raises(RuntimeError):
        with staged_directory(dst, force=True) as staging:
            (staging / "half-written.pt").write_bytes(b"...")
            raise RuntimeError("disk full")
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    assert (dst / "old.txt").read_text() == "previous checkpoint"


def test_cli_prints_one_line_error_and_exits_2(tmp_path, capsys):
    assert main([str(tmp_path / "missing"), str(tmp_path / "out"), "--to", "hf"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "no such file or directory" in err and "Traceback" not in err
