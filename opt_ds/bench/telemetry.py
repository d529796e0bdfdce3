"""What a step costs besides time: peak memory, GPU utilisation, power, energy and its carbon estimate.

GPU figures come from NVML (nvidia-ml-py): the total-energy counter (mJ, Volta and later) read before and
after the timed steps, and power/utilisation sampled by a background thread. Where NVML cannot be used
(no CUDA device, package missing, driver refuses) the fields say so instead of failing the run.
"""
from __future__ import annotations

import resource
import threading
import time
from typing import Optional

import torch

PUE = 1.1                       # data-centre power usage effectiveness (LLaMA paper section 6)
KG_CO2_PER_KWH = 0.385          # US average grid intensity used by the OPT and LLaMA papers
CARBON_FORMULA = f"energy (kWh) × PUE {PUE} × {KG_CO2_PER_KWH} kg CO2eq/kWh"


def carbon_kg(energy_joules: float, pue: float = PUE, kg_per_kwh: float = KG_CO2_PER_KWH) -> float:
    return energy_joules / 3.6e6 * pue * kg_per_kwh


def peak_memory() -> dict:
    """This process's peak memory: the CUDA caching allocator's peak, or the max RSS on CPU."""
    if torch.cuda.is_available():
        return {"bytes": torch.cuda.max_memory_allocated(), "kind": "torch.cuda.max_memory_allocated"}
    # ru_maxrss is in KiB on Linux.
    return {"bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "kind": "process max RSS"}


def reset_peak_memory() -> None:
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


class GpuMonitor:
    """Energy, power and utilisation of this process's GPU over a measured window."""

    def __init__(self, interval_s: float = 0.1):
        self.interval_s = interval_s
        self.reason: Optional[str] = None
        self.handle = None
        self._samples: list = []
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._energy_start: Optional[int] = None
        self._t0 = 0.0
        if not torch.cuda.is_available():
            self.reason = "no CUDA device"
            return
        try:
            import pynvml
        except ImportError:
            self.reason = "nvidia-ml-py is not installed (pip install nvidia-ml-py)"
            return
        try:
            pynvml.nvmlInit()
            self.handle = pynvml.nvmlDeviceGetHandleByIndex(_nvml_index())
        except Exception as err:     # NVMLError subclasses: library or driver missing, no permission
            self.reason = f"NVML unavailable: {err}"
            self.handle = None
        self._nvml = pynvml if self.handle is not None else None

    @property
    def available(self) -> bool:
        return self.handle is not None

    def start(self) -> None:
        if not self.available:
            return
        self._energy_start = self._energy_mj()
        self._t0 = time.perf_counter()
        self._stop.clear()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def stop(self) -> dict:
        if not self.available:
            return {"available": False, "reason": self.reason}
        self._stop.set()
        self._thread.join()
        elapsed = time.perf_counter() - self._t0
        power = [p for p, _ in self._samples if p is not None]
        util = [u for _, u in self._samples if u is not None]
        energy_end = self._energy_mj()
        if self._energy_start is not None and energy_end is not None:
            energy_j, source = (energy_end - self._energy_start) / 1e3, "nvmlDeviceGetTotalEnergyConsumption delta"
        elif power:
            energy_j, source = sum(power) / len(power) * elapsed, "mean sampled power × time"
        else:
            energy_j, source = None, "no energy counter and no power samples"
        return {
            "available": True,
            "energy_j": energy_j,
            "energy_source": source,
            "window_s": elapsed,
            "power_w_mean": sum(power) / len(power) if power else None,
            "power_w_max": max(power) if power else None,
            "utilization_pct_mean": sum(util) / len(util) if util else None,
            "samples": len(self._samples),
        }

    def _energy_mj(self) -> Optional[int]:
        try:
            return self._nvml.nvmlDeviceGetTotalEnergyConsumption(self.handle)
        except Exception:
            return None

    def _sample(self) -> None:
        while not self._stop.is_set():
            try:
                power = self._nvml.nvmlDeviceGetPowerUsage(self.handle) / 1e3
            except Exception:
                power = None
            try:
                util = self._nvml.nvmlDeviceGetUtilizationRates(self.handle).gpu
            except Exception:
                util = None
            self._samples.append((power, util))
            self._stop.wait(self.interval_s)


def _nvml_index() -> int:
    """NVML numbers GPUs physically; CUDA_VISIBLE_DEVICES renumbers them for CUDA."""
    device = torch.cuda.current_device()
    try:
        return torch.cuda._get_nvml_device_index(device)
    except Exception:
        return device


def combine_gpu_windows(windows: list) -> dict:
    """One record for all ranks of a run: energies and powers add up, utilisation averages."""
    usable = [w for w in windows if w.get("available")]
    if not usable:
        return {"available": False, "reason": windows[0].get("reason") if windows else "no ranks"}

    def total(key):
        values = [w[key] for w in usable if w.get(key) is not None]
        return sum(values) if len(values) == len(usable) else None

    def mean(key):
        values = [w[key] for w in usable if w.get(key) is not None]
        return sum(values) / len(values) if values else None

    return {
        "available": True,
        "gpus": len(usable),
        "energy_j": total("energy_j"),
        "energy_source": usable[0]["energy_source"],
        "power_w_total": total("power_w_mean"),
        "power_w_mean_per_gpu": mean("power_w_mean"),
        "power_w_max": max((w["power_w_max"] for w in usable if w.get("power_w_max") is not None), default=None),
        "utilization_pct_mean": mean("utilization_pct_mean"),
    }
