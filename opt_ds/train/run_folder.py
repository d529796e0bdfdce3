"""The run folder (train.log_dir) tells its story: beside metrics.jsonl, the resolved config (re-runnable as
is: `opt-ds train <log_dir>/config.yaml`), the DeepSpeed JSON generated from it, and the versions and git
commit it ran with. Rewritten at every start, so it describes the latest session."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import yaml

from opt_ds.durable import write_atomically

CONFIG = "config.yaml"
DEEPSPEED_JSON = "deepspeed.json"
VERSIONS = "versions.json"


def write(log_dir, cfg, world_size: int) -> None:
    """Rank 0 only."""
    from opt_ds.bench.provenance import git_commit, versions
    import opt_ds
    log_dir = Path(log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    header = (f"# The resolved config of this run ({cfg.layout} on {world_size} processes); rerun with\n"
              f"#   opt-ds train {log_dir / CONFIG}\n")
    write_atomically(log_dir / CONFIG, header + yaml.safe_dump(cfg.run.to_dict(), sort_keys=False))
    write_atomically(log_dir / DEEPSPEED_JSON, json.dumps(cfg.deepspeed_config(), indent=2) + "\n")
    write_atomically(log_dir / VERSIONS, json.dumps({"opt_ds": opt_ds.__version__, **versions(),
                                                     "git_commit": git_commit(), "command": sys.argv},
                                                    indent=2) + "\n")
