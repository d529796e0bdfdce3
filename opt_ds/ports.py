"""A free TCP port for a rendezvous, so two runs on one shared node do not collide on a fixed port."""
from __future__ import annotations

import socket


def free_port(host: str = "") -> int:
    """A port nothing listens on right now (the OS picks it from its ephemeral range)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]
