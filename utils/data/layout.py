"""The names every dataset reader shares: the splits, the echo image classes, the phantoms' redraw stream, the error
a bad dataset raises, and the check that a mask holds integer labels."""

import numpy as np

SPLITS = ("train", "valid", "test")
# The image class of an echo record (CAMUS and the synthetic phantom): view x phase, as MOTFM's CAMUS setting.
VIEW_PHASE_CLASSES = ("2CH_ED", "2CH_ES", "4CH_ED", "4CH_ES")
# The synthetic phantoms redraw a patient's appearance (the evaluation's oracle) from default_rng([seed, patient,
# REDRAW_STREAM + k]): a stream no patient's own default_rng([seed, patient]) can be.
REDRAW_STREAM = 1_000_003


def view_phase_class(view: str, phase: str) -> int:
    """The class index of a view ("2CH"/"4CH") and phase ("ED"/"ES"): its place in VIEW_PHASE_CLASSES."""
    return VIEW_PHASE_CLASSES.index(f"{view}_{phase}")


class DatasetError(ValueError):
    """A dataset file that cannot be used; the message names the file and the record."""


def as_labels(mask: np.ndarray, where: str) -> np.ndarray:
    """Integer-valued masks as ``uint8`` labels when they fit (else unchanged, for validation to judge); a float
    mask must hold whole numbers, or it is a :class:`DatasetError` naming ``where``."""
    if mask.dtype.kind == "f":
        bad = ~np.isfinite(mask) | (mask != np.round(mask))
        if bad.any():
            raise DatasetError(
                f"{where}: mask holds the non-integer value {float(mask[bad].flat[0]):g}; masks must hold "
                "integer labels (0, 1, 2, ...), not labels rescaled to [0, 1]"
            )
    if mask.dtype.kind in "biuf" and mask.size and mask.min() >= 0 and mask.max() <= 255:
        return mask.astype(np.uint8, copy=False)
    return mask
