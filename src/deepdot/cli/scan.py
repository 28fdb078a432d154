"""``deepdot scan``: Neural Cleanse on a model file, with a resumable checkpoint."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import typer

from deepdot.cli.app import EXIT_BACKDOOR, EXIT_CLEAN, app, console, handle_errors
from deepdot.cli.common import (
    AllowCodeOpt,
    DataOpt,
    ModelArchOpt,
    OutOpt,
    PreprocessOpt,
    load_data_for,
    load_model_arg,
    parse_ints,
    progress_bars,
)
from deepdot.errors import DeepdotError


class ScanMode(str, Enum):
    fast = "fast"
    faithful = "faithful"


class ScanLoss(str, Enum):
    cross_entropy = "cross-entropy"
    reference_code = "reference-code"


@app.command("scan")
@handle_errors
def scan_command(
    model: Annotated[
        Path,
        typer.Argument(
            help="Model: deepdot folder/.safetensors, Keras .h5/.keras, .onnx, TorchScript, or a state_dict with --arch."
        ),
    ],
    data: DataOpt = "digits",
    out: OutOpt = Path("deepdot-scan"),
    mode: Annotated[
        ScanMode,
        typer.Option(
            help="fast: all labels at once with early stopping; faithful: the reference algorithm, label by label."
        ),
    ] = ScanMode.fast,
    steps: Annotated[
        int | None, typer.Option(help="Most optimisation steps per label (fast 120, faithful 1000).")
    ] = None,
    samples_per_step: Annotated[
        int | None, typer.Option(help="faithful only: clean images per step (default 1000).")
    ] = None,
    batch_size: Annotated[int | None, typer.Option(help="Most images per mini-batch (default 32).")] = None,
    images_per_step: Annotated[
        int | None, typer.Option(help="fast only: clean images per step (default: 640 / labels, within 16..128).")
    ] = None,
    lr: Annotated[float | None, typer.Option(help="Adam learning rate (default 0.1).")] = None,
    init_cost: Annotated[
        float | None, typer.Option(help="Initial weight of the mask's L1 term (default: fast 1e-2, faithful 1e-3).")
    ] = None,
    labels: Annotated[str | None, typer.Option(help="Scan only these labels, e.g. 0,5,33 (at least 3).")] = None,
    suspected: Annotated[str | None, typer.Option(help="Scan these labels first (order only).")] = None,
    max_images: Annotated[int | None, typer.Option(help="Use at most this many clean images.")] = None,
    min_images: Annotated[
        int | None, typer.Option(help="Refuse to scan fewer clean images than this (default 50).")
    ] = None,
    loss: Annotated[
        ScanLoss | None,
        typer.Option(
            help="Classification term of the objective: cross-entropy (the paper's) or reference-code (what the "
            "Neural Cleanse reference code computes, ~16.12 x (1 - p_target)), to reproduce its numbers."
        ),
    ] = None,
    min_accuracy: Annotated[
        float, typer.Option(help="Refuse to scan below this clean accuracy (preprocessing check).")
    ] = 0.5,
    preprocess: PreprocessOpt = None,
    seed: Annotated[int, typer.Option(help="Random seed (the scan is repeatable).")] = 0,
    resume: Annotated[
        bool, typer.Option(help="Reuse labels finished by an interrupted run with the same arguments.")
    ] = True,
    arch: ModelArchOpt = None,
    allow_code: AllowCodeOpt = False,
) -> None:
    """Reverse-engineer a trigger per label and flag outliers (Neural Cleanse).

    Writes OUT/scan.json and OUT/label_<k>_{mask,pattern,fusion}.png. Exit code 0: no backdoor
    found; 1: backdoor found; 2: usage or input error.
    """
    from deepdot.io.files import ensure_dir
    from deepdot.report.artifacts import write_scan
    from deepdot.report.console import print_scan

    overrides = {
        "steps": steps,
        "samples_per_step": samples_per_step,
        "batch_size": batch_size,
        "images_per_step": images_per_step,
        "lr": lr,
        "init_cost": init_cost,
        "min_images": min_images,
        "loss": loss.value if loss is not None else None,
    }
    scanner = make_scanner(
        mode.value, seed=seed, min_clean_accuracy=min_accuracy, **{k: v for k, v in overrides.items() if v is not None}
    )
    ensure_dir(out)
    classifier = load_model_arg(model, preprocess, arch, allow_code)
    scan_data = load_data_for(data, "test", classifier, max_images)
    chosen = parse_ints(labels, "--labels")
    checkpoint, done = _checkpoint(out, model, classifier, scan_data, scanner, chosen, resume)
    console.print(
        f"scanning {model} ({classifier.num_classes} labels) on {len(scan_data)} images of {scan_data.name}, {mode.value} mode",
        markup=False,
    )
    with progress_bars() as bars:
        result = scanner.scan(
            classifier,
            scan_data,
            labels=chosen,
            suspected=parse_ints(suspected, "--suspected") or (),
            done=done,
            on_label=checkpoint.save,
            progress=bars,
        )
    facts = {
        "model": str(model),
        "model_sha256": checkpoint.key["model"],
        "data": scan_data.name,
        "output_kind": classifier.output_kind,
    }
    json_path = write_scan(out, result, {**facts, "objective": classifier.output_note})
    print_scan(console, result, str(model))
    console.print(f"objective: {classifier.output_note}")
    console.print(f"wrote {json_path} and label_<k>_{{mask,pattern,fusion}}.png in {out}", markup=False)
    raise typer.Exit(EXIT_BACKDOOR if result.infected else EXIT_CLEAN)


def _checkpoint(
    out: Path, model: Path, classifier: Any, data: Any, scanner: Any, labels: list[int] | None, resume: bool
) -> tuple[Any, dict[int, Any]]:
    """The scan's checkpoint and the labels it may reuse. Its key is everything that changes the
    result (the model's bytes, the data's pixels and labels, preprocessing, settings): a
    checkpoint made under another key is discarded."""
    from deepdot.io.checkpoint import Checkpoint, data_digest
    from deepdot.io.models import model_digest

    key = {
        "model": model_digest(model),
        "preprocess": classifier.preprocess.to_json(),  # the JSON value model.json holds
        "data": data_digest(data),
        "images": len(data),
        "settings": scanner.settings(),
        "labels": labels,
    }
    checkpoint = Checkpoint(out, key)
    done = scanner.reusable(checkpoint.load(), labels or range(classifier.num_classes)) if resume else {}
    checkpoint.start()
    if done:
        console.print(f"resuming: {len(done)} label(s) already done in {checkpoint.folder}", markup=False)
    return checkpoint, done


def make_scanner(mode: str, **settings: Any) -> Any:
    """The scanner for ``--mode`` with the given settings (others keep their defaults)."""
    from deepdot.scan import FastNeuralCleanse, NeuralCleanse

    if mode == "fast":
        if "samples_per_step" in settings:
            raise DeepdotError("--samples-per-step applies to --mode faithful only (fast mode: --images-per-step)")
        return FastNeuralCleanse(**settings)
    if "images_per_step" in settings:
        raise DeepdotError("--images-per-step applies to --mode fast only (faithful mode: --samples-per-step)")
    return NeuralCleanse(**settings)
