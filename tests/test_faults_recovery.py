"""Automatic divergence recovery in real 2-process runs (PP=2, ZeRO-1): an injected NaN and an injected loss
spike are rolled back in-process to the last healthy checkpoint, the data window is skipped, the LR lowered,
and the run finishes within 5% of an uninterrupted run's final validation loss; the changes survive a resume;
a silent bad host is caught by the replica check; a divergence that keeps coming back exhausts the budget.
With the default thresholds, a spike while the demo's loss still falls steeply is caught, and clean runs
raise no alarm."""
import shutil
import socket

import pytest

from fault_runs import (BASE, STEPS, clean_run, demo_clean_run, demo_train, events, final_eval_loss, train,
                        trajectory)


def test_injected_nan_is_rolled_back_and_the_run_finishes(tmp_path):
    clean = clean_run()
    train(tmp_path, f"train.steps={STEPS}", "faults.nan_at_step=35", "checkpoint.keep_last=2",
          "checkpoint.keep_every=20")
    [recovery] = events(tmp_path, "recovery")
    assert recovery["step"] == 35 and recovery["restored"] == "global_step30"
    assert recovery["skipped_data_steps"] == [31, 35] and recovery["peak_lr"] == pytest.approx(0.007)
    losses, clean_losses = trajectory(tmp_path), trajectory(clean)
    assert all(losses[s] == clean_losses[s] for s in range(1, 31)), "identical up to the restored checkpoint"
    lrs, clean_lrs = trajectory(tmp_path, "lr"), trajectory(clean, "lr")
    assert all(abs(lrs[s] - 0.7 * clean_lrs[s]) < 1e-12 for s in range(31, STEPS + 1)), "the LR cut lasts"
    assert abs(final_eval_loss(tmp_path) / final_eval_loss(clean) - 1) < 0.05
    incident = (tmp_path / "incidents.md").read_text()
    for fact in ("step 35", "loss is nan", "restored global_step30", "steps 31–35", "0.01 → 0.007"):
        assert fact in incident, fact
    # retention: the newest 2, every 20th, and always the newest healthy one
    kept = sorted(p.name for p in (tmp_path / "ckpt").glob("global_step*"))
    assert kept == ["global_step20", "global_step40", "global_step50", "global_step60"]


def test_injected_spike_skips_the_poisoned_data_and_the_changes_survive_a_resume(tmp_path):
    clean = clean_run()
    run = tmp_path / "run"
    train(run, f"train.steps={STEPS}", "faults.spike_at_step=35")
    [recovery] = events(run, "recovery")      # one: after the skip the poisoned batch is never read again
    assert recovery["step"] == 36 and recovery["restored"] == "global_step30"
    assert recovery["skipped_data_steps"] == [31, 36] and recovery["data_step"] == 36
    assert abs(final_eval_loss(run) / final_eval_loss(clean) - 1) < 0.05
    incident = (run / "incidents.md").read_text()
    for fact in ("step 36", "loss_spike", "restored global_step30", "0.01 → 0.007"):
        assert fact in incident, fact

    # a fresh process resumed from a checkpoint saved after the recovery continues the same trajectory:
    # data offset, LR cut and health state are run state
    resumed = tmp_path / "resumed"
    train(resumed, f"train.steps={STEPS}", f"train.load_dir={run}/ckpt", "train.load_tag=global_step40")
    for field in ("loss", "lr", "grad_norm"):
        original, again = trajectory(run, field), trajectory(resumed, field)
        assert [again[s] for s in range(41, STEPS + 1)] == [original[s] for s in range(41, STEPS + 1)], field


def test_silent_bad_host_is_rolled_back_without_touching_lr_or_data(tmp_path):
    """DP=2: rank 1's gradients are garbage for one step. DeepSpeed's reduced norm agrees on every rank; the
    replica check does not. The rollback replays the same data at the same LR, so the run must then match an
    uninterrupted one exactly — which also shows the in-process rollback restores the full training state."""
    dp2 = [a for a in BASE if a != "parallel.pipeline=2"] + ["parallel.data=2", "train.steps=12", "train.save_interval=5"]
    train(tmp_path / "clean", base=dp2)
    train(tmp_path / "bad", "faults.bad_replica_at_step=7", base=dp2)
    [recovery] = events(tmp_path / "bad", "recovery")
    assert recovery["step"] == 7 and recovery["restored"] == "global_step5" and recovery["lr_scale"] == 1.0
    assert recovery["skipped_data_steps"] is None
    [anomaly] = recovery["anomalies"]
    assert anomaly["kind"] == "replica_disagreement" and f"rank 1 on {socket.gethostname()}" in anomaly["message"]
    assert trajectory(tmp_path / "bad") == trajectory(tmp_path / "clean")
    spreads = [r["replica_norm_spread"] for r in events(tmp_path / "clean", "train")]
    assert max(spreads) < 10.0, f"healthy replicas stay within the default health.replica_norm_ratio: {spreads}"


def test_divergence_that_keeps_coming_back_exhausts_the_budget(tmp_path):
    """One process, so the exit status is the trainer's own: 3, with a message and the incident log."""
    one_stage = [a for a in BASE if a != "parallel.pipeline=2"]
    proc = train(tmp_path, "train.steps=20", "train.save_interval=5", "faults.nan_at_step=8", "faults.persistent=true",
                 "recovery.max_retries=2", "recovery.clip_grad=0.3", base=one_stage, nproc=1, check=False)
    assert proc.returncode == 3, proc.stdout[-3000:]
    assert "training diverged at step 8" in proc.stdout and "recovery.max_retries=2" in proc.stdout
    assert "train.load_tag=global_step5" in proc.stdout and "Traceback" not in proc.stdout
    recoveries = events(tmp_path, "recovery")
    assert [r["retries"] for r in recoveries] == [1, 2] and [r["lr_scale"] for r in recoveries] == pytest.approx([0.7, 0.49])
    after_rollback = [r for r in events(tmp_path, "train") if r["step"] == 6]
    assert [r["clip_grad"] for r in after_rollback] == [1.0, 0.3, 0.3], "clipping 1.0 -> 0.3 applied by the optimizer"
    assert events(tmp_path, "gave_up")
    assert "gave up" in (tmp_path / "incidents.md").read_text()


def alarms(run_dir) -> list:
    return [r for event in ("anomaly", "divergence", "recovery") for r in events(run_dir, event)]


@pytest.mark.parametrize("run", [clean_run, demo_clean_run], ids=["tiny", "demo"])
def test_clean_runs_raise_no_alarm_with_the_default_thresholds(run):
    run_dir = run()
    assert alarms(run_dir) == []
    judged = [r["step"] for r in events(run_dir, "train") if "spike_threshold" in r]
    assert judged and judged[0] <= 20, "spikes are judged from the early steps on"


def test_demo_spike_while_the_loss_still_falls_is_caught_and_recovered(tmp_path):
    """The demo's loss falls from 9.0 by ~0.15 a step when a 100x-LR update at step 14 throws it back up by
    more than 1: detected at the next step with the default thresholds, rolled back to global_step10.
    Its first 10 steps would be the clean run's, so it starts from the clean run's global_step10 (an exact resume:
    weights, optimizer, data position and the health monitor's recent losses), put in its own save_dir."""
    clean = demo_clean_run()
    shutil.copytree(clean / "ckpt" / "global_step10", tmp_path / "ckpt" / "global_step10")
    (tmp_path / "ckpt" / "latest").write_text("global_step10")
    demo_train(tmp_path, "faults.spike_at_step=14", timeout=1200)
    [resume] = events(tmp_path, "resume")
    assert resume["tag"] == "global_step10"
    [recovery] = events(tmp_path, "recovery")
    assert recovery["step"] == 15 and recovery["restored"] == "global_step10"
    assert [a["kind"] for a in recovery["anomalies"]] == ["loss_spike"]
    clean_losses = trajectory(clean)
    spiked = next(r["loss"] for r in events(tmp_path, "train") if r["step"] == 15)
    assert clean_losses[10] - clean_losses[15] > 0.5, "the clean loss still falls steeply there"
    assert spiked > clean_losses[15] + 1.0, "and the spike throws it back up"
    assert abs(final_eval_loss(tmp_path) / final_eval_loss(clean) - 1) < 0.05
