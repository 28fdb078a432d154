"""Pictures a scan leaves behind: ``label_<k>_mask.png``, ``_pattern.png``, ``_fusion.png``.

The scan's data (``scan.json``, the exact triggers) is written by :func:`deepdot.io.scans.save_scan`;
:func:`write_scan` writes both.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from deepdot.io.files import ensure_dir, save_png
from deepdot.io.scans import save_scan
from deepdot.results import LabelTrigger, ScanResult


def write_label_images(out: Path, item: LabelTrigger) -> None:
    """``label_<k>_mask.png`` (grey), ``_pattern.png`` and ``_fusion.png`` (mask × pattern), as the
    reference code saves them."""
    t = item.trigger
    save_png(out / f"label_{item.label}_mask.png", t.mask)
    save_png(out / f"label_{item.label}_pattern.png", t.pattern)
    save_png(out / f"label_{item.label}_fusion.png", t.pattern * t.mask.unsqueeze(0))


def write_scan(out: Path, result: ScanResult, extra: dict[str, Any] | None = None) -> Path:
    """Write the scan's data (:func:`~deepdot.io.scans.save_scan`) and every label's pictures;
    returns the ``scan.json`` path."""
    ensure_dir(out)
    json_path = save_scan(out, result, extra)
    for item in result.labels:
        write_label_images(out, item)
    return json_path
