"""Numeric precision by its Lightning name, for code that runs a network outside the Trainer."""

from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)


def autocast(precision: str, device: torch.device | str) -> torch.autocast:
    """Autocast for a Lightning precision name: "16-mixed" (fp16), "bf16-mixed" (bf16), "32-true" (off)."""
    dtype = {"16-mixed": torch.float16, "bf16-mixed": torch.bfloat16}.get(precision)
    return torch.autocast(torch.device(device).type, dtype=dtype, enabled=dtype is not None)


def resolve_precision(precision: str, accelerator: str) -> str:
    """The Lightning precision to train with: fp16 mixed precision needs a GPU, so the CPU uses 32-bit."""
    if accelerator == "cpu" and precision == "16-mixed":
        log.warning("fp16 mixed precision needs a GPU; training in 32-bit on the CPU")
        return "32-true"
    return precision
