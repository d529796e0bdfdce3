"""Every DeepSpeed / megatron-core internal opt_ds patches exists in the installed versions, and one that
disappears (simulated on a stub) stops the run with a message naming it and the versions it was written for."""
import types

import pytest

from opt_ds import patches
from opt_ds.patches import PrivateAPIChanged

ENTRIES = [value for value in vars(patches).values() if isinstance(value, patches.Private)]


def test_every_entry_is_checked_at_start_up():
    assert sorted(e.attribute for e in ENTRIES) == sorted(e.attribute for e in patches.AT_IMPORT + patches.ON_ENGINE
                                                          + (patches.HP_GRAD,))


def test_the_installed_versions_have_every_patched_attribute():
    for entry in patches.AT_IMPORT:
        entry.check()


@pytest.mark.parametrize("entry", ENTRIES, ids=lambda e: e.attribute)
def test_a_missing_attribute_fails_loudly(entry):
    stub = types.SimpleNamespace(**{entry.attribute: None})
    entry.check(stub)
    delattr(stub, entry.attribute)
    with pytest.raises(PrivateAPIChanged, match=rf"\.{entry.attribute} is gone from the installed version") as info:
        entry.check(stub)
    assert entry.written_for in str(info.value) and "opt_ds/patches.py" in str(info.value)


class StubEngine:
    """What the patches touch on a DeepSpeed PipelineEngine, nothing else."""
    _INSTRUCTION_MAP: dict = {}

    def __init__(self):
        self._config = types.SimpleNamespace(gradient_clipping=1.0)
        self.optimizer = object()
        self._global_grad_norm = None
        self.total_loss = 3.0
        self.module = types.SimpleNamespace(micro_offset=7)
        self.checkpoint_engine = types.SimpleNamespace(save=lambda state, path: None)

    def clip_fp32_gradients(self):
        pass


def test_the_patches_work_on_the_stub_and_refuse_when_an_attribute_is_gone():
    engine = StubEngine()
    patches.check_engine(engine)
    patches.set_gradient_clipping(engine, 0.5)
    patches.forget_last_loss(engine)
    patches.set_forward_passes(engine, 9)
    assert (engine._config.gradient_clipping, engine.total_loss, patches.forward_passes(engine)) == (0.5, None, 9)

    del engine._config.gradient_clipping                # as if a DeepSpeed release renamed it
    with pytest.raises(PrivateAPIChanged, match="gradient_clipping is gone"):
        patches.check_engine(engine)
    with pytest.raises(PrivateAPIChanged, match="gradient_clipping is gone"):
        patches.set_gradient_clipping(engine, 0.25)
    del engine.module.micro_offset
    with pytest.raises(PrivateAPIChanged, match="micro_offset is gone"):
        patches.forward_passes(engine)
