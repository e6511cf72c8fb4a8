"""Import a MOTFM run: its Lightning checkpoint and YAML become a COMET checkpoint and config.

Example:
    python -m utils.motfm import --checkpoint MOTFM.ckpt --config MOTFM.yaml --output_dir checkpoints/motfm_camus
    python inferer.py --checkpoint checkpoints/motfm_camus/imported.ckpt --num_samples 64

Writes ``OUTPUT/imported.ckpt`` (read it with ``--checkpoint``: ``trainer.py`` never resumes from it) and
``OUTPUT/config.yaml`` (the translated config, which also trains a new model). The imported network samples as
MOTFM trained it: time floored to floor(t * 999) (``--continuous_time`` to drop that) and images min-max
normalised by the training split's extremes, read from the data (``data_args.pickle_path``) or given as
``--image_range LO HI`` in [0, 1] (uint8 / 255). Class names, in class order 0..K-1: ``--class_names``, else
the data's, else 0..K-1 (MOTFM's ``data_args.class_values`` orders its one-hot input; the import reorders it).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from utils.cli import add_renamed, configure_logging, docstring_parser

log = logging.getLogger("comet.motfm")
CHECKPOINT = "imported.ckpt"


def build_parser() -> argparse.ArgumentParser:
    p = docstring_parser(__doc__, prog="python -m utils.motfm")
    sub = p.add_subparsers(dest="command", required=True)
    i = sub.add_parser("import", help="convert a MOTFM checkpoint and YAML")
    i.add_argument("--checkpoint", required=True, help="MOTFM's .ckpt (Lightning)")
    i.add_argument("--config", required=True, help="the MOTFM YAML it was trained with")
    add_renamed(i, "--output_dir", "--output", required=True,
                help="run directory to write imported.ckpt and config.yaml into")
    i.add_argument("--num_labels", type=int, default=4, help="mask labels incl. background (default: %(default)s)")
    i.add_argument("--image_size", type=int, default=256, help="H = W of the images (default: %(default)s)")
    i.add_argument("--image_range", type=float, nargs=2, metavar=("LO", "HI"),
                   help="the training split's min and max in [0, 1] (default: read from the data)")
    i.add_argument("--class_names", nargs="+", help="class names in index order (default: see above)")
    i.add_argument("--continuous_time", action="store_true", help="t * 999 as a float instead of MOTFM's floor")
    i.add_argument("--overwrite", action="store_true", help="replace an existing imported.ckpt")
    return p


def data_facts(config: dict, image_range, class_names,
               num_labels: int) -> tuple[tuple[float, float], list[str] | None]:
    """The image range and class names, from the flags, MOTFM's YAML or its training split, whose masks must have
    ``num_labels`` labels when the data is here."""
    data = config.get("data_args") or {}
    from utils.motfm.convert import MotfmError

    path, split = Path(str(data.get("pickle_path", ""))), data.get("split_train", "train")
    if not path.exists():
        if image_range is not None and (class_names or not config.get("model_args", {}).get("with_conditioning")):
            log.warning("%s: MOTFM's data_args.pickle_path is not here, so --num_labels %d is not checked against "
                        "its masks", path, num_labels)
            return tuple(image_range), class_names
        raise MotfmError(f"{path}: MOTFM's data_args.pickle_path is not here; give --image_range LO HI (and "
                         "--class_names for a class-conditional model)")
    import numpy as np

    from utils.data.datamodule import class_names as data_class_names
    from utils.data.dataset_io import load_dataset, normalise_image

    records = load_dataset(path).get(split) or []
    if not records:
        raise MotfmError(f"{path}: has no '{split}' split (MOTFM's data_args.split_train)")
    highest = max(int(np.max(r["mask"])) for r in records)
    if highest + 1 != num_labels:
        raise MotfmError(f"{path}: the masks of split '{split}' have labels 0..{highest}, which MOTFM scaled by "
                         f"1/{highest} for its ControlNet; --num_labels is {num_labels} (give --num_labels "
                         f"{highest + 1})")
    if image_range is None:
        values = [normalise_image(r["image"]) for r in records]
        image_range = (float(min(v.min() for v in values)), float(max(v.max() for v in values)))
        image_range = tuple(float(np.float32(x)) for x in image_range)
    if class_names is None and all("class" in r for r in records):
        class_names = data_class_names({split: records}, path)
    return tuple(image_range), class_names


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging()
    import torch

    from utils.config import ConfigError, dump_config, read_yaml_mapping
    from utils.data.layout import DatasetError
    from utils.methods import config_from_dict
    from utils.motfm.convert import MotfmError, import_run

    out = Path(args.output_dir)
    if (out / CHECKPOINT).exists() and not args.overwrite:
        raise SystemExit(f"error: {out / CHECKPOINT} exists; pass --overwrite")
    try:
        motfm = read_yaml_mapping(args.config)
        image_range, class_names = data_facts(motfm, args.image_range, args.class_names, args.num_labels)
        if not 0.0 <= image_range[0] < image_range[1] <= 1.0:
            raise MotfmError(f"--image_range must satisfy 0 <= LO < HI <= 1, got {list(image_range)}")
        ckpt, values = import_run(args.checkpoint, motfm, out, args.num_labels, args.image_size, image_range,
                                  class_names, not args.continuous_time, args.config)
    except (ConfigError, DatasetError, MotfmError) as e:
        raise SystemExit(f"error: {e}") from None
    out.mkdir(parents=True, exist_ok=True)
    torch.save(ckpt, out / CHECKPOINT)
    dump_config(config_from_dict(values, args.config), out / "config.yaml")
    log.info("imported %s (%s, %s) -> %s; image range %s, time %s", args.checkpoint,
             values["conditioning_args"]["mode"], ", ".join(class_names or []) or "no classes", out / CHECKPOINT,
             list(image_range),
             "continuous" if args.continuous_time else "floored")
    return 0


if __name__ == "__main__":
    sys.exit(main())
