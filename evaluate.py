"""Evaluate a COMET checkpoint (or existing samples): FID, KID, CMMD, SSIM, PSNR, B-Dice, surface Dice, HD95, FRD,
precision/recall/density/coverage and per-mask diversity, beside what an average and a perfect sampler score.

Examples:
    python evaluate.py --checkpoint checkpoints/quickstart --samples_per_mask 4 --skip_missing_metrics
    python evaluate.py --checkpoint checkpoints/comet_camus --num_samples 2000 --num_steps 10 \\
        --inception_weights weights/weights-inception-2015-12-05-6726825d.pth \\
        --clip_dir weights/clip-vit-large-patch14-336
    python evaluate.py --samples outputs/quickstart/samples.npz --skip_missing_metrics
    python evaluate.py --checkpoint checkpoints/quickstart --num_samples 160 --skip_missing_metrics --segmenter auto
    python evaluate.py --checkpoint checkpoints/quickstart_3d --num_samples 20 \
        --r3d_weights weights/r3d_18-b3b3357e.pth --inception_weights weights/weights-inception-2015-12-05-6726825d.pth
    python evaluate.py --checkpoint checkpoints/quickstart --skip_missing_metrics --segmenter auto --dry_run

Generated image i is paired with the real image whose mask conditioned it (SSIM, PSNR, B-Dice, surface Dice
(NSD at --surface_dice_tolerance px, beside the pixel-exact B-Dice) and HD95 of their edge maps);
FID, KID and CMMD compare the generated set with the split's real images. Nothing is downloaded:
weights come from --inception_weights / --clip_dir, the COMET_INCEPTION_WEIGHTS / COMET_CLIP_DIR
environment variables, or torch hub's cache.

Beyond paired metrics (on by default, --no-comparison to skip; utils.evaluation.comparison): paired metrics
reward averaging, so report.md also scores the samples, the per-mask mean of their K samples (--samples_per_mask),
the oracle (phantom data: a second real image of each mask, what a perfect sampler scores) and the split's real
images with Fréchet Radiomics Distance (frd-score, v0 and v1) and precision/recall/density/coverage against the
training split, and the diversity among the samples of each mask. Needs no weights.

Mask fidelity (--segmenter): a segmenter trained on the real training split (utils.evaluation.segmenter; `auto`
trains it once and caches it by data hash) segments every generated image; per-label Dice, HD95 and surface
Dice against the mask that conditioned it, next to the same segmenter on the real images (the ceiling).
Memorisation audit (on by default, --no-memorisation to skip): each generated image's nearest training image
by pixel RMSE, against the real test images' nearest distances (utils.evaluation.memorisation).

Volumes (samples and data [N, 1, D, H, W]; utils.evaluation.volume_metrics): 3D-FID on R3D-18 features
(--r3d_weights, $COMET_R3D_WEIGHTS or torch hub's cache), 2.5-D FID (the Inception FID per orthogonal plane
and their mean), MMD, and per volume SSIM, MS-SSIM, PSNR and the edge-map B-Dice, NSD and HD95 in voxels.
KID, CMMD and the segmenter are 2-D only and are skipped with the reason recorded; the memorisation audit
compares voxels.

--dry_run checks every input as a run would (checkpoint, dataset, weights, segmenter), then prints the plan: the
checkpoint, method, sampler and steps, the samples and masks, the output folder, the metrics computed and those
skipped with why, and the time and peak memory of the generation, extrapolated from one batch generated after a
warm-up (metrics not included). It writes nothing: no samples, no feature cache, no segmenter training.
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

from utils.cli import (
    add_checkpoint_arguments,
    add_sampler_argument,
    configure_logging,
    docstring_parser,
    run_command,
)
from utils.evaluation.columns import COMPARED, METRICS, METRICS_3D
from utils.methods import samplers

log = logging.getLogger("comet.evaluate")

NOT_FOR_VOLUMES = {  # 2-D-only parts, recorded as skipped when the data are volumes
    "kid": "2-D only: KID is defined on the Inception features of images (volumes get 3D-FID and 2.5-D FID)",
    "cmmd": "2-D only: CMMD's CLIP ViT embeds 2-D images",
    "mask_fidelity": "2-D only: the segmenter (utils.evaluation.segmenter) segments 2-D images",
}


def build_parser() -> argparse.ArgumentParser:
    p = docstring_parser(__doc__)
    src = p.add_argument_group("what to evaluate")
    add_checkpoint_arguments(src)  # the model that generates the samples
    src.add_argument("--samples", help="an inferer.py samples.npz to evaluate without generating")
    src.add_argument("--data_path", help="dataset of the real images (default: the checkpoint's data_args.path)")
    src.add_argument("--split", default="test", help="split of masks and real images (default: %(default)s)")
    gen = p.add_argument_group("generation (the paper's protocol by default)")
    gen.add_argument("--num_samples", type=int, help="images to generate (default: 2000; volumes: one per mask of the "
                                                      "split)")
    gen.add_argument("--samples_per_mask", type=int, metavar="K",
                     help="K samples with distinct noise per mask: K for every mask of the split, or with "
                          "--num_samples N for its first N/K masks; per-mask diversity and the mean-of-K row use "
                          "them (studies use K >= 4)")
    gen.add_argument("--num_steps", type=int,
                     help="sampler steps (default: the checkpoint's sampling_args.num_steps, 10 when shipped)")
    add_sampler_argument(gen, samplers())
    gen.add_argument("--seed", type=int, default=0, help="noise seed (default: %(default)s)")
    gen.add_argument("--batch_size", type=int, help="generation batch (default: 64 on GPU, 8 on CPU; volumes 1)")
    audit = p.add_argument_group("is the synthetic data useful and safe?")
    audit.add_argument("--segmenter", metavar="DIR_OR_PT|auto",
                       help="mask fidelity with this segmenter (a segmenter.pt or its directory), or `auto`: "
                            "train one on the dataset's train split, cached by data hash under --cache_dir")
    audit.add_argument("--memorisation", action=argparse.BooleanOptionalAction, default=True,
                       help="nearest-training-image audit of every generated image (default: on; cheap)")
    w = p.add_argument_group("feature-extractor weights (never downloaded)")
    w.add_argument("--inception_weights", help="torch-fidelity Inception-v3 state dict (.pth)")
    w.add_argument("--clip_dir", help="local transformers directory of CLIP ViT-L/14@336")
    w.add_argument("--r3d_weights", help="torchvision R3D-18 Kinetics-400 state dict (r3d_18-b3b3357e.pth), "
                                         "for the 3D-FID of volumes")
    w.add_argument("--skip_missing_metrics", action="store_true",
                   help="record FID/KID, CMMD or 3D-FID as skipped when their weights are missing, evaluate the "
                        "rest")
    w.add_argument("--cache_dir", help="real-set feature cache (default: $COMET_CACHE_DIR or ~/.cache/comet)")
    out = p.add_argument_group("output")
    out.add_argument("--output_dir", help="where to write (default: next to the checkpoint or samples)")
    out.add_argument("--overwrite", action="store_true", help="write into a non-empty --output_dir")
    out.add_argument("--comparison", action=argparse.BooleanOptionalAction, default=True,
                     help="the comparison rows beside the samples: FRD, precision/recall/density/coverage, per-mask "
                          "diversity, the mean-of-K row, the oracle row on phantom data (default: on; radiomic "
                          "features cost about 0.25 s per image on a CPU)")
    out.add_argument("--surface_dice_tolerance", type=float, default=2.0,
                     help="tolerance in pixels of the surface Dice (NSD) of edge maps (default: %(default)s)")
    out.add_argument("--n_boot", type=int, default=1000, help="bootstrap resamples for 95%% CIs (default: 1000)")
    out.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    out.add_argument("--dry_run", action="store_true",
                     help="print the plan, the metrics that would be skipped and why, time and memory (from one "
                          "batch), and write nothing (see above)")
    return p


def _extractors(args, device: str, volumes: bool) -> tuple[dict, dict]:
    """Feature extractors whose weights are present, and {metric: reason} for those skipped.

    Keys: ``inception`` (FID, KID) and ``clip`` (CMMD) for images; ``r3d`` (3D-FID) and ``inception_planes``
    (2.5-D FID) for volumes.
    """
    from utils.evaluation.feature_extractors import (
        ClipExtractor,
        InceptionExtractor,
        MissingWeightsError,
        R3DExtractor,
        resolve_clip_dir,
        resolve_inception_weights,
        resolve_r3d_weights,
    )

    inception = (resolve_inception_weights, args.inception_weights, InceptionExtractor)
    specs = {"r3d": (resolve_r3d_weights, args.r3d_weights, R3DExtractor, ("fid_3d",)),
             "inception_planes": (*inception, ("fid_2p5d",))} if volumes else {
             "inception": (*inception, ("fid", "kid")),
             "clip": (resolve_clip_dir, args.clip_dir, ClipExtractor, ("cmmd",))}
    found, skipped = {}, {}
    for key, (resolve, flag, build, metrics) in specs.items():
        try:
            found[key] = (build, resolve(flag))
        except MissingWeightsError as e:
            if not args.skip_missing_metrics:
                raise SystemExit(f"error: {e}") from None
            for m in metrics:
                skipped[m] = str(e)
            log.warning("skipping %s: %s", "/".join(metrics).upper(), e)
    return {k: build(path, device) for k, (build, path) in found.items()}, skipped


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging()
    if (args.num_samples is not None and args.num_samples < 1) or (args.num_steps is not None and args.num_steps < 1):
        raise SystemExit("error: --num_samples and --num_steps must be >= 1")
    if not args.surface_dice_tolerance > 0:
        raise SystemExit(f"error: --surface_dice_tolerance must be > 0, got {args.surface_dice_tolerance}")
    if args.samples and args.overrides:
        raise SystemExit("error: --set changes the checkpoint's config; it does not apply to --samples")
    if args.samples_per_mask is not None and (args.samples_per_mask < 1 or args.samples):
        raise SystemExit("error: --samples_per_mask K must be >= 1 and generates samples (it does not apply to "
                         "--samples)")

    from utils.config import ConfigError
    from utils.data.dataset_io import DatasetError
    from utils.evaluation.feature_extractors import WeightsFileError
    from utils.generation.checkpoints import CheckpointError
    from utils.generation.outputs import SamplesError

    try:
        return run(args)
    except (CheckpointError, ConfigError, DatasetError, SamplesError, WeightsFileError) as e:  # before any writing
        raise SystemExit(f"error: {e}") from None


def run(args) -> int:
    """Load or generate the samples, compute the metrics, write them; bad inputs stop before any writing."""
    import numpy as np
    import torch

    from utils.data.dataset_io import load_dataset, normalise_image
    from utils.evaluation.comparison import summary_cell
    from utils.evaluation.feature_extractors import FeatureCache
    from utils.evaluation.metrics import paired_metrics, summarise
    from utils.evaluation.report import report, write_results
    from utils.evaluation.volume_metrics import mmd, mmd_problem, ms_ssim_problem, paired_volume_metrics
    from utils.generation.generate import generate
    from utils.generation.outputs import read_samples, write_samples
    from utils.generation.plan import describe_samples, estimate_generation
    from utils.methods import load_module, resolve_checkpoint, sampling_overrides

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    manifest, module, ckpt = {}, None, None
    if args.samples:
        samples = Path(args.samples)
        images, masks, indices, manifest = read_samples(samples)
        data_path = args.data_path or manifest.get("config", {}).get("data_args", {}).get("path")
        split = manifest.get("split") or args.split
        out_dir = Path(args.output_dir or samples.parent / "eval")
        steps, sampler, seed = manifest.get("num_inference_steps"), manifest.get("sampler"), manifest.get("seed")
        method = manifest.get("method")
        ckpt = manifest.get("checkpoint")
    else:
        ckpt = resolve_checkpoint(args.checkpoint, args.which, args.config_path)
        module = load_module(ckpt, device, args.overrides + sampling_overrides(args.num_steps, args.sampler))
        data_path, split = args.data_path or module.cfg.data_args.path, args.split
        steps, sampler, seed = module.cfg.sampling_args.num_steps, module.cfg.sampling_args.sampler, args.seed
        method = module.cfg.method
        out_dir = Path(args.output_dir or Path(ckpt).parent / f"eval_{Path(ckpt).stem}_{split}_{steps}steps")
    if not data_path:
        raise SystemExit("error: no dataset for the real images; pass --data_path")
    if not Path(data_path).exists():
        raise SystemExit(f"error: {data_path}: no such dataset file or folder (the real images); pass --data_path")
    if out_dir.exists() and any(out_dir.iterdir()) and not args.overwrite:
        raise SystemExit(f"error: {out_dir} is not empty; pass --overwrite or choose another --output_dir")

    config = module.hparams["config"] if module is not None else manifest.get("config", {})
    num_classes = config.get("data_args", {}).get("num_classes", 4)
    dataset = _fitted(load_dataset(data_path), config)
    records = dataset.get(split)
    if not records:
        raise SystemExit(f"error: {data_path} has no '{split}' split")
    real = torch.from_numpy(np.stack([normalise_image(r["image"]) for r in records]))
    split_masks = torch.from_numpy(np.stack([np.asarray(r["mask"], dtype=np.uint8) for r in records]))
    volumes = real.ndim == 5  # records [1, D, H, W]
    if module is None:
        _check_samples(images, masks, indices, real, split_masks, data_path, split)
    extractors, skipped = _extractors(args, device, volumes)  # fail on missing weights before generating anything
    skipped_2d_only = {k: v for k, v in NOT_FOR_VOLUMES.items() if volumes and (k != "mask_fidelity" or args.segmenter)}
    for part, reason in skipped_2d_only.items():
        log.warning("skipping %s: %s", part, reason)
    segmenter = None if volumes else _segmenter(args, data_path, num_classes)  # trained or loaded before generating

    if module is not None:
        indices, masks, classes, batch = _to_generate(args, module, records, split_masks, split, data_path, volumes,
                                                      device)
    if args.dry_run:
        plan = {"checkpoint": str(Path(ckpt).resolve()) if module is not None else f"none: --samples {args.samples}",
                "method": f"{method}, sampler {sampler}, {steps} steps",
                "samples": f"{describe_samples(indices, f'split {split!r} of {data_path}')}, seed {seed}",
                "output": str(out_dir.absolute()),
                **_metric_plan(args, dataset, masks.shape, extractors, {**skipped, **skipped_2d_only}, segmenter)}
        return _print_plan(plan, None if module is None else estimate_generation(
            module, masks, seed, steps, sampler, batch, [device], classes=classes))
    if module is not None:
        n = len(indices)
        result = generate(module, masks, torch.arange(n), seed, steps, sampler, batch, [device], classes=classes)
        images = result.images
        manifest = {"checkpoint": str(ckpt), "num_samples": n, "num_inference_steps": steps, "method": method,
                    "sampler": sampler,
                    "seed": seed, "nfe_per_image": result.nfe, "seconds_per_image": result.seconds / n,
                    "split": split, "config": module.hparams["config"]}
        grids = [_record_grid(records[i]) for i in indices.tolist()] if volumes else None
        write_samples(out_dir / "samples", images, masks, indices.tolist(), manifest,
                      module.cfg.data_args.num_classes, split=split, classes=classes, grids=grids)
    paired = real[indices]

    log.info("per-%s metrics on %d pairs", "volume" if volumes else "image", len(images))
    if volumes:
        per_image = paired_volume_metrics(images, paired, masks, tolerance=args.surface_dice_tolerance)
    else:
        per_image = paired_metrics(images, paired, masks, tolerance=args.surface_dice_tolerance)
    metrics: dict[str, dict] = {m: {"skipped": reason} for m, reason in skipped.items()}
    for name in per_image:  # resampled by source image: samples sharing a mask are not independent
        metrics[name] = summary_cell(summarise(per_image[name], indices.numpy(), n_boot=args.n_boot, seed=0))
    if volumes:
        metrics.setdefault("ms_ssim", {"skipped": ms_ssim_problem(images.shape)})
        why = mmd_problem(len(images))
        metrics["mmd"] = {"skipped": why} if why else {"value": mmd(paired, images), "n": len(images)}
    cache = FeatureCache(_cache_dir(args))
    weights = _feature_metrics(extractors, cache, split, real, images, metrics)
    comparison = _comparison(args, config, dataset, records, real, split_masks, images, indices, per_image, cache,
                             extractors.get("inception")) if args.comparison else None
    if comparison and "rows" in comparison:
        metrics.update(comparison["rows"]["samples"])  # the samples' own FRD, PRDC and diversity

    results = {
        "metrics": {m: metrics[m] for m in (*(METRICS_3D if volumes else METRICS), *COMPARED) if m in metrics},
        "num_samples": len(images), "num_masks": len(set(indices.tolist())),
        "num_steps": steps, "method": method, "sampler": sampler, "seed": seed,
        "checkpoint": str(ckpt) if ckpt else None, "dataset": str(data_path), "split": split,
        "num_real": len(records), "surface_dice_tolerance_px": args.surface_dice_tolerance,
        "weights_sha256": weights, "device": device,
        "samples": str(args.samples) if args.samples else str(out_dir / "samples" / "samples.npz"),
    }
    if comparison is not None:
        results["comparison"] = comparison
    if skipped_2d_only:
        results["skipped_2d_only"] = skipped_2d_only
    if args.memorisation:
        results["memorisation"] = _memorisation(dataset, images, out_dir)
    if segmenter is not None:
        from utils.evaluation.segmenter import mask_fidelity

        log.info("mask fidelity: segmenting %d generated and %d real images", len(images), len(real))
        results["mask_fidelity"] = {"segmenter": str(segmenter[1]), **mask_fidelity(
            segmenter[0], images, masks, indices.numpy(), real, split_masks, num_classes,
            args.surface_dice_tolerance, args.n_boot)}
    write_results(out_dir, results, per_image, indices, images, paired, masks, num_classes)
    print(report(results))
    log.info("wrote %s", out_dir)
    return 0


def _check_samples(images, masks, indices, real, split_masks, data_path, split: str) -> None:
    """Stop unless --samples were generated from the masks of ``split`` of ``data_path`` (images or volumes like
    its real ones, each sample's mask that of its index); checked before generating or writing anything."""
    import torch

    if images.ndim != real.ndim:
        raise SystemExit(f"error: the samples are {'volumes' if images.ndim == 5 else 'images'} "
                         f"{list(images.shape[1:])}, the real data of {data_path} {list(real.shape[1:])}; pass the "
                         "--data_path they were generated from")
    if indices.min() < 0 or indices.max() >= len(split_masks) or not torch.equal(masks, split_masks[indices]):
        raise SystemExit(f"error: the samples' masks are not those of {data_path} split '{split}' at their "
                         "indices; pass the --data_path and --split they were generated from")


def _record_grid(record: dict):
    """The NIfTI grid of a volume generated for ``record``'s mask: the record (fitted to the model's grid) with
    its affine, identity when it has none."""
    import numpy as np

    from utils.data.masks import VolumeGrid

    return VolumeGrid() if record.get("affine") is None else VolumeGrid(np.asarray(record["affine"], np.float64))


def _to_generate(args, module, records: list[dict], split_masks, split: str, data_path, volumes: bool,
                 device: str) -> tuple:
    """(indices (N,) of each sample's mask in the split, masks (N, 1, ...) uint8, classes (N,) or None, batch
    size): the samples --num_samples and --samples_per_mask ask for; class-conditional models make each image
    of its source record's class."""
    import torch

    from utils.generation.generate import default_batch_size

    n, num_masks = sample_plan(args.num_samples, args.samples_per_mask, len(records), volumes)
    indices = torch.arange(n) % num_masks  # mask by mask, round the masks again and again
    classes = None
    if module.class_names:
        from utils.data.masks import MaskSource
        from utils.generation.classes import sample_classes

        source = MaskSource(split_masks, list(range(len(records))), f"split '{split}' of {data_path}",
                            [r.get("class") for r in records])
        try:
            classes = sample_classes(module.class_names, source, indices)
        except ValueError as e:
            raise SystemExit(f"error: {e}") from None
    return indices, split_masks[indices], classes, args.batch_size or default_batch_size(device, volumes)


def _metric_plan(args, dataset: dict, shape: tuple, extractors: dict, skipped: dict, segmenter) -> dict[str, str]:
    """A dry run's lines on what the run would compute and what it would skip and why: ``skipped`` {part:
    reason} from the checks a run makes before generating, and those it makes later (MS-SSIM's size, MMD's
    count, the comparison's and the audit's splits) made here on the samples' ``shape``."""
    from utils.evaluation.volume_metrics import mmd_problem, ms_ssim_problem

    volumes = len(shape) == 5
    reasons = dict(skipped)
    if volumes:
        later = {"ms_ssim": ms_ssim_problem(shape), "mmd": mmd_problem(shape[0])}
        reasons.update({m: why for m, why in later.items() if why})
    if not args.comparison or (problem := _comparison_problem(dataset)):
        reasons["comparison"] = "--no-comparison" if not args.comparison else problem
    if not args.memorisation or (problem := _memorisation_problem(dataset)):
        reasons["memorisation"] = "--no-memorisation" if not args.memorisation else problem
    if not args.segmenter:
        reasons["mask_fidelity"] = "no --segmenter"
    computed = [m for m in (METRICS_3D if volumes else METRICS) if m not in reasons]
    computed += [part for part in ("comparison", "memorisation", "mask_fidelity") if part not in reasons]
    lines = {"computes": ", ".join(computed)}
    if segmenter is not None:
        lines["segmenter"] = str(segmenter[1]) + ("" if segmenter[0] is not None else
                                                  " (not cached: a run trains it on the train split first)")
    if extractors:
        lines["feature cache"] = f"{_cache_dir(args)} (real-set features read from or written to it)"
    by_reason: dict[str, list[str]] = {}
    for part, why in reasons.items():
        by_reason.setdefault(why, []).append(part)
    # the first sentence: what is missing and where it was looked for (the warnings above say how to fix it)
    return lines | {f"skips {', '.join(parts)}": why.split(". ")[0] for why, parts in by_reason.items()}


def _print_plan(plan: dict, estimate) -> int:
    """Print a dry run's ``plan`` with the generation's time and memory (``estimate``; None: nothing to
    generate)."""
    from utils.generation.plan import format_plan

    if estimate is None:
        plan["estimate"] = "nothing to generate (--samples); metrics not timed"
    else:
        lines = estimate.lines()
        plan |= {**lines, "estimate": lines["estimate"] + "; metrics not included"}
    print(format_plan(plan))
    return 0


def sample_plan(num_samples: int | None, per_mask: int | None, split_masks: int, volumes: bool) -> tuple[int, int]:
    """(samples to generate, masks they use: the split's first ones), from --num_samples N and --samples_per_mask K.

    K alone: K samples for every mask of the split. N alone: N samples cycling over all masks. Both: N / K masks,
    K samples each (N a multiple of K, N / K masks at most the split's). Neither: 2000 images (FID needs
    thousands) or one volume per mask (2000 volumes of 96^3 are 7 GB of float32 and days of generation)."""
    if per_mask is None:
        return num_samples or (split_masks if volumes else 2000), split_masks
    if num_samples is None:
        return per_mask * split_masks, split_masks
    if num_samples % per_mask or num_samples // per_mask > split_masks:
        raise SystemExit(f"error: --num_samples {num_samples} with --samples_per_mask {per_mask} needs a multiple of "
                         f"{per_mask} and at most {per_mask * split_masks} samples (the split has {split_masks} "
                         "masks); or leave out --num_samples for every mask of the split")
    return num_samples, num_samples // per_mask


def _comparison(args, config: dict, dataset: dict, records: list[dict], real, masks, images, indices,
                per_image: dict, cache, inception) -> dict:
    """:func:`utils.evaluation.comparison.evaluate_rows` for this evaluation (the training split as the
    reference), or ``{"skipped": reason}``."""
    from utils.evaluation.comparison import evaluate_rows
    from utils.evaluation.metrics import paired_metrics
    from utils.evaluation.segmenter import split_tensors
    from utils.evaluation.volume_metrics import paired_volume_metrics

    if problem := _comparison_problem(dataset):
        log.warning("skipping the comparison rows: %s", problem)
        return {"skipped": problem}
    if records is dataset["train"]:
        log.warning("the evaluated split is the training split, the distribution metrics' reference: the real "
                    "row compares the reference with itself")
    reference = split_tensors(dataset["train"])[0]
    score = paired_volume_metrics if images.ndim == 5 else paired_metrics
    return evaluate_rows(images, indices.numpy(), per_image, real, masks, records, reference,
                         config.get("data_args", {}).get("synthetic"),
                         lambda a, b, m: score(a, b, m, tolerance=args.surface_dice_tolerance), args.n_boot, cache,
                         inception)


def _comparison_problem(dataset: dict) -> str | None:
    """Why the comparison rows cannot be computed (a package missing, no training split), or None."""
    from utils.evaluation.radiomics import radiomics_problem

    return radiomics_problem() or (None if dataset.get("train") else
                                   "the dataset has no train split, the distribution metrics' reference")


def _memorisation_problem(dataset: dict) -> str | None:
    """Why the memorisation audit cannot run, or None."""
    if dataset.get("train") and dataset.get("test"):
        return None
    return "the dataset needs train and test splits (training images, unseen reference)"


def _fitted(dataset: dict, config: dict) -> dict:
    """``dataset`` as the model saw it: for a 3-D model (``model_args.spatial_dims`` 3 in the checkpoint's or
    the samples' config), every volume fitted to ``data_args.image_size``^3 as training does
    (:func:`utils.data.resample.fit_dataset`); otherwise unchanged."""
    size = config.get("data_args", {}).get("image_size")
    if config.get("model_args", {}).get("spatial_dims") != 3 or not size:
        return dataset
    from utils.data.resample import fit_dataset

    return fit_dataset(dataset, size)[0]


def _feature_metrics(extractors: dict, cache, split: str, real, images, metrics: dict) -> dict:
    """Add each extractor's set-level metrics (generated ``images`` against the split's ``real`` ones) to
    ``metrics``; returns ``{extractor name: its weights files' sha256}``."""
    from utils.evaluation.metrics import cmmd, frechet_distance, kernel_inception_distance
    from utils.evaluation.volume_metrics import fid_2p5d, plane_slices
    from utils.images import PLANES

    weights = {}
    for key, ext in extractors.items():
        weights[ext.name] = ext.weights_files
        counts = {"n": len(images), "n_real": len(real)}
        if key == "inception_planes":  # cached per plane: the split name carries the plane
            real_feats = {p: cache.features(f"{split}-{p}", ext, plane_slices(real, p)) for p in PLANES}
            fids = fid_2p5d(real_feats, {p: ext(plane_slices(images, p)) for p in PLANES})
            metrics["fid_2p5d"] = {"value": fids.pop("mean"), "planes": fids, **counts}
            continue
        real_feats, gen_feats = cache.features(split, ext, real), ext(images)
        if key == "inception":
            metrics["fid"] = {"value": frechet_distance(real_feats, gen_feats), **counts}
            size = min(1000, len(real_feats), len(gen_feats))
            mean, std = kernel_inception_distance(real_feats, gen_feats, subset_size=size)
            metrics["kid"] = {"value": mean, "std": std, "subset_size": size, **counts}
        elif key == "clip":
            metrics["cmmd"] = {"value": cmmd(real_feats, gen_feats), **counts}
        else:
            metrics["fid_3d"] = {"value": frechet_distance(real_feats, gen_feats), **counts}
    return weights


def _segmenter(args, data_path, num_classes: int):
    """(network, where it came from) for --segmenter, or None without it; bad files stop with their name.

    A dry run trains nothing: with `auto` and no cached segmenter it gives (None, the cache directory)."""
    if not args.segmenter:
        return None
    from utils.evaluation.segmenter import (
        CHECKPOINT,
        SegmenterError,
        cached_segmenter,
        load_segmenter,
        segmenter_cache,
    )

    path = args.segmenter
    if path == "auto":
        if not Path(data_path).is_file():
            raise SystemExit(f"error: --segmenter auto caches by the dataset file's hash; {data_path} is not a "
                             "file: train one with `python -m utils.evaluation.segmenter train` and pass it")
        if args.dry_run:
            path = segmenter_cache(data_path, _cache_dir(args), num_classes)
            if not (path / CHECKPOINT).is_file():
                return None, path
        else:
            path = cached_segmenter(data_path, _cache_dir(args), num_classes)
    try:
        net, ckpt = load_segmenter(path)
    except SegmenterError as e:
        raise SystemExit(f"error: {e}") from None
    if ckpt["num_classes"] != num_classes:
        raise SystemExit(f"error: {path}: the segmenter has {ckpt['num_classes']} classes, the data {num_classes}")
    return net, path


def _memorisation(dataset: dict, images, out_dir: Path) -> dict:
    """The audit's summary (files written in ``out_dir``), or why it was skipped."""
    from utils.evaluation.memorisation import audit, write_audit
    from utils.evaluation.segmenter import split_tensors

    if problem := _memorisation_problem(dataset):
        return {"skipped": problem}
    train, _ = split_tensors(dataset["train"])
    test, _ = split_tensors(dataset["test"])
    log.info("memorisation audit: %d generated and %d test images against %d training images",
             len(images), len(test), len(train))
    patients = [r["metadata"].get("patient") for r in dataset["train"]]
    return write_audit(out_dir, audit(images, train, test), images, train, patients)


def _cache_dir(args) -> Path:
    return Path(args.cache_dir or os.environ.get("COMET_CACHE_DIR") or Path.home() / ".cache" / "comet")


def cli() -> None:
    """The console script (pyproject.toml): Ctrl-C ends with one line and status 130."""
    run_command(main)


if __name__ == "__main__":
    cli()
