"""The README end to end on one shortened demo run: launchers/demo.sh preprocesses the bundled corpus, trains
TP=2 x PP=2 through DeepSpeed's launcher (4 ranks, no third-party warning printed), saves, samples and
summarises; then every command of the README runs as written against it, in a folder laid out like a fresh
clone after `make demo` (CPU-feasible ones for real, with fewer steps; GPU-sized ones as --print-config),
and so does the offline path of docs/fine-tuning.md."""
import re
import shlex
import sys
from pathlib import Path

import pytest
import torch

from multiproc import REPO, opt_ds, run
from opt_ds.train.metrics import read_metrics

DEMO_STEPS = 16
# A line a library prints for a Python warning or a logged warning (opt_ds's own lines start with [opt_ds]).
THIRD_PARTY_WARNING = re.compile(r"Warning: |\[WARNING\]|warnings\.warn\(")


@pytest.fixture(scope="module")
def clone(tmp_path_factory):
    """A folder laid out like a fresh clone after `make demo` (the demo shortened to DEMO_STEPS steps)."""
    root = tmp_path_factory.mktemp("clone")
    for name in ("ds_configs", "launchers", "opt_ds", "README.md"):
        (root / name).symlink_to(REPO / name)
    proc = run(["bash", "launchers/demo.sh", f"train.steps={DEMO_STEPS}", "train.eval_interval=8",
                "train.save_interval=8", "sample.max_new_tokens=8"], timeout=900, cwd=root,
               BIN=Path(sys.executable).parent)
    return root, proc.stdout


def test_demo_script(clone):
    root, stdout = clone
    demo = root / "runs" / "demo"
    records = read_metrics(demo / "metrics.jsonl")
    evals = [r for r in records if r["event"] == "eval"]
    assert [r["step"] for r in evals] == [0, 8, 16]
    assert evals[-1]["loss"] < evals[0]["loss"] - 1.0, "validation loss must fall clearly on the real corpus"
    start = next(r for r in records if r["event"] == "start")
    assert start["layout"] == "TP=2 x PP=2 x DP=1"
    assert (demo / "checkpoints" / "global_step16").is_dir()
    assert (demo / "checkpoints" / "latest").read_text() == "global_step16"
    assert any(r["event"] == "sample" for r in records)
    assert "validation loss: " in stdout and "sample at step 16:" in stdout
    assert [line for line in stdout.splitlines() if THIRD_PARTY_WARNING.search(line)] == []


def test_generate_needs_whole_tensor_parallel_groups(clone):
    """`opt-ds generate` rebuilds the model from the checkpoint's saved config: a TP=2 checkpoint needs a
    multiple of 2 processes (one clear error otherwise); the README runs it with 2."""
    root, _ = clone
    proc = opt_ds("generate", root / "runs/demo/checkpoints", "--prompt", "ROMEO. ", check=False, timeout=60)
    assert proc.returncode == 2 and "tensor-parallel with TP=2: run a multiple of 2 processes" in proc.stdout


def readme_commands() -> list:
    """The commands of the bash blocks of the README and the fine-tuning recipe's offline path (continuations
    joined, comments dropped), but `make`."""
    text = (REPO / "README.md").read_text() + (REPO / "docs" / "fine-tuning.md").read_text()
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if words and words[0] not in ("make", "source"):
                commands.append(words)
    return commands


SHORT = ["train.steps=2", "train.eval_iters=1", "sample.max_new_tokens=4"]


def adapted(words: list):
    """(command, environment, what its output must contain) for one README command."""
    line = " ".join(words)
    if words[0] == "deepspeed":                         # 8 GPUs: the config it would run, at world size 8
        return [sys.executable, "-m", "opt_ds", *words[words.index("train"):], "--print-config"], \
            {"WORLD_SIZE": "8"}, '"layout": "TP=2 x PP=1 x DP=4"'
    if words[0] == "sbatch":                            # needs SLURM: the config it would run
        return [sys.executable, "-m", "opt_ds", "train", words[2], "--print-config"], {}, '"layout": "TP=8 x PP=2'
    if words[0].startswith("HOSTFILE="):
        return ["bash", "-c", line], {}, "launching TP=2 x PP=1 x DP=8 on 16 processes over 2 node(s)"
    if words[:3] == ["opt-ds", "bench", "opt-1.3b"] and not torch.cuda.is_available():
        return [sys.executable, "-m", "opt_ds", *words[1:]], {}, "it is a GPU case"
    if "generate" in words:
        words = [*words, "--max-new-tokens", "8"]
    elif "train.steps=400" in words:                    # continue the demo, or resume it at another layout
        steps = DEMO_STEPS + (4 if "train.load_dir=runs/demo-universal" in words else 2)
        words = [w.replace("train.steps=400", f"train.steps={steps}") for w in words] + SHORT[1:]
    elif "train" in words and "--print-config" not in words:
        words = [*words, *SHORT]
    if words[0] == "torchrun":
        words = [sys.executable, "-m", "torch.distributed.run", *words[1:]]
    elif words[0] == "opt-ds":
        words = [sys.executable, "-m", "opt_ds", *words[1:]]
    expected = {"summary": "validation loss: ", "generate": "ROMEO. ", "--list": "175b-slice",
                "--print-config": '"deepspeed"', "preprocess": "runs/opt-bpe/shakespeare",
                "convert": "verify: OK", "eval": "eval wrote "}
    return words, {}, next((v for k, v in expected.items() if k in words), "[opt_ds] end step=")


def test_every_readme_command_runs_as_written(clone):
    root, _ = clone
    commands = readme_commands()
    assert len(commands) >= 20
    for words in commands:
        command, env, expected = adapted(words)
        proc = run(command, cwd=root, timeout=400, check=False, **env)
        refused = expected == "it is a GPU case"
        assert proc.returncode == (2 if refused else 0), f"{' '.join(words)}\n{proc.stdout[-4000:]}"
        assert expected in proc.stdout, f"{' '.join(words)}\n{proc.stdout[-4000:]}"
        if f"train.steps={DEMO_STEPS + 2}" in command:
            assert f"resumed from runs/demo/checkpoints/global_step{DEMO_STEPS}" in proc.stdout
            assert "2 steps remain" in proc.stdout
        if f"train.steps={DEMO_STEPS + 4}" in command:
            assert f"resumed from runs/demo-universal/global_step{DEMO_STEPS + 2} (universal" in proc.stdout
