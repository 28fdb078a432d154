"""``deepdot mitigate`` and ``deepdot filter``: remove a backdoor a scan found, or screen inputs.

The algorithms live in :mod:`deepdot.mitigate` (pure); this module reads the scan folder, the
model and the data, splits the clean data into a repair part and a held-out part for measuring,
and writes the repaired model, ``mitigation.json`` and (for the filter) ``filter.json``.
"""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import typer

from deepdot.cli import (
    EXIT_BACKDOOR,
    EXIT_CLEAN,
    AllowCodeOpt,
    DataOpt,
    ModelArchOpt,
    OutOpt,
    PreprocessOpt,
    _bars,
    _load_data_for,
    _load_model,
    _parse_ints,
    _report_written,
    _train_and_test,
    app,
    console,
    handle_errors,
)
from deepdot.errors import DeepdotError

#: Methods ``auto`` tries, in order of preference on ties.
AUTO_METHODS = ("unlearn", "fine-prune", "prune", "fine-tune")


class Method(str, Enum):
    filter = "filter"
    prune = "prune"
    unlearn = "unlearn"
    fine_tune = "fine-tune"
    fine_prune = "fine-prune"
    auto = "auto"


def make_mitigation(
    method: str, *, layer: str | None, fpr: float, epochs: int | None, lr: float | None, seed: int
) -> Any:
    """The algorithm behind ``--method`` with the CLI's overrides (others keep their defaults)."""
    from deepdot.mitigate import FinePruning, FineTuning, InputFilter, NeuronPruning, Unlearning

    given: dict[str, Any] = {"seed": seed}
    if method == "filter":
        return InputFilter(false_positive_rate=fpr, layer=layer or "penultimate")
    if lr is not None:
        given["lr"] = lr
    if method in ("prune", "fine-prune"):
        if layer is not None:
            given["layer"] = layer
        if epochs is not None:
            given["fine_tune_epochs"] = epochs
        return NeuronPruning(**given) if method == "prune" else FinePruning(**given)
    if epochs is not None:
        given["epochs"] = epochs  # unlearning and fine-tuning train the whole network: no layer
    return Unlearning(**given) if method == "unlearn" else FineTuning(**given)


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
        Method, typer.Option(help="Mitigation; auto tries prune, unlearn, fine-tune and fine-prune.")
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
        float, typer.Option(help="auto: the largest clean-accuracy drop accepted (0.01 = 1 point).")
    ] = 0.01,
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
    """
    from deepdot.data import ImageData
    from deepdot.io.files import ensure_dir, load_trigger, write_json
    from deepdot.io.save_as import check_save_as, save_model_as
    from deepdot.io.scans import PNG_NOTE, load_scan, scan_json_path, select_recovered
    from deepdot.metrics import ALL_TO_ALL
    from deepdot.mitigate import PlantedBackdoor, choose_best, measure, measure_filter

    if (trigger is None) != (target is None and not all_to_all):
        raise DeepdotError("--trigger and --target (or --all-to-all) go together")
    if not 0 < fpr < 1:
        raise DeepdotError(f"--fpr must be between 0 and 1, got {fpr}")
    ensure_dir(out)
    classifier = _load_model(model, preprocess, arch, allow_code)
    recovered = load_scan(scan, classifier.input_shape)
    for note in recovered.warnings:
        if note == PNG_NOTE:
            console.print(f"note: {note}", markup=False)
    try:
        mitigated, backdoors = select_recovered(recovered, _parse_ints(labels, "--labels"))
    except DeepdotError as exc:
        raise DeepdotError(f"{scan_json_path(scan)}: {exc}") from exc
    for k in mitigated:
        if not 0 <= k < classifier.num_classes:
            raise DeepdotError(f"label {k} is outside the model's 0..{classifier.num_classes - 1}")
    planted = None
    if trigger is not None:
        goal = ALL_TO_ALL if all_to_all else int(target)  # type: ignore[arg-type]
        if goal != ALL_TO_ALL and not 0 <= goal < classifier.num_classes:
            raise DeepdotError(f"--target {goal} is outside the model's 0..{classifier.num_classes - 1}")
        planted = PlantedBackdoor(goal, load_trigger(trigger, classifier.input_shape))
    # Before the long work: can the repaired model be written in the input's format?
    save_format = check_save_as(classifier, model)
    if save_format.note:
        console.print(save_format.note)
    repair, held_out = _train_and_test(data, test_data, holdout, seed)
    repair, held_out = (
        ImageData(d.x, d.y, classifier.num_classes, d.name, d.groups)
        for d in (_fit(repair, classifier), _fit(held_out, classifier))
    )
    requested = AUTO_METHODS if method is Method.auto else (method.value,)
    algos = runnable_mitigations(
        model,
        classifier,
        repair,
        {name: make_mitigation(name, layer=layer, fpr=fpr, epochs=epochs, lr=lr, seed=seed) for name in requested},
        skip=method is Method.auto,
    )
    names = tuple(algos)
    before = measure(classifier, held_out, backdoors, planted)
    console.print(
        f"mitigating label(s) {', '.join(map(str, mitigated))} of {model} with {method.value}: "
        f"{len(repair)} clean images for repair, {len(held_out)} held out for measuring"
    )
    results: dict[str, Any] = {}
    figures: dict[str, Any] = {}
    filter_figures = None
    with _bars() as bars:
        for name, algo in algos.items():
            results[name] = algo.apply(classifier, backdoors, repair, progress=bars)
            if name == "filter":
                filter_figures = measure_filter(classifier, results[name].input_filter, held_out, backdoors, planted)
                figures[name] = filter_figures.behind_filter
            else:
                figures[name] = measure(results[name].classifier, held_out, backdoors, planted)
    chosen = names[0]
    best: str | None = chosen
    if method is Method.auto:
        # Chosen on the held-out figures (against the recovered trigger only: the planted one is
        # never used to decide). None kept accuracy within the margin: keep the one that lost least.
        best = choose_best(before, figures, max_accuracy_drop)
        chosen = best if best is not None else max(figures, key=lambda n: figures[n].clean_accuracy)
    result = results[chosen]
    summary: dict[str, Any] = {
        "method": chosen,
        "requested_method": method.value,
        "model": str(model),
        "scan": str(scan_json_path(scan)),
        "labels": mitigated,
        "repair_data": repair.name,
        "test_data": held_out.name,
        "repair_images": len(repair),
        "test_images": len(held_out),
        "before": before.to_dict(),
        "after": figures[chosen].to_dict(),
        "pruning_curve": [s.to_dict() for s in result.pruning.curve] if result.pruning is not None else None,
        "filter": filter_figures.to_dict() if filter_figures is not None else None,
        "details": result.to_dict(),
    }
    if planted is not None:
        summary["planted_target"] = "all-to-all" if planted.target == ALL_TO_ALL else planted.target
    if method is Method.auto:
        summary["max_accuracy_drop"] = max_accuracy_drop
        summary["within_accuracy_margin"] = best is not None
        summary["candidates"] = {n: {"after": f.to_dict(), "details": results[n].to_dict()} for n, f in figures.items()}
    paths = save_model_as(result.classifier, model, out, fmt=save_format)
    if result.input_filter is not None:
        paths.append(write_json(out / "filter.json", {**result.input_filter.to_dict(), "model": paths[0].name}))
    paths.append(write_json(out / "mitigation.json", summary))
    _print_mitigation(summary)
    _report_written(paths)


def runnable_mitigations(
    model: Path, classifier: Any, repair: Any, algos: dict[str, Any], *, skip: bool
) -> dict[str, Any]:
    """The mitigations of ``algos`` that can run on ``classifier``, checked before any long work
    (e.g. pruning needs a layer it can hook and bake into the weights). With ``skip`` (``auto``)
    the others are left out with a note; otherwise, or when none can run, the first problem is
    an error naming the model file."""
    runnable: dict[str, Any] = {}
    problems: dict[str, str] = {}
    for name, algo in algos.items():
        try:
            algo.check(classifier, repair)
        except DeepdotError as exc:
            if not skip:
                raise DeepdotError(f"{model}: {exc}") from exc
            problems[name] = str(exc)
        else:
            runnable[name] = algo
    if not runnable:
        raise DeepdotError(f"{model}: no mitigation can run on this model ({next(iter(problems.values()))})")
    for name, problem in problems.items():
        console.print(f"skipping {name}: {problem}", soft_wrap=True)
    return runnable


def _fit(data: Any, classifier: Any) -> Any:
    """Check that clean data fits the model (image shape, label range)."""
    if data.image_shape != classifier.input_shape:
        raise DeepdotError(
            f"{data.name}: images are {'x'.join(map(str, data.image_shape))} but the model takes "
            f"{'x'.join(map(str, classifier.input_shape))}"
        )
    if data.num_classes > classifier.num_classes:
        raise DeepdotError(
            f"{data.name}: labels go up to {data.num_classes - 1} but the model has {classifier.num_classes} classes"
        )
    return data


def _print_mitigation(summary: dict[str, Any]) -> None:
    from rich.table import Table

    table = Table(title=f"Mitigation: {summary['method']}")
    table.add_column("figure")
    table.add_column("before", justify="right")
    table.add_column("after", justify="right")
    for key in summary["after"]:
        b, a = summary["before"].get(key), summary["after"][key]
        table.add_row(key, "" if b is None else f"{b:.4f}", f"{a:.4f}")
    if summary["filter"]:
        for key, value in summary["filter"].items():
            table.add_row(f"filter {key}", "", f"{value:.4f}")
    if summary["pruning_curve"]:
        pruning = summary["details"]["pruning"]
        table.add_row(f"pruned units of {pruning['layer']}", "", f"{pruning['pruned']} of {pruning['units']}")
    console.print(table)
    if summary.get("within_accuracy_margin") is False:
        console.print("no method kept clean accuracy within the margin; kept the one that lost least")


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
    classifier = _load_model(model_path, preprocess, arch, allow_code)
    if isinstance(classifier.network, torch.jit.ScriptModule):
        raise DeepdotError(
            f"{model_path}: a filter reads layer {flt.layer!r} through a forward hook, which TorchScript models "
            "do not take; give the model as ONNX, Keras, safetensors or a state_dict"
        )
    images = _load_data_for(data, "test", classifier)
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
    _report_written([write_json(out / "filtered.json", summary)])
    raise typer.Exit(EXIT_BACKDOOR if indices else EXIT_CLEAN)
