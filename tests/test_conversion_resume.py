"""Training resumes from a converted checkpoint at another layout, with real multi-process engines.

Layout A (TP=2, PP=2, DP=1) trains 2 steps and saves with engine.save_checkpoint, then records the loss
on a fixed evaluation batch and the losses of training steps 3 and 4 (step 3's loss is computed before
any update, so it depends on the weights alone; step 4's also on Adam's moments and the LR schedule).
  * weights only (--to opt_ds, TP=1 PP=2): the optimizer state is gone, so the evaluation loss and step 3
    match and step 4 is shown to differ;
  * universal (--to universal, loaded at TP=1 PP=1 DP=2): weights, optimizer state, LR schedule and step
    count carry over, so steps 3 and 4 give A's losses.
"""
from __future__ import annotations

import json

import pytest

from conversion.convert import Options, convert
from multiproc import REPO, torchrun

WORKER = REPO / "tests" / "conversion_engine.py"
TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    torchrun(4, WORKER, "train", "--tp", "2", "--pp", "2", "--save", root / "a", "--steps", "2",
             "--out", root / "a.json", timeout=300)
    return root, json.loads((root / "a.json").read_text())


def test_weights_only_conversion_keeps_the_evaluation_loss(trained):
    root, a = trained
    lines = []
    assert convert(root / "a", root / "weights", Options(to="opt_ds", tp=1, pp=2), out=lines.append) == 0
    assert any("the ZeRO optimizer state (zero_pp_rank_*_optim_states.pt) is dropped" in line for line in lines)
    torchrun(2, WORKER, "resume", "--tp", "1", "--pp", "2", "--load", root / "weights", "--how", "weights",
             "--out", root / "weights.json", timeout=300)
    b = json.loads((root / "weights.json").read_text())
    assert abs(b["eval"] - a["eval"]) <= TOLERANCE
    assert abs(b["next"][0] - a["next"][0]) <= TOLERANCE
    # the honest limit: a fresh optimizer and LR schedule do not continue A's training
    assert abs(b["next"][1] - a["next"][1]) > 100 * TOLERANCE


def test_universal_checkpoint_continues_training_exactly(trained):
    root, a = trained
    lines = []
    assert convert(root / "a", root / "universal", Options(to="universal"), out=lines.append) == 0
    assert lines[-1].endswith("verify: OK")
    torchrun(2, WORKER, "resume", "--tp", "1", "--pp", "1", "--load", root / "universal", "--how", "universal",
             "--steps", "2", "--out", root / "universal.json", timeout=300)
    b = json.loads((root / "universal.json").read_text())
    assert b["global_steps"] == 2
    assert abs(b["eval"] - a["eval"]) <= TOLERANCE
    assert b["next"] == pytest.approx(a["next"], abs=TOLERANCE)

    # the fp32 master weights of a universal checkpoint export like any other source
    lines = []
    assert convert(root / "universal", root / "hf", Options(to="hf"), out=lines.append) == 0
    assert lines[-1].endswith("verify: OK")
