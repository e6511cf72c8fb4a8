"""Numeric precision by its Lightning name, for code that runs a network outside the Trainer."""

from __future__ import annotations

import torch


def autocast(precision: str, device: torch.device | str) -> torch.autocast:
    """Autocast for a Lightning precision name: "16-mixed" (fp16), "bf16-mixed" (bf16), "32-true" (off)."""
    dtype = {"16-mixed": torch.float16, "bf16-mixed": torch.bfloat16}.get(precision)
    return torch.autocast(torch.device(device).type, dtype=dtype, enabled=dtype is not None)
