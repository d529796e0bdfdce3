"""The checkpoint contract (opt_ds.train.contract) reads DeepSpeed's own records where they exist."""
from deepspeed.checkpoint import constants as ds

from opt_ds.models.presets import PRESETS
from opt_ds.train import contract


def test_the_contract_names_deepspeeds_own_keys():
    assert (contract.PARALLEL_DIMS_KEY, contract.TP_DEGREE_KEY) == (ds.CHECKPOINT_PARALLEL_DIMS,
                                                                    ds.CHECKPOINT_TP_DEGREE)
    assert contract.UNIVERSAL_INFO_KEY == ds.UNIVERSAL_CHECKPOINT_INFO


def test_tensor_parallel_degree_from_deepspeeds_record_else_the_files(tmp_path):
    shape = PRESETS["opt-125m"].shape
    written = contract.mp_rank_state(shape, shape.vocab_size, tp=4, pp=2)
    assert contract.tensor_parallel_degree(written, tmp_path) == 4
    for rank in range(2):
        (tmp_path / f"layer_00-model_{rank:02d}-model_states.pt").touch()
    assert contract.tensor_parallel_degree({}, tmp_path) == 2


def test_run_state_round_trip_keeps_older_checkpoints_readable():
    state = contract.RunState(step=7, lr_scale=0.5, diverged_at=5)
    saved = {k: v for k, v in vars(state).items() if k != "health"}        # as a checkpoint before `health`
    assert contract.RunState.from_saved(saved) == contract.RunState(step=7, lr_scale=0.5, diverged_at=5)
