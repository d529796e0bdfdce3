"""Evaluation on one small trained checkpoint (trained once for the module): its Hugging Face export carries
the run's tokenizer; lm-evaluation-harness's own HF model class on the export and `opt-ds eval` at TP=1 and
at TP=2 x PP=2 agree on the shipped local tasks (same acc/acc_norm, per-request log-likelihoods within
1e-4), and a universal checkpoint scores like the training one; `opt-ds eval --perplexity` equals
transformers' on the export; the validation loss of the same weights is the same in runs of other lengths,
eval intervals and layouts; task metrics are logged during a real two-process training run, and a failing
task does not stop it; bad input gets one line and writes nothing."""
import json
import math
import random

import pytest
import torch

from conftest import TINY_MODEL
from multiproc import opt_ds
from opt_ds.cli import main as opt_ds_main
from opt_ds.data.preprocess import PreprocessConfig, preprocess
from opt_ds.data.tokenizer import BPETokenizer
from opt_ds.eval.tasks import LOCAL_TASKS, TaskError, check_loadable, task_manager
from opt_ds.train.metrics import read_metrics

TASKS = ["opt_ds_tiny_mc", "opt_ds_tiny_cloze"]
TRAIN = TINY_MODEL + ["data.split=90,10,0", "batch.global_batch_size=8", "batch.micro_batch_size=2",
                      "optimizer.lr=0.003", "model.dropout=0.0", "train.eval_iters=2"]
ANIMALS = ["cat", "dog", "fox", "bird", "horse", "cow", "fish", "bear"]
PLACES = ["the river", "the garden", "the barn", "the forest", "the field", "the house"]
FOODS = ["bread", "milk", "apples", "fish", "seeds", "grass"]
SENTENCES = ["In the morning the {a} went to {p} and ate some {f}.", "The old {a} walked to {p} to look for {f}.",
             "Every day the little {a} sleeps near the {b}.", "Where does the {a} sleep at night? The {a} sleeps in {p}.",
             "What does the {a} eat? It eats {f} with the other animals.", "The {a} walks slowly to {p}."]


def write_corpus(path, documents=240, seed=1):
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(documents):
            text = " ".join(rng.choice(SENTENCES).format(a=rng.choice(ANIMALS), b=rng.choice(ANIMALS),
                                                         p=rng.choice(PLACES), f=rng.choice(FOODS))
                            for _ in range(rng.randint(2, 6)))
            f.write(json.dumps({"text": text}) + "\n")
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A TP=1 run on a corpus with its own BPE (saved with a validation at steps 0, 4, 8, 12), its HF export
    and a TP=2 x PP=2 weights-only copy."""
    root = tmp_path_factory.mktemp("eval")
    corpus = write_corpus(root / "corpus.jsonl")
    preprocess(PreprocessConfig(inputs=[str(corpus)], output_prefix=str(root / "data" / "corpus"), vocab_size=512,
                                workers=1), progress=False)
    opt_ds("train", "-", *TRAIN, f"data.train=[{{path: {root / 'data' / 'corpus'}}}]", "train.steps=12",
           "train.eval_interval=4", f"train.save_dir={root / 'ckpt'}", f"train.log_dir={root / 'run'}",
           "train.tensorboard=false", timeout=300)
    opt_ds("convert", root / "ckpt", root / "hf", "--to", "hf", timeout=300)
    opt_ds("convert", root / "ckpt", root / "tp2pp2", "--to", "opt_ds", "--tp", 2, "--pp", 2, "--no-verify",
           timeout=300)
    return root


def test_hf_export_tokenizer_reproduces_opt_ds_ids(trained, tmp_path):
    from transformers import AutoTokenizer
    ours = BPETokenizer.load(trained / "data" / "corpus.tokenizer")
    theirs = AutoTokenizer.from_pretrained(trained / "hf")
    text = "The old fox walked to the barn to look for apples. Ünïcode, digits 1234 and  two spaces\n"
    assert theirs(text, add_special_tokens=False)["input_ids"] == ours.encode(text)
    assert theirs(text)["input_ids"] == ours.encode(text, add_bos=True)
    assert (theirs.bos_token_id, theirs.eos_token_id, theirs.pad_token_id) == (2, 2, 1)
    assert theirs.decode(ours.encode(text)) == text
    generation = json.loads((trained / "hf" / "generation_config.json").read_text())
    assert (generation["bos_token_id"], generation["eos_token_id"], generation["pad_token_id"]) == (2, 2, 1)

    # a weights-only source records no tokenizer: said in one line; --tokenizer supplies one (if it fits)
    proc = opt_ds("convert", trained / "tp2pp2", tmp_path / "bare", "--to", "hf", "--no-verify", timeout=300)
    assert "records no tokenizer, so the export has none" in proc.stdout and not (tmp_path / "bare" / "tokenizer.json").exists()
    opt_ds("convert", trained / "tp2pp2", tmp_path / "given", "--to", "hf", "--no-verify",
           "--tokenizer", trained / "data" / "corpus.tokenizer", timeout=300)
    assert AutoTokenizer.from_pretrained(tmp_path / "given")(text)["input_ids"] == ours.encode(text, add_bos=True)
    proc = opt_ds("convert", trained / "tp2pp2", tmp_path / "opt", "--to", "hf", "--tokenizer", "opt", check=False,
                  timeout=300)
    assert proc.returncode == 2 and "has 50265 entries, more than the model's vocabulary of 512" in proc.stdout
    assert not (tmp_path / "opt").exists()


def harness_on_export(trained) -> dict:
    """lm-evaluation-harness's own Hugging Face model class (`lm_eval --model hf`) on the export."""
    from lm_eval import simple_evaluate
    manager = task_manager(TASKS)
    return simple_evaluate(model="hf", model_args={"pretrained": str(trained / "hf"), "dtype": "float32",
                                                   "device": "cpu"},
                           tasks=TASKS, task_manager=manager, log_samples=True, bootstrap_iters=1000, batch_size=4)


def loglikelihoods(results: dict) -> dict:
    return {(task, sample["doc_id"], i): response[0][0]
            for task, samples in results["samples"].items() for sample in samples
            for i, response in enumerate(sample["resps"])}


@pytest.fixture(scope="module")
def evaluated(trained):
    out = {}
    opt_ds("eval", trained / "ckpt", "--tasks", ",".join(TASKS), "--log-samples", "--output", trained / "eval-tp1",
           "--perplexity", trained / "corpus.jsonl", "--window", 16, "--stride", 8, timeout=600)
    out["tp1"] = json.loads((trained / "eval-tp1" / "results.json").read_text())
    opt_ds("eval", trained / "tp2pp2", "--tasks", ",".join(TASKS), "--log-samples", "--output", trained / "eval-tp2pp2",
           "--tokenizer", trained / "data" / "corpus.tokenizer", "--batch-size", 3, nproc=4, timeout=600)
    out["tp2pp2"] = json.loads((trained / "eval-tp2pp2" / "results.json").read_text())
    return out


def test_opt_ds_eval_matches_the_harness_hf_model_at_two_layouts(trained, evaluated):
    reference = harness_on_export(trained)
    expected = loglikelihoods(reference)
    assert len(expected) == 24 * 2 + 24
    for layout in ("tp1", "tp2pp2"):
        results = evaluated[layout]
        for task, metrics in (("opt_ds_tiny_mc", ("acc", "acc_norm")), ("opt_ds_tiny_cloze", ("acc",))):
            for metric in metrics:
                assert results["results"][task][f"{metric},none"] == reference["results"][task][f"{metric},none"]
        got = loglikelihoods(results)
        assert got.keys() == expected.keys()
        assert max(abs(got[k] - expected[k]) for k in expected) < 1e-4, layout


def test_perplexity_equals_transformers_on_the_export(trained, evaluated):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    measured = evaluated["tp1"]["perplexity"][0]
    assert (measured["window"], measured["stride"], measured["documents"]) == (16, 8, 240)
    tokenizer = AutoTokenizer.from_pretrained(trained / "hf")
    model = AutoModelForCausalLM.from_pretrained(trained / "hf", dtype=torch.float32).eval()
    total, count = 0.0, 0
    for line in (trained / "corpus.jsonl").read_text().splitlines():
        ids = tokenizer(json.loads(line)["text"])["input_ids"] + [tokenizer.eos_token_id]     # </s> text </s>
        scored = 0
        while scored < len(ids) - 1:        # windows of 16 inputs, 8 new tokens predicted after the first
            end = min(len(ids) - 1, 16 if scored == 0 else scored + 8)
            window = torch.tensor([ids[max(0, end - 16):end + 1]])
            with torch.no_grad():
                logprobs = torch.log_softmax(model(window[:, :-1]).logits.float(), -1)
            per_token = logprobs[0].gather(-1, window[0, 1:, None])[:, 0]
            total += float(per_token[-(end - scored):].sum())
            count += end - scored
            scored = end
    assert measured["tokens"] == count
    assert measured["perplexity"] == pytest.approx(math.exp(-total / count), rel=1e-4)


def test_same_weights_same_validation_loss_across_runs_and_layouts(trained, in_training):
    """Step 0 (the same seeded weights): 12 steps / eval every 4 at TP=1 vs 6 steps / every 3 at DP=2."""
    first = read_metrics(trained / "run" / "metrics.jsonl", "eval")[0]
    second = read_metrics(in_training / "metrics.jsonl", "eval")[0]
    assert first["step"] == second["step"] == 0
    assert abs(first["loss"] - second["loss"]) < 1e-6
    splits = [read_metrics(d / "metrics.jsonl", "data_split")[0] for d in (trained / "run", in_training)]
    assert splits[0]["corpora"] == splits[1]["corpora"] and splits[0]["corpora"][0]["valid_documents"] == 24


BROKEN_TASK = """task: opt_ds_broken
custom_dataset: !function broken.docs
output_type: loglikelihood
test_split: test
doc_to_text: "{{text}}"
doc_to_target: " end"
process_results: !function broken.fail
metric_list:
  - metric: acc
"""
BROKEN_CODE = """import datasets
def docs(**_):
    return datasets.DatasetDict({"test": datasets.Dataset.from_list([{"text": "the cat"}, {"text": "a dog"}])})
def fail(doc, results):
    raise RuntimeError("this task's metric is broken")
"""


@pytest.fixture(scope="module")
def in_training(trained):
    """Two processes (DP=2), tasks and a perplexity set every 4 steps (4 and the end, 6); one task fails."""
    tasks = trained / "broken-task"
    tasks.mkdir()
    (tasks / "broken.yaml").write_text(BROKEN_TASK)
    (tasks / "broken.py").write_text(BROKEN_CODE)
    log_dir = trained / "in-training"
    opt_ds("train", "-", *TRAIN, f"data.train=[{{path: {trained / 'data' / 'corpus'}}}]", "train.steps=6",
           "train.eval_interval=3", f"train.log_dir={log_dir}", "eval.tasks=[opt_ds_tiny_mc, opt_ds_broken]",
           f"eval.include_path=[{tasks}]", f"eval.perplexity=[{trained / 'corpus.jsonl'}]", "eval.limit=8",
           "eval.interval=4", nproc=2, timeout=600)
    return log_dir


def test_in_training_evaluation_logs_task_metrics(in_training):
    records = read_metrics(in_training / "metrics.jsonl", "eval_tasks")
    assert [r["step"] for r in records] == [4, 6]
    for record in records:
        assert 0 <= record["opt_ds_tiny_mc/acc"] <= 1 and 0 <= record["opt_ds_tiny_mc/acc_norm"] <= 1
        assert 1 < record["perplexity/corpus.jsonl"] < 512
    failed = read_metrics(in_training / "metrics.jsonl", "eval_tasks_failed")
    assert [(r["step"], r["task"]) for r in failed] == [(4, "opt_ds_broken"), (6, "opt_ds_broken")]
    assert "this task's metric is broken" in failed[0]["error"]
    assert read_metrics(in_training / "metrics.jsonl", "end")[0]["step"] == 6     # training went on
    assert any((in_training / "tensorboard").iterdir())


# --- bad input: one line, nothing written ---------------------------------------------------------------

def eval_error(capsys, *args, **env):
    status = opt_ds_main(["eval", *map(str, args)])
    err = capsys.readouterr().err.strip().splitlines()
    assert status != 0 and len(err) == 1 and err[0].startswith("opt-ds eval: error: "), err
    return err[0]


def test_unknown_task_lists_close_names():
    with pytest.raises(TaskError, match=r"unknown task\(s\) opt_ds_tiny_mcq .*close names: 'opt_ds_tiny_mcq': "
                                        r"opt_ds_tiny_mc"):
        task_manager(["opt_ds_tiny_mcq"])


def test_task_data_not_found_offline_says_where_it_looked(tmp_path):
    (tmp_path / "hub.yaml").write_text("task: opt_ds_hub_only\ndataset_path: no-such-org/no-such-dataset\n"
                                       "output_type: loglikelihood\ntest_split: test\ndoc_to_text: '{{text}}'\n"
                                       "doc_to_target: ' x'\n")
    manager = task_manager(["opt_ds_hub_only"], [tmp_path])
    with pytest.raises(TaskError, match="cannot be loaded offline .*looked in the datasets cache .*--include-path"):
        check_loadable(manager, ["opt_ds_hub_only"])


def test_bad_eval_arguments_get_one_line_and_write_nothing(trained, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    (tmp_path / "empty").mkdir()
    assert "is neither a checkpoint folder nor a train.save_dir" in \
        eval_error(capsys, tmp_path / "empty", "--tasks", TASKS[0], "--output", out)
    assert "more than the checkpoint's vocabulary of 512" in \
        eval_error(capsys, trained / "ckpt", "--tasks", TASKS[0], "--tokenizer", "opt", "--output", out)
    assert "--perplexity" in eval_error(capsys, trained / "ckpt", "--perplexity", tmp_path / "nothing.txt")
    monkeypatch.setenv("WORLD_SIZE", "2")     # checked before any process group is made
    assert "records no tokenizer" in eval_error(capsys, trained / "tp2pp2", "--tasks", TASKS[0], "--output", out)
    monkeypatch.setenv("WORLD_SIZE", "3")
    assert "tensor-parallel with TP=2: run a multiple of 2 processes" in \
        eval_error(capsys, trained / "tp2pp2", "--tasks", TASKS[0], "--output", out)
    assert not out.exists()


def test_shipped_tasks_are_packaged():
    assert sorted(p.name for p in LOCAL_TASKS.glob("*.yaml")) == ["opt_ds_tiny_cloze.yaml", "opt_ds_tiny_mc.yaml"]


def test_universal_checkpoint_evaluates_like_the_training_one(trained, evaluated):
    opt_ds("convert", trained / "ckpt", trained / "universal", "--to", "universal", "--no-verify", timeout=300)
    opt_ds("eval", trained / "universal", "--tasks", TASKS[0], "--limit", 6, "--log-samples", "--output",
           trained / "eval-universal", timeout=600)
    got = loglikelihoods(json.loads((trained / "eval-universal" / "results.json").read_text()))
    expected = loglikelihoods(evaluated["tp1"])
    assert len(got) == 12 and max(abs(got[k] - expected[k]) for k in got) < 1e-6
