#!/usr/bin/env bash
# The embedded default (`make demo`): preprocess the bundled Shakespeare corpus (training an 8k BPE on it),
# train a small OPT with TP=2 x PP=2 through DeepSpeed's launcher, save checkpoints, print a text sample
# and a summary. Runs on the CPU (4 ranks) when there is no GPU; on a machine with GPUs it uses them.
# `make demo-llama` runs the same with DEMO_CONFIG=ds_configs/demo-llama.yaml DEMO_RUN_DIR=runs/demo-llama;
# a LLaMA config (model.family: llama) gets LLaMA's kind of tokenizer, a byte-fallback BPE (tokenizer.json,
# <unk>=0 <s>=1 </s>=2), instead of OPT's byte-level BPE. DEMO_TOKENIZER_KIND overrides the choice.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-.venv/bin}
RUN=${DEMO_RUN_DIR:-runs/demo}
CONFIG=${DEMO_CONFIG:-ds_configs/demo.yaml}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
if grep -Eq '^[[:space:]]*family:[[:space:]]*llama' "$CONFIG"; then KIND=byte-fallback; else KIND=byte-level; fi
KIND=${DEMO_TOKENIZER_KIND:-$KIND}

GPUS=$("$BIN/python" -c "import torch; print(torch.cuda.device_count())")
if [ "$GPUS" -ge 4 ]; then
    PROCS=$(( GPUS / 4 * 4 )); LAYOUT=(precision.dtype=bf16)                # TP=2 x PP=2 x DP=GPUS/4
elif [ "$GPUS" -ge 2 ]; then
    PROCS=2; LAYOUT=(parallel.pipeline=1 precision.dtype=bf16)              # TP=2
elif [ "$GPUS" -eq 1 ]; then
    PROCS=1; LAYOUT=(parallel.tensor=1 parallel.pipeline=1 precision.dtype=bf16)
else
    PROCS=4; LAYOUT=()                                                      # CPU: TP=2 x PP=2, fp32
fi

rm -rf "$RUN"
"$BIN/opt-ds" preprocess --bundled-corpus --output-prefix "$RUN/data/shakespeare" --vocab-size 8192 \
    --tokenizer-kind "$KIND" --no-progress
"$BIN/opt-ds" launch "$CONFIG" --num-gpus "$PROCS" "${LAYOUT[@]}" \
    "data.train=[{path: $RUN/data/shakespeare}]" "train.save_dir=$RUN/checkpoints" "train.log_dir=$RUN" "$@"
echo
"$BIN/opt-ds" summary "$RUN"
