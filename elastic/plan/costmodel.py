"""Predict a layout's step time and a reshard's cost; calibrate both from what the job measures.

Step time = compute + communication.
- Compute: 6 * params * tokens FLOPs per step, spread over min(world, cores) cores at the
  measured FLOP rate, stretched by the pipeline bubble (pp - 1 + mb) / mb and a small
  tensor-parallel penalty for narrower matmuls.
- Communication per rank, in bytes over the measured bandwidth plus a latency per collective:
  fsdp all-gathers parameters twice and reduce-scatters gradients once, (fsdp - 1) / fsdp of
  the rank's stage; dp all-reduces gradients, 2 (dp - 1) / dp; tp all-reduces activations four
  times per layer and micro-batch; pp sends activations and their gradients between stages.
Reshard cost = the busiest worker's bytes over the bandwidth, plus a fixed overhead (new groups,
engine build).

Calibration: after each step the FLOP rate is re-fitted (moving average) from the observed time
minus the predicted communication; after each reshard, the bandwidth and the fixed overhead.
Pure Python, no torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from elastic.core.config import ModelConfig
from elastic.core.layout import Layout


@dataclass
class CostModel:
    model: ModelConfig
    global_batch: int
    seq_len: int
    itemsize: int
    cores: float = 2.0  # CPU cores the workers share (the cluster's CPUs)
    flop_rate: float = 3e9  # FLOP/s of one core, calibrated
    bandwidth: float = 1e9  # bytes/s between two processes, calibrated
    disk_bandwidth: float = 2e9  # bytes/s a worker reads a base folder's tensors (page-cached safetensors), calibrated
    latency: float = 3e-4  # seconds per collective call
    reshard_overhead: float = 0.4  # seconds of fixed reshard cost, calibrated
    tp_penalty: float = 0.1  # compute stretch per extra tp rank (smaller matmuls)
    smoothing: float = 0.3
    observed_steps: int = field(default=0, init=False)

    # ---- prediction ------------------------------------------------------------------
    def step_flops(self) -> float:
        return 6.0 * self.model.num_params() * self.global_batch * self.seq_len

    def compute_seconds(self, layout: Layout) -> float:
        parallel = min(layout.world, max(self.cores, 1.0))
        seconds = self.step_flops() / (self.flop_rate * parallel)
        if layout.pp > 1:
            seconds *= (layout.pp - 1 + layout.microbatches) / layout.microbatches
        return seconds * (1.0 + self.tp_penalty * (layout.tp - 1))

    def comm_bytes_and_calls(self, layout: Layout) -> tuple[float, float]:
        m = self.model
        stage_params = m.num_params() / (layout.pp * layout.tp)
        param_bytes = stage_params * self.itemsize
        layers = m.n_layers / layout.pp
        nbytes, calls = 0.0, 0.0
        if layout.fsdp > 1:
            nbytes += 3 * param_bytes * (layout.fsdp - 1) / layout.fsdp
            calls += 3 * (layers + 1)
        if layout.dp > 1:
            nbytes += 2 * (param_bytes / layout.fsdp) * (layout.dp - 1) / layout.dp
            calls += layers + 1
        local_batch = self.global_batch / layout.data_parallel
        activation = local_batch * self.seq_len * m.dim * self.itemsize
        if layout.tp > 1:
            nbytes += 4 * layers * 2 * activation * (layout.tp - 1) / layout.tp
            calls += 4 * layers * layout.microbatches
        if layout.pp > 1:
            nbytes += 2 * activation
            calls += 2 * layout.microbatches
        return nbytes, calls

    def comm_seconds(self, layout: Layout) -> float:
        nbytes, calls = self.comm_bytes_and_calls(layout)
        # Processes beyond the core count time-share: their transfers are not free either.
        crowding = max(1.0, layout.world / max(self.cores, 1.0))
        return nbytes / self.bandwidth * crowding + calls * self.latency

    def step_seconds(self, layout: Layout) -> float:
        return self.compute_seconds(layout) + self.comm_seconds(layout)

    def reshard_seconds(self, max_worker_bytes: int) -> float:
        return max_worker_bytes / self.bandwidth + self.reshard_overhead

    # ---- calibration -----------------------------------------------------------------
    def _blend(self, old: float, new: float) -> float:
        return new if self.observed_steps == 0 else (1 - self.smoothing) * old + self.smoothing * new

    def observe_step(self, layout: Layout, seconds: float) -> None:
        compute = max(seconds - self.comm_seconds(layout), 0.25 * seconds)
        implied = self.compute_seconds(layout) * self.flop_rate / compute
        self.flop_rate = self._blend(self.flop_rate, implied)
        self.observed_steps += 1

    def base_from_disk(self) -> bool:
        """Whether reading a frozen base's pieces from its folder is predicted faster than receiving them: the
        same bytes either way, so it is the faster of the two calibrated rates."""
        return self.disk_bandwidth > self.bandwidth

    def observe_disk(self, nbytes: int, seconds: float) -> None:
        if nbytes > 1 << 20 and seconds > 0:
            self.disk_bandwidth = 0.5 * self.disk_bandwidth + 0.5 * (nbytes / seconds)

    def observe_reshard(self, bytes_moved: int, transfer_seconds: float, other_seconds: float) -> None:
        if bytes_moved > 1 << 20 and transfer_seconds > 0:
            self.bandwidth = 0.5 * self.bandwidth + 0.5 * (bytes_moved / transfer_seconds)
        self.reshard_overhead = 0.5 * self.reshard_overhead + 0.5 * other_seconds
