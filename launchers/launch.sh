#!/usr/bin/env bash
# Multi-node training with DeepSpeed's launcher (pdsh over ssh by default):
#   HOSTFILE=launchers/hostfile launchers/launch.sh ds_configs/opt-1.3b.yaml data.train='[{path: /data/pile_text_document}]'
# The hostfile and the config are checked against each other before anything starts on any node.
# Environment variables that must reach every node go in ./.deepspeed_env (one VAR=value per line).
set -euo pipefail
HOSTFILE=${HOSTFILE:-launchers/hostfile}
LAUNCHER=${LAUNCHER:-pdsh}
PORT_ARGS=()
if [ -n "${MASTER_PORT:-}" ]; then PORT_ARGS=(--master-port "$MASTER_PORT"); fi   # default: a free port
exec opt-ds launch --hostfile "$HOSTFILE" --launcher "$LAUNCHER" "${PORT_ARGS[@]}" "$@"
