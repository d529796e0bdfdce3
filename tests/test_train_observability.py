"""What a person watching a run sees: the console line (progress, ETA, data consumed, the loss averaged over
the log interval, speed), TensorBoard and Weights & Biases (offline) with the same scalars, the run folder's
story, and a finished run that says so when asked to train again."""
import re
from pathlib import Path

import pytest
import yaml

from conftest import TINY_MODEL
from multiproc import opt_ds
from opt_ds.config import load_config
from opt_ds.train.metrics import read_metrics
from wandb_files import history

ARGS = TINY_MODEL + ["data.synthetic=arithmetic", "batch.global_batch_size=2", "batch.micro_batch_size=1",
                     "optimizer.lr=0.003", "train.steps=6", "train.eval_interval=3", "train.eval_iters=1"]
LINE = re.compile(r"^\[opt_ds\] step (\d)/6 \| 0:00:\d\d elapsed, ETA 0:\d\d:\d\d \| ([\d,]+) tokens, (\d+) samples \| "
                  r"loss (\d+\.\d{4}) \(mean of 3 steps\) \| lr \d\.\d{3}e[-+]\d\d \| grad norm \d+\.\d{3} \| "
                  r"[\d,]+ tokens/s \| [\d.e-]+ model TFLOP/s per GPU \| memory \d+\.\d\d GiB$", re.M)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("observability")
    every_step = root / "every-step"
    opt_ds("train", "-", *ARGS, "train.log_interval=1", "train.tensorboard=false", f"train.log_dir={every_step}",
           timeout=300)
    watched = root / "watched"
    proc = opt_ds("train", "-", *ARGS, "train.log_interval=3", f"train.log_dir={watched}",
                  f"train.save_dir={watched}/checkpoints", "train.wandb.project=opt-ds-test",
                  "train.wandb.mode=offline", "train.wandb.name=watched", timeout=300, WANDB_MODE="offline",
                  WANDB_SILENT="true")
    return every_step, watched, proc.stdout


def test_console_line_shows_progress_data_and_the_interval_mean_loss(runs):
    every_step, watched, stdout = runs
    lines = LINE.findall(stdout)
    assert [int(step) for step, *_ in lines] == [3, 6], stdout[-3000:]
    assert [(tokens, int(samples)) for _, tokens, samples, _ in lines] == [("192", 6), ("384", 12)]
    per_step = [r["loss"] for r in read_metrics(every_step / "metrics.jsonl", "train")]
    logged = read_metrics(watched / "metrics.jsonl", "train")
    means = [sum(per_step[:3]) / 3, sum(per_step[3:]) / 3]
    assert [r["loss"] for r in logged] == pytest.approx(means, rel=1e-6)
    assert [float(loss) for *_, loss in lines] == pytest.approx(means, abs=5e-5)
    assert [r["step_loss"] for r in logged] == pytest.approx([per_step[2], per_step[5]], rel=1e-6)
    assert logged[-1]["eta_seconds"] == 0 and logged[-1]["consumed_tokens"] == 6 * 2 * 32


def test_wandb_offline_run_holds_the_same_scalars_as_tensorboard(runs):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    _, watched, _ = runs
    board = EventAccumulator(str(watched / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0}).Reload()
    scalars = {tag: [(e.step, e.value) for e in board.Scalars(tag)] for tag in board.Tags()["scalars"]}
    on_steps = {tag: points for tag, points in scalars.items() if tag.split("/")[0] in ("train", "eval")}
    assert {"train/loss", "train/lr", "train/grad_norm", "train/tokens_per_second", "eval/loss"} <= set(on_steps)
    assert [step for step, _ in scalars["train-vs-tokens/loss"]] == [192, 384]
    assert {"config/text_summary", "sample/text_summary"} & set(board.Tags()["tensors"]) >= {"config/text_summary"}

    [run_file] = (watched / "wandb").glob("offline-run-*/run-*.wandb")
    rows = history(run_file)
    logged = {tag: [(row["step"], row[tag]) for row in rows if tag in row] for tag in on_steps}
    for tag, points in on_steps.items():
        assert [s for s, _ in logged[tag]] == [s for s, _ in points], tag
        assert [v for _, v in logged[tag]] == pytest.approx([v for _, v in points], rel=1e-6), tag
    assert any("consumed_tokens" in row for row in rows)


def test_run_folder_tells_its_story(runs):
    _, watched, _ = runs
    cfg = load_config(watched / "config.yaml").run          # re-runnable as is
    assert cfg.train.steps == 6 and cfg.model.hidden_size == 64
    assert (watched / "deepspeed.json").is_file() and (watched / "metrics.jsonl").is_file()
    versions = yaml.safe_load((watched / "versions.json").read_text())
    assert versions["torch"] and versions["deepspeed"] and versions["git_commit"]


def test_a_finished_run_says_so_instead_of_training_again(runs):
    _, watched, _ = runs
    proc = opt_ds("train", "-", *ARGS, f"train.log_dir={watched}", f"train.save_dir={watched}/checkpoints",
                  timeout=300)
    assert f"resumed from {watched}/checkpoints/global_step6" in proc.stdout and "0 steps remain" in proc.stdout
    assert "nothing to train" in proc.stdout and "train.steps=12" in proc.stdout
    assert not list(Path(watched, "checkpoints").glob("global_step[!6]*"))
