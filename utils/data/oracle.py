"""The phantoms' oracle: a second, independent real image of a mask, what a perfect sampler would make.

The synthetic phantoms know their conditional distribution: :func:`utils.data.synthetic_echo.render_patient` and
:func:`utils.data.synthetic_brain.render_brain` with ``redraw=k`` render a patient again with new texture,
speckle and noise and the very same masks. For records of a built-in phantom (patient ids ``synthNNNN`` /
``brainNNNN`` in their metadata, built with ``data_args.synthetic``'s size and seed) :func:`oracle_images`
re-renders each record's patient; it first checks that the plain render reproduces the record's mask bit for
bit, so data that merely look like the phantom never get an oracle.
"""

from __future__ import annotations

import re

import numpy as np


class OracleUnavailable(ValueError):
    """The records are not (all) from a built-in phantom with these settings; the message says why."""


_PATIENT = re.compile(r"^(synth|brain)(\d{4,})$")


def oracle_images(records: list[dict], synthetic: dict | None, redraw: int) -> np.ndarray:
    """uint8 ``[N, 1, H, W]`` (or ``[N, 1, D, H, W]``): for each record, its patient re-rendered with appearance
    stream ``redraw`` (>= 0); the masks are the records' own. ``synthetic``: ``data_args.synthetic``
    (``size``, ``seed``). Raises :class:`OracleUnavailable` when the records are not this phantom's."""
    if not synthetic:
        raise OracleUnavailable("the data are not a built-in phantom (the config has no data_args.synthetic)")
    size, seed = int(synthetic["size"]), int(synthetic["seed"])
    renders: dict[tuple, dict] = {}  # (kind, patient, stream) -> its frames
    images = []
    for i, record in enumerate(records):
        kind, index = _patient(record, i)
        for stream in (None, redraw):
            if (kind, index, stream) not in renders:
                renders[kind, index, stream] = _render(kind, size, seed, index, stream)
        key = _frame_key(kind, record)
        truth, oracle = renders[kind, index, None].get(key), renders[kind, index, redraw].get(key)
        mask = np.asarray(record["mask"])
        if truth is None or truth[1].shape != mask.shape or not np.array_equal(truth[1], mask):
            raise OracleUnavailable(f"record {i} ({record['metadata'].get('patient')}) is not the phantom's "
                                    f"patient at size {size}, seed {seed}: its mask differs from the render")
        if not np.array_equal(oracle[1], mask):  # the renderers promise this; a broken promise is a bug
            raise AssertionError(f"record {i}: the redrawn mask differs from the phantom's")
        images.append(oracle[0])
    return np.stack(images)


def _patient(record: dict, i: int) -> tuple[str, int]:
    match = _PATIENT.match(str(record.get("metadata", {}).get("patient", "")))
    if not match:
        raise OracleUnavailable(f"record {i} has no phantom patient id (metadata.patient synthNNNN or brainNNNN)")
    return match.group(1), int(match.group(2)) - 1


def _frame_key(kind: str, record: dict):
    meta = record["metadata"]
    return (meta.get("view"), meta.get("phase")) if kind == "synth" else None


def _render(kind: str, size: int, seed: int, index: int, redraw: int | None) -> dict:
    """{frame key: (image [1, ...], mask [1, ...])} of one patient."""
    if kind == "synth":
        from utils.data.synthetic_echo import render_patient

        return {(view, phase): (image[None], mask[None])
                for view, phase, image, mask in render_patient(size, seed, index, redraw)}
    from utils.data.synthetic_brain import render_brain

    image, mask, _ = render_brain(size, seed, index, redraw)
    return {None: (image[None], mask[None])}
