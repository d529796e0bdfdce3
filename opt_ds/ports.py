"""A free TCP port for a rendezvous, so two runs on one shared node do not collide on a fixed port; and an
environment without this process's rendezvous, for a child that must start its own world."""
from __future__ import annotations

import socket


def free_port(host: str = "") -> int:
    """A port nothing listens on right now (the OS picks it from its ephemeral range)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


# What a launcher (or opt_ds's own one-process default world) sets for torch.distributed's env:// rendezvous.
RENDEZVOUS_VARIABLES = frozenset({"RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
                                  "MASTER_PORT", "GROUP_RANK", "ROLE_RANK", "TORCHELASTIC_RUN_ID"})


def without_rendezvous(env: dict) -> dict:
    """`env` for a child process that starts its own world: a child inheriting this process's MASTER_PORT
    would try to bind the port this process's store already holds."""
    return {k: v for k, v in env.items() if k not in RENDEZVOUS_VARIABLES}
