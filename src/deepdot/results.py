"""The values stages hand each other: a backdoor, a scan's per-label triggers and its outlier
statistics. Plain frozen data with ``to_dict``/``from_dict``, below every algorithm, so that the
file formats (``deepdot.io``) and reports can read and write them without importing a scanner.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from deepdot.errors import DeepdotError
from deepdot.triggers import Trigger

#: anomaly index above which a label is flagged (Neural Cleanse: 2)
DEFAULT_THRESHOLD = 2.0


@dataclass(frozen=True)
class Backdoor:
    """A trigger and the label it sends images to: recovered by a scan (what a defence works
    from) or planted by an attacker (to measure a defence, never to build it).

    ``target`` may be :data:`deepdot.metrics.ALL_TO_ALL` for a planted all-to-all backdoor.
    """

    target: int
    trigger: Trigger


@dataclass(frozen=True)
class OutlierStats:
    """Result of the MAD outlier test over per-label mask L1 norms.

    Attributes:
        median: median of the norms.
        mad: consistency-scaled median absolute deviation (or its fallback, see :func:`mad`).
        anomaly_index: ``|min(norms) - median| / mad``, the model's score (> 2: infected).
        indices: per-label anomaly index, in the order of ``labels``.
        flagged: labels below the median with an index above the threshold, most anomalous first.
        labels: the labels the norms belong to.
    """

    median: float
    mad: float
    anomaly_index: float
    indices: tuple[float, ...]
    flagged: tuple[int, ...]
    labels: tuple[int, ...]
    threshold: float = DEFAULT_THRESHOLD

    def to_dict(self) -> dict:
        return {
            "median": self.median,
            "mad": self.mad,
            "anomaly_index": self.anomaly_index,
            "flagged": list(self.flagged),
            "threshold": self.threshold,
        }


@dataclass(frozen=True)
class LabelTrigger:
    """The smallest trigger found that sends clean images to ``label``.

    Attributes:
        label: candidate target label.
        trigger: recovered mask (H×W) and pattern (C×H×W).
        mask_l1: L1 norm of the mask (its size in pixels): small means suspicious.
        attack_success_rate: share of the scan's clean images the trigger sends to ``label``
            (measured in the step that produced the kept mask).
        reached_threshold: whether any step reached the success threshold (if not, the last
            mask is kept and its L1 is an upper bound, not a minimum).
        steps: optimisation steps run; image_passes: images pushed through the model
            (forward + backward); seconds: wall time; cpu_seconds: processor time of the
            scanning process (all its threads). On a shared machine the processor time of a
            one-thread scan is the steadier measure of its cost (it does not grow while other
            jobs hold the cores).
    """

    label: int
    trigger: Trigger
    mask_l1: float
    attack_success_rate: float
    reached_threshold: bool
    steps: int
    image_passes: int
    seconds: float
    cpu_seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "mask_l1": self.mask_l1,
            "attack_success_rate": self.attack_success_rate,
            "reached_threshold": self.reached_threshold,
            "steps": self.steps,
            "image_passes": self.image_passes,
            "seconds": round(self.seconds, 3),
            "cpu_seconds": round(self.cpu_seconds, 3),
        }


@dataclass(frozen=True)
class ScanResult:
    """Outcome of scanning a model: a trigger per label and the outlier test over their sizes."""

    labels: tuple[LabelTrigger, ...]
    outliers: OutlierStats
    clean_accuracy: float
    seconds: float
    image_passes: int
    mode: str
    settings: dict[str, Any] = field(default_factory=dict)
    cpu_seconds: float = 0.0
    #: why the verdict may be shaky (e.g. few clean images); empty when there is nothing to say
    warnings: tuple[str, ...] = ()

    @property
    def infected(self) -> bool:
        return bool(self.outliers.flagged)

    @property
    def flagged(self) -> tuple[int, ...]:
        return self.outliers.flagged

    def trigger_for(self, label: int) -> Trigger:
        for item in self.labels:
            if item.label == label:
                return item.trigger
        raise KeyError(f"label {label} was not scanned")

    def to_dict(self) -> dict[str, Any]:
        by_label = dict(zip(self.outliers.labels, self.outliers.indices, strict=True))
        return {
            "mode": self.mode,
            "infected": self.infected,
            "flagged": list(self.flagged),
            **self.outliers.to_dict(),
            "clean_accuracy": self.clean_accuracy,
            "seconds": round(self.seconds, 3),
            "cpu_seconds": round(self.cpu_seconds, 3),
            "image_passes": self.image_passes,
            "labels": [{**t.to_dict(), "anomaly_index": by_label[t.label]} for t in self.labels],
            "settings": self.settings,
            "warnings": list(self.warnings),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], triggers: Mapping[int, Trigger]) -> ScanResult:
        """The result :meth:`to_dict` described, with each label's trigger from ``triggers``.

        Raises:
            DeepdotError: ``data`` is not a scan's dictionary, or a label has no trigger.
        """
        try:
            entries = list(data["labels"])
            labels = tuple(
                LabelTrigger(
                    label=_whole(e["label"]),
                    trigger=triggers[_whole(e["label"])],
                    mask_l1=float(e["mask_l1"]),
                    attack_success_rate=float(e["attack_success_rate"]),
                    reached_threshold=bool(e["reached_threshold"]),
                    steps=int(e["steps"]),
                    image_passes=int(e["image_passes"]),
                    seconds=float(e.get("seconds", 0.0)),
                    cpu_seconds=float(e.get("cpu_seconds", 0.0)),
                )
                for e in entries
            )
            index = {int(e["label"]): float(e["anomaly_index"]) for e in entries}
            order = tuple(sorted(index))
            outliers = OutlierStats(
                median=float(data["median"]),
                mad=float(data["mad"]),
                anomaly_index=float(data["anomaly_index"]),
                indices=tuple(index[v] for v in order),
                flagged=tuple(_whole(v) for v in data["flagged"]),
                labels=order,
                threshold=float(data.get("threshold", DEFAULT_THRESHOLD)),
            )
            settings = data.get("settings") or {}
            return cls(
                labels=labels,
                outliers=outliers,
                clean_accuracy=float(data["clean_accuracy"]),
                seconds=float(data.get("seconds", 0.0)),
                image_passes=int(data["image_passes"]),
                mode=str(data["mode"]),
                settings=dict(settings),
                cpu_seconds=float(data.get("cpu_seconds", 0.0)),
                warnings=tuple(str(w) for w in data.get("warnings", ())),
            )
        except KeyError as exc:
            raise DeepdotError(f"not a complete scan result: {exc.args[0]!r} is missing") from exc
        except (TypeError, ValueError, AttributeError) as exc:
            raise DeepdotError(f"not a scan result ({exc})") from exc


def _whole(value: Any) -> int:
    """A label read from JSON: a whole number, not 7.5 or "7"."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"labels are whole numbers, got {value!r}")
    return value
