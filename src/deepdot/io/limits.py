"""Size limits that keep a small hostile file from exhausting memory.

A 200 KB compressed ``.npz`` can declare a 2 GB array, a chunked HDF5 data set can expand a
hundredfold, and a tiny PNG can decode to 20 000 × 20 000 pixels. Every reader checks the size a
file *declares* (array headers, data set shapes, image sizes, archive member sizes) against these
limits before it reads anything, and refuses with one line that says how to raise the limit.

The limits are read from the environment on every check, so a user (or a test) can raise them
without touching code:

=============================  =====================================  =========================
variable                       what it bounds                          default
=============================  =====================================  =========================
``DEEPDOT_MAX_DATA_MB``        one data set's decoded arrays           2048 (2 GiB)
``DEEPDOT_MAX_IMAGE_PIXELS``   one image file's width × height         16 777 216 (4096 × 4096)
``DEEPDOT_MAX_MODEL_MB``       a model archive's unpacked contents     4096 (4 GiB)
=============================  =====================================  =========================
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from deepdot.errors import DeepdotError

MB = 1 << 20


@dataclass(frozen=True)
class Limit:
    """One size limit: its environment variable, default, and the unit it is given in."""

    variable: str
    default: int
    unit: str  # "MB" (value given in MiB, compared in bytes) or "pixels"

    def value(self) -> int:
        """The limit in bytes (``MB`` limits) or pixels, from the environment or the default."""
        text = os.environ.get(self.variable, "").strip()
        try:
            given = int(float(text)) if text else self.default
        except ValueError:
            raise DeepdotError(f"{self.variable}={text!r}: expected a whole number of {self.unit}") from None
        if given <= 0:
            raise DeepdotError(f"{self.variable}={text!r}: must be positive")
        return given * MB if self.unit == "MB" else given

    def check(self, amount: int, what: str, error: type[DeepdotError] = DeepdotError) -> None:
        """Raise ``error`` when ``amount`` (bytes or pixels) exceeds the limit."""
        limit = self.value()
        if amount > limit:
            shown = f"{amount / MB:,.0f} MB" if self.unit == "MB" else f"{amount:,} pixels"
            cap = f"{limit // MB:,} MB" if self.unit == "MB" else f"{limit:,} pixels"
            raise error(
                f"{what} would take {shown}, over the limit of {cap}; if you trust the file, raise {self.variable}"
            )


DATA_BYTES = Limit("DEEPDOT_MAX_DATA_MB", 2048, "MB")  # GTSRB's test set decodes to 155 MB
IMAGE_PIXELS = Limit("DEEPDOT_MAX_IMAGE_PIXELS", 4096 * 4096, "pixels")
MODEL_BYTES = Limit("DEEPDOT_MAX_MODEL_MB", 4096, "MB")


class Budget:
    """A running total of bytes read from one file, bounded by a :class:`Limit` (the importers
    count each weight before allocating it)."""

    def __init__(self, path: object, limit: Limit, what: str, error: type[DeepdotError]) -> None:
        self.path, self.limit, self.what, self.error = path, limit, what, error
        self.total = 0

    def take(self, nbytes: int) -> None:
        """Count ``nbytes`` more, before they are allocated; ``error`` past the limit."""
        self.total += nbytes
        self.limit.check(self.total, f"{self.path}: {self.what}", self.error)


def weights_budget(path: object) -> Budget:
    """The bytes of weights a model importer reads from ``path``, bounded by :data:`MODEL_BYTES`."""
    from deepdot.errors import ModelError

    return Budget(path, MODEL_BYTES, "weights", ModelError)
