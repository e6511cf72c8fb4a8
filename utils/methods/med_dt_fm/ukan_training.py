"""Med-DT-FM's stage 0: train the U-KAN segmenter on the training split, score it on the validation split, and
measure its encoder's per-channel feature statistics (the standardisation of the distillation targets).

A plain loop, not a Lightning Trainer (as :mod:`utils.evaluation.segmenter`): one process, a fixed number of
steps, deterministic for a given seed. This segmenter is the *training target* of Med-DT-FM; it must not be
used to score mask fidelity (that would be circular): evaluation trains its own, independent one.
"""

from __future__ import annotations

import logging
import math

import torch

from losses.distillation import channel_moments
from utils.methods.med_dt_fm.config import UKANConfig
from utils.methods.med_dt_fm.ukan import UKAN

log = logging.getLogger(__name__)


def build_ukan(cfg: UKANConfig, num_classes: int) -> UKAN:
    return UKAN(in_channels=1, num_classes=num_classes, widths=tuple(cfg.widths), kind=cfg.kind)


def batch_order(n: int, steps: int, batch_size: int, generator: torch.Generator) -> list[torch.Tensor]:
    """``steps`` index batches of min(batch_size, n): shuffled epochs cut into batches."""
    size = min(batch_size, n)
    epochs = math.ceil(steps * size / n) + 1
    stream = torch.cat([torch.randperm(n, generator=generator) for _ in range(epochs)])
    return [stream[k * size:(k + 1) * size] for k in range(steps)]


def train_ukan(x_1: torch.Tensor, mask: torch.Tensor, cfg: UKANConfig, num_classes: int,
               device: torch.device | str = "cpu", progress: bool = True) -> UKAN:
    """U-KAN trained on images ``x_1`` (N, 1, H, W) in [-1, 1] with labels ``mask`` (N, 1, H, W); returned in eval
    mode on the CPU. Initial weights and batch order come from ``cfg.seed``."""
    from monai.losses import DiceCELoss
    from tqdm import tqdm

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        net = build_ukan(cfg, num_classes)
    net.to(device).train()
    kan = {id(p) for p in net.kan_parameters()}
    groups = [{"params": [p for p in net.parameters() if id(p) not in kan], "lr": cfg.lr},
              {"params": net.kan_parameters(), "lr": cfg.kan_lr}]
    opt = torch.optim.Adam([g for g in groups if g["params"]], weight_decay=cfg.weight_decay)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.steps, eta_min=cfg.min_lr)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    order = batch_order(len(x_1), cfg.steps, cfg.batch_size, torch.Generator().manual_seed(cfg.seed))
    for idx in tqdm(order, desc="stage 0: training the U-KAN segmenter", unit="step", disable=not progress,
                    dynamic_ncols=True):
        x, y = x_1[idx].float().to(device), mask[idx].long().to(device)
        loss = loss_fn(net(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        schedule.step()
    return net.cpu().eval()


@torch.no_grad()
def predict(net: UKAN, x_1: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """Labels (N, 1, H, W) int64: the argmax of the logits, in batches, on the network's device."""
    device = next(net.parameters()).device
    return torch.cat([net(x_1[i:i + batch_size].float().to(device)).argmax(1, keepdim=True).cpu()
                      for i in range(0, len(x_1), batch_size)])


def foreground_dice(pred: torch.Tensor, target: torch.Tensor, num_classes: int) -> float:
    """Mean over the foreground labels 1..K-1 of Dice over the whole set, 2|P & G| / (|P| + |G|); a label absent
    from both is left out (an all-background prediction scores 0 wherever the labels exist)."""
    scores = []
    for k in range(1, num_classes):
        p, g = pred == k, target == k
        total = int(p.sum() + g.sum())
        if total:
            scores.append(2.0 * int((p & g).sum()) / total)
    return float(sum(scores) / len(scores)) if scores else 1.0


@torch.no_grad()
def encoder_statistics(net: UKAN, x_1: torch.Tensor, levels: list[int],
                       batch_size: int = 64) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """{stage: (mean (C,), std (C,))} of the encoder's stage maps (1-based stages) over the images ``x_1``."""
    device = next(net.parameters()).device

    def stage_maps(stage: int):  # one pass per stage: the maps of a whole split need not fit in memory
        for i in range(0, len(x_1), batch_size):
            yield net.encode(x_1[i:i + batch_size].float().to(device), stages=stage)[stage - 1]

    return {s: channel_moments(stage_maps(s)) for s in sorted(set(levels))}
