"""Cosine InfoNCE on flow-matching velocities (COMET), as pure functions.

For anchor i with prediction v_i = v_theta(x_t,i, t_i, mask_i), logits are cosine similarities with a set
of M keys divided by the temperature tau; the anchor's own key is the positive:

    L = mean_i [ -log softmax_j( cos(q_i, k_ij) / tau )[pos_i] ]

Variants (``target``):

- ``velocity`` (the seed's): q_i = v_i, k_ij = x_1,j - x_0,j (the target velocities of the batch).
  Both v_i and its own target carry the sample's noise x_0,i, so the positive is easy to pick out at
  every t and a near-perfect predictor drives the loss to ~0 (the shortcut, DESIGN.md section 5).
- ``same_noise``: q_i = v_i, k_ij = x_1,j - x_0,i (negatives built with the anchor's own noise), which
  removes the shortcut.
- ``denoised``: q_i = x_t,i + (1 - t_i) v_i (the predicted image), k_ij = x_1,j.

Keys are usually gathered across DDP ranks (without gradient); ``positive`` then holds each anchor's
index in the gathered set. ``valid`` (B, M) marks usable keys (e.g. not the same patient); the positive
is always kept. Everything runs in float32 outside autocast: the squared norm of a flattened 256x256
field (or 96^3 volume) exceeds the float16 maximum.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

TARGETS = ("velocity", "same_noise", "denoised")


@dataclass
class ContrastiveOutput:
    loss: torch.Tensor  # scalar, differentiable
    pos_cos: torch.Tensor  # mean cosine with the positive
    neg_cos: torch.Tensor  # mean cosine with the valid negatives (nan if none)
    num_keys: int  # M
    valid_keys: torch.Tensor  # mean over anchors of the keys left after masking (positive included)
    chance: torch.Tensor  # mean over anchors of ln(valid keys): the loss of a predictor that knows nothing


def info_nce_from_cosines(
    cos: torch.Tensor, positive: torch.Tensor, temperature: float, valid: torch.Tensor | None = None
) -> ContrastiveOutput:
    """InfoNCE from a (B, M) cosine matrix; ``positive`` (B,) long; ``valid`` (B, M) bool or None."""
    b, m = cos.shape
    rows = torch.arange(b, device=cos.device)
    is_pos = torch.zeros_like(cos, dtype=torch.bool)
    is_pos[rows, positive] = True
    keep = torch.ones_like(is_pos) if valid is None else (valid | is_pos)
    logits = (cos / temperature).masked_fill(~keep, float("-inf"))
    loss = F.cross_entropy(logits, positive)
    negatives = keep & ~is_pos
    neg_cos = (cos.detach() * negatives).sum() / negatives.sum()  # nan without negatives; no host sync
    per_anchor = keep.sum(1).float()
    return ContrastiveOutput(loss, cos.detach()[rows, positive].mean(), neg_cos, m, per_anchor.mean(),
                             per_anchor.log().mean())


def _flat(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(x.shape[0], -1).float()


def contrastive_velocity_loss(
    target: str,
    v_pred: torch.Tensor,
    x_0: torch.Tensor,
    x_t: torch.Tensor,
    t: torch.Tensor,
    keys_x_0: torch.Tensor,
    keys_x_1: torch.Tensor,
    positive: torch.Tensor,
    temperature: float,
    valid: torch.Tensor | None = None,
    eps: float = 1e-8,
) -> ContrastiveOutput:
    """The COMET contrastive term for one of :data:`TARGETS`.

    Local tensors (B, C, *spatial), spatial (H, W) or (D, H, W), flattened per sample: ``v_pred`` (with
    gradient), ``x_0``, ``x_t``; ``t`` (B,). Keys (M, C, *spatial), no gradient: ``keys_x_0``, ``keys_x_1``
    (the x_0 and x_1 of every sample in the global batch). ``positive`` (B,): index of each anchor in the keys.
    """
    if target not in TARGETS:
        raise ValueError(f"contrastive target must be one of {TARGETS}, got {target!r}")
    with torch.autocast(device_type=v_pred.device.type, enabled=False):
        v = _flat(v_pred)
        if target == "velocity":
            cos = F.normalize(v, dim=1, eps=eps) @ F.normalize(_flat(keys_x_1 - keys_x_0), dim=1, eps=eps).T
        elif target == "denoised":
            x1_hat = _flat(x_t) + (1.0 - t.float()).view(-1, 1) * v
            cos = F.normalize(x1_hat, dim=1, eps=eps) @ F.normalize(_flat(keys_x_1), dim=1, eps=eps).T
        else:  # same_noise: k_ij = x_1,j - x_0,i, expanded without building the (B, M, D) tensor
            a, k1 = _flat(x_0), _flat(keys_x_1)
            dot = v @ k1.T - (v * a).sum(1, keepdim=True)
            key_sq = (k1 * k1).sum(1)[None, :] - 2.0 * a @ k1.T + (a * a).sum(1, keepdim=True)
            cos = dot / (v.norm(dim=1, keepdim=True) * key_sq.clamp_min(0).sqrt()).clamp_min(eps)
        return info_nce_from_cosines(cos, positive, temperature, valid)


def contrastive_weight(weight: float, warmup_epochs: int, epoch: int) -> float:
    """lambda for the current epoch: 0 during the warm-up epochs, ``weight`` after (survives resume)."""
    return weight if epoch >= warmup_epochs else 0.0
