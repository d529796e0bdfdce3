"""The parts of fault tolerance that need no training run: manifests, the damaged-checkpoint message,
retention, the health rules, the config guard on fault injection, SLURM rank adoption, the stop signal."""
import os
import random
import signal
from collections import namedtuple

import pytest

from conftest import TINY_MODEL
from opt_ds.cli import main as opt_ds_main
from opt_ds.config import ConfigError, HealthConfig, load_config
from opt_ds.errors import UserError
from opt_ds.slurm import adopt_environment, srun_command
from opt_ds.train import checkpoint, manifest, retention
from opt_ds.train.health import HealthMonitor, StepObservation, replica_anomalies, spike_bar
from opt_ds.train.signals import StopSignals


def fake_checkpoint(save_dir, step, *, healthy=True):
    folder = save_dir / f"global_step{step}"
    folder.mkdir(parents=True)
    (folder / "layer_00-model_00-model_states.pt").write_bytes(os.urandom(4096))
    (folder / "mp_rank_00_model_states.pt").write_bytes(os.urandom(1000))
    manifest.write(folder, tag=folder.name, step=step, health={"healthy": healthy})
    return folder


# --- manifests -----------------------------------------------------------------------------------------

def test_manifest_catches_truncation_and_changed_bytes(tmp_path):
    folder = fake_checkpoint(tmp_path, 10)
    assert manifest.verify(folder) == []
    layer = folder / "layer_00-model_00-model_states.pt"
    data = bytearray(layer.read_bytes())
    data[100] ^= 0xFF
    layer.write_bytes(bytes(data))
    assert manifest.verify(folder, "size") == [], "size mode reads no contents"
    assert manifest.verify(folder) == ["layer_00-model_00-model_states.pt: content differs from its manifest (sha256)"]
    layer.write_bytes(bytes(data[:1000]))
    assert manifest.verify(folder) == ["layer_00-model_00-model_states.pt: size 1000 != 4096 bytes in its manifest"]
    (folder / "mp_rank_00_model_states.pt").unlink()
    assert "mp_rank_00_model_states.pt: missing" in manifest.verify(folder)


def test_folder_without_manifest_is_unverifiable_not_damaged(tmp_path):
    (tmp_path / "x.pt").write_bytes(b"1")
    assert manifest.verify(tmp_path) is None


def test_files_are_shared_over_ranks_by_bytes():
    assigned = manifest.shares({"a": 100, "b": 60, "c": 50, "d": 10}, 2)
    assert assigned == [["a", "d"], ["b", "c"]]


def test_damaged_checkpoint_error_offers_the_previous_healthy_one(tmp_path):
    fake_checkpoint(tmp_path, 10)
    fake_checkpoint(tmp_path, 20, healthy=False)
    damaged = fake_checkpoint(tmp_path, 30)
    checkpoint.point_latest(tmp_path, "global_step30")
    with open(damaged / "mp_rank_00_model_states.pt", "r+b") as f:
        f.truncate(10)
    with pytest.raises(checkpoint.CheckpointError) as info:
        checkpoint.find_resume_point(tmp_path, None)    # sizes are checked before anything is unpickled
    assert str(info.value) == (
        f"{damaged} is damaged (mp_rank_00_model_states.pt: size 10 != 1000 bytes in its manifest); the previous "
        f"healthy checkpoint is global_step10: resume with train.load_tag=global_step10 (newer checkpoints are "
        f"then moved to {tmp_path / 'abandoned'})")


def test_changed_bytes_are_caught_before_the_engine_loads(tmp_path):
    fake_checkpoint(tmp_path, 10)
    folder = fake_checkpoint(tmp_path, 20)
    layer = folder / "layer_00-model_00-model_states.pt"
    layer.write_bytes(bytes(4096))                                  # same size, other bytes
    point = checkpoint.ResumePoint(tmp_path, "global_step20", "full", {})
    with pytest.raises(checkpoint.CheckpointError, match="layer_00-model_00-model_states.pt: content differs "
                       "from its manifest .sha256..; the previous healthy checkpoint is global_step10"):
        checkpoint.load(None, point, verify="sha256")


def test_set_aside_keeps_newer_checkpoints_out_of_the_trajectory(tmp_path):
    for step in (10, 20, 30):
        fake_checkpoint(tmp_path, step)
    assert checkpoint.set_aside_newer(tmp_path, 10) == ["global_step20", "global_step30"]
    assert [c.tag for c in checkpoint.published(tmp_path)] == ["global_step10"]
    assert sorted(p.name for p in (tmp_path / "abandoned").iterdir()) == ["global_step20", "global_step30"]


# --- retention -----------------------------------------------------------------------------------------

Ckpt = namedtuple("Ckpt", "step tag healthy")


def ckpts(*steps, unhealthy=()):
    return [Ckpt(s, f"global_step{s}", s not in unhealthy) for s in steps]


def test_retention_keeps_last_k_every_m_and_the_newest_healthy():
    doomed = retention.to_delete(ckpts(10, 20, 30, 40, 50, 60, unhealthy=(50, 60)), keep_last=2, keep_every=20)
    assert [c.step for c in doomed] == [10, 30]          # 40 is the newest healthy one, 20 and 40 every 20th
    assert retention.to_delete(ckpts(10, 20, 30), keep_last=0, keep_every=0) == [], "0 keeps everything"
    doomed = retention.to_delete(ckpts(10, 20, 30), keep_last=1, keep_every=0, protect=["global_step10"])
    assert [c.step for c in doomed] == [20]


def test_prune_deletes_folders_on_disk(tmp_path):
    for step in (10, 20, 30):
        fake_checkpoint(tmp_path, step, healthy=step == 10)
    checkpoint.point_latest(tmp_path, "global_step30")
    assert retention.prune(tmp_path, keep_last=1, keep_every=0) == ["global_step20"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["global_step10", "global_step30", "latest"]


# --- health --------------------------------------------------------------------------------------------

def monitor(**overrides):
    cfg = HealthConfig(**{"spike_warmup_steps": 3, **overrides})
    return HealthMonitor(cfg, fp16=False, deepspeed_min_loss_scale=1.0)


def observe(mon, loss, grad_norm=1.0, **kw):
    return mon.observe(StepObservation(step=0, loss=loss, grad_norm=grad_norm, loss_scale=kw.get("scale"),
                                       overflow=kw.get("overflow", False), replica_norms=kw.get("replicas")))


# Recorded train losses of steps 1-50 of clean runs: the demo's model and corpus (ds_configs/demo.yaml on one
# process; a steep fall from 9.0, then the noise of 16-sequence batches) and the tiny PP=2 model of
# tests/fault_runs.py on `arithmetic` data (8 sequences of 32 tokens: relative noise of several %).
DEMO_CLEAN = [9.007, 8.817, 8.755, 8.688, 8.577, 8.476, 8.318, 8.198, 7.973, 7.837, 7.616, 7.401, 7.260, 7.095,
              6.909, 6.740, 6.637, 6.543, 6.509, 6.257, 6.430, 6.342, 6.313, 6.240, 6.402, 6.281, 6.271, 6.194,
              6.441, 6.132, 6.233, 6.182, 6.430, 6.141, 6.304, 6.550, 6.068, 6.208, 6.065, 6.250, 6.253, 6.158,
              6.070, 6.244, 6.272, 5.964, 5.976, 6.228, 6.015, 6.190]
TINY_CLEAN = [4.854, 4.850, 4.810, 4.847, 4.819, 4.731, 4.661, 4.541, 4.471, 4.361, 4.206, 4.323, 4.112, 3.898,
              3.882, 3.983, 3.782, 3.796, 3.585, 3.550, 3.561, 3.447, 3.495, 3.465, 3.400, 3.277, 3.550, 3.393,
              3.332, 3.312, 3.180, 3.191, 3.259, 3.132, 3.114, 3.091, 3.195, 3.039, 3.068, 2.967, 2.971, 3.019,
              2.845, 2.826, 2.836, 2.687, 2.713, 2.817, 3.011, 2.891]


@pytest.mark.parametrize("losses", [DEMO_CLEAN, TINY_CLEAN], ids=["demo", "tiny"])
def test_default_spike_rule_is_quiet_on_clean_runs_from_the_first_steps(losses):
    mon = HealthMonitor(HealthConfig(), fp16=False, deepspeed_min_loss_scale=1.0)
    assert [observe(mon, loss) for loss in losses] == [[]] * len(losses)
    assert mon.losses == losses[-mon.cfg.spike_window:]


def test_default_spike_rule_catches_a_spike_while_the_loss_still_falls():
    """The issue's case: the loss falls steeply (7.26 at step 13) when a 100x-LR update throws it back up;
    a ratio to a mean of span 50 (8.26 there) did not see it."""
    mon = HealthMonitor(HealthConfig(), fp16=False, deepspeed_min_loss_scale=1.0)
    for loss in DEMO_CLEAN[:14]:
        assert observe(mon, loss) == []
    [spike] = observe(mon, 8.4)
    assert spike.kind == "loss_spike" and spike.fatal and "recent median 7.401" in spike.message
    assert observe(mon, 7.5) == [], "the spike did not enter the window"


def test_spike_bar_follows_the_noise_not_the_trend():
    rng = random.Random(0)
    noise = [rng.gauss(0.0, 0.1) for _ in range(200)]
    flat = spike_bar([5.0 + e for e in noise], sigmas=6.0, min_rise=0.0)
    falling = spike_bar([9.0 - 0.15 * i + e for i, e in enumerate(noise)], sigmas=6.0, min_rise=0.0)
    assert 0.085 < flat.noise < 0.115, "the robust spread estimates the noise's standard deviation"
    assert falling.noise == pytest.approx(flat.noise), "a steady trend does not inflate it"
    smooth = spike_bar([9.0 - 0.15 * i for i in range(50)], sigmas=6.0, min_rise=0.05)
    assert smooth.noise == pytest.approx(0.0, abs=1e-9)
    assert smooth.threshold == pytest.approx(smooth.reference * 1.05), "the floor of a noiseless run"


def test_spike_is_judged_after_warmup_and_does_not_enter_the_window():
    mon = monitor()
    assert observe(mon, 9.0) == [] and observe(mon, 30.0) == [], "no verdict during warm-up"
    observe(mon, 3.0)
    assert observe(mon, 3.0) == [], "the warm-up's losses are the window"
    window = list(mon.losses)
    [spike] = observe(mon, 1000.0)
    assert spike.kind == "loss_spike" and spike.fatal and mon.losses == window


def test_spike_patience_and_state_round_trip():
    mon = monitor(spike_patience=2)
    for loss in (3.0, 3.1, 3.0):
        observe(mon, loss)
    [first] = observe(mon, 10.0)
    saved = mon.state_dict()
    [second] = observe(mon, 10.0)
    assert not first.fatal and second.fatal
    mon.load_state_dict(saved)
    assert observe(mon, 10.0)[0].fatal, "the run of spikes is part of the saved state"
    mon.load_state_dict({"ewm": 3.0, "count": 200, "spike_run": 0})        # a checkpoint of the EWM rule
    assert mon.bar() is None and observe(mon, 10.0) == [], "starts a new warm-up"


def test_a_checkpoint_config_with_the_retired_ewm_keys_still_generates():
    from opt_ds.train.generate_cli import inference_config
    saved = load_config(None, BASE, world_size=1).run.to_dict()
    saved["health"] = {"spike_factor": 1.5, "ewm_window": 50, "spike_warmup_steps": 100}
    assert inference_config(saved, 1).run.health == HealthConfig()


def test_non_finite_loss_and_norm():
    mon = monitor()
    assert [a.kind for a in observe(mon, float("nan"), float("nan"))] == ["nan_loss", "nan_grad_norm"]
    assert [a.kind for a in observe(mon, 3.0, float("inf"))] == ["nan_grad_norm"]


def test_fp16_overflow_is_routine_but_a_collapsing_scale_is_not():
    mon = HealthMonitor(HealthConfig(min_loss_scale=4.0), fp16=True, deepspeed_min_loss_scale=1.0)
    assert observe(mon, 3.0, float("inf"), overflow=True, scale=1024.0) == []
    [low] = observe(mon, 3.0, 1.0, scale=2.0)
    assert low.kind == "loss_scale_collapse" and "below health.min_loss_scale 4" in low.message
    mon = HealthMonitor(HealthConfig(min_loss_scale=1.0), fp16=True, deepspeed_min_loss_scale=1.0)
    [floor] = observe(mon, 3.0, 1.0, scale=1.0)
    assert "one more overflow would abort the run" in floor.message


def test_nan_from_one_replica_is_blamed_on_its_host():
    mon = HealthMonitor(HealthConfig(), fp16=False, deepspeed_min_loss_scale=1.0)
    found = observe(mon, 3.0, float("inf"), overflow=True, replicas=[0.5, float("nan"), 0.6])
    assert [(a.kind, a.hardware) for a in found] == [("nan_grad_norm", True), ("replica_disagreement", True)]
    found = observe(mon, float("nan"), float("nan"), overflow=True, replicas=[float("nan")] * 3)
    assert not any(a.hardware for a in found), "every replica NaN: a real divergence"


def test_replica_check_names_the_odd_replica():
    assert replica_anomalies([1.0, 1.3, 0.9], ratio=10) == []
    [bad] = replica_anomalies([1.0, 250.0, 0.9, 1.1], ratio=10)
    assert bad.hardware and bad.message.startswith("DP replica 1: local gradient norm 250")
    [nan] = replica_anomalies([1.0, float("nan"), 0.9], ratio=10)
    assert nan.message.startswith("DP replica 1: non-finite local gradient")
    assert replica_anomalies([float("nan")] * 3, ratio=10) == [], "everyone NaN: the loss/norm checks own it"


# --- config --------------------------------------------------------------------------------------------

BASE = TINY_MODEL + ["batch.global_batch_size=8", "batch.micro_batch_size=2"]


def test_fault_injection_needs_the_environment_switch(monkeypatch):
    monkeypatch.delenv("OPT_DS_FAULT_INJECTION", raising=False)
    with pytest.raises(ConfigError) as info:
        load_config(None, BASE + ["faults.nan_at_step=3"], world_size=1)
    assert "faults: nan_at_step=3 would deliberately break this run" in str(info.value)
    assert "OPT_DS_FAULT_INJECTION=1" in str(info.value)
    monkeypatch.setenv("OPT_DS_FAULT_INJECTION", "1")
    assert load_config(None, BASE + ["faults.nan_at_step=3"], world_size=1).run.faults.nan_at_step == 3
    assert load_config(None, BASE, world_size=1).run.faults.armed() == {}


@pytest.mark.parametrize("override, message", [
    ("recovery.lr_factor=1.5", "recovery.lr_factor 1.5 must be in (0, 1]"),
    ("health.spike_sigmas=0", "health.spike_sigmas 0.0 must be > 0"),
    ("health.spike_warmup_steps=2", "health.spike_warmup_steps 2 must be >= 3"),
    ("health.spike_window=5", "exceeds health.spike_window 5"),
    ("checkpoint.verify=md5", "checkpoint.verify 'md5': choose sha256, size or none"),
    ("recovery.clip_grad=0", "recovery.clip_grad 0.0 must be > 0"),
])
def test_recovery_settings_are_validated(override, message):
    with pytest.raises(ConfigError) as info:
        load_config(None, BASE + [override], world_size=1)
    assert message in str(info.value)


# --- SLURM and signals ---------------------------------------------------------------------------------

def test_srun_tasks_take_their_rank_from_slurm():
    env = {"OPT_DS_SLURM_RANKS": "1", "SLURM_PROCID": "5", "SLURM_NTASKS": "16", "SLURM_LOCALID": "1",
           "MASTER_ADDR": "node0", "MASTER_PORT": "29500"}
    adopt_environment(env)
    assert (env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"]) == ("5", "16", "1")
    with pytest.raises(UserError, match="MASTER_ADDR"):
        adopt_environment({"OPT_DS_SLURM_RANKS": "1", "SLURM_PROCID": "0", "SLURM_NTASKS": "1", "SLURM_LOCALID": "0"})
    untouched = {"SLURM_PROCID": "3"}
    adopt_environment(untouched)
    assert "RANK" not in untouched, "only for tasks started by opt-ds launch --launcher slurm"


def test_srun_command_starts_one_task_per_rank():
    cmd = srun_command({"n0": 8, "n1": 8}, master_addr=None, master_port=1234, config="c.yaml",
                       overrides=["train.steps=5"], check_installed=False)
    assert cmd[:6] == ["srun", "--ntasks=16", "--nodes=2", "--ntasks-per-node=8", "--nodelist=n0,n1",
                       "--kill-on-bad-exit=1"]
    assert cmd[6] == "--export=ALL,OPT_DS_SLURM_RANKS=1,MASTER_ADDR=n0,MASTER_PORT=1234"
    assert cmd[-6:] == ["-u", "-m", "opt_ds", "train", "c.yaml", "train.steps=5"]
    with pytest.raises(UserError, match="same number of ranks on every node"):
        srun_command({"n0": 8, "n1": 4}, master_addr=None, master_port=1, config="c", overrides=[],
                     check_installed=False)


def test_launch_dry_run_prints_the_srun_line(tmp_path, capsys):
    (tmp_path / "hosts").write_text("n0 slots=2\nn1 slots=2\n")
    (tmp_path / "run.yaml").write_text("parallel: {pipeline: 2}\n")
    code = opt_ds_main(["launch", str(tmp_path / "run.yaml"), *BASE, "--hostfile", str(tmp_path / "hosts"),
                        "--launcher", "slurm", "--dry-run"])
    out = capsys.readouterr().out
    assert code == 0 and "srun --ntasks=4 --nodes=2 --ntasks-per-node=2 --nodelist=n0,n1" in out


def test_stop_signal_is_recorded_not_fatal():
    stop = StopSignals(rank=0)
    try:
        os.kill(os.getpid(), signal.SIGUSR1)
        assert stop.received == "SIGUSR1"
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.received == "SIGUSR1", "the first signal is the one reported"
    finally:
        stop.restore()
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
