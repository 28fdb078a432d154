"""Progress reporting without printing: algorithms call a callback, the CLI draws the bars."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class ProgressEvent:
    """``done`` of ``total`` units of ``stage`` are finished; ``info`` carries live figures."""

    stage: str
    done: int
    total: int
    info: dict[str, Any] = field(default_factory=dict)


ProgressFn = Callable[[ProgressEvent], None]


def no_progress(_event: ProgressEvent) -> None:
    """The default callback: ignore progress."""
