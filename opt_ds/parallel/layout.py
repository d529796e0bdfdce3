"""ParallelLayout: one object that owns the TP x PP x DP decomposition.

It builds DeepSpeed's pipeline topology (axes pipe, data, model) and megatron-core's `parallel_state`
(order tp-cp-ep-dp-pp) from the same three numbers and checks, rank by rank, that the two libraries
put every process in the same tensor-, data- and pipeline-parallel groups.
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass

import torch

from opt_ds.errors import UserError
from opt_ds.parallel.cpu_compat import apply_cpu_adaptations, running_on_cpu
from opt_ds.ports import free_port


class LayoutError(UserError, ValueError):
    """A parallel layout that cannot work; the message names the problem and the fix."""


@dataclass(frozen=True)
class ParallelLayout:
    tensor: int = 1
    pipeline: int = 1
    data: int = 1

    @property
    def world_size(self) -> int:
        return self.tensor * self.pipeline * self.data

    def __str__(self) -> str:
        return f"TP={self.tensor} x PP={self.pipeline} x DP={self.data}"

    def check_world_size(self, world_size: int) -> None:
        if world_size != self.world_size:
            raise LayoutError(
                f"world size {world_size} != TP x PP x DP = {self.tensor} x {self.pipeline} x {self.data} "
                f"= {self.world_size}; launch {self.world_size} processes or set parallel.data=auto")

    # --- process groups -------------------------------------------------------------------------

    def topology(self):
        from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology
        return PipeModelDataParallelTopology(num_pp=self.pipeline, num_mp=self.tensor, num_dp=self.data)

    def initialize(self, timeout_minutes: int = 30) -> None:
        """Start torch.distributed (gloo on CPU, NCCL on GPU) and megatron's parallel_state."""
        # Read when the CUDA context is created, so before any CUDA call: megatron's TP layers overlap their
        # gradient all-reduce with the weight-gradient GEMM and rely on launches staying in order.
        os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")
        _share_cores_between_local_ranks()
        apply_cpu_adaptations()
        _default_single_process_env()
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        if not running_on_cpu():
            torch.cuda.set_device(local_rank)
        import deepspeed
        from datetime import timedelta
        if not torch.distributed.is_initialized():
            deepspeed.init_distributed(dist_backend="gloo" if running_on_cpu() else "nccl",
                                       timeout=timedelta(minutes=timeout_minutes))
        self.check_world_size(torch.distributed.get_world_size())

        from megatron.core import parallel_state
        if not parallel_state.model_parallel_is_initialized():
            parallel_state.initialize_model_parallel(
                tensor_model_parallel_size=self.tensor,
                pipeline_model_parallel_size=self.pipeline,
                distributed_timeout_minutes=timeout_minutes,
                create_gloo_process_groups=False,
            )
        self.assert_groups_agree()

    def assert_groups_agree(self) -> None:
        """DeepSpeed's topology and megatron's parallel_state must place this rank identically."""
        from megatron.core import parallel_state as ps
        topo = self.topology()
        rank = torch.distributed.get_rank()
        pairs = {
            "model": ps.get_tensor_model_parallel_group(),
            "data": ps.get_data_parallel_group(),
            "pipe": ps.get_pipeline_model_parallel_group(),
        }
        for axis, group in pairs.items():
            megatron_ranks = sorted(torch.distributed.get_process_group_ranks(group))
            deepspeed_ranks = next(sorted(g) for g in topo.get_axis_comm_lists(axis) if rank in g) \
                if topo.get_dim(axis) > 1 else [rank]
            if megatron_ranks != deepspeed_ranks:
                raise RuntimeError(
                    f"rank {rank}: megatron-core's {axis} group {megatron_ranks} differs from DeepSpeed's "
                    f"{deepspeed_ranks}; the two libraries disagree on rank order for {self}")

    def tensor_group(self):
        """This rank's tensor-parallel process group, handed to the model's TP layers. `initialize()` first."""
        from megatron.core import parallel_state
        return parallel_state.get_tensor_model_parallel_group()

    def megatron_config(self, params_dtype=torch.float32, sequence_parallel: bool = False):
        """megatron-core's ModelParallelConfig for the TP layers of this layout.

        Weights are initialised on the CPU from the full (master) matrix and then split, so the initial
        model does not depend on the TP degree and the single-process run is a golden reference.
        `sequence_parallel` (opt_ds.models.sequence) takes effect only with TP > 1.
        """
        from megatron.core import ModelParallelConfig
        return ModelParallelConfig(
            tensor_model_parallel_size=self.tensor,
            pipeline_model_parallel_size=self.pipeline,
            pipeline_dtype=params_dtype,
            params_dtype=params_dtype,
            use_cpu_initialization=True,
            perform_initialization=True,
            gradient_accumulation_fusion=False,
            sequence_parallel=sequence_parallel and self.tensor > 1,
        )


def shutdown_distributed(wait: bool = True) -> None:
    """End of a process's distributed work: (optionally) wait for every rank, then tear the process groups
    down. Left to interpreter exit, a finished multi-process run sometimes aborted with "terminate called
    without an active exception" (SIGABRT, exit -6) as gloo's C++ threads were destroyed unjoined, which a job
    script reads as a crash. `wait=False` on error paths, where a peer may never arrive."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        if wait:
            torch.distributed.barrier()
        if "megatron.core.parallel_state" in sys.modules:     # a world without megatron (a bench peer) has none
            from megatron.core import parallel_state
            parallel_state.destroy_model_parallel()     # so a later initialize() in this process starts clean
        torch.distributed.destroy_process_group()


def _share_cores_between_local_ranks() -> None:
    """Unless OMP_NUM_THREADS says otherwise, give each rank its share of this machine's cores. Launchers
    differ (torchrun sets 1; DeepSpeed's runner sets nothing and pdsh forwards only some variables), and
    oversubscribed ranks ran ~10x slower on 2 cores."""
    if "OMP_NUM_THREADS" in os.environ:
        return
    local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("LOCAL_SIZE") or 1)
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_ranks))


def _default_single_process_env() -> None:
    """Let `python script.py` run as a one-process world without a launcher."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in os.environ:
        os.environ["MASTER_PORT"] = str(free_port("127.0.0.1"))
