"""Where a number came from: library versions, device, git commit."""
from __future__ import annotations

import os
import platform
import subprocess
from importlib import metadata
from pathlib import Path

import torch

PACKAGES = ("torch", "deepspeed", "megatron-core", "transformers", "nvidia-ml-py")
REPO_ROOT = Path(__file__).resolve().parents[2]


def versions() -> dict:
    found = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    found["cuda"] = torch.version.cuda
    if torch.cuda.is_available():
        try:
            found["nccl"] = ".".join(map(str, torch.cuda.nccl.version()))
        except Exception:
            found["nccl"] = None
    return found


def device_name() -> str:
    return torch.cuda.get_device_name(torch.cuda.current_device()) if torch.cuda.is_available() else "cpu"


def git_commit() -> str:
    """The checkout's commit (with '+changes' when the tree is dirty); OPT_DS_GIT_COMMIT overrides it,
    for copies of the tree that have no .git (e.g. a GPU machine that received a working tree)."""
    given = os.environ.get("OPT_DS_GIT_COMMIT")
    if given:
        return given
    try:
        commit = subprocess.run(["git", "-C", str(REPO_ROOT), "rev-parse", "--short=12", "HEAD"],
                                capture_output=True, text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(REPO_ROOT), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown (not a git checkout; set OPT_DS_GIT_COMMIT)"
    return commit + ("+changes" if dirty else "")
