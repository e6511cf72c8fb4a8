"""Does a conditional model follow its conditions? Two measurements on a trained checkpoint.

``classes``: is the class recognisable? A small CNN classifier (fixed recipe, seeded) is trained on the real
training images and their classes, scored on the real test images (the ceiling), then on images the model
generates for each class: ``--per_class`` images of class k, from the masks of test records of class k (a
class-only model does not read them; for a mask + class model the mask shows the view too, so only a class-only
model measures the class alone). Reported: the accuracy over all classes, the confusion matrix, and for
view x phase classes (``2CH_ED``...) the view accuracy (2CH vs 4CH, the prediction's view).

``guidance``: mask adherence against the guidance scale. For each w in ``--scales`` the checkpoint generates the
test split's first ``--num_samples`` masks (noise of (seed, i): the same noise for every w) and B-Dice, HD95,
surface Dice and SSIM against the real image of that mask are averaged, with the network evaluations per image.

Examples:
    python -m utils.studies.conditioning classes --checkpoint checkpoints/class_quickstart --output_dir outputs/classes
    python -m utils.studies.conditioning guidance --checkpoint checkpoints/guidance_quickstart \\
        --scales 1 1.5 2 3 --output_dir outputs/guidance

Writes ``<command>.json`` and ``<command>.md`` in ``--output``.
"""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from utils.cli import add_renamed, configure_logging, docstring_parser

if TYPE_CHECKING:  # torch is imported where it runs, so that `--help` answers before it loads
    import torch
    from torch import nn

log = logging.getLogger("comet.conditioning")


@dataclass(frozen=True)
class ClassifierRecipe:
    """Three stride-2 3x3 convolutions (16, 32, 64 channels, ReLU), global average pooling and a linear layer, on
    ``2 * image - 1``; cross-entropy, Adam (lr 1e-3), batch 32, ``steps`` steps over seeded shuffles."""

    steps: int = 400
    batch_size: int = 32
    lr: float = 1e-3
    seed: int = 0


def build_classifier(num_classes: int) -> nn.Module:
    from torch import nn

    return nn.Sequential(nn.Conv2d(1, 16, 3, 2, 1), nn.ReLU(), nn.Conv2d(16, 32, 3, 2, 1), nn.ReLU(),
                         nn.Conv2d(32, 64, 3, 2, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(64, num_classes))


def train_classifier(images01: torch.Tensor, classes: torch.Tensor, num_classes: int,
                     recipe: ClassifierRecipe = ClassifierRecipe()) -> nn.Module:
    """A classifier of ``images01`` (N, 1, H, W) in [0, 1] into ``classes`` (N,) int64; in eval mode."""
    import torch
    from torch import nn

    torch.manual_seed(recipe.seed)
    net = build_classifier(num_classes)
    opt = torch.optim.Adam(net.parameters(), lr=recipe.lr)
    g = torch.Generator().manual_seed(recipe.seed)
    x, y, size = images01.float() * 2 - 1, classes.long(), min(recipe.batch_size, len(images01))
    order = torch.cat([torch.randperm(len(x), generator=g) for _ in range(recipe.steps * size // len(x) + 1)])
    net.train()
    for k in range(recipe.steps):
        idx = order[k * size:(k + 1) * size]
        loss = nn.functional.cross_entropy(net(x[idx]), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return net.eval()


def predict(net: nn.Module, images01: torch.Tensor) -> torch.Tensor:
    import torch

    with torch.no_grad():
        return torch.cat([net(images01[i:i + 256].float() * 2 - 1).argmax(1) for i in range(0, len(images01), 256)])


def confusion(true: torch.Tensor, pred: torch.Tensor, num_classes: int) -> list[list[int]]:
    """Counts [true class][predicted class]."""
    import torch

    m = torch.zeros(num_classes, num_classes, dtype=torch.int64)
    m.index_put_((true.long(), pred.long()), torch.ones(len(true), dtype=torch.int64), accumulate=True)
    return m.tolist()


def view_accuracy(true: torch.Tensor, pred: torch.Tensor, names: list[str]) -> float | None:
    """Accuracy of the view part of ``VIEW_PHASE`` class names (2CH vs 4CH); None for other names."""
    if not all("_" in n for n in names):
        return None
    view = [n.split("_")[0] for n in names]
    return float(np.mean([view[a] == view[b] for a, b in zip(true.tolist(), pred.tolist())]))


def _split(records: list[dict]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Images (N, 1, H, W) in [0, 1], masks (N, 1, H, W) uint8, classes (N,) (-1 for a record without one)."""
    import torch

    from utils.data.dataset_io import normalise_image

    images = torch.from_numpy(np.stack([normalise_image(r["image"]) for r in records]))
    masks = torch.from_numpy(np.stack([np.asarray(r["mask"], dtype=np.uint8) for r in records]))
    return images, masks, torch.tensor([int(r.get("class", -1)) for r in records])


def measure_classes(module, data: dict, per_class: int, seed: int, batch_size: int, device: str,
                    recipe: ClassifierRecipe = ClassifierRecipe()) -> dict:
    import torch

    from utils.generation.generate import generate

    names = module.class_names
    if not names:
        raise ValueError("the checkpoint is not class-conditional (conditioning_args.mode class or mask+class)")
    train_x, _, train_y = _split(data["train"])
    test_x, test_m, test_y = _split(data["test"])
    if bool((train_y < 0).any()) or bool((test_y < 0).any()):
        raise ValueError("every train and test record needs a class to measure class recognisability")
    net = train_classifier(train_x, train_y, len(names), recipe)
    real_pred = predict(net, test_x)
    picks = []
    for k in range(len(names)):
        rows = torch.nonzero(test_y == k).flatten()
        if len(rows) == 0:
            raise ValueError(f"the test split has no record of class {names[k]} to take masks from")
        picks.append(rows[torch.arange(per_class) % len(rows)])
    pick = torch.cat(picks)
    s = module.cfg.sampling_args
    result = generate(module, test_m[pick], torch.arange(len(pick)), seed, s.num_steps, s.sampler, batch_size,
                      [device], classes=test_y[pick])
    gen_pred = predict(net, result.images)
    return {
        "class_names": names, "per_class": per_class, "seed": seed, "num_steps": s.num_steps, "sampler": s.sampler,
        "guidance_scale": s.guidance_scale, "nfe_per_image": result.nfe, "classifier": asdict(recipe),
        "real_test": {"n": len(test_y), "accuracy": float((real_pred == test_y).float().mean()),
                      "view_accuracy": view_accuracy(test_y, real_pred, names),
                      "confusion": confusion(test_y, real_pred, len(names))},
        "generated": {"n": len(pick), "accuracy": float((gen_pred == test_y[pick]).float().mean()),
                      "view_accuracy": view_accuracy(test_y[pick], gen_pred, names),
                      "confusion": confusion(test_y[pick], gen_pred, len(names))},
    }


def measure_guidance(checkpoint: Path, scales: list[float], data: dict, num_samples: int, seed: int,
                     batch_size: int, device: str) -> dict:
    import torch

    from utils.evaluation.metrics import paired_metrics
    from utils.generation.generate import generate
    from utils.methods import load_module

    n = min(num_samples, len(data["test"]))
    images, masks, classes = _split(data["test"][:n])
    rows = []
    for w in scales:
        module = load_module(checkpoint, device, [f"sampling_args.guidance_scale={w}"])
        s = module.cfg.sampling_args
        result = generate(module, masks, torch.arange(n), seed, s.num_steps, s.sampler, batch_size, [device],
                          classes=classes if module.class_names else None)
        scores = paired_metrics(result.images, images, masks)
        rows.append({"guidance_scale": w, "nfe_per_image": result.nfe,
                     **{k: _mean_se(v) for k, v in scores.items() if k != "psnr"}})
    return {"num_samples": n, "seed": seed, "rows": rows}


def _mean_se(values: np.ndarray) -> dict:
    v = np.asarray(values, dtype=np.float64)
    return {"mean": float(v.mean()), "se": float(v.std(ddof=1) / np.sqrt(len(v))) if len(v) > 1 else None}


def classes_markdown(r: dict) -> str:
    def row(name, part):
        view = "n/a" if part["view_accuracy"] is None else f"{part['view_accuracy']:.3f}"
        return f"| {name} | {part['n']} | {part['accuracy']:.3f} | {view} |"

    names = r["class_names"]
    lines = [f"Class recognisability ({len(names)} classes: {', '.join(names)}; classifier trained on the real "
             f"training images; {r['num_steps']} {r['sampler']} steps, guidance {r['guidance_scale']:g}, seed "
             f"{r['seed']})", "", "| images | n | class accuracy | view accuracy |", "|---|---|---|---|",
             row("real test (ceiling)", r["real_test"]), row("generated", r["generated"]), "",
             "Generated confusion (rows: class asked for, columns: class predicted):", "",
             "| | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    lines += [f"| {names[i]} | " + " | ".join(str(c) for c in row_) + " |"
              for i, row_ in enumerate(r["generated"]["confusion"])]
    return "\n".join(lines) + "\n"


def guidance_markdown(r: dict) -> str:
    def cell(x):
        return f"{x['mean']:.3f}" + ("" if x["se"] is None else f" ± {x['se']:.3f}")

    lines = [f"Mask adherence against the guidance scale ({r['num_samples']} test masks, seed {r['seed']}; mean ± "
             "standard error over images)", "", "| w | NFE | B-Dice | HD95 (px) | surface Dice | SSIM |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {x['guidance_scale']:g} | {x['nfe_per_image']} | {cell(x['b_dice'])} | {cell(x['hd95'])} | "
              f"{cell(x['surface_dice'])} | {cell(x['ssim'])} |" for x in r["rows"]]
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    p = docstring_parser(__doc__, prog="python -m utils.studies.conditioning")
    sub = p.add_subparsers(dest="command", required=True)
    for name, text in (("classes", "classify images generated for each class"),
                       ("guidance", "mask adherence for each guidance scale")):
        c = sub.add_parser(name, help=text)
        c.add_argument("--checkpoint", required=True, help="a .ckpt file or a run directory (its best checkpoint)")
        c.add_argument("--which", choices=("best", "last"), default="best", help="checkpoint in a run directory")
        c.add_argument("--data_path", help="dataset (default: the checkpoint's data_args.path)")
        add_renamed(c, "--output_dir", "--output", required=True, help="directory for the .json and .md")
        c.add_argument("--seed", type=int, default=0, help="noise seed (default: %(default)s)")
        c.add_argument("--batch_size", type=int, default=16, help="images per batch (default: %(default)s)")
    sub.choices["classes"].add_argument("--per_class", type=int, default=40,
                                        help="images generated per class (default: %(default)s)")
    sub.choices["classes"].add_argument("--classifier_steps", type=int, default=ClassifierRecipe.steps,
                                        help="classifier optimiser steps (default: %(default)s)")
    sub.choices["guidance"].add_argument("--scales", type=float, nargs="+", default=[1.0, 1.5, 2.0, 3.0],
                                         help="guidance scales w (default: 1 1.5 2 3)")
    sub.choices["guidance"].add_argument("--num_samples", type=int, default=40,
                                         help="test masks, the first N (default: %(default)s)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging()
    import torch

    from utils.config import ConfigError
    from utils.data.dataset_io import DatasetError, load_dataset
    from utils.generation.checkpoints import CheckpointError, find_checkpoint
    from utils.methods import load_module

    device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        ckpt = find_checkpoint(args.checkpoint, args.which)
        module = load_module(ckpt, device)
        data = load_dataset(args.data_path or module.cfg.data_args.path)
        if args.command == "classes":
            result = measure_classes(module, data, args.per_class, args.seed, args.batch_size, device,
                                     ClassifierRecipe(steps=args.classifier_steps))
            text = classes_markdown(result)
        else:
            result = measure_guidance(ckpt, args.scales, data, args.num_samples, args.seed, args.batch_size, device)
            text = guidance_markdown(result)
    except (CheckpointError, ConfigError, DatasetError, FileNotFoundError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.command}.json").write_text(json.dumps({"checkpoint": str(ckpt), **result}, indent=2) + "\n")
    (out / f"{args.command}.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
