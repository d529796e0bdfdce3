"""`opt-ds plan`: layouts that fit, fastest first, with their memory and the overrides that run them; the
memory model checked against the tensor memory of real opt_ds engines on CPU."""
import json
import re
import subprocess
import sys

import pytest

from multiproc import REPO, run, torchrun
from opt_ds.bench.cases import parse_case
from opt_ds.bench.memory import REDUCE_BUCKET_ELEMENTS, stage_memory
from opt_ds.bench.project import ProjectionInputs
from opt_ds.config import load_config
from opt_ds.models.family import as_decoder_shape

WORKER = REPO / "tests" / "workers" / "memory_run.py"
ROW = re.compile(r"^\s+1\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)\s+(none|selective|full)\s+(on|off)\s+([01])\s+"
                 r"([\d.]+)\s+([\d.]+)\s+([\d.]+)")


def _plan(capsys, *args):
    from opt_ds.cli import main
    status = main(["plan", *args])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def test_opt_175b_on_992_a100s_ranks_a_layout_near_147_tflops_first(capsys):
    # OPT-175B's 147 TFLOP/s were fp16 (bf16 adds the fp32 gradient accumulation per micro-batch)
    status, out, _ = _plan(capsys, "--model", "opt-175b", "--gpus", "992", "--hardware", "a100-80gb", "--top", "3",
                           "--precision", "fp16")
    assert status == 0
    top = next(ROW.match(line) for line in out.splitlines() if ROW.match(line))
    tp, pp, dp, hardware_tflops = int(top[1]), int(top[2]), int(top[3]), float(top[11])
    assert tp * pp * dp == 992
    assert abs(hardware_tflops / 147 - 1) <= 0.15, out
    # The overrides printed under the row are a config opt_ds accepts at 992 ranks.
    overrides = next(line.split("CONFIG", 1)[1].split() for line in out.splitlines() if "opt-ds train CONFIG" in line)
    cfg = load_config(None, ["model.preset=opt-175b", *overrides], world_size=992)
    assert (cfg.layout.tensor, cfg.layout.pipeline, cfg.data_parallel) == (tp, pp, dp)
    for kind in ("weights", "grads", "optimizer", "activations", "buffers"):
        assert kind in out


def test_every_listed_layout_fits_and_they_are_fastest_first():
    from opt_ds.bench.plan import RESERVED_FRACTION, plan
    from opt_ds.bench.hardware import HARDWARE
    base = ProjectionInputs(gpus=992, global_batch=1024, hardware=HARDWARE["a100-80gb"])
    layouts, considered = plan(base)
    assert 0 < len(layouts) < considered
    assert all(p.memory.total_gib <= 80 * (1 - RESERVED_FRACTION) for p in layouts)
    speeds = [p.projection.tokens_per_s_per_gpu for p in layouts]
    assert speeds == sorted(speeds, reverse=True)
    assert {p.inputs.zero_stage for p in layouts} <= {0, 1}
    # More memory per GPU admits more layouts.
    assert len(plan(base.replace(hardware=HARDWARE["h200"]))[0]) > len(layouts)


def test_a_general_shape_plans_too(capsys):
    status, out, _ = _plan(capsys, "--shape", "layers=32,hidden=4096,heads=32,ffn=11008,gated=1,vocab=32000,tied=0",
                           "--gpus", "64", "--hardware", "h100-80gb", "--top", "2")
    assert status == 0 and "F=11008 gated" in out and out.count("opt-ds train CONFIG") == 2


@pytest.mark.parametrize("args, words", [
    (["--gpus", "0"], "must be positive"),
    (["--model", "opt-9b", "--gpus", "8"], "--model 'opt-9b': choose one of"),
    (["--gpus", "8", "--hardware", "tpu-v9"], "--hardware: hardware 'tpu-v9'"),
    (["--gpus", "8", "--shape", "layers=2,hidden=64"], "also give heads"),
])
def test_bad_input_is_one_line(capsys, args, words):
    status, _, err = _plan(capsys, *args)
    assert status == 2 and words in err and len(err.strip().splitlines()) == 1


def test_nothing_fits_says_what_to_change(capsys):
    status, out, _ = _plan(capsys, "--model", "opt-175b", "--gpus", "8")
    assert status == 1 and "Nothing fits" in out


def test_help_does_not_import_torch():
    code = ("import sys\nfrom opt_ds.cli import main\ntry:\n    main(['plan', '--help'])\nexcept SystemExit:\n"
            "    pass\nassert 'torch' not in sys.modules, 'torch imported'\n")
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, timeout=120)


# --- the memory model against measured tensor memory -----------------------------------------------------

@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    """Measured per-rank tensor memory of real CPU engines (fp32, ZeRO-1): TP1×PP1 and TP2×PP2."""
    out = tmp_path_factory.mktemp("memory")
    results = {}
    for spec, nproc in (("tiny", 1), ("tiny-3d:dp=1", 4)):
        path = out / f"{spec.replace(':', '_')}.json"
        if nproc == 1:
            run([sys.executable, WORKER, path, spec], timeout=600)
        else:
            torchrun(nproc, WORKER, path, spec, timeout=900)
        results[spec] = json.loads(path.read_text())["ranks"]
    return results


@pytest.mark.parametrize("spec", ["tiny", "tiny-3d:dp=1"])
def test_memory_model_is_within_10_percent_of_measured_on_cpu(measured, spec):
    case = parse_case(spec)
    inputs = ProjectionInputs(shape=as_decoder_shape(case.shape), gpus=case.world_size, tensor=case.tensor,
                              pipeline=case.pipeline, micro_batch=case.micro_batch, global_batch=case.global_batch,
                              seq=case.seq, recompute="none", dropout=case.shape.dropout > 0, precision="fp32",
                              zero_stage=1)
    estimates = stage_memory(inputs)
    for rank in measured[spec]:
        model, peak = estimates[rank["stage"]].parts, rank["peak"]
        pairs = {"weights": (model["weights"], peak["weights"]),
                 "gradients": (model["gradients"], peak["grads"]),
                 "optimizer": (model["optimizer"], peak["optimizer"]),
                 "activations": (model["activations"], rank["activations"]),
                 "bucket": (REDUCE_BUCKET_ELEMENTS * 4, peak["bucket"]),
                 "total": (sum(model.values()), peak["total"])}
        for kind, (estimate, seen) in pairs.items():
            assert estimate == pytest.approx(seen, rel=0.10), (spec, rank["rank"], kind, estimate, seen)


def test_the_global_batch_is_the_models_shipped_recipe(capsys):
    """ds_configs/opt-175b.yaml trains 992 sequences of 2048 and llama-65b's 2048; a shape without a shipped
    recipe gets 4M tokens; --global-batch wins over both."""
    for args, sequences in ((["--model", "opt-175b"], 992), (["--model", "llama-65b"], 2048),
                            (["--model", "opt-175b", "--seq", "1024"], 1984),
                            (["--shape", "layers=8,hidden=1024,heads=16,ffn=4096,vocab=50272"], 2048),
                            (["--model", "opt-175b", "--global-batch", "64"], 64)):
        status, out, _ = _plan(capsys, *args, "--gpus", "64", "--top", "1")
        assert f"global batch ≈ {sequences} sequences" in out.splitlines()[0], (args, out)
