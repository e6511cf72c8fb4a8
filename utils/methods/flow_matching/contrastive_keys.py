"""The contrastive key set: M keys per anchor, a property of the recipe rather than of the GPU count.

M = ``contrastive_args.num_keys`` keys per anchor, its own positive included. A key is a target without
gradient (the x_0, x_1 and patient of a sample), so it may come from any sample seen, not only from the
anchor's micro-batch:

- the current micro-batch of every rank, gathered across ranks in rank order (this rank's block at
  ``rank * B``);
- when all ranks together hold fewer than M samples (few GPUs, gradient accumulation), the most recent
  earlier micro-batches fill the rest: a bank of the last ``M - B * world`` samples, newest first. One GPU
  with batch 4 and M = 16 contrasts with its 4 current samples and the 12 before them; four GPUs with
  batch 4 contrast with the 16 current ones;
- when the ranks hold more than M samples (many GPUs), consecutive ranks form groups of M samples and
  each anchor contrasts within its group.

The bank holds gathered keys, so it is the same on every rank; the module saves it in the checkpoint and
a resumed run continues with the keys it would have had. It has its fixed size from the first micro-step, so
every step's key set has M rows (static shapes, as CUDA graph capture needs), and it is updated in place (a
smaller last batch of an epoch, which the loader keeps on small sets, resizes it to the newest keys); its
slots start empty (``filled`` False), the loss masks them out, so the first micro-steps of a run see fewer
keys: the module logs the true count (``train/nce_valid_keys``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from utils.distributed import gather_no_grad


@dataclass
class KeySet:
    x_0: torch.Tensor  # (M, C, *spatial): (H, W) or (D, H, W)
    x_1: torch.Tensor  # (M, C, *spatial)
    patient: torch.Tensor  # (M,) patient code, -1 when unknown
    filled: torch.Tensor  # (M,) bool: False for a bank slot no sample has reached yet
    positive: torch.Tensor  # (B,) index of each local anchor's own key


class ContrastiveKeys:
    """Builds the :class:`KeySet` of each micro-step; keeps the bank between calls."""

    FIELDS = ("x_0", "x_1", "patient", "filled")

    def __init__(self, num_keys: int):
        self.num_keys = num_keys
        self.bank: dict[str, torch.Tensor] = {}

    def __call__(self, x_0: torch.Tensor, x_1: torch.Tensor, patient: torch.Tensor) -> KeySet:
        """Keys for the local anchors ``x_0``, ``x_1`` (B, C, *spatial) and ``patient`` (B,)."""
        gathered = {}
        for name, value in zip(self.FIELDS, (x_0, x_1, patient)):
            gathered[name], offset = gather_no_grad(value)
        total, m = len(gathered["x_0"]), self.num_keys
        gathered["filled"] = torch.ones(total, dtype=torch.bool, device=patient.device)
        local = torch.arange(x_0.shape[0], device=x_0.device)
        if total >= m:
            if total % m:
                raise ValueError(f"contrastive_args.num_keys ({m}) must divide the {total} samples that all "
                                 "processes hold in one micro-step (batch_size x processes), or exceed them")
            start = offset // m * m
            return KeySet(**{k: v[start:start + m] for k, v in gathered.items()}, positive=offset - start + local)
        self.fit_bank(gathered, m - total)
        keys = {k: torch.cat([v, self.bank[k]]) for k, v in gathered.items()}
        for k, v in self.bank.items():  # the newest samples, in place: the bank keeps its storage
            v.copy_(keys[k][:m - total])
        return KeySet(**keys, positive=offset + local)

    def fit_bank(self, like: dict[str, torch.Tensor], size: int) -> None:
        """The bank with exactly ``size`` slots on ``like``'s device and dtypes: a new one is all empty slots
        (zeros, patient -1, not filled); one loaded from a checkpoint keeps its newest ``size`` keys, padded
        with empty slots. Nothing to do when it already fits (every micro-step after the first)."""
        have = self.bank.get("filled")
        if have is not None and len(have) == size and have.device == like["filled"].device:
            return
        n = 0 if have is None else min(len(have), size)
        bank = {}
        for k, v in like.items():
            empty = v.new_full((size - n, *v.shape[1:]), -1 if k == "patient" else 0)
            bank[k] = torch.cat([self.bank[k][:n].to(v), empty]) if n else empty
        self.bank = bank

    def state_dict(self) -> dict[str, torch.Tensor]:
        """A copy: the bank itself changes in place at the next micro-step."""
        return {k: v.to("cpu", copy=True) for k, v in self.bank.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """A bank saved by :meth:`state_dict`; one saved before the bank had a fixed size (no ``filled``) holds
        only samples already seen."""
        self.bank = {k: v.clone() for k, v in state.items()}  # updated in place: not the caller's tensors
        if self.bank and "filled" not in self.bank:
            self.bank["filled"] = torch.ones(len(self.bank["patient"]), dtype=torch.bool)


def valid_keys(anchor_patient: torch.Tensor, key_patient: torch.Tensor) -> torch.Tensor:
    """(B, M) bool: key j may be a negative for anchor i unless both belong to the same known patient."""
    own = anchor_patient[:, None]
    return (key_patient[None, :] != own) | (own < 0)
