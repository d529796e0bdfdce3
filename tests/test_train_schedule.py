"""The learning rate's one owner: recovery and fault injection change the LR through the schedule, and
what DeepSpeed saves of it in a checkpoint is what a plain LambdaLR saved before."""
import functools

import pytest
import torch

from opt_ds.train.schedule import LearningRateSchedule, lr_multiplier

SETTINGS = dict(warmup_steps=2, decay_steps=10, min_ratio=0.1, style="linear")


def schedule(lr=1e-3):
    weights = torch.nn.Parameter(torch.zeros(2))
    optimizer = torch.optim.AdamW([{"params": [weights]}, {"params": [], "weight_decay": 0.0}], lr=lr)
    return LearningRateSchedule(optimizer, **SETTINGS)


def lrs(sched):
    return [group["lr"] for group in sched.optimizer.param_groups]


def test_the_schedule_is_the_multiplier_times_the_peak():
    sched = schedule()
    for step in range(6):
        assert lrs(sched) == pytest.approx([1e-3 * lr_multiplier(step, **SETTINGS)] * 2)
        sched.optimizer.step()
        sched.step()


def test_a_lower_peak_and_a_one_step_boost():
    sched = schedule()
    for _ in range(3):
        sched.optimizer.step()
        sched.step()
    scheduled = 1e-3 * lr_multiplier(3, **SETTINGS)
    sched.set_peak(5e-4)                        # recovery: peak LR x lr_factor
    assert lrs(sched) == pytest.approx([scheduled / 2] * 2)
    sched.scale_this_step(100.0)                # fault injection: one poisoned update
    assert lrs(sched) == pytest.approx([scheduled * 50] * 2)
    sched.apply()
    assert lrs(sched) == pytest.approx([scheduled / 2] * 2)
    sched.optimizer.step()
    sched.step()
    assert lrs(sched) == pytest.approx([5e-4 * lr_multiplier(4, **SETTINGS)] * 2)


def test_the_saved_state_is_a_lambda_lr_state():
    sched = schedule()
    sched.set_peak(5e-4)
    plain = torch.optim.lr_scheduler.LambdaLR(schedule().optimizer, functools.partial(lr_multiplier, **SETTINGS))
    plain.base_lrs = [5e-4, 5e-4]
    assert sched.state_dict().keys() == plain.state_dict().keys()
    assert sched.state_dict()["base_lrs"] == [5e-4, 5e-4] and sched.state_dict()["lr_lambdas"] == [{}, {}]
    restored = schedule()
    restored.load_state_dict(plain.state_dict())
    restored.apply()
    assert lrs(restored) == pytest.approx([5e-4 * lr_multiplier(0, **SETTINGS)] * 2)
