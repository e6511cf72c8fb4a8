"""How much memory one training step needs, known before the fit, so a too-large volume fails with a message
that names its size instead of an out-of-memory error deep inside the step.

The estimate is a measurement, not a formula: the network is built on PyTorch's ``meta`` device (shapes, no
data, no arithmetic) and run forward once at the configured batch and volume size; every tensor autograd
saves for the backward pass is counted once (by storage). Total:

    weights + gradients + Adam's two moments (+ the EMA copy) = (16 or 20 bytes) x parameters
    + the saved activations x ACTIVATION_MARGIN, for the backward pass's transient gradients and the
      allocator's fragmentation.

The saved activations are an upper bound in two ways: they are float32 (16-/bf16-mixed precision saves many
in half the bytes), and attention runs PyTorch's math path on ``meta``, which saves the (tokens x tokens)
weights that the flash and memory-efficient kernels of a real device recompute instead. With attention only
at the coarsest level and in the middle block (MONAI's middle block always attends; MOTFM's 3-D setting: 12^3
tokens at 96^3) that term is small.

The meta run takes well under a second even for MOTFM's 96^3 network (tests/test_3d.py).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch

from utils.config import ConfigError, RunConfig

log = logging.getLogger(__name__)

GIB = 2**30
# Bytes per parameter: float32 weight, gradient, Adam's exp_avg and exp_avg_sq; the EMA keeps one more copy.
PARAMETER_BYTES, EMA_BYTES = 16, 4
# The backward pass holds the gradient of a layer's activations beside the saved ones, and the allocator rounds.
ACTIVATION_MARGIN = 1.25


@dataclass(frozen=True)
class MemoryEstimate:
    parameters: int
    state_bytes: int  # weights, gradients, optimizer state, EMA
    activation_bytes: int  # tensors saved for the backward pass, counted once each

    @property
    def total_bytes(self) -> int:
        return self.state_bytes + int(self.activation_bytes * ACTIVATION_MARGIN)

    def describe(self) -> str:
        return (f"{self.total_bytes / GIB:.2f} GiB ({self.parameters:,} parameters: {self.state_bytes / GIB:.2f} "
                f"GiB of weights, gradients and optimizer state; {self.activation_bytes / GIB:.2f} GiB of saved "
                f"activations x {ACTIVATION_MARGIN})")


def saved_activation_bytes(network: torch.nn.Module, inputs: tuple, conditions: dict) -> int:
    """Bytes of the tensors autograd saves in ``network(*inputs, **conditions)``, each storage counted once
    (at its largest view). Run on ``meta`` tensors it costs no memory and no arithmetic."""
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        storages[storage._cdata] = max(storages.get(storage._cdata, 0), storage.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        network(*inputs, **conditions)
    return sum(storages.values())


def estimate_training_memory(module) -> MemoryEstimate:
    """The :class:`MemoryEstimate` of one training step of ``module`` (a flow-matching module) at its config's
    ``train_args.batch_size`` and ``data_args.image_size`` (N^spatial_dims voxels)."""
    cfg: RunConfig = module.cfg
    b, n, dims = cfg.train_args.batch_size, cfg.data_args.image_size, cfg.model_args.spatial_dims
    with torch.device("meta"):
        network = module.build_network()
        x_t = torch.zeros(b, 1, *[n] * dims)
        mask = torch.zeros(b, 1, *[n] * dims, dtype=torch.uint8)
        classes = torch.zeros(b, dtype=torch.int64) if module.class_names else None
        activations = saved_activation_bytes(network, (x_t, torch.zeros(b)), module.conditions(mask, classes))
    parameters = sum(p.numel() for p in network.parameters())
    per_parameter = PARAMETER_BYTES + (EMA_BYTES if cfg.train_args.ema_decay > 0 else 0)
    return MemoryEstimate(parameters, parameters * per_parameter, activations)


def available_memory(accelerator: str, limit_gb: float) -> tuple[int, str]:
    """(bytes a training step may use, where that number comes from): ``limit_gb`` when > 0, else the free
    memory of this process's CUDA device (``accelerator`` "gpu") or the RAM the system reports available."""
    if limit_gb > 0:
        return int(limit_gb * GIB), "train_args.memory_limit_gb"
    if accelerator == "gpu":
        device = local_device_index()
        free, _ = torch.cuda.mem_get_info(device)
        return free, f"free memory of {torch.cuda.get_device_name(device)} (cuda:{device})"
    return _available_ram(), "available RAM"


def local_device_index() -> int:
    """The GPU this process will train on: its local rank (torchrun's ``LOCAL_RANK``, SLURM's ``SLURM_LOCALID``),
    0 for a process started alone. The check runs before Lightning picks the device; asking ``cuda:0`` from
    every rank would measure one GPU for all and leave a CUDA context of every rank on GPU 0 for the whole run."""
    for name in ("LOCAL_RANK", "SLURM_LOCALID"):
        if os.environ.get(name):
            index = int(os.environ[name])
            return index if index < torch.cuda.device_count() else 0  # one GPU bound per task: its cuda:0
    return 0


def _available_ram() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise OSError("/proc/meminfo has no MemAvailable line")


def check_training_memory(module, accelerator: str) -> MemoryEstimate:
    """Log the estimate and refuse (ConfigError naming the volume size, the batch and both numbers) a config
    whose training step would not fit."""
    cfg = module.cfg
    estimate = estimate_training_memory(module)
    available, source = available_memory(accelerator, cfg.train_args.memory_limit_gb)
    n, b = cfg.data_args.image_size, cfg.train_args.batch_size
    log.info("memory: a training step at %d^%d voxels, batch %d, needs about %s; %s: %.2f GiB", n,
             cfg.model_args.spatial_dims, b, estimate.describe(), source, available / GIB)
    if estimate.total_bytes > available:
        raise ConfigError(
            f"data_args.image_size {n} ({n}^{cfg.model_args.spatial_dims} voxels) with train_args.batch_size {b} "
            f"needs about {estimate.total_bytes / GIB:.2f} GiB per training step ({estimate.describe()}), more "
            f"than the {available / GIB:.2f} GiB of {source}: lower data_args.image_size or train_args.batch_size "
            f"(keep train_args.effective_batch_size by accumulation), or a smaller model_args.channels. The "
            f"estimate is an upper bound (float32 activations; 16-/bf16-mixed precision saves many in half the "
            f"bytes): to train anyway, set train_args.memory_limit_gb to the GiB the step may use")
    return estimate
