"""Does a distribution metric rank blur and averaging below real samples? A check on data where the answer is known.

Usage:
    python -m utils.evaluation.ranking EVAL_DIR [--output_dir DIR] [--blur 1 2 4]

EVAL_DIR is an evaluate.py output directory of a phantom dataset (its samples/samples.npz and manifest.json,
K >= 2 samples per mask). Every set below is scored against the training split (the reference) with FRD v0,
FRD v1 and precision/recall/density/coverage in the v0 radiomic space:

    real        the real image of each mask (the reference's own real-vs-real value)
    oracle      a second real image of each mask (the phantom's redraw): a perfect sampler
    samples     the first generated image of each mask
    mean of K   per mask, the mean of its K samples: a blurred average, not an image
    painting    each label painted with its mean training intensity, blurred (sigma 2 px): a collapsed model
    blur s      the real images blurred with a Gaussian of sigma s px

Every set holds one image per mask, of the same masks (distribution metrics depend on N). A metric passes
when it orders {real, oracle} < samples < mean of K < painting (lower is better; real and oracle are both
perfect, so either may come first) and grows with the blur. Writes ranking.md and ranking.json in
--output_dir (default: EVAL_DIR).
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # torch is imported where it runs, so that `--help` answers before it loads
    import torch

log = logging.getLogger("comet.ranking")

TIERS = (("real", "oracle"), ("samples",), ("mean of K",), ("painting",))  # best to worst, as a person ranks them
PAINT_SIGMA = 2.0


def label_painting(masks: torch.Tensor, reference_images: torch.Tensor, reference_masks: torch.Tensor,
                   sigma: float = PAINT_SIGMA) -> torch.Tensor:
    """Each label of ``masks [N, 1, H, W]`` painted with that label's mean intensity over the reference images,
    then blurred: the image a model that collapsed to the label means would make."""
    import torch
    from scipy import ndimage

    labels = int(max(masks.max(), reference_masks.max())) + 1
    means = np.array([reference_images[reference_masks == k].mean().item() if (reference_masks == k).any() else 0.0
                      for k in range(labels)])
    painted = means[masks.numpy().astype(np.int64)]
    return torch.from_numpy(ndimage.gaussian_filter(painted, (0, 0, sigma, sigma)).astype(np.float32))


def blurred(images: torch.Tensor, sigma: float) -> torch.Tensor:
    import torch
    from scipy import ndimage

    return torch.from_numpy(ndimage.gaussian_filter(images.numpy(), (0, 0, sigma, sigma)).astype(np.float32))


def score_sets(sets: dict[str, torch.Tensor], reference: torch.Tensor) -> dict[str, dict[str, float | None]]:
    """{set: {frd_v0, frd_v1, precision, recall, density, coverage}} against ``reference``."""
    from utils.evaluation.comparison import Reference, distribution_metrics
    from utils.evaluation.radiomics import FRD_VERSIONS, RadiomicsExtractor

    extractors = {v: RadiomicsExtractor(v) for v in FRD_VERSIONS}
    ref = Reference({v: e(reference) for v, e in extractors.items()})
    out = {}
    for name, images in sets.items():
        log.info("scoring '%s' (%d images)", name, len(images))
        out[name] = {m: cell.get("value") for m, cell in distribution_metrics(images, ref, extractors).items()}
    return out


def verdict(scores: dict[str, dict], metric: str, blur_names: list[str]) -> dict:
    """Whether ``metric`` (lower is better) puts every set of each of :data:`TIERS` below every set of the next,
    and grows along ``blur_names`` (real first)."""
    def ordered(tiers):
        values = [[scores.get(n, {}).get(metric) for n in tier] for tier in tiers]
        if any(v is None for tier in values for v in tier):
            return False
        return all(max(a) < min(b) for a, b in zip(values, values[1:]))

    return {"order": ordered(TIERS), "blur": ordered([("real",), *((b,) for b in blur_names)])}


def ranking_sets(eval_dir: Path, blur_sigmas) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """(the sets of the module docstring, the reference images) from an evaluate.py output directory."""
    import torch

    from utils.data.dataset_io import load_dataset
    from utils.data.oracle import OracleUnavailable
    from utils.evaluation.comparison import oracle_set
    from utils.evaluation.diversity import groups, mean_of_samples
    from utils.evaluation.segmenter import split_tensors

    samples = eval_dir / "samples"
    manifest = json.loads((samples / "manifest.json").read_text())
    with np.load(samples / "samples.npz") as z:
        images, indices = torch.from_numpy(z["images"]), z["indices"]
    if images.ndim != 4:
        raise SystemExit(f"error: {samples / 'samples.npz'} holds volumes {list(images.shape[1:])}; the ranking "
                         "check blurs and paints 2-D images only")
    config = manifest["config"]
    dataset = load_dataset(config["data_args"]["path"])
    records, train = dataset[manifest["split"]], dataset["train"]
    (real, split_masks), (reference, reference_masks) = split_tensors(records), split_tensors(train)
    grouped = groups(indices)
    if not grouped:
        raise SystemExit(f"error: {samples}: every mask has one sample; evaluate with --samples_per_mask K >= 2")
    try:
        oracle = oracle_set(records, config["data_args"].get("synthetic"), indices)
    except OracleUnavailable as e:
        raise SystemExit(f"error: {eval_dir}: no oracle ({e}); the check needs phantom data") from None
    used = torch.as_tensor(list(grouped))  # one image per mask, the same masks in every set
    first = torch.as_tensor([int(p[0]) for p in grouped.values()])
    real = real[used]
    sets = {"real": real, "oracle": oracle[first], "samples": images[first],
            "mean of K": mean_of_samples(images, grouped)[0],
            "painting": label_painting(split_masks[used], reference, reference_masks)}
    sets.update({f"blur {s:g}": blurred(real, s) for s in blur_sigmas})
    return sets, reference


def ranking_markdown(scores: dict, verdicts: dict, sizes: dict[str, int]) -> str:
    from utils.evaluation.columns import column

    metrics = [m for m in ("frd_v0", "frd_v1", "precision", "recall", "density", "coverage")
               if any(s.get(m) is not None for s in scores.values())]
    lines = ["| Set | N | " + " | ".join(column(m) for m in metrics) + " |", "|---|---|" + "---|" * len(metrics)]
    for name, row in scores.items():
        lines.append(f"| {name} | {sizes[name]} | " + " | ".join(
            "–" if row.get(m) is None else f"{row[m]:.4g}" for m in metrics) + " |")
    order = " < ".join("{" + ", ".join(t) + "}" if len(t) > 1 else t[0] for t in TIERS)
    lines += ["", f"Expected order (lower FRD is better): {order}; and FRD growing with the blur."]
    lines += [f"- {column(m)}: order {'PASS' if v['order'] else 'FAIL'}, blur {'PASS' if v['blur'] else 'FAIL'}"
              for m, v in verdicts.items()]
    return "\n".join(lines)


def build_parser():
    from utils.cli import docstring_parser

    p = docstring_parser(__doc__, prog="python -m utils.evaluation.ranking")
    p.add_argument("eval_dir", help="an evaluate.py output directory (phantom data, K >= 2 samples per mask)")
    p.add_argument("--output_dir", help="where to write ranking.md/json (default: EVAL_DIR)")
    p.add_argument("--blur", type=float, nargs="+", default=[1.0, 2.0, 4.0], help="blur sigmas in px (default: 1 2 4)")
    return p


def main(argv: list[str] | None = None) -> int:
    from utils.cli import configure_logging

    args = build_parser().parse_args(argv)
    configure_logging()
    eval_dir = Path(args.eval_dir)
    if not (eval_dir / "samples" / "samples.npz").is_file():
        raise SystemExit(f"error: {eval_dir} holds no samples/samples.npz; pass an evaluate.py output directory")
    sets, reference = ranking_sets(eval_dir, args.blur)
    scores = score_sets(sets, reference)
    blur_names = [f"blur {s:g}" for s in sorted(args.blur)]
    verdicts = {m: verdict(scores, m, blur_names) for m in ("frd_v0", "frd_v1")}
    out = Path(args.output_dir or eval_dir)
    out.mkdir(parents=True, exist_ok=True)
    text = ranking_markdown(scores, verdicts, {k: len(v) for k, v in sets.items()})
    (out / "ranking.md").write_text(f"# Ranking check of {eval_dir} (reference: {len(reference)} training images)"
                                    f"\n\n{text}\n")
    (out / "ranking.json").write_text(json.dumps({"scores": scores, "verdicts": verdicts}, indent=2) + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
