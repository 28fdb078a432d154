"""A scan result on disk: ``scan.json`` (figures) and ``triggers.safetensors`` (every label's
mask and pattern, float32, exact).

``deepdot scan`` writes both (and pictures beside them, see :mod:`deepdot.report.artifacts`);
``deepdot mitigate --scan DIR`` reads them back as the :class:`~deepdot.results.ScanResult` the
scan produced, so a repair works from the triggers the scan found, not from 8-bit pictures of
them. A folder written before ``triggers.safetensors`` existed still loads: its triggers are
read from ``label_<k>_mask.png`` / ``_pattern.png`` and the result says so in its warnings.
"""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from deepdot.errors import DeepdotError
from deepdot.io.files import read_json, replacing, write_json
from deepdot.io.limits import MODEL_BYTES
from deepdot.results import DEFAULT_THRESHOLD, Backdoor, OutlierStats, ScanResult
from deepdot.triggers import Trigger

SCAN_JSON = "scan.json"
TRIGGERS = "triggers.safetensors"
PNG_NOTE = (
    "the triggers are 8-bit copies read from the scan's PNG pictures (the scan folder predates "
    "triggers.safetensors); rescan for the exact ones"
)


def save_scan(out: Path, result: ScanResult, extra: dict[str, Any] | None = None) -> Path:
    """Write ``triggers.safetensors`` and ``scan.json`` (``result.to_dict()`` plus ``extra``) into
    the folder ``out``; returns the JSON path. Both are written atomically, triggers first."""
    from safetensors.torch import save_file

    tensors = {}
    for item in result.labels:
        tensors[f"label_{item.label}.mask"] = item.trigger.mask.detach().cpu().float().contiguous()
        tensors[f"label_{item.label}.pattern"] = item.trigger.pattern.detach().cpu().float().contiguous()
    path = out / TRIGGERS
    try:
        with replacing(path) as tmp:
            save_file(tensors, str(tmp), metadata={"format": "deepdot-scan-triggers", "version": "1"})
    except OSError as exc:
        raise DeepdotError(f"{path}: cannot write ({exc.strerror or exc})") from exc
    return write_json(out / SCAN_JSON, {**result.to_dict(), **(extra or {})})


def scan_json_path(scan: str | Path) -> Path:
    """``scan.json`` given as the file or the scan's output folder."""
    p = Path(scan).expanduser()
    path = p / SCAN_JSON if p.is_dir() else p
    if not path.is_file():
        raise DeepdotError(
            f"{path}: no such file (give the scan's scan.json or its folder, as written by `deepdot scan`)"
        )
    return path


def load_scan(scan: str | Path, image_shape: tuple[int, int, int] | None = None) -> ScanResult:
    """The :class:`ScanResult` saved in a scan folder (or given its ``scan.json``).

    Args:
        scan: the folder ``deepdot scan`` wrote, or its ``scan.json``.
        image_shape: (C, H, W) the triggers must fit (checked when given; needed to read the
            pattern PNGs of an old folder, which do not say whether they are grey or colour).

    Raises:
        DeepdotError: one line naming the file and what is wrong with it.
    """
    path = scan_json_path(scan)
    info = read_json(path)
    if not isinstance(info, dict) or not isinstance(info.get("labels", []), list):
        raise DeepdotError(f"{path}: not a deepdot scan.json")
    exact = path.parent / TRIGGERS
    if exact.is_file():
        triggers, notes = _read_triggers(exact), ()
    else:
        triggers, notes = _read_pictures(path, info, image_shape), (PNG_NOTE,)
    if image_shape is not None:
        for label, t in triggers.items():
            if tuple(t.pattern.shape) != tuple(image_shape):
                raise DeepdotError(
                    f"{exact if not notes else path.parent}: label {label}'s trigger is "
                    f"{tuple(t.pattern.shape)} but the images are {tuple(image_shape)}"
                )
    data = info if info.get("labels") else _minimal(info, triggers)
    try:
        result = ScanResult.from_dict(data, triggers)
    except DeepdotError as exc:
        raise DeepdotError(f"{path}: {exc}") from exc
    return replace(result, warnings=(*result.warnings, *notes)) if notes else result


def select_recovered(result: ScanResult, labels: list[int] | None = None) -> tuple[list[int], list[Backdoor]]:
    """The labels to mitigate (``labels``, else the scan's flagged ones) and their recovered
    backdoors.

    Raises:
        DeepdotError: nothing to mitigate, or a label the scan has no trigger for.
    """
    chosen = list(result.flagged) if labels is None else list(labels)
    if not chosen:
        raise DeepdotError("the scan flagged no label, so there is nothing to mitigate (name labels with --labels)")
    have = {t.label for t in result.labels}
    missing = [k for k in chosen if k not in have]
    if missing:
        raise DeepdotError(f"the scan has no recovered trigger for label(s) {', '.join(map(str, missing))}")
    return chosen, [Backdoor(k, result.trigger_for(k)) for k in chosen]


def load_recovered(
    scan: str | Path, image_shape: tuple[int, int, int], labels: list[int] | None = None
) -> tuple[list[int], list[Backdoor]]:
    """:func:`select_recovered` of the scan saved in ``scan`` (see :func:`load_scan`)."""
    try:
        return select_recovered(load_scan(scan, image_shape), labels)
    except DeepdotError as exc:
        raise DeepdotError(f"{scan_json_path(scan)}: {exc}") from exc


def _read_triggers(path: Path) -> dict[int, Trigger]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        MODEL_BYTES.check(path.stat().st_size, f"{path}: the triggers", DeepdotError)
        tensors = load_file(str(path))
    except DeepdotError:
        raise
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise DeepdotError(f"{path}: corrupt or truncated triggers file ({exc})") from exc
    found: dict[int, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        name, _, part = key.partition(".")
        if not name.startswith("label_") or not name[6:].isdigit() or part not in ("mask", "pattern"):
            raise DeepdotError(f"{path}: unexpected entry {key!r} (a scan's triggers are label_<k>.mask/.pattern)")
        found.setdefault(int(name[6:]), {})[part] = tensor
    triggers = {}
    for label, parts in found.items():
        if set(parts) != {"mask", "pattern"}:
            raise DeepdotError(f"{path}: label {label} lacks its {'pattern' if 'mask' in parts else 'mask'}")
        try:
            triggers[label] = Trigger(parts["mask"].float(), parts["pattern"].float())
        except DeepdotError as exc:
            raise DeepdotError(f"{path}: label {label}: {exc}") from exc
    return triggers


def _read_pictures(path: Path, info: dict[str, Any], image_shape: tuple[int, int, int] | None) -> dict[int, Trigger]:
    """Triggers from ``label_<k>_mask.png`` / ``_pattern.png`` of the labels that have them."""
    from deepdot.io.files import load_trigger

    labels = [int(e["label"]) for e in info.get("labels", []) if isinstance(e, dict) and "label" in e]
    labels += [int(v) for v in info.get("flagged", []) if isinstance(v, int)]
    triggers = {}
    for label in sorted(set(labels)):
        mask = path.parent / f"label_{label}_mask.png"
        if mask.is_file():
            triggers[label] = load_trigger(mask, image_shape)
    return triggers


def _minimal(info: dict[str, Any], triggers: dict[int, Trigger]) -> dict[str, Any]:
    """A scan.json that records only its verdict (``flagged``), completed from the triggers."""
    flagged = info.get("flagged")
    if not isinstance(flagged, list):
        raise DeepdotError("not a deepdot scan.json (no 'flagged' list)")
    entries = [
        {"label": k, "mask_l1": t.mask_l1, "attack_success_rate": math.nan, "reached_threshold": True, "steps": 0,
         "image_passes": 0, "anomaly_index": math.nan}
        for k, t in sorted(triggers.items())
    ]  # fmt: skip
    stats = OutlierStats(math.nan, math.nan, math.nan, (), tuple(flagged), (), DEFAULT_THRESHOLD).to_dict()
    return {**stats, "mode": info.get("mode", "unknown"), "clean_accuracy": math.nan, "image_passes": 0,
            "labels": entries, **{k: v for k, v in info.items() if k != "labels"}}  # fmt: skip
