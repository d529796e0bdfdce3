"""`incidents.md`: a human-readable logbook of divergences and what was done about them, one section per
incident (the machine-readable copy of every event is in metrics.jsonl)."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Optional


class IncidentLog:
    def __init__(self, path: Optional[Path], *, enabled: bool):
        self.path = Path(path) if (path is not None and enabled) else None

    def write(self, title: str, lines: list) -> None:
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fresh = not self.path.exists()
        when = time.strftime("%Y-%m-%d %H:%M:%S")
        with self.path.open("a") as f:
            if fresh:
                f.write("# Incidents\n\nWritten by opt_ds: divergences detected, checkpoints restored, data "
                        "skipped, learning-rate changes. See docs/fault-tolerance.md.\n")
            f.write(f"\n## {when} — {title}\n\n" + "".join(f"- {line}\n" for line in lines))
