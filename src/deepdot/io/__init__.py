"""Everything that reads or writes files: data sets, models, triggers, images, results."""

from deepdot.io.data import builtin_digits, load_data

__all__ = ["builtin_digits", "load_data"]
