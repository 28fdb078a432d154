"""``deepdot mitigate`` (repair a model from the triggers its scan recovered) and
``deepdot filter`` (screen inputs with a fitted input filter)."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import typer

from deepdot.cli.app import EXIT_BACKDOOR, EXIT_CLEAN, EXIT_NOT_REPAIRED, app, console, handle_errors
from deepdot.cli.common import (
    AllowCodeOpt,
    DataOpt,
    ModelArchOpt,
    OutOpt,
    PreprocessOpt,
    fit_to,
    load_data_for,
    load_model_arg,
    parse_ints,
    progress_bars,
    report_written,
    train_and_test,
)
from deepdot.errors import DeepdotError
from deepdot.io.scans import scan_json_path
from deepdot.mitigate.pipeline import AUTO
from deepdot.mitigate.registry import METHODS

# the choices of --method: the registry's methods and auto
Method = Enum("Method", {name.replace("-", "_"): name for name in (*METHODS, AUTO)}, type=str)  # type: ignore[misc]


@app.command("mitigate")
@handle_errors
def mitigate_command(
    model: Annotated[
        Path,
        typer.Argument(
            help="The backdoored model: a deepdot folder or model.safetensors, or a Keras, ONNX or TorchScript file."
        ),
    ],
    scan: Annotated[
        Path, typer.Option("--scan", help="scan.json written by `deepdot scan` (or its folder, with the label PNGs).")
    ],
    data: DataOpt = "digits",
    method: Annotated[
        Method, typer.Option(help="Mitigation; auto tries unlearn, fine-prune, prune and fine-tune and keeps the best.")
    ] = Method.auto,
    out: OutOpt = Path("deepdot-mitigated"),
    test_data: Annotated[
        str | None, typer.Option(help="Held-out clean data for measuring; default: a share of --data.")
    ] = None,
    holdout: Annotated[
        float, typer.Option(help="Share of --data held out for measuring when there is no --test-data.")
    ] = 0.3,
    labels: Annotated[
        str | None, typer.Option(help="Mitigate these labels' recovered triggers (default: the scan's flagged labels).")
    ] = None,
    layer: Annotated[
        str | None,
        typer.Option(
            help="Layer: last_conv, penultimate or a module name (default: penultimate for filter, else last_conv)."
        ),
    ] = None,
    fpr: Annotated[float, typer.Option(help="filter: false-positive rate the threshold is calibrated for.")] = 0.05,
    epochs: Annotated[
        int | None, typer.Option(help="Fine-tuning epochs (unlearn at most 3, fine-tune 5, fine-prune 5, prune 0).")
    ] = None,
    lr: Annotated[float | None, typer.Option(help="Fine-tuning Adam learning rate.")] = None,
    max_accuracy_drop: Annotated[
        float,
        typer.Option(
            help="The most clean accuracy a repair may cost (0.01 = 1 point): every method keeps within it, "
            "and auto chooses under it."
        ),
    ] = 0.01,
    max_attack_success: Annotated[
        float,
        typer.Option(help="A repair must leave the recovered triggers at most this attack success (held-out data)."),
    ] = 0.05,
    trigger: Annotated[
        Path | None,
        typer.Option(
            "--trigger", help="The planted trigger, if known (.npz or folder/*mask*.png): measured, never used."
        ),
    ] = None,
    target: Annotated[int | None, typer.Option(help="The planted trigger's target label.")] = None,
    all_to_all: Annotated[bool, typer.Option("--all-to-all", help="The planted attack sends y to y+1.")] = False,
    preprocess: PreprocessOpt = None,
    arch: ModelArchOpt = None,
    allow_code: AllowCodeOpt = False,
    seed: Annotated[int, typer.Option(help="Random seed (runs are repeatable).")] = 0,
) -> None:
    """Remove a backdoor found by `deepdot scan` (Neural Cleanse filter/pruning/unlearning, Fine-Pruning).

    The clean --data is split into a repair part and a held-out part (--holdout, or --test-data)
    on which before/after figures are measured (and auto picks its method). Writes the repaired
    model in the input's format (model.safetensors + model.json, model.h5, model.onnx, model.pt …,
    with model.json holding its preprocessing) and mitigation.json to OUT; the filter method also
    writes filter.json (use it with `deepdot filter OUT --data ...`).

    Exit code 0: repaired within the budget (--max-accuracy-drop, --max-attack-success, on the
    held-out data); 3: not within it (the best model found is still written, and mitigation.json
    says "within_budget": false); 2: usage or input error.
    """
    from deepdot.io.files import ensure_dir
    from deepdot.io.save_as import check_save_as
    from deepdot.mitigate import RepairBudget, repair

    if not 0 < fpr < 1:
        raise DeepdotError(f"--fpr must be between 0 and 1, got {fpr}")
    if not 0 <= max_accuracy_drop < 1 or not 0 <= max_attack_success < 1:
        raise DeepdotError("--max-accuracy-drop and --max-attack-success must be in [0, 1)")
    planted_given = _planted_spec(trigger, target, all_to_all)
    ensure_dir(out)
    classifier = load_model_arg(model, preprocess, arch, allow_code)
    mitigated, backdoors = _recovered(scan, model, classifier, parse_ints(labels, "--labels"))
    planted = _planted(planted_given, trigger, classifier)
    save_format = check_save_as(classifier, model)  # before the long work: can the result be written?
    if save_format.note:
        console.print(save_format.note)
    repair_set, held_out = (fit_to(d, classifier) for d in train_and_test(data, test_data, holdout, seed))
    overrides = {"layer": layer, "epochs": epochs, "lr": lr, "false_positive_rate": fpr, "seed": seed}
    mitigations = _runnable(
        method, model, classifier, repair_set, {**overrides, "max_accuracy_drop": max_accuracy_drop}
    )
    console.print(
        f"mitigating label(s) {', '.join(map(str, mitigated))} of {model} with {method.value}: "
        f"{len(repair_set)} clean images for repair, {len(held_out)} held out for measuring",
        markup=False,
    )
    with progress_bars() as bars:
        report = repair(
            classifier,
            backdoors,
            repair_set,
            held_out,
            method=method.value,
            mitigations=mitigations,
            planted=planted,
            budget=RepairBudget(max_accuracy_drop, max_attack_success),
            seed=seed,
            progress=bars,
        )
    _write(report, model, scan, out, save_format)
    if not report.within_budget:
        raise typer.Exit(EXIT_NOT_REPAIRED)


def _runnable(method: Method, model: Path, classifier: Any, repair_set: Any, overrides: dict[str, Any]) -> Any:
    """The mitigations ``--method`` names, built with the command line's ``overrides``, that can
    run on ``classifier`` (for auto, the others are skipped with a note)."""
    from deepdot.mitigate import build_mitigation, method_names, runnable

    wanted = {n: build_mitigation(n, **overrides) for n in method_names(method.value)}
    try:
        mitigations, skipped = runnable(classifier, repair_set, wanted, skip=method is Method.auto)
    except DeepdotError as exc:
        raise DeepdotError(f"{model}: {exc}") from exc
    for name, problem in skipped.items():
        console.print(f"skipping {name}: {problem}", soft_wrap=True, markup=False)
    return mitigations


def _write(report: Any, model: Path, scan: Path, out: Path, save_format: Any) -> None:
    """Write the repaired model (and filter.json) and mitigation.json to ``out``; print the figures."""
    from deepdot.io.files import write_json
    from deepdot.io.save_as import save_model_as
    from deepdot.report.console import print_mitigation

    summary = {**report.to_dict(), "model": str(model), "scan": str(scan_json_path(scan))}
    paths = save_model_as(report.result.classifier, model, out, fmt=save_format)
    if report.result.input_filter is not None:
        paths.append(write_json(out / "filter.json", {**report.result.input_filter.to_dict(), "model": paths[0].name}))
    paths.append(write_json(out / "mitigation.json", summary))
    print_mitigation(console, report)
    report_written(paths)


def _planted_spec(trigger: Path | None, target: int | None, all_to_all: bool) -> int | None:
    """The planted target named on the command line (checked against the model later)."""
    from deepdot.metrics import ALL_TO_ALL

    if (trigger is None) != (target is None and not all_to_all):
        raise DeepdotError("--trigger and --target (or --all-to-all) go together")
    return ALL_TO_ALL if all_to_all else target


def _planted(goal: int | None, trigger: Path | None, classifier: Any) -> Any:
    """The planted backdoor, when the user knows it (measured, never used to repair)."""
    from deepdot.io.files import load_trigger
    from deepdot.metrics import ALL_TO_ALL
    from deepdot.mitigate import PlantedBackdoor

    if trigger is None or goal is None:
        return None
    if goal != ALL_TO_ALL and not 0 <= goal < classifier.num_classes:
        raise DeepdotError(f"--target {goal} is outside the model's 0..{classifier.num_classes - 1}")
    return PlantedBackdoor(goal, load_trigger(trigger, classifier.input_shape))


def _recovered(scan: Path, model: Path, classifier: Any, labels: list[int] | None) -> tuple[list[int], list[Any]]:
    """The labels to mitigate and their recovered backdoors, from the scan folder."""
    from deepdot.io.files import read_json
    from deepdot.io.models import model_digest
    from deepdot.io.scans import PNG_NOTE, load_scan, select_recovered

    result = load_scan(scan, classifier.input_shape)
    if PNG_NOTE in result.warnings:
        console.print(f"note: {PNG_NOTE}", markup=False)
    recorded = read_json(scan_json_path(scan)).get("model_sha256")
    if recorded and recorded != model_digest(model):
        console.print(f"note: {scan_json_path(scan)} was made for other model bytes than {model}", markup=False)
    try:
        mitigated, backdoors = select_recovered(result, labels)
    except DeepdotError as exc:
        raise DeepdotError(f"{scan_json_path(scan)}: {exc}") from exc
    for k in mitigated:
        if not 0 <= k < classifier.num_classes:
            raise DeepdotError(f"label {k} is outside the model's 0..{classifier.num_classes - 1}")
    return mitigated, backdoors


@app.command("filter")
@handle_errors
def filter_command(
    filter_path: Annotated[
        Path,
        typer.Argument(
            metavar="FILTER", help="filter.json written by `deepdot mitigate --method filter`, or its folder."
        ),
    ],
    data: DataOpt = "digits",
    out: OutOpt = Path("deepdot-filter"),
    model: Annotated[
        Path | None,
        typer.Option("--model", help="The model the filter was calibrated on (default: the one beside filter.json)."),
    ] = None,
    preprocess: PreprocessOpt = None,
    arch: ModelArchOpt = None,
    allow_code: AllowCodeOpt = False,
) -> None:
    """Screen inputs with a saved input filter (Neural Cleanse); writes OUT/filtered.json.

    Exit code 0: no input flagged; 1: some inputs flagged as carrying a trigger; 2: usage or input error.
    """
    import torch

    from deepdot.io.files import ensure_dir, read_json, write_json
    from deepdot.mitigate import TriggerFilter

    path = filter_path / "filter.json" if filter_path.is_dir() else filter_path
    info = read_json(path)
    if not isinstance(info, dict):
        raise DeepdotError(f"{path}: not a deepdot filter.json")
    flt = TriggerFilter.from_dict(info)
    model_path = model or path.parent / str(info.get("model", "model.safetensors"))
    ensure_dir(out)
    classifier = load_model_arg(model_path, preprocess, arch, allow_code)
    if isinstance(classifier.network, torch.jit.ScriptModule):
        raise DeepdotError(
            f"{model_path}: a filter reads layer {flt.layer!r} through a forward hook, which TorchScript models "
            "do not take; give the model as ONNX, Keras, safetensors or a state_dict"
        )
    images = load_data_for(data, "test", classifier)
    scores = flt.score(classifier, images.x)
    flagged = scores > flt.threshold
    indices = [int(i) for i in flagged.nonzero().flatten()]
    summary = {
        "filter": str(path),
        "model": str(model_path),
        "data": images.name,
        "images": len(images),
        "flagged_count": len(indices),
        "flagged_rate": len(indices) / len(images),
        "threshold": flt.threshold,
        "flagged": indices,
        "scores": [round(float(s), 6) for s in scores],
    }
    shown = ", ".join(map(str, indices[:20])) + (" …" if len(indices) > 20 else "")
    console.print(
        f"{len(indices)} of {len(images)} inputs of {images.name} flagged as carrying a trigger "
        f"({summary['flagged_rate']:.1%}, threshold {flt.threshold:.4g})" + (f": {shown}" if indices else "")
    )
    report_written([write_json(out / "filtered.json", summary)])
    raise typer.Exit(EXIT_BACKDOOR if indices else EXIT_CLEAN)
