"""Measured launch configurations per GPU (filled in by `python -m ffa.tuner`)."""


def load_table(device):
    """The tuned table for `device` (an object with .lookup(...)), or None without a cache."""
    return None
