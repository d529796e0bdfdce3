"""Bad input to the commands (issue 9, items 3, 6 and 7): each is refused with one line naming the problem
and the fix, before any work starts, and leaves the folders it touches exactly as they were.

The commands run in-process through `opt_ds.cli.main` (fast); only the SIGTERM case spawns a process.
"""
import hashlib
import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import TINY_MODEL
from multiproc import child_env
from opt_ds.cli import main

BASE = TINY_MODEL + ["batch.global_batch_size=8", "batch.micro_batch_size=2", "train.steps=2"]


def tree_digest(folder: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(Path(folder).rglob("*")):
        digest.update(str(path.relative_to(folder)).encode())
        if path.is_file():
            digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()


def refused(capsys, *argv, status=2) -> str:
    """Run `opt-ds ARGV` in-process; it must exit with `status` and print one error line."""
    assert main([str(a) for a in argv]) == status
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    return err


# --- checkpoints (item 3: integrity; item 7: generate) ----------------------------------------------------

@pytest.fixture(scope="module")
def save_dir(tmp_path_factory):
    """A save folder as training leaves it: global_step1 and global_step2 (weights of a tiny HF model,
    converted), each with its SHA-256 manifest, `latest` naming global_step2."""
    from conversion.convert import Options, convert
    from conversion_helpers import tiny_hf_model
    from opt_ds.train import manifest
    root = tmp_path_factory.mktemp("generate")
    tiny_hf_model("pre_ln").save_pretrained(root / "hf")
    folder = root / "checkpoints"
    assert convert(root / "hf", folder, Options(to="opt_ds", tag="global_step1", verify=False), out=lambda _: None) == 0
    shutil.copytree(folder / "global_step1", folder / "global_step2")
    (folder / "latest").write_text("global_step2")
    for step in (1, 2):
        manifest.write(folder / f"global_step{step}", tag=f"global_step{step}", step=step, health={"healthy": True})
    return folder


@pytest.fixture
def damaged(save_dir, tmp_path):
    """A copy of `save_dir` whose newest checkpoint has one flipped byte (same size: only SHA-256 sees it)."""
    folder = shutil.copytree(save_dir, tmp_path / "checkpoints")
    victim = folder / "global_step2" / "layer_03-model_00-model_states.pt"
    raw = bytearray(victim.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    victim.write_bytes(bytes(raw))
    return folder


def test_convert_refuses_a_damaged_checkpoint(damaged, tmp_path, capsys):
    before = tree_digest(tmp_path)
    assert main(["convert", str(damaged), str(tmp_path / "hf-out"), "--to", "hf"]) == 2
    err = capsys.readouterr().err
    assert "global_step2 is damaged (layer_03-model_00-model_states.pt: content differs from its manifest" in err
    assert "convert the previous intact checkpoint with --src-tag global_step1" in err
    assert "verify: OK" not in err and tree_digest(tmp_path) == before
    assert main(["convert", str(damaged), str(tmp_path / "hf-out"), "--to", "hf", "--src-tag", "global_step1",
                 "--no-verify"]) == 0


def test_generate_refuses_a_damaged_checkpoint_with_its_own_fix(damaged, tmp_path, capsys):
    before = tree_digest(tmp_path)
    err = refused(capsys, "generate", damaged, "--prompt", "Hello", "--tokenizer", "opt")
    assert "global_step2 is damaged (layer_03-model_00-model_states.pt: content differs from its manifest" in err
    assert f"opt-ds generate {damaged / 'global_step1'} --prompt" in err
    assert "train.load_tag" not in err, "training's fix does not apply to generate"
    assert tree_digest(tmp_path) == before


@pytest.mark.parametrize("args, message", [
    (["--temperature", "-1"], "--temperature -1.0 must be > 0"),
    (["--top-p", "5"], "--top-p 5.0 must be in [0, 1]"),
    (["--max-new-tokens", "-3"], "--max-new-tokens -3 must be >= 1"),
    (["--max-new-tokens", "40"], "--max-new-tokens 40: the 3-token prompt leaves room for 29 new tokens in the "
                                 "model's context of 32; use --max-new-tokens 29 or less"),
    (["--prompt", "word " * 40], "the prompt is 42 tokens (with BOS), but the model's context is 32 tokens: "
                                 "shorten the prompt to at most 30 tokens"),
])
def test_generate_arguments(save_dir, capsys, args, message):
    before = tree_digest(save_dir)
    err = refused(capsys, "generate", save_dir, "--prompt", "Hello world", "--tokenizer", "opt", *args)
    assert message in err and err.startswith("opt-ds generate: error: ")
    assert tree_digest(save_dir) == before


def test_moved_run_finds_its_tokenizer(tmp_path, monkeypatch):
    """A run trained from the repository root records data paths relative to it (runs/demo/data/x); moved
    elsewhere, generate finds the dataset's tokenizer beside the moved checkpoints."""
    from opt_ds.config import load_config
    from opt_ds.data.tokenizer import OPT_TOKENIZER_DIR, TokenizerError
    from opt_ds.train.generate_cli import find_tokenizer
    moved = tmp_path / "elsewhere" / "demo"
    (moved / "checkpoints").mkdir(parents=True)
    shutil.copytree(OPT_TOKENIZER_DIR, moved / "data" / "corpus.tokenizer")
    cfg = load_config(None, BASE + ["data.train=[{path: runs/demo/data/corpus}]"])
    monkeypatch.chdir(tmp_path)
    assert find_tokenizer(cfg, moved / "checkpoints").vocab_file.parent == moved / "data" / "corpus.tokenizer"
    shutil.rmtree(moved / "data")
    with pytest.raises(TokenizerError, match="not found near .* pass --tokenizer FOLDER"):
        find_tokenizer(cfg, moved / "checkpoints")


def test_sigterm_during_convert_leaves_no_partial_folder(tmp_path):
    """A model big enough that writing takes a while; SIGTERM once the staging folder holds a file."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.OPTConfig(vocab_size=1000, hidden_size=384, num_hidden_layers=6, ffn_dim=1536,
                                    num_attention_heads=8, max_position_embeddings=64)
    transformers.OPTForCausalLM(config).save_pretrained(tmp_path / "hf")
    before = tree_digest(tmp_path)
    proc = subprocess.Popen([sys.executable, "-m", "opt_ds", "convert", str(tmp_path / "hf"), str(tmp_path / "out"),
                             "--to", "opt_ds", "--tp", "2"], env=child_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not any(p.is_file() for p in tmp_path.glob(".out.partial-*/**/*")):
        assert proc.poll() is None and time.monotonic() < deadline, "the conversion ended before it could be stopped"
        time.sleep(0.005)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert not list(tmp_path.glob(".out*")) and not (tmp_path / "out").exists()
    assert tree_digest(tmp_path) == before


# --- training: datasets and config, before any process group (items 3 and 6) -----------------------------

@pytest.fixture(scope="module")
def corpora(tmp_path_factory):
    from opt_ds.data.preprocess import PreprocessConfig, preprocess
    root = tmp_path_factory.mktemp("corpora")
    prefixes = []
    for name, words in (("a", "the quick brown fox "), ("b", "lorem ipsum dolor sit amet ")):
        (root / f"{name}.jsonl").write_text("".join(json.dumps({"text": f"{i} " + words * (i % 9 + 3)}) + "\n"
                                                    for i in range(80)))
        preprocess(PreprocessConfig(inputs=[str(root / f"{name}.jsonl")], output_prefix=str(root / name),
                                    tokenizer="opt"), progress=False)
        prefixes.append(root / name)
    return prefixes


def train_refused(capsys, tmp_path, *overrides) -> str:
    run_dir = tmp_path / "run"
    run_dir.mkdir(exist_ok=True)
    before = tree_digest(tmp_path)
    err = refused(capsys, "train", "-", *BASE, "model.vocab_size=50272", f"train.log_dir={run_dir}",
                  f"train.save_dir={run_dir / 'checkpoints'}", *overrides)
    assert not torch.distributed.is_initialized(), "refused before any process group exists"
    assert not (run_dir / "metrics.jsonl").exists() and tree_digest(tmp_path) == before
    return err


def test_missing_dataset_found_before_the_engine(capsys, tmp_path):
    err = train_refused(capsys, tmp_path, f"data.train=[{{path: {tmp_path / 'missing'}}}]")
    assert "no dataset at" in err and "opt-ds preprocess" in err


def test_bin_beside_another_datasets_idx(corpora, capsys, tmp_path):
    a, b = corpora
    mixed = tmp_path / "data" / "mixed"
    mixed.parent.mkdir()
    shutil.copyfile(a.with_suffix(".bin"), mixed.with_suffix(".bin"))
    shutil.copyfile(b.with_suffix(".idx"), mixed.with_suffix(".idx"))
    err = train_refused(capsys, tmp_path, f"data.train=[{{path: {mixed}}}]")
    assert "do not belong together (a .bin beside another dataset's .idx" in err


def test_vocabulary_checked_without_the_tokenizer_folder(corpora, capsys, tmp_path):
    """The tokenizer folder was not copied with the data: the token ids themselves are checked."""
    bare = tmp_path / "data" / "a"
    bare.parent.mkdir()
    for suffix in (".bin", ".idx"):
        shutil.copyfile(corpora[0].with_suffix(suffix), bare.with_suffix(suffix))
    largest = int(np.fromfile(bare.with_suffix(".bin"), dtype=np.uint16).max())
    err = train_refused(capsys, tmp_path, f"data.train=[{{path: {bare}}}]", "model.vocab_size=512")
    assert f"holds token id {largest}, beyond vocab_size=512" in err and "raise model.vocab_size" in err


def test_prompt_too_long_for_the_context_is_found_before_training(capsys, tmp_path):
    err = train_refused(capsys, tmp_path, "sample.prompt=" + " ".join(["word"] * 40), "data.tokenizer=opt")
    assert "the prompt is 41 tokens (with BOS), but the model's context is 32 tokens" in err


def test_save_dir_that_is_a_file(capsys, tmp_path):
    (tmp_path / "file").write_text("not a folder")
    err = refused(capsys, "train", "-", *BASE, f"train.save_dir={tmp_path / 'file'}")
    assert "train.save_dir" in err and "is a file, not a folder" in err
    assert (tmp_path / "file").read_text() == "not a folder"


# --- summary, bench, launch (item 7) ---------------------------------------------------------------------

RECORDS = [{"event": "train", "step": 1, "loss": 7.5, "tokens_per_second": 100.0, "model_tflops_per_gpu": 0.1},
           {"event": "train", "step": 2, "loss": 7.0, "tokens_per_second": 120.0, "model_tflops_per_gpu": 0.1}]


def test_summary_of_a_truncated_file(tmp_path, capsys):
    text = "".join(json.dumps(r) + "\n" for r in RECORDS) + '{"event": "train", "st'
    (tmp_path / "metrics.jsonl").write_text(text)
    assert main(["summary", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "training loss:   7.500 at step 1 -> 7.000 at step 2" in out and "line 3 is cut short" in out


def test_summary_of_a_record_without_loss(tmp_path, capsys):
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [*RECORDS, {"event": "train",
                                                                                             "step": 3}]))
    assert main(["summary", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "-> 7.000 at step 2" in out and "1 train/eval record(s) without a numeric loss and step are left out" in out


@pytest.mark.parametrize("text, message", [
    ("", "holds no metrics records: the run stopped before logging anything"),
    ('{"event": "start"}\nnot json\n{"event": "end"}\n', "metrics.jsonl:2 is not a metrics record"),
])
def test_summary_of_an_empty_or_damaged_file(tmp_path, capsys, text, message):
    (tmp_path / "metrics.jsonl").write_text(text)
    assert message in refused(capsys, "summary", tmp_path)


@pytest.mark.parametrize("args, message", [
    (["--steps", "0"], "--steps 0 must be >= 1"),
    (["--warmup", "-1"], "--warmup -1 must be >= 0"),
])
def test_bench_measurement_arguments(capsys, tmp_path, args, message):
    assert message in refused(capsys, "bench", "--out", tmp_path / "bench", *args)
    assert not (tmp_path / "bench").exists()


def test_launch_hostfile_not_utf8(capsys, tmp_path):
    (tmp_path / "hostfile").write_bytes(b"node\xff slots=2\n")
    err = refused(capsys, "launch", "-", *BASE, "--hostfile", tmp_path / "hostfile")
    assert "is not UTF-8 text" in err and "save it as plain text" in err


def test_launch_unknown_launcher(capsys, tmp_path):
    (tmp_path / "hostfile").write_text("localhost slots=2\n")
    with pytest.raises(SystemExit) as exit_:
        main(["launch", "-", *BASE, "--hostfile", str(tmp_path / "hostfile"), "--launcher", "pdssh"])
    assert exit_.value.code == 2 and "invalid choice: 'pdssh'" in capsys.readouterr().err


@pytest.mark.parametrize("tools, message", [
    ((), "ssh is not installed"),
    (("ssh",), "--launcher pdsh needs `pdsh`, which is not installed on this machine"),
])
def test_launch_without_ssh_or_pdsh(capsys, tmp_path, monkeypatch, tools, message):
    """PATH holds only `tools` (links to the real programs), as on a machine without them."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in tools:
        real = shutil.which(tool)
        if real is None:
            pytest.skip(f"{tool} is not installed here")
        (bin_dir / tool).symlink_to(real)
    (tmp_path / "hostfile").write_text("node-a slots=1\nnode-b slots=1\n")
    monkeypatch.setenv("PATH", str(bin_dir))
    assert message in refused(capsys, "launch", "-", *BASE, "--hostfile", tmp_path / "hostfile")
