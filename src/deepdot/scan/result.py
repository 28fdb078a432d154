"""The scan's result types; they live in :mod:`deepdot.results` (below every algorithm)."""

from deepdot.results import LabelTrigger, ScanResult

__all__ = ["LabelTrigger", "ScanResult"]
