"""The names every dataset reader shares: the splits, and the error a bad dataset raises."""

SPLITS = ("train", "valid", "test")


class DatasetError(ValueError):
    """A dataset file that cannot be used; the message names the file and the record."""
