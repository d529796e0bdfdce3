#!/usr/bin/env bash
# The step-cost A/B session (issue 15) for one GPU machine, within one 10-minute device call: each option
# switched off alone against opt_ds's defaults, beside the Hugging Face peers, in one table. It runs
# gpu_session.sh (same setup, preflight, wheels, projections) with this case list:
#
#   <model>                          defaults (fused kernels, bf16 accumulation in backward hooks, no
#                                    recompute) + the HF peers (plain PyTorch, DeepSpeed ZeRO-1)
#   <model>:fused=off                megatron-core's fused element-wise kernels off (OPT_DS_FUSED=0)
#   <model>:accum=separate           bf16 accumulation as DeepSpeed's separate pass per micro-batch
#   <model>:recompute=selective      the attention core recomputed in backward
#   <model>:recompute=full           every layer recomputed (what the large presets used before)
#   175B slice (one layer at TP=1):  recompute none / selective / full
#   with 2+ GPUs also the slice at TP=2 with and without sequence parallelism (one GPU cannot run TP=2)
#
# for <model> in opt-1.3b and opt-2.7b at seq 2048. Unbind for Q/K/V has no switch (the select version is
# gone); benchmarks/layer_cpu.py measures it against the previous revision on a CPU.
#   OPT_DS_GIT_COMMIT=<commit> bash scripts/gpu_ab.sh           # output in runs/gpu_ab
# CPU rehearsal with tiny cases: docs/bench.md "On GPUs" (AB_MODELS=tiny AB_SLICE=tiny AB_SLICE_TP2=tiny-tp2 ...)
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
MODELS="${AB_MODELS:-opt-1.3b opt-2.7b}"
SLICE="${AB_SLICE:-175b-slice:tp=1,layers=1}"
SLICE_TP2="${AB_SLICE_TP2:-175b-slice:tp=2,layers=1}"
GPUS="$(command -v nvidia-smi > /dev/null && nvidia-smi -L | wc -l || echo 0)"

cases=""
for model in $MODELS; do
    cases+=" $model $model:fused=off,peer=off $model:accum=separate,peer=off"
    cases+=" $model:recompute=selective,peer=off $model:recompute=full,peer=off"
done
sep=$([[ "$SLICE" == *:* ]] && echo , || echo :)
for mode in none selective full; do
    cases+=" $SLICE${sep}ac=0,recompute=$mode,peer=off"
done
if [ "${AB_FORCE_TP2:-0}" = 1 ] || [ "$GPUS" -ge 2 ]; then
    sep2=$([[ "$SLICE_TP2" == *:* ]] && echo , || echo :)
    cases+=" $SLICE_TP2${sep2}sp=off,peer=off $SLICE_TP2${sep2}sp=on,peer=off"
else
    echo "== one GPU: sequence parallelism needs TP >= 2 and is not measured here"
fi

export BENCH_CASES="${cases# }"
export BENCH_STEPS="${BENCH_STEPS:-6}"
export BENCH_WARMUP="${BENCH_WARMUP:-2}"
export BENCH_TIMEOUT="${BENCH_TIMEOUT:-150}"
export OUT="${OUT:-runs/gpu_ab}"
exec bash opt_ds/bench/gpu_session.sh
