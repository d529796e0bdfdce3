"""Dense (non-sparse) peak TFLOP/s per device, for MFU.

Figures are the vendors' datasheet numbers without structured sparsity (the "2:4 sparse" figures are
twice these and are the usual source of inflated MFU, see MLM #1276/#1565, torchtitan #668). fp32 runs
use the TF32 tensor-core peak when PyTorch lets matmuls use TF32, else the plain FP32 peak.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class DevicePeak:
    label: str
    bf16: Optional[float]   # TFLOP/s, dense; None where the device has no bf16 tensor cores
    fp16: float
    tf32: Optional[float]
    fp32: float


# Most specific pattern first: "H100 PCIe" before "H100", "GH200" before "H200", "L40S" before "L4".
PEAKS = [
    (r"GH200", DevicePeak("GH200", 989, 989, 494.5, 67)),
    (r"H200", DevicePeak("H200", 989, 989, 494.5, 67)),
    (r"H100.*NVL", DevicePeak("H100 NVL", 835, 835, 417.5, 60)),
    (r"H100.*PCIe", DevicePeak("H100 PCIe", 756, 756, 378, 51)),
    (r"H100", DevicePeak("H100 SXM", 989, 989, 494.5, 67)),
    (r"A100|A800", DevicePeak("A100", 312, 312, 156, 19.5)),
    (r"L40S", DevicePeak("L40S", 362, 362, 183, 91.6)),
    (r"\bL4\b", DevicePeak("L4", 121, 121, 60, 30.3)),
    (r"\bA10\b", DevicePeak("A10", 125, 125, 62.5, 31.2)),
    (r"V100", DevicePeak("V100", None, 125, None, 15.7)),
    (r"MI300X", DevicePeak("MI300X", 1307.4, 1307.4, 653.7, 163.4)),
]


@dataclass(frozen=True)
class Peak:
    """The peak a run's MFU is measured against, or why there is none."""
    tflops: Optional[float]
    source: str


def lookup(device_name: str) -> Optional[DevicePeak]:
    for pattern, peak in PEAKS:
        if re.search(pattern, device_name):
            return peak
    return None


def peak_for(device_name: str, precision: str, tf32_allowed: bool = False,
             override_tflops: Optional[float] = None) -> Peak:
    """Dense peak for `precision` (fp32 | bf16 | fp16) on the named device ("cpu" for none)."""
    if override_tflops is not None:
        return Peak(override_tflops, f"given with --peak-tflops ({override_tflops:g} TFLOP/s)")
    if device_name == "cpu":
        return Peak(None, "n/a: CPU (no peak table for CPUs)")
    device = lookup(device_name)
    if device is None:
        return Peak(None, f"n/a: {device_name!r} is not in the peak table; pass --peak-tflops")
    if precision == "fp32":
        kind, value = ("tf32", device.tf32) if tf32_allowed and device.tf32 else ("fp32", device.fp32)
    else:
        kind, value = precision, getattr(device, precision)
    if value is None:
        return Peak(None, f"n/a: {device.label} has no dense {kind} tensor-core peak")
    return Peak(value, f"{device.label} dense {kind} {value:g} TFLOP/s")
