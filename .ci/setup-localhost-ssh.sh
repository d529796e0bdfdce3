#!/usr/bin/env bash
# Lets the `deepspeed --hostfile` test take DeepSpeed's real multi-node path (ssh reachability check, then
# pdsh over ssh) against this machine: installs pdsh and an ssh server, starts sshd on 127.0.0.1 and
# authorises a key of the current user for localhost. Idempotent.
set -euo pipefail
SUDO=$([ "$(id -u)" -eq 0 ] && echo "" || echo "sudo")
if ! command -v pdsh >/dev/null || [ ! -x /usr/sbin/sshd ]; then
    export DEBIAN_FRONTEND=noninteractive
    $SUDO apt-get install -y -q pdsh openssh-server openssh-client >/dev/null 2>&1 \
        || { $SUDO apt-get update -q >/dev/null && $SUDO apt-get install -y -q pdsh openssh-server openssh-client >/dev/null; }
fi
mkdir -p ~/.ssh && chmod 700 ~/.ssh
[ -f ~/.ssh/id_ed25519 ] || ssh-keygen -q -t ed25519 -N "" -f ~/.ssh/id_ed25519
touch ~/.ssh/authorized_keys && chmod 600 ~/.ssh/authorized_keys
grep -qxF "$(cat ~/.ssh/id_ed25519.pub)" ~/.ssh/authorized_keys || cat ~/.ssh/id_ed25519.pub >> ~/.ssh/authorized_keys
$SUDO mkdir -p /run/sshd
pgrep -x sshd >/dev/null || $SUDO /usr/sbin/sshd -o ListenAddress=127.0.0.1
ssh -o StrictHostKeyChecking=accept-new -o BatchMode=yes localhost true
echo "localhost ssh + pdsh ready"
