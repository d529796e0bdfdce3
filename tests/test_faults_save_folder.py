"""The save folder at start-up, without a training run: an interrupted publication is finished from the copy
it left, a folder whose `latest` names no checkpoint is an error that changes nothing, and one live job at a
time holds the folder."""
import hashlib
import os
import signal
import subprocess
import sys

import pytest
import torch

from opt_ds.train import checkpoint, manifest
from opt_ds.train.save_lock import LOCK, SaveDirInUse, SaveDirLock
from test_faults_units import fake_checkpoint


def tree_digest(folder) -> dict:
    """relative path -> sha256 of every file under `folder` (folders too, so a rename shows)."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(folder.rglob("*"))}


def loadable_checkpoint(save_dir, step):
    """A fake checkpoint whose run state torch can read."""
    folder = fake_checkpoint(save_dir, step)
    torch.save({checkpoint.RUN_STATE_KEY: {"step": step}}, folder / "mp_rank_00_model_states.pt")
    manifest.write(folder, tag=folder.name, step=step, health={"healthy": True})
    return folder


def names(folder) -> list:
    return sorted(p.name for p in folder.iterdir())


# --- finishing an interrupted publication -------------------------------------------------------------

def test_the_copy_set_aside_by_an_interrupted_resave_is_put_back(tmp_path, capsys):
    fake_checkpoint(tmp_path, 10)
    os.rename(loadable_checkpoint(tmp_path, 20), tmp_path / ".replaced-global_step20")
    (tmp_path / ".tmp-global_step20").mkdir()           # the new copy, incomplete: no manifest yet
    (tmp_path / ".tmp-global_step20" / "layer_00-model_00-model_states.pt").write_bytes(b"half")
    checkpoint.point_latest(tmp_path, "global_step20")

    assert checkpoint.recover_interrupted_publish(tmp_path, "sha256") == [
        "restored global_step20 from .replaced-global_step20, the copy a re-save had set aside (the re-save was "
        "interrupted)"]
    assert "restored global_step20 from .replaced-global_step20" in capsys.readouterr().out
    assert names(tmp_path) == [".tmp-global_step20", "global_step10", "global_step20", "latest"]
    assert checkpoint.find_resume_point(tmp_path, None).tag == "global_step20"


def test_a_complete_new_copy_wins_over_the_one_set_aside(tmp_path):
    os.rename(fake_checkpoint(tmp_path, 20), tmp_path / ".replaced-global_step20")
    os.rename(fake_checkpoint(tmp_path / "new", 20), tmp_path / ".tmp-global_step20")
    (tmp_path / "new").rmdir()
    digest = tree_digest(tmp_path / ".tmp-global_step20")

    lines = checkpoint.recover_interrupted_publish(tmp_path, "sha256")
    assert lines == ["restored global_step20 from .tmp-global_step20, its complete copy (the save was interrupted "
                     "before it was published)",
                     "deleted .replaced-global_step20: a newer complete copy of global_step20 is in place"]
    assert names(tmp_path) == ["global_step20"] and tree_digest(tmp_path / "global_step20") == digest


def test_a_copy_set_aside_after_its_replacement_was_published_is_deleted(tmp_path):
    fake_checkpoint(tmp_path, 20)
    os.rename(fake_checkpoint(tmp_path, 30), tmp_path / ".replaced-global_step20")
    assert checkpoint.recover_interrupted_publish(tmp_path, "size") == [
        "deleted .replaced-global_step20: a newer complete copy of global_step20 is in place"]
    assert names(tmp_path) == ["global_step20"]


def test_damaged_or_incomplete_staging_copies_are_not_published(tmp_path):
    os.rename(fake_checkpoint(tmp_path, 20), tmp_path / ".tmp-global_step20")
    with open(tmp_path / ".tmp-global_step20" / "layer_00-model_00-model_states.pt", "r+b") as f:
        f.truncate(100)
    before = tree_digest(tmp_path)
    assert checkpoint.recover_interrupted_publish(tmp_path, "size") == []
    assert tree_digest(tmp_path) == before


# --- a save folder whose `latest` names no checkpoint ---------------------------------------------------

def break_latest(save_dir, how: str) -> None:
    pointer = save_dir / "latest"
    if how == "missing":
        pointer.unlink()
    elif how == "empty":
        pointer.write_text("\n")
    elif how == "garbage":
        pointer.write_bytes(b"\xff\xfe\x00global")
    elif how == "dangling":
        pointer.write_text("global_step99")
    elif how == "folder":
        pointer.unlink()
        pointer.mkdir()


REASONS = {"missing": "there is no 'latest' file", "empty": "'latest' is empty",
           "garbage": "'latest' is unreadable (UnicodeDecodeError)",
           "dangling": "'latest' names 'global_step99', which is not a folder there",
           "folder": "'latest' is unreadable (IsADirectoryError)"}


@pytest.mark.parametrize("how", sorted(REASONS))
def test_checkpoints_without_a_readable_latest_are_an_error_naming_the_newest_intact_one(tmp_path, how):
    for step in (10, 20):
        loadable_checkpoint(tmp_path, step)
    damaged = fake_checkpoint(tmp_path, 30)
    (damaged / "mp_rank_00_model_states.pt").write_bytes(b"short")
    checkpoint.point_latest(tmp_path, "global_step30")
    break_latest(tmp_path, how)
    before = tree_digest(tmp_path)

    with pytest.raises(checkpoint.CheckpointError) as info:
        checkpoint.find_resume_point(tmp_path, None)
    assert str(info.value) == (
        f"{tmp_path} holds checkpoints but {REASONS[how]}; the newest intact checkpoint there is global_step20: "
        f"resume from it with train.load_tag=global_step20 (or write global_step20 into {tmp_path / 'latest'}). "
        "Nothing was changed")
    assert tree_digest(tmp_path) == before
    assert checkpoint.find_resume_point(tmp_path, None, "global_step20").run_state == {"step": 20}, \
        "the override the message gives resumes"


def test_no_intact_checkpoint_left_says_so(tmp_path):
    folder = fake_checkpoint(tmp_path, 10)
    (folder / "mp_rank_00_model_states.pt").unlink()
    with pytest.raises(checkpoint.CheckpointError, match="holds checkpoints but there is no 'latest' file; no "
                       "global_step\\* folder there matches its manifest: restore one from a copy, or start from "
                       "scratch with another train.save_dir"):
        checkpoint.find_resume_point(tmp_path, None)


def test_a_latest_naming_a_missing_folder_is_an_error_even_without_checkpoints(tmp_path):
    checkpoint.point_latest(tmp_path, "global_step40")
    with pytest.raises(checkpoint.CheckpointError, match=f"^{tmp_path}: 'latest' names 'global_step40', which is "
                       "not a folder there; no global_step"):
        checkpoint.find_resume_point(tmp_path, None)


def test_an_empty_save_folder_is_a_fresh_start(tmp_path):
    assert checkpoint.find_resume_point(tmp_path, None) is None


# --- one live job per save folder -------------------------------------------------------------------------

def test_a_held_folder_is_refused_and_writes_nothing(tmp_path):
    first = SaveDirLock.acquire(tmp_path)
    first.record_holder()
    before = tree_digest(tmp_path)
    with pytest.raises(SaveDirInUse, match=f"train.save_dir={tmp_path} is in use by another running job \\(pid "
                       f"{os.getpid()} on .* holds {tmp_path / LOCK}\\); stop that job first, or give this run "
                       "another train.save_dir"):
        SaveDirLock.acquire(tmp_path)
    assert tree_digest(tmp_path) == before
    first.release()
    SaveDirLock.acquire(tmp_path).release()


def test_a_killed_holder_does_not_keep_the_folder(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from opt_ds.train.save_lock import SaveDirLock; "
         f"lock = SaveDirLock.acquire({str(tmp_path)!r}); lock.record_holder(); print('held', flush=True); time.sleep(600)"],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        with pytest.raises(SaveDirInUse, match=f"pid {holder.pid} on "):
            SaveDirLock.acquire(tmp_path)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    lock = SaveDirLock.acquire(tmp_path)         # the lock file is still there, naming the dead holder
    lock.release()
