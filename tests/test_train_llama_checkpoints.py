"""LLaMA checkpoints through the product's commands: a TP=2 x PP=2 GQA run saved after N steps resumes
exactly (same losses, LR and grad norms as the run that never stopped), resumes from a universal checkpoint
at TP=1 x PP=1 x DP=2 on the same loss curve, and is refused by an OPT config with one line."""
import pytest

from conftest import TINY_MODEL
from multiproc import opt_ds
from opt_ds.train.metrics import read_metrics

N = 3
ARGS = TINY_MODEL + ["model.family=llama", "model.num_kv_heads=2", "data.synthetic=arithmetic",
                     "batch.global_batch_size=8", "batch.micro_batch_size=2", "optimizer.lr=0.003",
                     "optimizer.warmup_steps=2", f"optimizer.decay_steps={2 * N}", "train.tensorboard=false"]
TP2PP2 = ["parallel.tensor=2", "parallel.pipeline=2"]


def train_records(log_dir):
    return read_metrics(log_dir / "metrics.jsonl", "train")


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A TP=2 x PP=2 run straight to 2N steps, saved after N (global_step{N}) and at the end."""
    root = tmp_path_factory.mktemp("llama")
    opt_ds("train", "-", *ARGS, *TP2PP2, f"train.steps={2 * N}", f"train.save_interval={N}",
           f"train.save_dir={root / 'ckpt'}", f"train.log_dir={root / 'straight'}", nproc=4, timeout=300)
    return root


def test_exact_resume(saved):
    log_dir = saved / "resumed"
    opt_ds("train", "-", *ARGS, *TP2PP2, f"train.steps={2 * N}", f"train.load_dir={saved / 'ckpt'}",
           f"train.load_tag=global_step{N}", f"train.log_dir={log_dir}", nproc=4, timeout=300)
    straight, resumed = train_records(saved / "straight"), train_records(log_dir)
    assert [r["step"] for r in resumed] == list(range(N + 1, 2 * N + 1))
    for key in ("loss", "lr", "grad_norm"):
        assert [r[key] for r in resumed] == [r[key] for r in straight[N:]], key


def test_universal_checkpoint_resumes_at_another_layout(saved):
    opt_ds("convert", saved / "ckpt", saved / "universal", "--to", "universal", "--src-tag", f"global_step{N}",
           timeout=300)
    log_dir = saved / "universal-resumed"
    opt_ds("train", "-", *ARGS, "parallel.data=2", f"train.steps={2 * N}", f"train.load_dir={saved / 'universal'}",
           f"train.log_dir={log_dir}", nproc=2, timeout=300)
    resume = next(r for r in read_metrics(log_dir / "metrics.jsonl") if r["event"] == "resume")
    assert resume["step"] == N and resume["kind"] == "universal"
    straight = [r["loss"] for r in train_records(saved / "straight")]
    assert [r["loss"] for r in train_records(log_dir)] == pytest.approx(straight[N:], rel=1e-5)


def test_llama_checkpoint_into_an_opt_config_is_refused(saved):
    opt_args = [a for a in ARGS if not a.startswith(("model.family", "model.num_kv_heads"))]
    proc = opt_ds("train", "-", *opt_args, *TP2PP2, f"train.load_dir={saved / 'ckpt'}", nproc=4, check=False,
                  timeout=120)
    assert proc.returncode != 0
    assert "holds a llama model and this config builds a opt model; set model.family=llama" in proc.stdout
