"""Changing the layout between save and resume, through the product's commands: `opt-ds train` at
TP=2 x PP=2, `opt-ds convert --to universal`, `opt-ds train` again at TP=1 x PP=1 x DP=2 continues the same
loss curve with the optimizer state; a checkpoint loaded at the wrong layout or for another model fails
with one message that names the fix."""
import pytest

from conftest import TINY_MODEL
from multiproc import opt_ds
from opt_ds.train.metrics import read_metrics

N = 3
ARGS = TINY_MODEL + ["model.dropout=0.0", "data.synthetic=arithmetic", "batch.global_batch_size=8",
                     "batch.micro_batch_size=2", "optimizer.lr=0.003", "optimizer.warmup_steps=2",
                     f"optimizer.decay_steps={2 * N}", "train.tensorboard=false"]
TP2PP2 = ["parallel.tensor=2", "parallel.pipeline=2"]


def train_losses(log_dir):
    return [r["loss"] for r in read_metrics(log_dir / "metrics.jsonl", "train")]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A TP=2 x PP=2 run straight to 2N steps, saved after N (global_step{N}) and at the end."""
    root = tmp_path_factory.mktemp("layouts")
    opt_ds("train", "-", *ARGS, *TP2PP2, f"train.steps={2 * N}", f"train.save_interval={N}",
           f"train.save_dir={root / 'ckpt'}", f"train.log_dir={root / 'straight'}", nproc=4, timeout=240)
    return root


def test_resume_from_universal_checkpoint_at_another_layout(saved):
    opt_ds("convert", saved / "ckpt", saved / "universal", "--to", "universal", "--src-tag", f"global_step{N}",
           timeout=240)
    log_dir = saved / "resumed"
    opt_ds("train", "-", *ARGS, "parallel.data=2", f"train.steps={2 * N}", f"train.load_dir={saved / 'universal'}",
           f"train.save_dir={saved / 'resumed-ckpt'}", f"train.log_dir={log_dir}", nproc=2, timeout=240)
    records = read_metrics(log_dir / "metrics.jsonl")
    resume = next(r for r in records if r["event"] == "resume")
    assert resume["step"] == N and resume["kind"] == "universal"
    straight = train_losses(saved / "straight")
    assert train_losses(log_dir) == pytest.approx(straight[N:], rel=1e-5)


def test_full_checkpoint_at_another_layout_names_the_conversion(saved):
    proc = opt_ds("train", "-", *ARGS, "parallel.data=2", f"train.steps={2 * N}", f"train.load_dir={saved / 'ckpt'}",
                  nproc=2, check=False, timeout=120)
    assert proc.returncode != 0
    assert "was saved at TP=2 x PP=2 x DP=1, this run is TP=1 x PP=1 x DP=2" in proc.stdout
    ckpt = saved / "ckpt"
    assert (f"opt-ds convert {ckpt} {ckpt}-universal --to universal` and train with train.load_dir={ckpt}-universal "
            f"train.save_dir={ckpt}-tp1pp1") in proc.stdout, "a new save_dir: the run's own save_dir wins over load_dir"


def test_checkpoint_of_another_model_is_refused(saved):
    proc = opt_ds("train", "-", *ARGS, *TP2PP2, "model.num_layers=2", f"train.load_dir={saved / 'ckpt'}",
                  nproc=4, check=False, timeout=120)
    assert proc.returncode != 0
    assert "holds another model (num_layers: checkpoint 4, config 2)" in proc.stdout


def test_opt_checkpoint_into_a_llama_config_is_refused(saved):
    proc = opt_ds("train", "-", *ARGS, *TP2PP2, "model.family=llama", f"train.load_dir={saved / 'ckpt'}",
                  nproc=4, check=False, timeout=120)
    assert proc.returncode != 0
    assert "holds a opt model and this config builds a llama model; set model.family=opt" in proc.stdout
