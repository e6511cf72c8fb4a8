"""A small segmenter with a fixed recipe: trained on real images, it measures how well generated images match
the masks that conditioned them (mask fidelity), and it is the network of the downstream study.

Network: MONAI ``UNet`` (2-D, channels 16/32/64/128, strides 2/2/2, one residual unit per level, instance
norm; ~0.5 M parameters, CPU-friendly), input ``2 * image - 1`` (the dataset's one intensity rule), output
``num_classes`` logits. Recipe (:class:`Recipe`): MONAI ``DiceCELoss`` (softmax, one-hot labels, background
included), Adam (lr 1e-3, weight decay 1e-5), batch 16, a fixed number of optimiser steps (600) over
shuffled epochs, no augmentation, no validation-based selection: the last weights are kept, so the result
depends only on the training images and the seed. A fixed step count (not epochs) gives every training set
the same compute, so a larger (real + synthetic) set is not also a longer training run. A plain loop, not a
Lightning Trainer: one CPU process, no checkpoint selection, no DDP, and the downstream study trains it a
dozen times, where a Trainer's start-up and logging would cost more than the training.

Scores (:func:`label_scores`), per image and per foreground label, against a reference mask: Dice (MONAI
``DiceMetric``; 1 when both are empty), HD95 in pixels (``HausdorffDistanceMetric``, percentile 95; 0 when
both are empty, the image diagonal when exactly one is, as :func:`utils.evaluation.metrics.hd95`) and the
normalised surface Dice at ``tolerance`` px (``SurfaceDiceMetric``; 1 both empty, 0 exactly one).

Checkpoint: ``segmenter.pt`` (``{"state_dict", "recipe", "num_classes", "data"}``, plain types, read with
``torch.load(weights_only=True)``) and ``segmenter.json`` (recipe, data hash, the real test-split scores).

Example:
    python -m utils.evaluation.segmenter train --data_path data/synthetic_echo_64.npz --output_dir checkpoints/segmenter
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from utils.cli import add_renamed, configure_logging, docstring_parser
from utils.files import load_torch_file

if TYPE_CHECKING:  # torch is imported where it runs, so that `--help` answers before it loads
    import torch

log = logging.getLogger(__name__)

CAMUS_LABELS = ("LV cavity", "myocardium", "LA cavity")
SCORES = ("dice", "hd95", "surface_dice")
CHECKPOINT = "segmenter.pt"


class SegmenterError(ValueError):
    """A segmenter checkpoint that cannot be used; the message names the file."""


@dataclass(frozen=True)
class Recipe:
    channels: tuple[int, ...] = (16, 32, 64, 128)
    strides: tuple[int, ...] = (2, 2, 2)
    num_res_units: int = 1
    steps: int = 600
    batch_size: int = 16
    lr: float = 1e-3
    weight_decay: float = 1e-5
    seed: int = 0


def label_names(num_classes: int) -> list[str]:
    """Names of the foreground labels 1..num_classes-1 (CAMUS names for 4 classes)."""
    return list(CAMUS_LABELS) if num_classes == 4 else [f"label {k}" for k in range(1, num_classes)]


def build_network(recipe: Recipe, num_classes: int) -> torch.nn.Module:
    from monai.networks.nets import UNet

    return UNet(spatial_dims=2, in_channels=1, out_channels=num_classes, channels=recipe.channels,
                strides=recipe.strides, num_res_units=recipe.num_res_units, norm="instance")


def train_segmenter(images01: torch.Tensor, masks: torch.Tensor, num_classes: int, recipe: Recipe = Recipe(),
                    progress: bool = True) -> torch.nn.Module:
    """Train on ``images01`` (N, 1, H, W) float in [0, 1] and ``masks`` (N, 1, H, W) integer labels (see the
    module docstring for the recipe); returns the network in eval mode on CPU."""
    import torch
    from monai.losses import DiceCELoss
    from tqdm import tqdm

    if len(images01) != len(masks) or len(images01) == 0:
        raise ValueError(f"need as many masks as images (>= 1), got {len(images01)} images, {len(masks)} masks")
    torch.manual_seed(recipe.seed)  # the network's initial weights
    net = build_network(recipe, num_classes)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    opt = torch.optim.Adam(net.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
    order = _batches(len(images01), recipe)
    x, y = images01.float() * 2 - 1, masks.long()
    net.train()
    for idx in tqdm(order, desc="training segmenter", unit="step", disable=not progress, dynamic_ncols=True):
        loss = loss_fn(net(x[idx]), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return net.eval()


def _batches(n: int, recipe: Recipe) -> list[torch.Tensor]:
    """``recipe.steps`` index batches: shuffled epochs (generator seeded by ``recipe.seed``) cut into batches."""
    import torch

    g = torch.Generator().manual_seed(recipe.seed)
    size = min(recipe.batch_size, n)
    stream = torch.cat([torch.randperm(n, generator=g) for _ in range(math.ceil(recipe.steps * size / n) + 1)])
    return [stream[k * size:(k + 1) * size] for k in range(recipe.steps)]


def segment(net: torch.nn.Module, images01: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """Labels ``uint8 (N, 1, H, W)`` (argmax of the logits) of images ``(N, 1, H, W)`` in [0, 1]."""
    import torch

    with torch.no_grad():
        out = [net(images01[i:i + batch_size].float() * 2 - 1).argmax(1, keepdim=True)
               for i in range(0, len(images01), batch_size)]
    return torch.cat(out).to(torch.uint8)


def label_scores(pred: torch.Tensor, ref: torch.Tensor, num_classes: int,
                 tolerance: float = 2.0) -> dict[str, np.ndarray]:
    """Per image and foreground label ``{"dice", "hd95", "surface_dice"}`` -> ``float64 [N, num_classes - 1]``
    of label maps ``pred`` and ``ref`` (N, 1, H, W) (see the module docstring for the empty-label rules)."""
    import torch
    from monai.metrics import DiceMetric, HausdorffDistanceMetric, SurfaceDiceMetric
    from monai.networks.utils import one_hot

    if pred.shape != ref.shape:
        raise ValueError(f"predicted labels {tuple(pred.shape)} and reference {tuple(ref.shape)} differ in shape")
    p, r = one_hot(pred.long(), num_classes), one_hot(ref.long(), num_classes)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # MONAI warns about empty labels, which are handled below
        dice = DiceMetric(include_background=False, reduction="none", ignore_empty=False)(p, r)
        hd = HausdorffDistanceMetric(include_background=False, percentile=95.0, reduction="none")(p, r)
        nsd = SurfaceDiceMetric([float(tolerance)] * (num_classes - 1), include_background=False,
                                reduction="none")(p, r)
    p_any, r_any = p[:, 1:].flatten(2).any(-1), r[:, 1:].flatten(2).any(-1)
    both, one = ~p_any & ~r_any, p_any ^ r_any
    hd = torch.where(both, 0.0, torch.where(one, math.hypot(*pred.shape[-2:]), hd))
    nsd = torch.where(both, 1.0, torch.where(one, 0.0, nsd))
    return {"dice": dice.double().numpy(), "hd95": hd.double().numpy(), "surface_dice": nsd.double().numpy()}


def save_segmenter(directory: str | Path, net: torch.nn.Module, recipe: Recipe, num_classes: int,
                   data: dict, scores: dict | None = None) -> Path:
    """``segmenter.pt`` and ``segmenter.json`` in ``directory``; ``data`` describes the training set."""
    import torch

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    plain = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(recipe).items()}
    torch.save({"state_dict": net.state_dict(), "recipe": plain, "num_classes": num_classes, "data": data},
               directory / CHECKPOINT)
    info = {"recipe": plain, "num_classes": num_classes, "data": data, "real_test": scores}
    (directory / "segmenter.json").write_text(json.dumps(info, indent=2) + "\n")
    return directory / CHECKPOINT


def load_segmenter(path: str | Path) -> tuple[torch.nn.Module, dict]:
    """The network (eval mode, CPU) and the checkpoint dict of ``segmenter.pt`` or the directory holding it."""
    path = Path(path)
    path = path / CHECKPOINT if path.is_dir() else path
    if not path.is_file():
        raise SegmenterError(f"{path}: no such segmenter checkpoint (train one with "
                             "`python -m utils.evaluation.segmenter train`)")
    ckpt = load_torch_file(path, "a segmenter checkpoint", SegmenterError)
    try:
        recipe = Recipe(**{k: tuple(v) if isinstance(v, list) else v for k, v in ckpt["recipe"].items()})
        net = build_network(recipe, ckpt["num_classes"])
        net.load_state_dict(ckpt["state_dict"])
    except Exception as e:  # any unreadable or mismatched file: one error naming it
        raise SegmenterError(f"{path}: not a segmenter checkpoint written by utils.evaluation.segmenter "
                             f"({type(e).__name__}: {e})") from e
    return net.eval(), ckpt


def split_tensors(records: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
    """Images ``float (N, 1, H, W)`` in [0, 1] and masks ``uint8 (N, 1, H, W)`` of dataset records."""
    import torch

    from utils.data.dataset_io import normalise_image

    images = np.stack([normalise_image(r["image"]) for r in records])
    masks = np.stack([np.asarray(r["mask"], dtype=np.uint8) for r in records])
    return torch.from_numpy(images), torch.from_numpy(masks)


def summarise_scores(scores: dict[str, np.ndarray], num_classes: int, clusters=None, n_boot: int = 1000) -> dict:
    """``{label name: {score: {"value", "ci95", "n"}}}``: means over images with cluster-bootstrap 95% CIs."""
    from utils.evaluation.metrics import summarise

    out = {}
    for k, name in enumerate(label_names(num_classes)):
        out[name] = {}
        for score in SCORES:
            s = summarise(scores[score][:, k], clusters, n_boot=n_boot, seed=0)
            out[name][score] = {"value": s["mean"], "ci95": [s["ci95_lo"], s["ci95_hi"]], "n": s["n"]}
    return out


def train_on_dataset(data_path: str | Path, recipe: Recipe = Recipe(), tolerance: float = 2.0,
                     num_classes: int = 4) -> tuple[torch.nn.Module, dict, dict]:
    """Train on ``data_path``'s train split; returns the network, the data description and the test scores."""
    from utils.data.dataset_io import load_dataset, validate_dataset
    from utils.files import sha256_file

    data = load_dataset(data_path)
    validate_dataset(data, data_path, num_classes=num_classes, splits=("train", "test"))
    images, masks = split_tensors(data["train"])
    net = train_segmenter(images, masks, num_classes, recipe)
    test_images, test_masks = split_tensors(data["test"])
    scores = summarise_scores(label_scores(segment(net, test_images), test_masks, num_classes, tolerance),
                              num_classes)
    described = {"path": str(data_path), "sha256": sha256_file(data_path) if Path(data_path).is_file() else None,
                 "num_train": len(images), "num_test": len(test_images)}
    return net, described, scores


def segmenter_cache(data_path: str | Path, cache_dir: str | Path, num_classes: int) -> Path:
    """The directory in ``cache_dir`` of the default-recipe segmenter of ``data_path`` (keyed by the data file's
    SHA-256, the recipe and ``num_classes``), trained or not; a dry run looks there without training."""
    import hashlib

    from utils.files import sha256_file

    key = hashlib.sha256(f"{sha256_file(data_path)} {asdict(Recipe())} {num_classes}".encode()).hexdigest()[:16]
    return Path(cache_dir) / "segmenters" / key


def cached_segmenter(data_path: str | Path, cache_dir: str | Path, num_classes: int) -> Path:
    """A segmenter for ``data_path`` trained with the default recipe, from ``cache_dir`` when one was trained
    for the same data file (by SHA-256) and recipe, otherwise trained now and stored there."""
    recipe = Recipe()
    directory = segmenter_cache(data_path, cache_dir, num_classes)
    if (directory / CHECKPOINT).is_file():
        log.info("segmenter for %s from the cache %s", data_path, directory)
        return directory
    log.info("training a segmenter on the train split of %s (cached in %s)", data_path, directory)
    net, described, scores = train_on_dataset(data_path, recipe, num_classes=num_classes)
    save_segmenter(directory, net, recipe, num_classes, described, scores)
    return directory


def mask_fidelity(net: torch.nn.Module, images01: torch.Tensor, masks: torch.Tensor, clusters,
                  real01: torch.Tensor, real_masks: torch.Tensor, num_classes: int, tolerance: float = 2.0,
                  n_boot: int = 1000) -> dict:
    """How well the segmenter finds each conditioning mask in its generated image, next to the ceiling: the same
    scores on the real images with their own masks. ``clusters`` (N,) ids the source mask of each generated
    image (the bootstrap unit). ``{"generated": {label: {score: ...}}, "real": {...}, "n", "n_real"}``."""
    generated = label_scores(segment(net, images01), masks, num_classes, tolerance)
    real = label_scores(segment(net, real01), real_masks, num_classes, tolerance)
    return {"generated": summarise_scores(generated, num_classes, clusters, n_boot),
            "real": summarise_scores(real, num_classes, None, n_boot), "n": len(images01), "n_real": len(real01),
            "tolerance_px": tolerance}


def fidelity_table(fidelity: dict) -> str:
    """Markdown: per label, each score on the generated images and on the real ones (the ceiling)."""
    head = "| label | " + " | ".join(f"{n} gen | {n} real" for n in ("Dice↑", "HD95 (px)↓", "NSD↑")) + " |"
    lines = [head, "|---|" + "---|" * 2 * len(SCORES)]
    for name, gen in fidelity["generated"].items():
        real = fidelity["real"][name]
        lines.append(f"| {name} | " + " | ".join(f"{gen[k]['value']:.3f} | {real[k]['value']:.3f}" for k in SCORES)
                     + " |")
    return "\n".join(lines)


def format_scores(scores: dict) -> str:
    """A Markdown table of :func:`summarise_scores` output."""
    lines = ["| label | Dice↑ | HD95 (px)↓ | NSD↑ |", "|---|---|---|---|"]
    for name, s in scores.items():
        cells = [f"{s[k]['value']:.3f} [{s[k]['ci95'][0]:.3f}, {s[k]['ci95'][1]:.3f}]" for k in SCORES]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = docstring_parser(__doc__, prog="python -m utils.evaluation.segmenter")
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train on a dataset's train split and score it on its test split")
    add_renamed(t, "--data_path", "--data", required=True,
                help="dataset file (.npz/.pkl) or folder with train and test splits")
    add_renamed(t, "--output_dir", "--output", required=True, help="directory for segmenter.pt and segmenter.json")
    add_renamed(t, "--train_steps", "--steps", type=int, default=Recipe.steps,
                help="optimiser steps (default: %(default)s)")
    t.add_argument("--seed", type=int, default=0, help="initial weights and batch order (default: %(default)s)")
    t.add_argument("--num_classes", type=int, default=4, help="labels incl. background (default: %(default)s)")
    t.add_argument("--tolerance", type=float, default=2.0, help="surface Dice tolerance in px (default: 2)")
    t.add_argument("--overwrite", action="store_true", help="replace an existing segmenter.pt in --output")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging()
    if args.train_steps < 1:
        raise SystemExit(f"error: --train_steps must be >= 1, got {args.train_steps}")
    if (Path(args.output_dir) / CHECKPOINT).exists() and not args.overwrite:
        raise SystemExit(f"error: {Path(args.output_dir) / CHECKPOINT} exists; pass --overwrite")
    from utils.data.layout import DatasetError

    recipe = Recipe(steps=args.train_steps, seed=args.seed)
    try:
        net, described, scores = train_on_dataset(args.data_path, recipe, args.tolerance, args.num_classes)
    except (DatasetError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}") from None
    path = save_segmenter(args.output_dir, net, recipe, args.num_classes, described, scores)
    print(f"real test split of {args.data_path} ({described['num_test']} images), the mask-fidelity ceiling:")
    print(format_scores(scores))
    log.info("wrote %s", path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
