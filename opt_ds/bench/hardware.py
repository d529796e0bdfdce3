"""GPU profiles for the projection and the planner: peak, memory and links, each figure with its source."""
from __future__ import annotations

from dataclasses import dataclass, field

from opt_ds.errors import UserError

GB = 1e9


@dataclass(frozen=True)
class Hardware:
    name: str
    peak_tflops: float              # dense fp16/bf16 tensor-core peak
    gemm_efficiency: float          # achieved fraction of peak on a training step's large GEMMs
    attention_efficiency: float     # fused (flash) attention kernels, on their real (causal) FLOPs
    hbm_tb_s: float
    memory_gib: float
    nvlink_busbw_gb_s: float        # NCCL all-reduce bus bandwidth inside a node, large messages
    ib_gb_s_per_gpu: float          # achieved inter-node bandwidth per GPU
    gpus_per_node: int = 8
    why: dict = field(default_factory=dict, compare=False, hash=False)


# One figure for every GPU, fitted where no communication blurs it: a whole compiled OPT-1.3B training step
# on one H100 (b=8, s=2048, bf16, fused kernels) measured 537 model TFLOP/s; this roofline gives 535 with
# 0.65 (and 516 for OPT-2.7B, measured 489). An isolated 8192³ GEMM reaches 0.78 of H100 peak and 0.86 of
# A100 peak: the shapes of a training step (TP shards, weight gradients, sustained clocks) reach less.
GEMM_EFFICIENCY = 0.65
GEMM_EFFICIENCY_WHY = ("fitted once on a one-GPU measurement (compiled OPT-1.3B step on an H100: 537 model "
                       "TFLOP/s measured, 535 projected; OPT-2.7B 489 measured, 516 projected); isolated "
                       "8192³ GEMMs reach 0.78 (H100) and 0.86 (A100) of peak, training-step GEMMs less")

_A100_WHY = {
    "peak_tflops": "A100 dense fp16/bf16 tensor-core peak (datasheet)",
    "gemm_efficiency": GEMM_EFFICIENCY_WHY,
    "attention_efficiency": "FlashAttention(-2) forward + backward reaches 0.4–0.7 of A100 peak on causal "
                            "FLOPs (FlashAttention-2 paper, head dim 64–128)",
    "hbm_tb_s": "A100-80GB HBM2e (datasheet); element-wise kernels reach ~80 % of it",
    "memory_gib": "A100 80GB: 81920 MiB",
    "nvlink_busbw_gb_s": "NCCL all-reduce bus bandwidth of 8 A100s on NVSwitch: ~230 GB/s at GB messages, "
                         "~190 at the 25–100 MB of a TP all-reduce (nccl-tests); latency below",
    "ib_gb_s_per_gpu": "one 200 Gb/s HDR HCA per GPU (DGX A100 / Azure NDm A100 v4 / Meta RSC) = 25 GB/s at 80 %",
}

HARDWARE = {
    "a100-80gb": Hardware("A100-SXM4-80GB, NVSwitch, one 200 Gb/s HDR HCA per GPU", 312, GEMM_EFFICIENCY, 0.5,
                          2.039, 80, 190, 20, why=_A100_WHY),
    "a100-80gb-opa": Hardware(
        "A100-SXM4-80GB, NVSwitch, 4 × 100 Gb/s Omni-Path per 8-GPU node (Jean Zay, BLOOM)", 312, GEMM_EFFICIENCY,
        0.5, 2.039, 80, 190, 5,
        why={**_A100_WHY, "ib_gb_s_per_gpu": "BLOOM's model card: 4 Omni-Path links of 100 Gb/s per 8-GPU node "
                                             "= 6.25 GB/s per GPU, at 80 %"}),
    "h100-80gb": Hardware(
        "H100-SXM5-80GB, NVLink4 + NVSwitch, one 400 Gb/s NDR HCA per GPU", 989, GEMM_EFFICIENCY, 0.5, 3.35, 79.6,
        360, 40,
        why={"peak_tflops": "H100 SXM dense bf16 peak (datasheet)",
             "gemm_efficiency": GEMM_EFFICIENCY_WHY,
             "attention_efficiency": "FlashAttention-2/3 on H100 reach 0.35–0.75 of peak: 0.5",
             "hbm_tb_s": "H100 SXM HBM3 (datasheet)", "memory_gib": "H100 80GB: 81559 MiB",
             "nvlink_busbw_gb_s": "NCCL all-reduce bus bandwidth of 8 H100s (NVLink4 450 GB/s per direction) "
                                  "at tens of MB",
             "ib_gb_s_per_gpu": "400 Gb/s NDR = 50 GB/s per GPU at 80 %"}),
    "h200": Hardware(
        "H200-SXM-141GB, NVLink4 + NVSwitch, one 400 Gb/s NDR HCA per GPU", 989, GEMM_EFFICIENCY, 0.5, 4.8, 140,
        360, 40,
        why={"peak_tflops": "H200 dense bf16 peak = H100's (same GH100 die)",
             "gemm_efficiency": GEMM_EFFICIENCY_WHY, "attention_efficiency": "as H100",
             "hbm_tb_s": "H200 HBM3e (datasheet)", "memory_gib": "H200 141 GB: 143771 MiB",
             "nvlink_busbw_gb_s": "as H100 (NVLink4)", "ib_gb_s_per_gpu": "400 Gb/s NDR = 50 GB/s per GPU at 80 %"}),
}
# Fixed costs of one collective or transfer, independent of its size (NCCL ring/tree start-up).
NVLINK_LATENCY_S = 20e-6
IB_LATENCY_S = 30e-6


ALIASES = {"h100-sxm": "h100-80gb"}


def get_hardware(name: str) -> Hardware:
    try:
        return HARDWARE[ALIASES.get(name, name)]
    except KeyError:
        raise UserError(f"hardware {name!r}: choose one of {', '.join(HARDWARE)}") from None


def hardware_key(hardware: Hardware) -> str:
    """The profile name of `hardware` (also after a figure of it was changed)."""
    return next((key for key, known in HARDWARE.items() if known.name == hardware.name), "custom")
