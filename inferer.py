"""Generate images for masks with a trained COMET checkpoint, reproducibly.

Examples:
    python inferer.py --checkpoint checkpoints/quickstart --num_samples 64 --output_dir outputs/quickstart
    python inferer.py --config_path configs/comet_camus.yaml --num_samples 2000 --num_steps 10
    python inferer.py --checkpoint run.ckpt --masks my_masks/ --resize --png --output_dir outputs/mine
    python inferer.py --checkpoint checkpoints/quickstart --split train --num_samples 480 --export synth.npz
    python inferer.py --checkpoint checkpoints/meddtfm_quickstart --reference data/synthetic_echo_64.npz --t0 0.5
    python inferer.py --checkpoint checkpoints/class_quickstart --class 4CH_ED --set sampling_args.guidance_scale=2
    python inferer.py --checkpoint checkpoints/quickstart --num_samples 2000 --dry_run

Masks come from a split of the checkpoint's dataset (default: test, cycled when --num_samples exceeds it)
or from --masks (a folder of PNG/NPY label maps, or a dataset file; for a 3-D model a folder of NIfTI masks
or a 3-D dataset file). A 3-D model generates at its N^3 grid: a mask of another size is resampled onto it
(nearest neighbour) and the volume back onto the mask's grid (trilinear), so each nifti/NNNNN_image.nii.gz
lies on its mask's grid with its mask's affine (identity when the mask has none). Sample i starts from the prior noise
of (--seed, i), so the images do not depend on --batch_size or --devices. A class-conditional model makes each
image of its mask's record's class, or of --class NAME (all), or of the class --class_file gives its mask.

--reference FILE|DIR (a method with reference-guided generation: med_dt_fm) guides sample i by reference image
i (cycled; a PNG/NPY file, a folder of them, or the --split of a dataset file): it starts at --t0 on the straight
path towards the reference and is integrated to t = 1 under its mask (t0 = 0: noise-based; t0 = 1: the
reference itself). The manifest records t0 and the references' SHA-256. --feature_guidance S (experimental, default
0) also pulls each step's projected decoder features towards the reference's segmentation-encoder features.

--export PATH writes a synthetic dataset instead of the samples folder: a dataset file (.npz, the framework's
format, or .pkl, MOTFM's pickle layout, by suffix) whose one split (--export_split, default train) holds the
generated images as uint8 with the masks that conditioned them (and their class when the source records have
one; metadata: sample, source index or file, source_patient), plus PATH's <stem>.manifest.json (checkpoint,
sampler, seed, mask source). It holds no real image: pair it with the real valid/test splits downstream.

--dry_run checks every input as a run would, then prints the plan (the checkpoint, method, sampler and steps,
the samples and masks, where it would write) with the time and peak memory of the generation, extrapolated from
one batch generated after a warm-up, and writes nothing.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from utils.cli import (
    add_checkpoint_arguments,
    add_renamed,
    add_sampler_argument,
    configure_logging,
    docstring_parser,
    run_command,
)
from utils.methods import samplers

log = logging.getLogger("comet.inferer")


def build_parser() -> argparse.ArgumentParser:
    p = docstring_parser(__doc__)
    add_checkpoint_arguments(p)
    p.add_argument("--num_samples", type=int, help="images to generate (default: one per mask)")
    add_renamed(p, "--num_steps", "--num_inference_steps", type=int, help="sampler steps (default: the config's, 10)")
    add_sampler_argument(p, samplers())
    p.add_argument("--seed", type=int, default=0, help="noise seed (default: %(default)s)")
    p.add_argument("--split", default="test", help="dataset split whose masks are used (default: %(default)s)")
    p.add_argument("--masks", help="folder of PNG/NPY label maps (3-D: NIfTI masks), or a dataset file, instead of "
                                   "the split")
    p.add_argument("--resize", action="store_true",
                   help="resize masks (nearest neighbour) and reference images (bilinear) of another size")
    p.add_argument("--reference", metavar="FILE|DIR",
                   help="reference-guided generation from these images (see above; method med_dt_fm)")
    p.add_argument("--t0", type=float, help="with --reference: where on the path to start, in [0, 1] (default: the "
                                            "checkpoint's med_dt_fm_args.reference_t0)")
    p.add_argument("--feature_guidance", type=float, default=0.0, metavar="S",
                   help="with --reference: experimental feature guidance scale (default: 0, off; it did not help "
                        "in the design study)")
    p.add_argument("--class", dest="class_name", metavar="NAME",
                   help="class-conditional models: make every image of this class (one of the checkpoint's names)")
    p.add_argument("--class_file", metavar="CSV",
                   help="class-conditional models: rows 'mask,class' giving each mask's class (mask: its file name "
                        "in --masks or its index in the split)")
    p.add_argument("--batch_size", type=int, help="images per batch (default: 64 on GPU, 8 on CPU; volumes 1)")
    p.add_argument("--batch_invariant", action="store_true",
                   help="run the network on one image at a time: bitwise-identical images for any --batch_size "
                        "(slower); without it they agree to float rounding (~1e-7)")
    p.add_argument("--devices", type=int, default=1, help="GPUs to split the work over (default: %(default)s)")
    p.add_argument("--output_dir", help="where to write (default: <run dir>/samples_<split>_<steps>steps)")
    p.add_argument("--overwrite", action="store_true", help="write into a non-empty --output_dir")
    p.add_argument("--png", action="store_true", help="also write one PNG per image")
    p.add_argument("--format", choices=("npz", "pkl"), default="npz",
                   help="npz always; pkl also writes the seed's/MOTFM's pickle layout")
    p.add_argument("--export", metavar="PATH",
                   help="write a synthetic dataset file (.npz or .pkl) and PATH's .manifest.json instead of samples")
    p.add_argument("--export_split", default="train", help="split of the exported dataset (default: %(default)s)")
    p.add_argument("--dry_run", action="store_true",
                   help="print the plan, time and memory (from one batch) and write nothing (see above)")
    return p


def pick_devices(count: int) -> list[str]:
    import torch

    if torch.cuda.is_available():
        if count > torch.cuda.device_count():
            raise SystemExit(f"error: --devices {count} but only {torch.cuda.device_count()} GPUs are visible")
        return [f"cuda:{i}" for i in range(count)]
    return ["cpu"]


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging()
    if args.t0 is not None and not args.reference:
        raise SystemExit("error: --t0 needs --reference")
    if args.feature_guidance and not args.reference:
        raise SystemExit("error: --feature_guidance needs --reference")
    if args.feature_guidance < 0:
        raise SystemExit(f"error: --feature_guidance must be >= 0, got {args.feature_guidance}")
    if args.t0 is not None and not 0 <= args.t0 <= 1:
        raise SystemExit(f"error: --t0 must be in [0, 1], got {args.t0}")
    for name in ("num_samples", "num_steps", "batch_size", "devices"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise SystemExit(f"error: --{name} must be >= 1, got {value}")

    from utils.config import ConfigError
    from utils.data.dataset_io import DatasetError
    from utils.data.masks import MaskError
    from utils.generation.checkpoints import CheckpointError

    try:
        return run(args)
    except (CheckpointError, ConfigError, DatasetError, MaskError) as e:  # all raised before anything is written
        raise SystemExit(f"error: {e}") from None


def run(args) -> int:
    """Load, generate, write; bad inputs raise the errors ``main`` reports, before anything is written."""
    import torch

    from utils.data.masks import load_masks
    from utils.generation.classes import sample_classes
    from utils.generation.generate import default_batch_size, generate
    from utils.methods import load_module, resolve_checkpoint, sampling_overrides

    ckpt = resolve_checkpoint(args.checkpoint, args.which, args.config_path)
    devices = pick_devices(args.devices)
    module = load_module(ckpt, devices[0], args.overrides + sampling_overrides(args.num_steps, args.sampler))
    cfg = module.cfg
    steps, sampler = cfg.sampling_args.num_steps, cfg.sampling_args.sampler
    out_dir = Path(args.output_dir or cfg.run_dir / f"samples_{args.split}_{steps}steps")
    if args.export:
        from utils.generation.outputs import export_paths

        try:
            export_paths(args.export, args.overwrite)
        except (ValueError, FileExistsError) as e:
            raise SystemExit(f"error: {e}") from None
    elif out_dir.exists() and any(out_dir.iterdir()) and not args.overwrite:
        raise SystemExit(f"error: {out_dir} is not empty; pass --overwrite or choose another --output_dir")

    mask_path = args.masks or cfg.data_args.path
    source = load_masks(mask_path, args.split, cfg.data_args.num_classes, cfg.data_args.image_size,
                        resize=args.resize, spatial_dims=cfg.model_args.spatial_dims)
    n = args.num_samples or len(source.masks)
    pick = torch.arange(n) % len(source.masks)  # cycle through the masks
    masks = source.masks[pick]
    classes = sample_classes(module.class_names, source, pick, args.class_name, args.class_file)
    batch = args.batch_size or default_batch_size(devices[0], cfg.model_args.spatial_dims == 3)
    references, reference_record = reference_images(args, module, n)
    log.info("checkpoint %s: %d images from %s, %d %s steps, seed %d, batch %d on %s",
             ckpt, n, source.description, steps, sampler, args.seed, batch, ", ".join(devices))
    options = {"batch_invariant": args.batch_invariant, "references": references, "classes": classes,
               "t0": reference_record["t0"] if references is not None else 0.0,
               "feature_guidance": args.feature_guidance}
    if args.dry_run:
        return _dry_run(args, ckpt, module, masks, pick, source.description, batch, devices, out_dir, options)
    result = generate(module, masks, torch.arange(n), args.seed, steps, sampler, batch, devices, **options)

    from utils.files import sha256_file

    manifest = {
        "checkpoint": str(ckpt.resolve()), "checkpoint_sha256": sha256_file(ckpt), "config": module.hparams["config"],
        "num_samples": n, "num_inference_steps": steps, "method": cfg.method, "sampler": sampler,
        "seed": args.seed,
        "nfe_per_image": result.nfe, "seconds": round(result.seconds, 3),
        "seconds_per_image": round(result.seconds / n, 5), "device": devices, "batch_size": batch,
        "batch_invariant": args.batch_invariant, "mask_source": source.description,
        "split": None if args.masks else args.split,
        "ema": module.ema is not None, "reference": reference_record,
        "guidance_scale": cfg.sampling_args.guidance_scale,
    }
    if classes is not None:
        manifest["class_names"] = module.class_names
    ids = [source.ids[i] for i in pick.tolist()]
    if args.export:
        affines = None if source.grids is None else [source.grids[i].model_affine for i in pick.tolist()]
        target = _export(args, result.images, masks, ids, mask_path, manifest, classes, affines)
    else:
        from utils.generation.outputs import write_samples

        out_dir.mkdir(parents=True, exist_ok=True)
        grids = None if source.grids is None else [source.grids[i] for i in pick.tolist()]
        write_samples(out_dir, result.images, masks, ids, manifest, num_classes=cfg.data_args.num_classes,
                      png=args.png, pkl=args.format == "pkl", split=args.split, classes=classes, grids=grids)
        target = out_dir
    log.info("wrote %d images to %s (%.3f s/image, %d network evaluations each)", n, target,
             result.seconds / n, result.nfe)
    return 0


def _dry_run(args, ckpt: Path, module, masks, pick, source: str, batch: int, devices: list[str], out_dir: Path,
             options: dict) -> int:
    """Print what the run would do and write, timing one batch of its generation; write nothing."""
    from utils.generation.plan import describe_samples, estimate_generation, format_plan

    steps, sampler = module.cfg.sampling_args.num_steps, module.cfg.sampling_args.sampler
    estimate = estimate_generation(module, masks, args.seed, steps, sampler, batch, devices, **options)
    target = f"{Path(args.export).absolute()} and its .manifest.json (--export)" if args.export else \
        str(out_dir.absolute())
    print(format_plan({
        "checkpoint": str(ckpt.resolve()), "method": f"{module.cfg.method}, sampler {sampler}, {steps} steps",
        "samples": f"{describe_samples(pick, source)}, seed {args.seed}, batch {batch} on {', '.join(devices)}",
        "output": target, **estimate.lines()}))
    return 0


def reference_images(args, module, n: int):
    """(references (n, 1, H, W) in [-1, 1] or None, the manifest's record of them or None) for --reference."""
    if not args.reference:
        return None, None
    import torch

    from utils.generation.references import load_references

    if not module.supports_reference:
        raise SystemExit(f"error: --reference: method {module.cfg.method} has no reference-guided generation "
                         "(med_dt_fm has)")
    if args.feature_guidance and not any(module.cfg.med_dt_fm_args.lambdas):
        raise SystemExit("error: --feature_guidance needs a model trained with distillation (its "
                         "med_dt_fm_args.lambdas are all 0)")
    t0 = args.t0 if args.t0 is not None else module.default_t0
    refs = load_references(args.reference, args.split, module.cfg.data_args.image_size, resize=args.resize)
    pick = torch.arange(n) % len(refs.images)
    record = {"source": refs.description, "t0": t0, "sha256": refs.sha256,
              "ids": [refs.ids[i] for i in pick.tolist()], "feature_guidance": args.feature_guidance}
    log.info("reference-guided: %s, t0 %.3g", refs.description, t0)
    return refs.images[pick] * 2 - 1, record


def _export(args, images, masks, ids: list, mask_path, manifest: dict, classes, affines=None) -> Path:
    """Write the synthetic dataset; each sample's source is its mask's record (class, patient) or file, and its
    class the one it was generated with (class-conditional models); volumes keep their affine on the model's grid
    (``affines``)."""
    from utils.generation.outputs import export_dataset

    if all(isinstance(i, int) for i in ids):  # masks from a dataset split: carry class and patient over
        from utils.data.dataset_io import load_dataset

        records = load_dataset(mask_path)[args.split]
        sources = [_source(i, records[i]) for i in ids]
    else:
        sources = [{"source": i} for i in ids]
    if classes is not None:
        sources = [{**source, "class": int(c)} for source, c in zip(sources, classes)]
    return export_dataset(args.export, images, masks, sources, manifest, split=args.export_split,
                          overwrite=args.overwrite, affines=affines)


def _source(index: int, record: dict) -> dict:
    source = {"source": index}
    if "class" in record:
        source["class"] = record["class"]
    patient = record.get("metadata", {}).get("patient")
    if patient is not None:
        source["patient"] = patient
    return source


def cli() -> None:
    """The console script (pyproject.toml): Ctrl-C ends with one line and status 130."""
    run_command(main)


if __name__ == "__main__":
    cli()
