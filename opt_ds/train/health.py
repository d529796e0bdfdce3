"""Per-step health checks: loss spikes against the run's recent losses and their noise, non-finite loss or
gradient norm, fp16 loss-scale collapse, and data-parallel replicas whose own gradients disagree (a silent bad
host).

Why spikes are judged by robust statistics of the recent losses and not by a ratio to a moving mean: early in
a run the loss falls steeply, and a mean over tens of steps lags far above the current loss (in the demo the
EWM of span 50 stood at 8.26 while the loss was 7.27), so a 100x-LR update that threw the loss back to 8.4-8.8
stayed under 1.5 x EWM. The reference here is the median of the last few healthy losses (one step of lag in a
descent, and one odd batch does not move it), and the bar above it is the run's own noise: the robust spread
(MAD) of the step-to-step loss changes over a window, which a steady descent does not inflate (the median
change is subtracted) and which grows on its own for small, noisy batches. A relative floor keeps a very smooth
run from flagging tiny bumps. Everything is computed from the loss, which every rank sees identically, in
plain Python floats, so every rank reaches the same verdict; the window is saved in checkpoints.

Why the replica check measures gradients *before* the data-parallel reduction: DeepSpeed's ZeRO-1 norm is
all-reduced over the DP group (each rank adds the squares of its partition of the averaged gradient), so
every rank reports the same number by construction; a host that computes garbage only shifts that common
number, and comparing it across ranks can never disagree. What differs per host is its own gradient, before
the average. So just before the reduction every rank takes the norm of its local gradient slice and the DP
group all-gathers these scalars: ranks holding the same slice (same pipeline stage and TP rank) of different
replicas see different data but the same model, so their norms agree to within sampling noise. A replica
that is non-finite while the others are not, or off by more than `health.replica_norm_ratio`, names its rank
and host. Cost: one fused norm over the local gradients (torch._foreach_norm, a few kernels however many
parameters) and one all-gather of a float per step, both queued on the device without a host synchronisation:
the norms are read to the host only after the step (`take`), when the loss has been read anyway.
"""
from __future__ import annotations

import math
import socket
import statistics
from dataclasses import asdict, dataclass
from typing import Optional, Sequence

import torch
import torch.distributed as dist

from opt_ds.patches import before_reduce_grads, local_gradients
from opt_ds.train.collective import device


@dataclass(frozen=True)
class Anomaly:
    kind: str               # nan_loss | nan_grad_norm | loss_spike | loss_scale_collapse | replica_disagreement
    message: str
    fatal: bool             # a divergence: roll back; otherwise a warning that marks the next checkpoint unhealthy
    hardware: bool = False  # suspected bad host: roll back, but keep the LR and the data

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class StepObservation:
    step: int
    loss: float
    grad_norm: Optional[float]
    loss_scale: Optional[float]         # fp16 only
    overflow: bool                      # fp16: the loss scaler skipped this update
    replica_norms: Optional[list] = None    # this rank's DP group, one per replica (None: not measured)


REFERENCE_STEPS = 5         # the spike reference: median of this many most recent healthy losses
MAD_TO_SIGMA = 1.4826       # MAD x this = standard deviation, for normally distributed noise


@dataclass(frozen=True)
class SpikeBar:
    """Where a loss counts as a spike, from the recent healthy losses."""
    reference: float        # median of the last REFERENCE_STEPS losses
    noise: float            # robust standard deviation of one step's loss around the trend
    threshold: float        # reference + max(spike_sigmas x noise, spike_min_rise x reference)


def spike_bar(history: Sequence[float], sigmas: float, min_rise: float) -> SpikeBar:
    """The spike threshold after `history` (oldest first, at least 3 losses). The noise is the MAD of the
    step-to-step changes about their median (the trend), / sqrt(2) because a change holds two steps' noise."""
    reference = statistics.median(history[-REFERENCE_STEPS:])
    changes = [b - a for a, b in zip(history, history[1:])]
    trend = statistics.median(changes)
    noise = MAD_TO_SIGMA * statistics.median(abs(c - trend) for c in changes) / math.sqrt(2)
    return SpikeBar(reference, noise, reference + max(sigmas * noise, min_rise * abs(reference)))


class HealthMonitor:
    """Judges each step from what every rank sees identically (loss, reduced norm, loss scale) plus the
    replica norms of its DP group. Its state (the recent healthy losses) is saved in checkpoints so a resume
    or a rollback judges the next steps exactly as an uninterrupted run would."""

    def __init__(self, cfg, *, fp16: bool, deepspeed_min_loss_scale: float, replica_names: Optional[list] = None):
        self.cfg = cfg
        self.fp16 = fp16
        self.deepspeed_min_loss_scale = deepspeed_min_loss_scale
        self.replica_names = replica_names
        self.losses: list = []          # the last health.spike_window healthy losses, oldest first
        self.spike_run = 0

    def state_dict(self) -> dict:
        return {"losses": list(self.losses), "spike_run": self.spike_run}

    def load_state_dict(self, state: dict) -> None:
        # a checkpoint from before the window (an EWM) starts a new warm-up
        self.losses, self.spike_run = list(state.get("losses", [])), state.get("spike_run", 0)

    def bar(self) -> Optional[SpikeBar]:
        """The current spike threshold; None during the warm-up."""
        if len(self.losses) < self.cfg.spike_warmup_steps:
            return None
        return spike_bar(self.losses, self.cfg.spike_sigmas, self.cfg.spike_min_rise)

    def observe(self, obs: StepObservation) -> list:
        if not self.cfg.enabled:
            return []
        routine_overflow = self.fp16 and obs.overflow and math.isfinite(obs.loss)
        replicas = []
        if obs.replica_norms is not None and not routine_overflow:
            replicas = replica_anomalies(obs.replica_norms, self.cfg.replica_norm_ratio, self.replica_names)
        found = []
        # a NaN that one replica alone produced is that host's fault, not the optimization's
        explained = bool(replicas)
        if not math.isfinite(obs.loss):
            found.append(Anomaly("nan_loss", f"loss is {obs.loss}", fatal=True, hardware=explained))
        else:
            found += self._spike(obs.loss)
        if obs.grad_norm is not None and not math.isfinite(obs.grad_norm) and not routine_overflow:
            found.append(Anomaly("nan_grad_norm", f"gradient norm is {obs.grad_norm}", fatal=True,
                                 hardware=explained))
        if obs.loss_scale is not None:
            found += self.loss_scale_anomalies(obs.loss_scale)
        return found + replicas

    def _spike(self, loss: float) -> list:
        cfg, bar = self.cfg, self.bar()
        if bar is not None and loss > bar.threshold:
            self.spike_run += 1       # a spike stays out of the window: a divergence must not raise its own bar
            return [Anomaly("loss_spike", f"loss {loss:.4g} > {bar.threshold:.4g} = recent median {bar.reference:.4g} "
                            f"+ max({cfg.spike_sigmas:g} x noise {bar.noise:.3g}, {cfg.spike_min_rise:g} x median) "
                            f"({self.spike_run} step(s) in a row; health.spike_patience={cfg.spike_patience})",
                            fatal=self.spike_run >= cfg.spike_patience)]
        self.spike_run = 0
        self.losses = (self.losses + [loss])[-cfg.spike_window:]
        return []

    def loss_scale_anomalies(self, scale: float) -> list:
        if scale < self.cfg.min_loss_scale:
            return [Anomaly("loss_scale_collapse", f"fp16 loss scale {scale:g} fell below health.min_loss_scale "
                            f"{self.cfg.min_loss_scale:g}", fatal=True)]
        if scale <= self.deepspeed_min_loss_scale:
            return [Anomaly("loss_scale_collapse", f"fp16 loss scale {scale:g} is at DeepSpeed's floor "
                            f"precision.min_loss_scale={self.deepspeed_min_loss_scale:g}: one more overflow "
                            "would abort the run", fatal=True)]
        return []


def replica_anomalies(norms: list, ratio: float, names: Optional[list] = None) -> list:
    """Compare the local gradient norms of the replicas of one model slice (index = DP rank)."""
    names = names or [f"DP replica {i}" for i in range(len(norms))]
    if len(norms) < 2:
        return []
    finite = [math.isfinite(n) for n in norms]
    if not all(finite):
        if not any(finite):
            return []           # every replica non-finite: a real divergence, the loss/norm checks report it
        bad = [names[i] for i, ok in enumerate(finite) if not ok]
        return [Anomaly("replica_disagreement", f"{', '.join(bad)}: non-finite local gradient while the other "
                        f"replicas' are finite ({_show(norms)})", fatal=True, hardware=True)]
    low, high = min(norms), max(norms)
    if high == 0.0 or (low > 0.0 and high / low <= ratio):
        return []
    limit = f"max/min > health.replica_norm_ratio={ratio:g}"
    if len(norms) == 2:         # two replicas: which one is wrong cannot be told, name both
        return [Anomaly("replica_disagreement", f"{names[0]} and {names[1]}: local gradient norms {_show(norms)} "
                        f"disagree ({limit})", fatal=True, hardware=True)]
    logs = [math.log(max(n, 1e-30)) for n in norms]
    centre = statistics.median(logs)
    outlier = max(range(len(norms)), key=lambda i: abs(logs[i] - centre))
    return [Anomaly("replica_disagreement", f"{names[outlier]}: local gradient norm {norms[outlier]:.4g} vs "
                    f"{_show(norms)} across the replicas ({limit})", fatal=True, hardware=True)]


def _show(norms: list) -> str:
    return "[" + ", ".join(f"{n:.3g}" for n in norms) + "]"


class ReplicaNormProbe:
    """Measures, every step, the local gradient norm of each DP replica of this rank's model slice."""

    def __init__(self, engine):
        self.engine = engine
        self.group = engine.grid.get_data_parallel_group()
        self.size = dist.get_world_size(group=self.group)
        self.norms: Optional[list] = None      # device tensors until `take` reads them
        before_reduce_grads(engine, self.measure)

    def names(self) -> list:
        """'rank R on HOST (stage S, TP rank T)' for each DP rank of this rank's group (collective)."""
        grid = self.engine.grid
        me = (f"DP replica {grid.data_parallel_id}: rank {dist.get_rank()} on {socket.gethostname()} "
              f"(stage {grid.get_stage_id()}, TP rank {grid.get_slice_parallel_rank()})")
        names = [None] * self.size
        dist.all_gather_object(names, me, group=self.group)
        return names

    def measure(self) -> None:
        grads = [grad.detach() for grad in local_gradients(self.engine)]
        squares = torch.zeros((), dtype=torch.float32, device=device())
        if grads:
            norms = torch._foreach_norm(grads, 2, dtype=torch.float32)     # fp32: an fp16 norm would overflow
            squares = torch.stack([n.to(squares.device) for n in norms]).pow(2).sum()
        scale = getattr(self.engine.optimizer, "cur_scale", 1.0) if self.engine.fp16_enabled() else 1.0
        norm = (squares.sqrt() / scale).reshape(1)
        gathered = [torch.zeros_like(norm) for _ in range(self.size)]
        dist.all_gather(gathered, norm, group=self.group)
        self.norms = gathered

    def take(self) -> Optional[list]:
        norms, self.norms = self.norms, None
        return None if norms is None else [float(t.item()) for t in norms]
