"""``deepdot models``, ``train``, ``attack`` and ``evaluate``."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import typer

from deepdot.attacks.registry import ATTACKS
from deepdot.cli.app import app, console, handle_errors
from deepdot.cli.common import (
    AllowCodeOpt,
    AugmentOpt,
    BatchOpt,
    DataOpt,
    EpochsOpt,
    HoldoutOpt,
    LrOpt,
    ModelArchOpt,
    OutOpt,
    PreprocessOpt,
    SeedOpt,
    TestDataOpt,
    TrainArchOpt,
    fresh_model,
    load_data_for,
    load_model_arg,
    parse_ints,
    progress_bars,
    report_written,
    train_and_test,
)
from deepdot.errors import DeepdotError


def _choices(name: str, values: tuple[str, ...]) -> Any:
    """A string Enum of command-line choices (members named like the values, ``-`` as ``_``)."""
    return Enum(name, {v.replace("-", "_"): v for v in values}, type=str)  # type: ignore[misc]


Corner = _choices("Corner", ("bottom-right", "bottom-left", "top-right", "top-left", "center"))
TriggerType = _choices("TriggerType", ("square", "image", "blended", "pixels"))
# the choices of attack --method: the attack registry's names
AttackMethod = _choices("AttackMethod", tuple(ATTACKS))


def build_trigger(
    shape: tuple[int, int, int],
    *,
    trigger_file: Path | None,
    kind: TriggerType,
    size: int | None,
    corner: Corner,
    margin: int,
    position: str | None,
    color: str,
    image: Path | None,
    alpha: float | None,
    pixels: int,
    seed: int,
) -> Any:
    """The trigger an attack plants, from the CLI options (see ``deepdot attack --help``)."""
    from deepdot import triggers
    from deepdot.io.files import load_trigger

    if trigger_file is not None:
        return load_trigger(trigger_file, shape)
    pos = parse_ints(position, "--trigger-position")
    if pos is not None and len(pos) != 2:
        raise DeepdotError("--trigger-position takes ROW,COL of the trigger's top-left pixel")
    place = {"corner": corner.value, "margin": margin, "position": tuple(pos) if pos else None}
    default_size = 3 if shape[1] <= 16 else 4
    if kind is TriggerType.square:
        try:
            colour = tuple(float(v) for v in color.split(","))
        except ValueError:
            raise DeepdotError(f"--trigger-color: expected values in [0,1] like 1 or 1,0,0, got {color!r}") from None
        return triggers.square(shape, size or default_size, color=colour, **place)
    if kind is TriggerType.image:
        if image is None:
            raise DeepdotError(
                "--trigger-type image needs --trigger-image PNG (e.g. ../shared/data/triggers/armory/peace.png)"
            )
        return triggers.image_patch(
            read_picture(image, "RGBA"), shape, size or max(default_size, shape[1] // 4), alpha=alpha or 1.0, **place
        )
    if kind is TriggerType.blended:
        arr = read_picture(image, "RGB") if image is not None else None
        return triggers.blended(shape, alpha or 0.1, image=arr, seed=seed)
    return triggers.random_pixels(shape, pixels, seed=seed)


def read_picture(path: Path, mode: str) -> Any:
    """A trigger picture as an H×W×channels uint8 array (size checked before it is decoded)."""
    import numpy as np

    from deepdot.io.images import open_image

    with open_image(path, DeepdotError) as im:
        return np.asarray(im.convert(mode))


@app.command("models")
def models_command() -> None:
    """List the built-in architectures."""
    from rich.table import Table

    from deepdot.models import ARCHITECTURES, Preprocess

    table = Table(title="Built-in architectures")
    for col in ("name", "input", "classes", "preprocess", "description"):
        table.add_column(col)
    for a in ARCHITECTURES.values():
        pre = Preprocess.parse(a.preprocess).name or "mean/std"
        table.add_row(a.name, "x".join(map(str, a.input_shape)), str(a.num_classes), pre, a.description)
    console.print(table)


@app.command("train")
@handle_errors
def train_command(
    data: DataOpt = "digits",
    out: OutOpt = Path("deepdot-out/clean"),
    arch: TrainArchOpt = None,
    test_data: TestDataOpt = None,
    holdout: HoldoutOpt = 0.2,
    epochs: EpochsOpt = 30,
    batch_size: BatchOpt = 32,
    lr: LrOpt = 1e-3,
    augment: AugmentOpt = False,
    preprocess: PreprocessOpt = None,
    seed: SeedOpt = 0,
) -> None:
    """Train a clean model; writes MODEL (model.safetensors + model.json) and train.json."""
    from deepdot.io.files import ensure_dir, write_json
    from deepdot.io.models import save_model
    from deepdot.metrics import clean_accuracy
    from deepdot.report.console import print_figures
    from deepdot.training import TrainConfig, train

    ensure_dir(out)
    train_set, test_set = train_and_test(data, test_data, holdout, seed)
    arch, model = fresh_model(arch, data, train_set, preprocess, seed)
    config = TrainConfig(epochs=epochs, batch_size=batch_size, lr=lr, augment=augment, seed=seed)
    with progress_bars() as bars:
        history = train(model, train_set, config, progress=bars)
    summary = {
        "clean_accuracy": clean_accuracy(model, test_set),
        "architecture": arch,
        "train_data": train_set.name,
        "test_data": test_set.name,
        "train_images": len(train_set),
        "test_images": len(test_set),
        "epochs": epochs,
        "seed": seed,
        "train_seconds": round(history.seconds, 2),
        "train_loss": history.loss,
    }
    weights = save_model(model, out)
    print_figures(console, f"Clean model ({arch})", summary)
    report_written([weights, weights.with_suffix(".json"), write_json(out / "train.json", summary)])


@app.command("attack")
@handle_errors
def attack_command(
    data: DataOpt = "digits",
    method: Annotated[
        AttackMethod,
        typer.Option(
            help="badnets (stamp --trigger-*), trojan (trigger optimised on chosen neurons), xiong-reconstructed / "
            "xiong-random (Xiong et al.'s Neural-Cleanse-evading attacks), pruning-aware (survives pruning)."
        ),
    ] = AttackMethod.badnets,
    out: OutOpt = Path("deepdot-out/badnets"),
    target: Annotated[int, typer.Option(help="Attacker's label (all-to-one).")] = 7,
    all_to_all: Annotated[
        bool, typer.Option("--all-to-all", help="Send label y to y+1 instead of one target.")
    ] = False,
    poison_rate: Annotated[float, typer.Option(help="Share of training images poisoned.")] = 0.1,
    trigger: Annotated[
        Path | None, typer.Option("--trigger", help="Use a saved trigger (.npz, or folder/*mask*.png).")
    ] = None,
    trigger_type: Annotated[TriggerType, typer.Option(help="Trigger family.")] = TriggerType.square,
    trigger_size: Annotated[
        int | None, typer.Option(help="Patch side in pixels (default 3 on 16x16 images, else 4).")
    ] = None,
    trigger_corner: Annotated[Corner, typer.Option(help="Where the patch goes.")] = Corner.bottom_right,
    trigger_margin: Annotated[int, typer.Option(help="Pixels between the patch and the image border.")] = 1,
    trigger_position: Annotated[
        str | None, typer.Option(help="ROW,COL of the patch's top-left pixel (instead of a corner).")
    ] = None,
    trigger_color: Annotated[str, typer.Option(help="Square colour in [0,1]: 1 (white) or R,G,B.")] = "1",
    trigger_image: Annotated[Path | None, typer.Option(help="Picture for image/blended triggers (PNG).")] = None,
    trigger_alpha: Annotated[
        float | None, typer.Option(help="Opacity: blended (default 0.1) or image (default 1).")
    ] = None,
    trigger_pixels: Annotated[int, typer.Option(help="Number of pixels of a 'pixels' trigger.")] = 16,
    sampling_rate: Annotated[
        float | None, typer.Option(help="xiong-*: share of mask pixels a noise-augmented image keeps (alpha; 0.6).")
    ] = None,
    augment_fraction: Annotated[
        float | None, typer.Option(help="xiong-*: share of training images noise-augmented (Sn; 1.0).")
    ] = None,
    mask_pixels: Annotated[int | None, typer.Option(help="xiong-random: random trigger pixels (z; 36).")] = None,
    clean_model: Annotated[
        Path | None, typer.Option(help="xiong-reconstructed: clean model to reverse-engineer on (default: train one).")
    ] = None,
    retrain: Annotated[
        str | None, typer.Option(help="trojan: retrain the layers 'after' the chosen one (paper) or 'all'.")
    ] = None,
    prune_fraction: Annotated[
        float | None,
        typer.Option(help="pruning-aware: share of last-conv channels pruned (default: to a 5-point drop)."),
    ] = None,
    arch: TrainArchOpt = None,
    test_data: TestDataOpt = None,
    holdout: HoldoutOpt = 0.2,
    epochs: EpochsOpt = 30,
    batch_size: BatchOpt = 32,
    lr: LrOpt = 1e-3,
    augment: AugmentOpt = False,
    preprocess: PreprocessOpt = None,
    seed: SeedOpt = 0,
) -> None:
    """Train a backdoored model (--method, default BadNets); writes MODEL, trigger.npz (+ PNGs) and attack.json."""
    from deepdot.attacks import build_attack
    from deepdot.attacks.registry import GIVEN_TRIGGER
    from deepdot.io.files import ensure_dir
    from deepdot.metrics import ALL_TO_ALL
    from deepdot.training import TrainConfig

    if clean_model is not None and method is not AttackMethod.xiong_reconstructed:
        raise DeepdotError("--clean-model is for --method xiong-reconstructed")
    ensure_dir(out)
    train_set, test_set = train_and_test(data, test_data, holdout, seed)
    given = build_trigger(
        train_set.image_shape,
        trigger_file=trigger,
        kind=trigger_type,
        size=trigger_size,
        corner=trigger_corner,
        margin=trigger_margin,
        position=trigger_position,
        color=trigger_color,
        image=trigger_image,
        alpha=trigger_alpha,
        pixels=trigger_pixels,
        seed=seed,
    )
    attack = build_attack(
        method.value,
        target=ALL_TO_ALL if all_to_all else target,
        trigger=given,
        poison_rate=poison_rate,
        seed=seed,
        sampling_rate=sampling_rate,
        augment_fraction=augment_fraction,
        mask_pixels=mask_pixels,
        retrain=retrain,
        prune_fraction=prune_fraction,
        pretrain=True,  # trojan: the attacker starts from a trained model
    )
    arch, model = fresh_model(arch, data, train_set, preprocess, seed)
    config = TrainConfig(epochs=epochs, batch_size=batch_size, lr=lr, augment=augment, seed=seed)
    extra = {"clean_model": load_model_arg(clean_model, preprocess)} if clean_model is not None else {}
    with progress_bars() as bars:
        result = attack.run(model, train_set, test_set, config, progress=bars, **extra)
    planted = result.trigger if result.trigger is not None else given
    kind = (trigger_type.value if trigger is None else str(trigger)) if method.value in GIVEN_TRIGGER else method.value
    summary = {
        **result.to_dict(),
        "method": method.value,
        "architecture": arch,
        "poison_rate": poison_rate,
        "train_data": train_set.name,
        "test_data": test_set.name,
        "epochs": epochs,
        "seed": seed,
        "trigger": {"type": kind, "mask_l1": planted.mask_l1},
    }
    if all_to_all:
        summary["target"] = "all-to-all"
    _write_attack(model, planted, summary, out, f"Backdoored model ({arch}, {method.value})")


def _write_attack(model: Any, planted: Any, summary: dict[str, Any], out: Path, title: str) -> None:
    """Write the backdoored model, its trigger (npz and PNGs) and attack.json to ``out``; print the figures."""
    from deepdot.io.files import save_trigger, write_json
    from deepdot.io.models import save_model
    from deepdot.report.console import print_figures

    weights = save_model(model, out)
    paths = [weights, weights.with_suffix(".json"), save_trigger(planted, out / "trigger.npz")]
    paths += [save_trigger(planted, out / "trigger"), write_json(out / "attack.json", summary)]
    print_figures(console, title, summary)
    report_written(paths)


@app.command("evaluate")
@handle_errors
def evaluate_command(
    model: Annotated[
        Path,
        typer.Argument(
            help="Model: deepdot folder/.safetensors, Keras .h5/.keras, .onnx, TorchScript, or a state_dict with --arch."
        ),
    ],
    data: DataOpt = "digits",
    trigger: Annotated[
        Path | None, typer.Option("--trigger", help="Trigger to test (.npz, or folder/*mask*.png).")
    ] = None,
    target: Annotated[int | None, typer.Option(help="Attacker's label for the attack success rate.")] = None,
    all_to_all: Annotated[bool, typer.Option("--all-to-all", help="The attack sends y to y+1.")] = False,
    out: Annotated[Path | None, typer.Option("--out", help="Folder for evaluate.json (default: print only).")] = None,
    preprocess: PreprocessOpt = None,
    arch: ModelArchOpt = None,
    allow_code: AllowCodeOpt = False,
) -> None:
    """Clean accuracy (and attack success rate with --trigger/--target) of any model."""
    from deepdot.io.files import ensure_dir, load_trigger, write_json
    from deepdot.metrics import ALL_TO_ALL, attack_success_rate, clean_accuracy
    from deepdot.report.console import print_figures

    if (trigger is None) != (target is None and not all_to_all):
        raise DeepdotError("--trigger and --target (or --all-to-all) go together")
    if out is not None:
        ensure_dir(out)
    classifier = load_model_arg(model, preprocess, arch, allow_code)
    test_set = load_data_for(data, "test", classifier)
    figures: dict[str, Any] = {"model": str(model), "data": test_set.name, "images": len(test_set)}
    figures["clean_accuracy"] = clean_accuracy(classifier, test_set)
    if trigger is not None:
        goal = ALL_TO_ALL if all_to_all else int(target)  # type: ignore[arg-type]
        if goal != ALL_TO_ALL and not 0 <= goal < classifier.num_classes:
            raise DeepdotError(f"--target {goal} is outside the model's 0..{classifier.num_classes - 1}")
        figures["target"] = "all-to-all" if all_to_all else goal
        figures["attack_success_rate"] = attack_success_rate(
            classifier, test_set, load_trigger(trigger, test_set.image_shape), goal
        )
    print_figures(console, "Evaluation", figures)
    if out is not None:
        report_written([write_json(out / "evaluate.json", figures)])
