"""The README and docs end to end on one shortened demo run: launchers/demo.sh preprocesses the bundled corpus,
trains TP=2 x PP=2 through DeepSpeed's launcher (4 ranks, no third-party warning printed), saves, samples and
summarises; then every command of the ```bash blocks of README.md and docs/*.md runs as written against it, in
a folder laid out like a fresh clone after `make demo` (CPU-feasible ones for real, training for 2 steps;
GPU-sized ones as --print-config or refused up front by the CPU).

Commands that only read and print (no process group, no worker process, no checkpoint written: --print-config,
summary, bench --list / --project*, plan, convert --dry-run, and the GPU cases and layouts refused before any
work) run in this test's own process: the same argv through the same `python -m opt_ds` entry point
(opt_ds/__main__.py, run by runpy as the interpreter would), in the same folder with the same environment, so
each saves an interpreter start (3 to 10 s of CPU importing torch, for some also DeepSpeed and megatron-core).
`in_process` leaves nothing behind: environment, folder, warning filters and opt_ds.quiet's log filters are
restored, and no process group may remain. Everything that trains, launches, starts a world or writes a
checkpoint runs as a subprocess, as written; the two benchmark commands that share nothing with the commands
before them (see ALONGSIDE) start in the background once the demo is ready, and are checked at their turn."""
import contextlib
import io
import logging
import os
import re
import runpy
import shlex
import signal
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from file_modes import umask, unreadable
from multiproc import REPO, child_env, run
from opt_ds import quiet
from opt_ds.bench.cases import NAMED_CASES
from opt_ds.parallel.layout import shutdown_distributed
from opt_ds.train.metrics import read_metrics

DEMO_STEPS = 16
# A line a library prints for a Python warning or a logged warning (opt_ds's own lines start with [opt_ds]).
THIRD_PARTY_WARNING = re.compile(r"Warning: |\[WARNING\]|warnings\.warn\(")


@pytest.fixture(scope="module")
def clone(tmp_path_factory):
    """A folder laid out like a fresh clone after `make demo` (the demo shortened to DEMO_STEPS steps)."""
    root = tmp_path_factory.mktemp("clone")
    for name in ("ds_configs", "launchers", "opt_ds", "conversion", "scripts", "README.md"):
        (root / name).symlink_to(REPO / name)
    with umask(0o022):
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
    assert unreadable(demo) == [], "under umask 022 the run folder is readable by group and others"


@contextlib.contextmanager
def _restored_process_state():
    """Put back what a command run in this process may change: environment, folder, warning filters and the
    log filters opt_ds.quiet installs; and check it left no process group."""
    env, cwd, argv = dict(os.environ), os.getcwd(), list(sys.argv)
    loggers = [logging.getLogger(n.logger) for n in quiet.NOISE if n.logger]
    filters = [list(logger.filters) for logger in loggers]
    try:
        with warnings.catch_warnings():
            yield
    finally:
        os.chdir(cwd)
        os.environ.clear()
        os.environ.update(env)
        sys.argv[:] = argv
        for logger, kept in zip(loggers, filters):
            logger.filters = kept
    assert not torch.distributed.is_initialized(), "a command run in this process started a process group"


def in_process(args: list, cwd, **env) -> subprocess.CompletedProcess:
    """`python -m opt_ds ARGS` in this process (see the module docstring): runpy runs opt_ds/__main__.py with
    sys.argv as the interpreter sets it, in `cwd`, with the environment a subprocess would get; stdout and
    stderr are captured together, as `run` captures them."""
    # A one-rank world an earlier test left in this process (conftest ends it at session end) would be ended
    # by the command's own shutdown at exit: end it first, so that every run starts from the same state.
    shutdown_distributed(wait=False)
    output = io.StringIO()
    with _restored_process_state(), contextlib.redirect_stdout(output), contextlib.redirect_stderr(output):
        os.environ.clear()
        os.environ.update(child_env(**env))
        os.chdir(cwd)
        sys.argv[:] = ["-m", *map(str, args)]
        try:
            runpy.run_module("opt_ds", run_name="__main__", alter_sys=True)
            code = 0
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
    return subprocess.CompletedProcess(["opt-ds", *args], code, output.getvalue())


def test_generate_needs_whole_tensor_parallel_groups(clone):
    """`opt-ds generate` rebuilds the model from the checkpoint's saved config: a TP=2 checkpoint needs a
    multiple of 2 processes (one clear error otherwise, before any process group: run in this process); the
    README runs it with 2."""
    root, _ = clone
    proc = in_process(["generate", root / "runs/demo/checkpoints", "--prompt", "ROMEO. "], cwd=root)
    assert proc.returncode == 2 and "tensor-parallel with TP=2: run a multiple of 2 processes" in proc.stdout


# The documents with ```bash blocks, run in this order (a command an earlier one already ran is not rerun).
DOCS = ["README.md", *sorted(f"docs/{p.name}" for p in (REPO / "docs").glob("*.md") if "```bash" in p.read_text())]
# Commands shown but not run here: set-up (make, source, pip: `make setup` did it), downloads from the
# Hugging Face hub (no network in CI) and the test suite itself.
NOT_RUN = ("make", "source", "pip", "huggingface-cli", "pytest")
ENV_ASSIGNMENT = re.compile(r"^[A-Z_][A-Z0-9_]*=")
SHELL_OPERATORS = {"|", ">", ">>", "&&", ";"}


def doc_commands(doc: str) -> list:
    """(environment, words) of each command of the document's bash blocks: continuations joined, comments
    dropped, leading VAR=value words as the environment; a line with a here-document or a pipe runs in bash."""
    text = (REPO / doc).read_text()
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        lines = iter(block.replace("\\\n", " ").splitlines())
        for line in lines:
            heredoc = re.search(r"<<'?(\w+)'?", line)
            if heredoc:
                body = [line, *iter(lambda: next(lines), heredoc.group(1))]
                commands.append(({}, ["bash", "-c", "\n".join(body + [heredoc.group(1)])]))
                continue
            words = shlex.split(line, comments=True)
            env = {}
            while words and ENV_ASSIGNMENT.match(words[0]):
                key, _, value = words.pop(0).partition("=")
                env[key] = value
            if SHELL_OPERATORS & set(words):
                words = ["bash", "-c", line]
            if words:
                commands.append((env, words))
    return commands


SHORT = ["train.steps=2", "train.eval_iters=1", "sample.max_new_tokens=4"]
GPU_CASES = {name for name in NAMED_CASES if not name.startswith("tiny")}


def adapted(env: dict, words: list):
    """(command, environment, what its output must contain) for one command of the docs; None: not run."""
    if words[0] in NOT_RUN or any(w.startswith("runs/demo-llama") for w in words):
        return None     # (the conversions of `make demo-llama`'s checkpoint: tests/test_conversion_llama*.py)
    cuda = torch.cuda.is_available()
    if words[0] == "deepspeed":                         # 8 GPUs: the config it would run, at world size 8
        return [sys.executable, "-m", "opt_ds", *words[words.index("train"):], "--print-config"], \
            {**env, "WORLD_SIZE": "8"}, '"layout": "TP=2 x PP=1 x DP=4"'
    if words[0] == "sbatch":                            # needs SLURM: the config it would run
        return [sys.executable, "-m", "opt_ds", "train", words[2], "--print-config"], env, '"layout": "TP=8 x PP=2'
    if words[0] == "launchers/launch.sh":
        return ["bash", *words], env, "launching TP=2 x PP=1 x DP=8 on 16 processes over 2 node(s)"
    bench = words.index("bench") + 1 if "bench" in words else None
    if bench and not cuda and {w.split(":")[0] for w in words[bench:]} & GPU_CASES:
        if words[0] == "torchrun":                      # a rank of the launch it asks for refuses it
            env = {**env, "WORLD_SIZE": words[words.index("--nproc_per_node") + 1]}
        return [sys.executable, "-m", "opt_ds", *words[bench - 1:]], env, "it is a GPU case"
    if bench and words[bench:bench + 1] == ["tiny"]:    # the CPU smoke run: one timed step, no peers
        words = [*words, "--steps", "1", "--warmup", "0", "--no-peer"]
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
                "--print-config": '"deepspeed"', "--output-prefix": None, "--dry-run": "would write",
                "convert": "verify: OK", "eval": "eval wrote ", "plan": "Layouts for", "--project": "TFLOP/s",
                "--project-published": "predicted", "bench": "reports in", "bash": ""}
    key = next((k for k in expected if k in words), None)
    if key == "--output-prefix":                        # preprocess: the output prefix it wrote
        return words, env, words[words.index(key) + 1]
    if key == "eval" and "--output" not in words:       # results on the console only
        return words, env, "perplexity " if "--perplexity" in words else "| acc"
    return words, env, expected[key] if key else "[opt_ds] end step="


# Commands that read nothing an earlier command writes and write only their own folder, which no earlier
# command touches: the CPU benchmark (runs/bench) and the GPU A/B session's rehearsal (runs/gpu_ab_rehearsal),
# each a chain of interpreters started one after another, mostly on one core of two. They start as soon as the
# demo is ready and run beside the others; at a command's turn the test waits for it and checks it as it checks
# every command, so the commands after it in its document still find what it wrote.
ALONGSIDE = (["opt-ds", "bench", "tiny", "tiny-pp2"], ["bash", "scripts/gpu_ab.sh"])


@pytest.fixture(scope="module")
def alongside(clone, tmp_path_factory):
    """{repr((env, words)): (process, log file)} of the ALONGSIDE commands of the docs, started now."""
    root, _ = clone
    logs = tmp_path_factory.mktemp("alongside")
    started = {}
    for env, words in (c for doc in DOCS for c in doc_commands(doc)):
        if words in ALONGSIDE and repr((env, words)) not in started:
            command, env, _ = adapted(env, words)
            log = logs / f"{len(started)}.log"
            with open(log, "w") as out:     # a file, not a pipe: nobody reads the output until the end
                proc = subprocess.Popen([str(c) for c in command], cwd=root, env=child_env(**env), stdout=out,
                                        stderr=subprocess.STDOUT, start_new_session=True)
            started[repr((env, words))] = (proc, log)
    yield started
    for proc, _ in started.values():        # a -k selection that never reached its document
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def finished(proc: subprocess.Popen, log: Path, timeout: float) -> subprocess.CompletedProcess:
    """The result of a command started alongside, as `run` would return it (timeout counted from now)."""
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise AssertionError(f"timed out after {timeout}s: {' '.join(proc.args)}\n{log.read_text()[-6000:]}") from None
    return subprocess.CompletedProcess(proc.args, proc.returncode, log.read_text())


# The expected output of the commands that only read and print (the module docstring): run in this process.
READ_ONLY_OUTPUT = {"validation loss: ", "175b-slice", '"deepspeed"', '"layout": "TP=2 x PP=1 x DP=4"',
                    '"layout": "TP=8 x PP=2', "would write", "Layouts for", "TFLOP/s", "predicted", "it is a GPU case"}
ran = set()


@pytest.mark.parametrize("doc", DOCS)
def test_every_command_of_the_docs_runs_as_written(clone, alongside, doc):
    root, _ = clone
    commands = doc_commands(doc)
    assert len(commands) >= (20 if doc == "README.md" else 1)
    for env, words in commands:
        command, key = adapted(env, words), repr((env, words))
        if command is None or key in ran:
            continue
        ran.add(key)
        command, env, expected = command
        if key in alongside:
            proc = finished(*alongside[key], timeout=400)
        elif command[:3] == [sys.executable, "-m", "opt_ds"] and expected in READ_ONLY_OUTPUT \
                and "--measure-layer" not in command:
            proc = in_process(command[3:], cwd=root, **env)
        else:
            proc = run(command, cwd=root, timeout=400, check=False, **env)
        refused = expected == "it is a GPU case"
        assert proc.returncode == (2 if refused else 0), f"{doc}: {' '.join(words)}\n{proc.stdout[-4000:]}"
        assert expected in proc.stdout, f"{doc}: {' '.join(words)}\n{proc.stdout[-4000:]}"
        if words[0] == "launchers/launch.sh":          # a free rendezvous port by default, not DeepSpeed's 29500
            assert re.search(r"--master_port (?!29500 )\d+ ", proc.stdout), proc.stdout[-2000:]
        if f"train.steps={DEMO_STEPS + 2}" in command:
            assert f"resumed from runs/demo/checkpoints/global_step{DEMO_STEPS}" in proc.stdout
            assert "2 steps remain" in proc.stdout
        if f"train.steps={DEMO_STEPS + 4}" in command:
            assert f"resumed from runs/demo-universal/global_step{DEMO_STEPS + 2} (universal" in proc.stdout
