"""What an opt_ds checkpoint folder holds: the one module that defines it, for training, generation,
evaluation and conversion. The on-disk format is DeepSpeed's pipeline checkpoint plus opt_ds's client state:

    global_stepN/
      layer_XX-model_YY-model_states.pt   the weights of pipeline layer XX, TP rank YY (DeepSpeed)
      mp_rank_XX_model_states.pt          DeepSpeed's engine metadata (its TP / PP degrees under
                                          `checkpoint_parallel_dimensions`) and opt_ds's client state:
        opt_model_shape, model_family       the model's shape dataclass as a dict, and its family
        universal_checkpoint_info           the parameter patterns of DeepSpeed's `ds_to_universal`
        opt_ds                              the RunState, the run config (with its tokenizer) and the layout
      zero_pp_rank_*_optim_states.pt      ZeRO optimizer partitions (full checkpoints only)
      manifest.json                       sizes, hashes and health (opt_ds.train.manifest)
    latest                                the tag to resume from (opt_ds.train.checkpoint publishes it)

DeepSpeed's pipeline checkpoints hold tensors only; the number of attention heads, the LayerNorm placement
and the vocabulary padding cannot be read back from them, hence the model entries, which converters use to
rebuild the exact model. The universal patterns let DeepSpeed merge the ZeRO optimizer state of a
TP x PP x DP run into a layout-free "universal" checkpoint, from which training resumes at any other
layout (`"checkpoint": {"load_universal": true}`).
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

from opt_ds.models.family import family_named, family_of

MODEL_SHAPE_KEY = "opt_model_shape"
MODEL_FAMILY_KEY = "model_family"
UNIVERSAL_INFO_KEY = "universal_checkpoint_info"   # deepspeed.checkpoint.constants.UNIVERSAL_CHECKPOINT_INFO
RUN_STATE_KEY = "opt_ds"
ENGINE_STATES = "mp_rank_00_model_states.pt"       # DeepSpeed's metadata file that holds the client state
PARALLEL_DIMS_KEY, TP_DEGREE_KEY = "checkpoint_parallel_dimensions", "tp_degree"   # DeepSpeed's own metadata
LAYOUT_KEYS = ("tensor", "pipeline", "data")


@dataclass
class RunState:
    """What a checkpoint must carry besides DeepSpeed's own state for the resume to be exact."""
    step: int = 0
    micro_offset: int = 0           # forward passes so far: DeepSpeed derives dropout seeds from it
    # Divergence recovery (opt_ds.train.recovery); run state, so every later resume keeps it.
    data_offset: int = 0            # data steps skipped: step s reads the batch of data step s + data_offset
    lr_scale: float = 1.0           # product of the LR cuts: peak LR = optimizer.lr x lr_scale
    clip_grad: Optional[float] = None   # gradient clipping set by a recovery (None: optimizer.clip_grad)
    retries: int = 0                # rollbacks since the last healthy checkpoint past `diverged_at`
    recoveries: int = 0             # rollbacks in the whole run
    diverged_at: Optional[int] = None   # step of the last divergence
    health: dict = field(default_factory=dict)  # the health monitor's recent losses

    @property
    def data_step(self) -> int:
        return self.step + self.data_offset

    def client_state(self, cfg) -> dict:
        """Everything opt_ds adds to DeepSpeed's checkpoint of the run of the ResolvedConfig `cfg`."""
        layout = cfg.layout
        return {**checkpoint_client_state(cfg.shape),
                RUN_STATE_KEY: {**asdict(self), "config": cfg.run.to_dict(),
                                "layout": dict(zip(LAYOUT_KEYS, (layout.tensor, layout.pipeline, layout.data)))}}

    @classmethod
    def from_saved(cls, saved: dict) -> "RunState":
        names = [f for f in cls.__dataclass_fields__ if f in saved]      # older checkpoints lack the newer fields
        return cls(**{name: saved[name] for name in names})


def mp_rank_state(shape, original_vocab_size: int, tp: int, pp: int) -> dict:
    """DeepSpeed's engine metadata file of a weights-only checkpoint written without an engine (`opt-ds convert`):
    what `engine.load_checkpoint` reads, with the entries DeepSpeed's own save writes."""
    import deepspeed
    from deepspeed.checkpoint.constants import CHECKPOINT_PARALLEL_DIMS, CHECKPOINT_PP_DEGREE, CHECKPOINT_TP_DEGREE
    return {"module": None,             # pipeline weights live in the layer files
            "buffer_names": [], "optimizer": None, "param_shapes": None, "frozen_param_shapes": None,
            "shared_params": None, "frozen_param_fragments": None, "lr_scheduler": None, "data_sampler": None,
            "random_ltd": None, "skipped_steps": 0, "global_steps": 0, "global_samples": 0,
            "dp_world_size": 1, "mp_world_size": tp * pp,
            CHECKPOINT_PARALLEL_DIMS: {CHECKPOINT_PP_DEGREE: pp, CHECKPOINT_TP_DEGREE: tp},
            "ds_config": None, "ds_version": deepspeed.__version__,
            **checkpoint_client_state(shape, original_vocab_size)}


def saved_layout(run_state: dict) -> tuple:
    """(TP, PP, DP) of the run that saved this run state."""
    return tuple(run_state["layout"][k] for k in LAYOUT_KEYS)


def tensor_parallel_degree(saved: dict, folder: Path) -> int:
    """The TP degree of a checkpoint's files: DeepSpeed's own record in its mp_rank metadata, or for files
    written without it, the number of TP shards of the first layer."""
    dims = saved.get(PARALLEL_DIMS_KEY)
    if isinstance(dims, dict) and isinstance(dims.get(TP_DEGREE_KEY), int):
        return dims[TP_DEGREE_KEY]
    return max(1, len(list(Path(folder).glob("layer_00-model_*-model_states.pt"))))


def universal_checkpoint_info(shape, original_vocab_size: Optional[int] = None) -> dict:
    """DeepSpeed universal-checkpoint patterns for the parameter names of `opt_ds.parallel.pipe`.

    Parameter names are `tied_modules.<key>.<name>` for a tied embedding (present on the first and the last
    stage) and `<layer index>.<name inside the layer>` for everything else. The patterns are derived from
    megatron's TP attributes (`opt_ds.parallel.pipe.tensor_parallel_dims`): replicated tensors, tensors split
    on dim 1 (row-parallel), vocabulary tensors, and column-parallel tensors made of two sub-tensors
    (partition_stride 2: LLaMA's [gate_shard; up_shard]). Other column-parallel tensors need no pattern
    (DeepSpeed's default concatenates on dim 0); fused QKV rows are grouped per head so that is right.
    Every pattern matches a parameter, as ds_to_universal requires.
    """
    from deepspeed.checkpoint import constants as uc
    from opt_ds.parallel.pipe import tensor_parallel_dims

    splits = tensor_parallel_dims(shape)
    replicated = sorted({_name_pattern(n) for n, s in splits.items() if s.dim is None})
    row_parallel = sorted({_name_pattern(n) for n, s in splits.items() if s.dim == 1})
    vocabulary = sorted({_name_pattern(n) for n, s in splits.items() if s.vocab})
    two_sub_params = sorted({_name_pattern(n) for n, s in splits.items() if s.dim == 0 and s.stride == 2})
    tied_key = family_of(shape).tied_embedding_key
    return {
        uc.UNIVERSAL_CHECKPOINT_VERSION_KEY: uc.UNIVERSAL_CHECKPOINT_VERSION_VALUE,
        uc.ORIGINAL_VOCAB_SIZE: original_vocab_size or shape.vocab_size,
        uc.PADDED_VOCAB_SIZE: shape.vocab_size,
        uc.VOCABULARY_PARAMETER_PATTERNS: vocabulary,
        uc.PIPELINE_REPLICATED_PARAMETER_PATTERNS: [rf"tied_modules\.{tied_key}\."] if tied_key else [],
        uc.TP_REPLICATED_PARAMETER_PATTERNS: replicated,
        uc.PARAMETER_WITH_ROW_PARALLELISM_PATTERNS: row_parallel,
        **({uc.PARAMETER_WITH_2_SUB_PARAMS_CAT_DIM_0: two_sub_params} if two_sub_params else {}),
    }


def _name_pattern(name: str) -> str:
    r"""`12.mlp.fc2.weight` -> `\d+\.mlp\.fc2\.weight$`: one pattern for the same tensor of every layer."""
    index, _, rest = name.partition(".")
    return (r"\d+\." + re.escape(rest) if index.isdigit() else re.escape(name)) + "$"


def checkpoint_client_state(shape, original_vocab_size: Optional[int] = None) -> dict:
    """The client_state entries every opt_ds checkpoint carries (see the module docstring)."""
    return {MODEL_SHAPE_KEY: dataclasses.asdict(shape), MODEL_FAMILY_KEY: family_of(shape).name,
            UNIVERSAL_INFO_KEY: universal_checkpoint_info(shape, original_vocab_size)}


def shape_from_client_state(state: dict):
    """The shape saved by `checkpoint_client_state`, or None when the checkpoint has none. Checkpoints
    written before the family seam are OPT's."""
    fields = state.get(MODEL_SHAPE_KEY)
    if not isinstance(fields, dict):
        return None
    family = family_named(state.get(MODEL_FAMILY_KEY, "opt"))
    known = family.shape_fields()
    return family.shape_type(**{k: v for k, v in fields.items() if k in known})
