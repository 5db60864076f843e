"""GPU memory for Prometheus, where there is a GPU: what torch's caching allocator holds on this process's device.

Gauges in multiprocess mode keep one value per live process; `livesum` adds up the nodes that share a device and
drops a node's value when the supervisor marks it dead.
"""

from __future__ import annotations

import torch
from prometheus_client import Gauge

GPU_MEMORY_ALLOCATED = Gauge(
    "inferq_gpu_memory_allocated_bytes",
    "GPU memory held by tensors of the worker processes, per device.",
    ["device"],
    multiprocess_mode="livesum",
)
GPU_MEMORY_RESERVED = Gauge(
    "inferq_gpu_memory_reserved_bytes",
    "GPU memory reserved by torch's caching allocator in the worker processes, per device.",
    ["device"],
    multiprocess_mode="livesum",
)


def record_gpu_memory(device: torch.device) -> None:
    """Update the gauges for a CUDA device; nothing on a CPU worker or where CUDA cannot answer."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return
    try:
        index = torch.cuda.current_device() if device.index is None else device.index
        # Each node sees its own GPU as device 0: the UUID names the physical device (bounded by the host's GPUs).
        label = str(getattr(torch.cuda.get_device_properties(index), "uuid", index))
        GPU_MEMORY_ALLOCATED.labels(label).set(torch.cuda.memory_allocated(index))
        GPU_MEMORY_RESERVED.labels(label).set(torch.cuda.memory_reserved(index))
    except RuntimeError:  # a device in a bad state must not fail the job whose outcome was just recorded
        return
