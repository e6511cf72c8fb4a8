"""The names every dataset reader shares: the splits, the echo image classes, and the error a bad dataset raises."""

SPLITS = ("train", "valid", "test")
# The image class of an echo record (CAMUS and the synthetic phantom): view x phase, as MOTFM's CAMUS setting.
VIEW_PHASE_CLASSES = ("2CH_ED", "2CH_ES", "4CH_ED", "4CH_ES")


def view_phase_class(view: str, phase: str) -> int:
    """The class index of a view ("2CH"/"4CH") and phase ("ED"/"ES"): its place in VIEW_PHASE_CLASSES."""
    return VIEW_PHASE_CLASSES.index(f"{view}_{phase}")


class DatasetError(ValueError):
    """A dataset file that cannot be used; the message names the file and the record."""
