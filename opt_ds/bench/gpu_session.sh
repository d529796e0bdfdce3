#!/usr/bin/env bash
# The benchmark session for one fresh GPU machine (about 7 minutes on one H100; every row is written as
# soon as it is measured, so a session cut short keeps what it had).
#
# Needs: Python 3.12 with torch, transformers, matplotlib and nvidia-ml-py (the GPU image has them), and
# the rest of opt_ds's dependencies as wheels in .whl/ (`bash scripts/prepare_gpu_wheels.sh` fills it
# where PyPI is reachable; carry .whl to the machine). Run from anywhere:
#   OPT_DS_GIT_COMMIT=<commit> bash opt_ds/bench/gpu_session.sh
# Writes under $OUT (default runs/gpu_session): results.jsonl, table.txt, tflops.png, workers.log,
# projection-a100-80gb.txt, projection-<hardware>.txt, session.log (seven files).
#
# What it measures: opt_ds vs the Hugging Face peers (plain PyTorch, and inside DeepSpeed ZeRO-1) on the
# 1.3B and 2.7B shapes at seq 2048 on one GPU, 2.7B at micro-batch 2 in case 4 does not fit, one layer of
# OPT-175B, 1.3B with torch.compile per layer; then the OPT-175B projection from the A100 roofline and from
# the decoder layer measured on this GPU.
#
# Every choice can be overridden from the environment; the CPU rehearsal in
# tests/test_bench_gpu_session.py runs this same file with tiny cases.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
PY="${PYTHON:-python3}"
OUT="${OUT:-runs/gpu_session}"
WHEELS="${BENCH_WHEELS:-.whl}"
SITE="${BENCH_SITE:-/tmp/opt_ds_site}"
CASES="${BENCH_CASES:-opt-1.3b opt-2.7b opt-2.7b:mb=2,peer=off 175b-slice:tp=1,layers=1,peer=off opt-1.3b:compile=on,peer=off}"
STEPS="${BENCH_STEPS:-8}"
WARMUP="${BENCH_WARMUP:-3}"
CASE_TIMEOUT="${BENCH_TIMEOUT:-240}"
HARDWARE="${BENCH_PROJECT_HARDWARE:-h100-80gb}"
PROJECT_ARGS="${BENCH_PROJECT_ARGS:-}"

mkdir -p "$OUT"
exec > >(tee -a "$OUT/session.log") 2>&1
echo "== opt_ds GPU benchmark session $(date -u +%FT%TZ) in $PWD, output in $OUT"

if compgen -G "$WHEELS/*.whl" > /dev/null; then
    echo "== installing $(ls "$WHEELS"/*.whl | wc -l) wheel(s) from $WHEELS into $SITE"
    "$PY" -m pip install --quiet --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
        "$WHEELS"/*.whl || { echo "FATAL: installing the wheels in $WHEELS failed"; exit 1; }
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
else
    echo "== no wheels in $WHEELS: using the installed packages"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1

echo "== preflight"
command -v nvidia-smi > /dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total,power.limit,clocks.max.sm \
    --format=csv || echo "no nvidia-smi"
"$PY" - <<'EOF' || { echo "FATAL: the preflight imports failed; see above"; exit 1; }
import importlib
import torch
cuda = torch.cuda.is_available()
print("torch", torch.__version__, "| CUDA", torch.version.cuda, "|",
      f"{torch.cuda.device_count()} × {torch.cuda.get_device_name(0)}" if cuda else "no GPU (rehearsal)")
for name, without in (("deepspeed", None), ("megatron.core", None), ("transformers", "no peers"),
                      ("matplotlib", "no chart"), ("pynvml", "no power or energy")):
    try:
        module = importlib.import_module(name)
        print(f"{name:<14} {getattr(module, '__version__', 'ok')}  {module.__file__}")
    except ImportError as err:
        if without is None:
            raise
        print(f"{name:<14} not installed: {without} ({err})")
import opt_ds.train.engine, opt_ds.bench.worker, opt_ds.bench.peer  # the import chains the workers need
EOF

echo "== cases: $CASES"
# shellcheck disable=SC2086
"$PY" -m opt_ds bench $CASES --steps "$STEPS" --warmup "$WARMUP" --timeout "$CASE_TIMEOUT" --out "$OUT"
echo "== bench exit code $? (1 = some rows failed, e.g. out of memory; they are in the table)"

echo "== projection: OPT-175B on 992 A100-80GB from the roofline"
"$PY" -m opt_ds bench --project --out "$OUT"
echo "== projection: from the decoder layer measured on this device ($HARDWARE cluster)"
# shellcheck disable=SC2086
"$PY" -m opt_ds bench --project --measure-layer --project-hardware "$HARDWARE" --out "$OUT" $PROJECT_ARGS

echo "== files in $OUT"
ls -la "$OUT"
echo "== done $(date -u +%FT%TZ)"
exit 0
