"""Console output: tables and verdicts (rich), and a progress callback drawing bars."""

from __future__ import annotations

import time
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table
from rich.text import Text

from deepdot.mitigate.pipeline import RepairReport
from deepdot.progress import ProgressEvent
from deepdot.results import ScanResult


class ProgressBars:
    """A :data:`~deepdot.progress.ProgressFn` that shows one bar per stage (train, label, step).

    Use as a context manager; call the instance with events. With ``enabled=False`` (output is
    not a terminal, e.g. a log file) no bars are drawn; instead a plain line per stage is printed
    at most every ``interval`` seconds, and when a stage other than the inner ``step`` loop
    completes, so a long run in a log still shows it is moving.
    """

    LABELS = {"train": "training", "label": "labels", "step": "steps", "scan": "scan"}

    def __init__(self, console: Console, enabled: bool = True, interval: float = 30.0) -> None:
        self.console = console
        self.plain = not enabled
        self.interval = interval
        self._printed: dict[str, float] = {}
        self.progress = Progress(
            TextColumn("{task.description:<10}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=console,
            disable=not enabled,
            transient=False,
        )
        self.tasks: dict[str, Any] = {}

    def __enter__(self) -> ProgressBars:
        self.progress.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.__exit__(*exc)

    def __call__(self, event: ProgressEvent) -> None:
        items = [(k, v) for k, v in event.info.items() if k != "epochs"]
        if self.plain:  # one short line: per-label lists (the fast scan's) stay out of logs
            self._line(event, " ".join(f"{k} {_fmt(v)}" for k, v in items if isinstance(v, int | float | str)))
            return
        info = " ".join(f"{k} {_fmt(v)}" for k, v in items)
        if event.stage not in self.tasks:
            self.tasks[event.stage] = self.progress.add_task(
                self.LABELS.get(event.stage, event.stage), total=event.total, info=""
            )
        task = self.tasks[event.stage]
        self.progress.update(task, completed=event.done, total=event.total, info=info)

    def _line(self, event: ProgressEvent, info: str) -> None:
        now = time.monotonic()
        finished = event.done >= event.total and event.stage != "step"
        if finished or now - self._printed.get(event.stage, float("-inf")) >= self.interval:
            self._printed[event.stage] = now
            label = self.LABELS.get(event.stage, event.stage)
            self.console.print(f"{label} {event.done}/{event.total} {info}".rstrip(), highlight=False)


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3g}"
    return str(v)


def scan_table(result: ScanResult, max_rows: int = 60) -> Table:
    flagged = set(result.flagged)
    table = Table(title=f"Reverse-engineered triggers ({result.mode} scan), smallest first")
    for col in ("label", "mask L1", "success", "anomaly index", "steps", ""):
        table.add_column(col, justify="right" if col not in ("",) else "left")
    indices = dict(zip(result.outliers.labels, result.outliers.indices, strict=True))
    rows = sorted(result.labels, key=lambda t: t.mask_l1)
    for item in rows[:max_rows]:
        note = "FLAGGED" if item.label in flagged else ("" if item.reached_threshold else "threshold not reached")
        style = "bold red" if item.label in flagged else None
        table.add_row(
            str(item.label),
            f"{item.mask_l1:.2f}",
            f"{item.attack_success_rate:.3f}",
            f"{indices[item.label]:.2f}",
            str(item.steps),
            note,
            style=style,
        )
    return table


def print_scan(console: Console, result: ScanResult, model: str) -> None:
    console.print(scan_table(result))
    o = result.outliers
    l1 = {t.label: t.mask_l1 for t in result.labels}
    flagged = ", ".join(f"{k}: {l1[k]:.2f}" for k in o.flagged) or "none"
    console.print(
        f"median: {o.median:.2f}, MAD: {o.mad:.2f}, anomaly index: {o.anomaly_index:.2f}, flagged label list: {flagged}"
    )
    console.print(
        f"{result.image_passes:,} image passes in {result.seconds:.1f} s; clean accuracy on the scan data {result.clean_accuracy:.1%}"
    )
    for warning in result.warnings:
        console.print(Text.assemble(("warning:", "bold yellow"), " ", warning))
    model = escape(model)
    if result.infected:
        console.print(
            f"[bold red]BACKDOOR FOUND[/] in {model}: target label(s) {', '.join(map(str, o.flagged))} "
            f"(anomaly index {o.anomaly_index:.2f} > {o.threshold:g})"
        )
    else:
        console.print(
            f"[bold green]No backdoor found[/] in {model} (anomaly index {o.anomaly_index:.2f} <= {o.threshold:g})"
        )


def print_figures(console: Console, title: str, figures: dict[str, Any]) -> None:
    table = Table(title=title, show_header=False)
    table.add_column("figure")
    table.add_column("value", justify="right")
    for k, v in figures.items():
        if isinstance(v, (list, dict)):
            continue
        table.add_row(k, Text(f"{v:.4f}" if isinstance(v, float) else str(v)))  # Text: paths may hold [brackets]
    console.print(table)


def print_mitigation(console: Console, report: RepairReport) -> None:
    """Before/after figures of a repair (and what ``auto`` chose)."""
    table = Table(title=f"Mitigation: {report.method}")
    table.add_column("figure")
    table.add_column("before", justify="right")
    table.add_column("after", justify="right")
    before, after = report.before.to_dict(), report.after.to_dict()
    for key, a in after.items():
        b = before.get(key)
        table.add_row(key, "" if b is None else f"{b:.4f}", f"{a:.4f}")
    if report.filter is not None:
        for key, value in report.filter.to_dict().items():
            table.add_row(f"filter {key}", "", f"{value:.4f}")
    pruning = report.result.pruning
    if pruning is not None:
        table.add_row(f"pruned units of {escape(pruning.layer)}", "", f"{len(pruning.pruned_units)} of {pruning.units}")
    console.print(table)
    budget = report.budget
    if report.filter is not None:
        cost = f"rejecting at most {budget.max_accuracy_drop:g} more clean images than it was calibrated for"
    else:
        cost = f"losing at most {budget.max_accuracy_drop:g} of clean accuracy"
    goal = f"recovered attack success at most {budget.max_attack_success:g}, {cost}, on the held-out data"
    if report.within_budget:
        console.print(f"within budget: {goal}", markup=False)
    else:
        console.print(
            f"NOT within budget ({goal}): the model written is the best found, not a repair (exit code 3)",
            markup=False,
        )
    if report.auto is not None:
        chosen = "kept" if report.auto.within_budget else "no method kept clean accuracy within the margin; kept"
        console.print(
            f"auto: {chosen} {report.method} (chosen on {report.auto.validation_images} validation images of the "
            f"repair data, accuracy budget {report.auto.max_accuracy_drop:g})",
            markup=False,
        )
