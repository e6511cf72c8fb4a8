"""The image class of each sample a class-conditional model generates: one for all, per mask from a file, or the
class of the dataset record whose mask is used."""

from __future__ import annotations

import csv
from pathlib import Path

import torch

from utils.data.masks import MaskError, MaskSource


def class_index(name: str, class_names: list[str], where: str) -> int:
    """The index of class ``name`` among the model's ``class_names``; a MaskError names ``where`` otherwise."""
    if name not in class_names:
        raise MaskError(f"{where}: unknown class {name!r}; the model's classes are {', '.join(class_names)}")
    return class_names.index(name)


def read_class_file(path: str | Path, class_names: list[str]) -> dict[str, int]:
    """A CSV of ``mask,class`` rows (a header row ``mask,class`` is allowed): each mask's id (a file name in the
    masks folder, or an index in the split) and its class name. Returns {mask id: class index}."""
    path = Path(path)
    if not path.is_file():
        raise MaskError(f"{path}: class file not found")
    try:
        with open(path, newline="", encoding="utf-8") as f:
            rows = [r for r in csv.reader(f) if r and any(cell.strip() for cell in r)]
    except (UnicodeDecodeError, csv.Error) as e:
        raise MaskError(f"{path}: not a text CSV of mask,class rows ({type(e).__name__}: {e})") from None
    if rows and [c.strip() for c in rows[0]] == ["mask", "class"]:
        rows = rows[1:]
    out = {}
    for line, row in enumerate(rows, 1):
        if len(row) != 2:
            raise MaskError(f"{path}: row {line} has {len(row)} fields, expected 2 (mask,class)")
        out[row[0].strip()] = class_index(row[1].strip(), class_names, f"{path}: row {line}")
    return out


def sample_classes(class_names: list[str], source: MaskSource, pick: torch.Tensor, class_name: str | None = None,
                   class_file: str | None = None) -> torch.Tensor | None:
    """(N,) int64 class per generated sample (sample k uses mask ``pick[k]`` of ``source``), or None for a model
    that is not class-conditional (empty ``class_names``).

    ``class_name`` gives every sample that class; ``class_file`` one per mask (:func:`read_class_file`);
    otherwise the classes of the dataset records the masks come from.
    """
    if not class_names:
        if class_name is not None or class_file is not None:
            raise MaskError("--class / --class_file: this model is not class-conditional")
        return None
    if class_name is not None and class_file is not None:
        raise MaskError("give --class or --class_file, not both")
    if class_name is not None:
        return torch.full((len(pick),), class_index(class_name, class_names, "--class"), dtype=torch.int64)
    if class_file is not None:
        by_id = read_class_file(class_file, class_names)
        missing = [str(source.ids[i]) for i in pick.tolist() if str(source.ids[i]) not in by_id]
        if missing:
            raise MaskError(f"{class_file}: no class for mask {missing[0]} ({len(set(missing))} masks without one)")
        return torch.tensor([by_id[str(source.ids[i])] for i in pick.tolist()], dtype=torch.int64)
    classes = source.classes
    if classes is None or any(classes[i] is None for i in pick.tolist()):
        raise MaskError(f"{source.description}: the masks have no class and this model is conditioned on the image "
                        f"class ({', '.join(class_names)}): give --class NAME or --class_file FILE")
    out = torch.tensor([int(classes[i]) for i in pick.tolist()], dtype=torch.int64)
    bad = out[(out < 0) | (out >= len(class_names))]
    if len(bad):
        raise MaskError(f"{source.description}: class {int(bad[0])} outside the model's classes "
                        f"0..{len(class_names) - 1}")
    return out
