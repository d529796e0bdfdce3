"""Issue: the model is the same whatever the layout, for every model family.

Each layout trains the same tiny OPT, and the same tiny LLaMA with grouped-query attention (fp32, dropout
off, same seed, same learnable data, same global batch, gradient clipping active) with the real Trainer in real multi-process runs; every per-step loss and
gradient norm must equal the single-process run's within 1e-5 relative, the initial full weights must be
bit-identical, and OPT's tied embedding copies on the first and last stage must stay bit-identical.
The tensor-parallel layouts run with sequence parallelism and selective recompute (their gradients of the
norms and row-parallel biases are the ones SP must reduce over the TP ranks), the pipeline layouts with full
recompute; the plain TP path (SP off) runs in the checkpoint-layout and launcher tests.
"""
import json

import pytest
import torch

from conftest import TINY_MODEL
from multiproc import torchrun
from opt_ds.train.metrics import read_metrics

STEPS = 6
CLIP = 0.3
SP_SELECTIVE = ("parallel.sequence_parallel=true", "parallel.recompute=selective")
FULL_RECOMPUTE = ("parallel.recompute=full",)
LAYOUTS = {  # name: (tp, pp, dp, zero stage, extra overrides)
    "1x1x1": (1, 1, 1, 1, ()), "2x1x1": (2, 1, 1, 1, SP_SELECTIVE), "1x2x1": (1, 2, 1, 1, FULL_RECOMPUTE),
    "2x2x1": (2, 2, 1, 1, SP_SELECTIVE), "1x1x2": (1, 1, 2, 1, ()), "2x2x2": (2, 2, 2, 1, SP_SELECTIVE),
    "1x2x1-zero0": (1, 2, 1, 0, ()), "2x2x1-no-sp": (2, 2, 1, 1, ()),
}
FAMILY_OVERRIDES = {"opt": [], "llama": ["model.family=llama", "model.num_kv_heads=2"]}
# Family-independent paths run once, for OPT: ZeRO-0 clipping, pipeline-only and data-only layouts (LLaMA runs
# them combined in 2x2x2), and tensor parallelism without sequence parallelism (the default; LLaMA's is also
# held against transformers at TP=2 x PP=2 in test_model_llama_hf_equivalence.py).
OPT_ONLY = {"1x2x1-zero0", "1x2x1", "1x1x2", "2x2x1-no-sp"}


def overrides(family, tp, pp, zero, extra, log_dir):
    return TINY_MODEL + FAMILY_OVERRIDES[family] + [
        "model.dropout=0.0", "precision.dtype=fp32", f"parallel.tensor={tp}", f"parallel.pipeline={pp}",
        f"parallel.zero_stage={zero}", "batch.global_batch_size=8", "batch.micro_batch_size=2",
        "data.synthetic=arithmetic", f"train.steps={STEPS}", "train.seed=7", f"train.log_dir={log_dir}",
        "train.tensorboard=false", "optimizer.lr=0.003", "optimizer.warmup_steps=2", f"optimizer.clip_grad={CLIP}",
        *extra,
    ]


@pytest.fixture(scope="module")
def all_runs(tmp_path_factory):
    """{family: {layout: results}}. The runs of one world size share one torchrun, trained one after another
    (tests/workers/parity_run.py), so each rank's interpreter starts once, not once per layout."""
    by_world = {}
    for family in FAMILY_OVERRIDES:
        for name, (tp, pp, dp, zero, extra) in LAYOUTS.items():
            if family != "opt" and name in OPT_ONLY:
                continue
            work = tmp_path_factory.mktemp(f"{family}-{name}")
            args = overrides(family, tp, pp, zero, extra, work)
            by_world.setdefault(tp * pp * dp, []).append((family, name, work, args))
    results = {family: {"family": family} for family in FAMILY_OVERRIDES}
    for world, jobs in sorted(by_world.items()):
        job_file = tmp_path_factory.mktemp(f"world{world}") / "jobs.json"
        job_file.write_text(json.dumps([[str(work / "state.pt"), args] for _, _, work, args in jobs]))
        torchrun(world, "tests/workers/parity_run.py", job_file, timeout=240 * len(jobs))
        for family, name, work, _ in jobs:
            results[family][name] = {"metrics": read_metrics(work / "metrics.jsonl", "train"),
                                     **torch.load(work / "state.pt", weights_only=False)}
    return results


@pytest.fixture(scope="module", params=list(FAMILY_OVERRIDES))
def runs(request, all_runs):
    return all_runs[request.param]


def test_reference_run_learns_and_clips(runs):
    ref = runs["1x1x1"]["metrics"]
    assert len(ref) == STEPS
    assert ref[-1]["loss"] < ref[0]["loss"] - 0.1, "the parity data must be learnable so the model moves"
    assert all(r["grad_norm"] > CLIP for r in ref), "gradient clipping must be active in every step"


def layout_of(runs, name):
    if name not in runs:
        pytest.skip(f"{name} runs for OPT only")
    return runs[name]


@pytest.mark.parametrize("name", [n for n in LAYOUTS if n != "1x1x1"])
def test_losses_and_grad_norms_match_single_process(runs, name):
    layout_of(runs, name)
    ref, got = runs["1x1x1"]["metrics"], runs[name]["metrics"]
    assert [r["step"] for r in got] == list(range(1, STEPS + 1))
    for r, g in zip(ref, got):
        assert g["loss"] == pytest.approx(r["loss"], rel=1e-5), f"step {r['step']}"
        assert g["grad_norm"] == pytest.approx(r["grad_norm"], rel=1e-5), f"step {r['step']}"


@pytest.mark.parametrize("name", [n for n in LAYOUTS if n != "1x1x1"])
def test_initial_weights_identical(runs, name):
    layout_of(runs, name)
    ref, got = runs["1x1x1"]["init"], runs[name]["init"]
    assert ref.keys() == got.keys()
    for key in ref:
        assert torch.equal(ref[key], got[key]), key


@pytest.mark.parametrize("name", [n for n in LAYOUTS if n != "1x1x1"])
def test_trained_weights_match(runs, name):
    # Adam divides by sqrt(v), which turns float rounding in near-zero gradients into update differences
    # of ~1e-5 after a few steps; a layout bug moves whole tensors by O(1), far beyond this bound.
    layout_of(runs, name)
    ref, got = runs["1x1x1"]["final"], runs[name]["final"]
    for key in ref:
        assert (got[key] - ref[key]).norm() <= 1e-4 * ref[key].norm(), key


@pytest.mark.parametrize("name", ["1x2x1", "1x2x1-zero0", "2x2x1", "2x2x2"])
def test_tied_embedding_bit_identical_on_first_and_last_stage(runs, name):
    if runs["family"] != "opt":
        pytest.skip("LLaMA's output head is untied")
    copies = runs[name]["tied"]
    first = {(tp, dp): w for stage, tp, dp, w in copies if stage == 0}
    last = {(tp, dp): w for stage, tp, dp, w in copies if stage > 0}
    assert first and first.keys() == last.keys()
    for key in first:
        assert torch.equal(first[key], last[key]), f"tp,dp={key}"
    init = runs[name]["init"]["0.word_embeddings.weight"]
    trained = torch.cat([first[(tp, 0)] for tp in sorted(t for t, d in first if d == 0)])
    assert not torch.equal(trained, init), "the embedding must have been trained"
