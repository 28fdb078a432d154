"""``deepdot demo``: the whole story on the built-in digits."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Annotated

import typer

from deepdot.cli.app import app, console, handle_errors
from deepdot.cli.common import OutOpt, progress_bars
from deepdot.errors import DeepdotError


@app.command("demo")
@handle_errors
def demo_command(
    out: OutOpt = Path("deepdot-demo"),
    cache: Annotated[
        Path | None, typer.Option(help="Where the demo's models are kept (default ~/.cache/deepdot/demo).")
    ] = None,
    retrain: Annotated[bool, typer.Option(help="Train the demo models again even if cached.")] = False,
) -> None:
    """Train (or reuse) a clean and a backdoored model on the built-in digits, scan both."""
    from deepdot.demo import run_demo

    cache = cache or Path(os.environ.get("DEEPDOT_CACHE", "~/.cache/deepdot")).expanduser() / "demo"
    start = time.perf_counter()
    with progress_bars() as bars:
        summary = run_demo(out, cache, retrain=retrain, progress=bars, log=console.print)
    console.print(f"demo finished in {time.perf_counter() - start:.0f} s")
    if not summary["correct"]:
        # not exit 1: that code means "backdoor found" and nothing else
        raise DeepdotError("the demo's verdicts were not the expected ones (see above): please report it")


# Commands that live in their own modules register themselves on ``app`` when imported.
