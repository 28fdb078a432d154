"""The ``deepdot`` command line.

Exit codes (a contract scripts and CI gates rely on):
    0  success; for ``scan``: no backdoor found
    1  ``scan``: backdoor found
    2  usage or input error (one line on stderr, no traceback unless ``--debug``)
    130 interrupted (a scan resumes when rerun with the same arguments)
"""

from __future__ import annotations

import functools
import os
import signal
import sys
import time
import warnings
from collections.abc import Callable
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, NoReturn, TypeVar

import typer
from rich.console import Console
from rich.text import Text

from deepdot import __version__
from deepdot.errors import DeepdotError

app = typer.Typer(
    name="deepdot",
    help="Find, explain and remove backdoors in image classifiers.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console()
err_console = Console(stderr=True)

EXIT_CLEAN, EXIT_BACKDOOR, EXIT_INPUT = 0, 1, 2
EXIT_INTERRUPTED, EXIT_TERMINATED = 130, 143
_state = {"debug": False}

F = TypeVar("F", bound=Callable[..., Any])


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the program is so that it stops like Ctrl-C does (checkpoint kept)."""


def _terminate(signum: int, frame: Any) -> None:
    raise Terminated


def fail(message: str) -> NoReturn:
    """Print one error line on stderr and exit with code 2 (input or usage error)."""
    one_line = " ".join(message.split())  # a file name may hold a newline
    err_console.print(Text.assemble(("error:", "bold red"), " ", one_line), highlight=False, soft_wrap=True)
    raise typer.Exit(EXIT_INPUT)


def _describe_crash(exc: BaseException) -> str:
    """One line for an exception deepdot did not expect: a bug, or a resource running out."""
    detail = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
    what = f"{type(exc).__name__}: {detail}" if detail else type(exc).__name__
    if isinstance(exc, MemoryError):
        return f"out of memory ({what}); try fewer images (--max-images) or a smaller model"
    if isinstance(exc, OSError):
        return f"{what}"
    return f"internal error ({what}); this is a bug in deepdot: rerun as `deepdot --debug ...` for the traceback and report it"


def handle_errors(func: F) -> F:
    """The one place where a command's failures become exit codes, so that exit 1 stays the
    verdict "backdoor found" and nothing else:

    * :class:`DeepdotError` (bad input or set-up) -> its one-line message, exit 2;
    * Ctrl-C -> exit 130, SIGTERM -> exit 143 (a scan keeps its checkpoint and resumes);
    * any other exception (a bug in deepdot, or memory running out) -> one line saying so,
      exit 2. ``deepdot --debug`` shows the traceback instead.
    """

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except (typer.Exit, typer.Abort, SystemExit):
            raise
        except KeyboardInterrupt as exc:
            code = EXIT_TERMINATED if isinstance(exc, Terminated) else EXIT_INTERRUPTED
            how = "terminated" if code == EXIT_TERMINATED else "interrupted"
            err_console.print(f"{how}; a scan rerun with the same arguments resumes where it stopped")
            raise typer.Exit(code) from None
        except DeepdotError as exc:
            if _state["debug"]:
                raise
            fail(str(exc))
        except Exception as exc:  # noqa: BLE001 - the structural net: never a traceback, never exit 1
            if _state["debug"]:
                raise
            fail(_describe_crash(exc))

    return wrapper  # type: ignore[return-value]


def _version(value: bool) -> None:
    if value:
        console.print(f"deepdot {__version__}")
        raise typer.Exit()


@app.callback()
def main_options(
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks for errors.")] = False,
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version.")
    ] = False,
) -> None:
    _state["debug"] = debug
    if not debug:
        # Third-party notices (torch's pickle protocol, Pillow's decompression-bomb warning, …)
        # are not for the user: deepdot checks what they warn about and says so itself.
        warnings.simplefilter("ignore")


# --------------------------------------------------------------------------------------------
# shared helpers


def _bars() -> Any:
    from deepdot.report.console import ProgressBars

    return ProgressBars(err_console, enabled=err_console.is_terminal)


def _parse_ints(text: str | None, what: str) -> list[int] | None:
    if text is None or text.strip() == "":
        return None
    try:
        return [int(v) for v in text.replace(" ", "").split(",") if v != ""]
    except ValueError:
        raise DeepdotError(f"{what}: expected comma-separated whole numbers, got {text!r}") from None


def _load_model(path: Path, preprocess: str | None, arch: str | None = None, allow_code: bool = False) -> Any:
    """Load any supported model file (see ``deepdot.io.models.load_model``)."""
    from deepdot.io.models import load_model
    from deepdot.models import parse_preprocess

    return load_model(
        path, preprocess=parse_preprocess(preprocess) if preprocess else None, arch=arch, allow_code=allow_code
    )


def _load_data_for(spec: str, split: str, classifier: Any = None, max_images: int | None = None) -> Any:
    from deepdot.data import ImageData
    from deepdot.io import load_data

    data = load_data(spec, split=split, num_classes=classifier.num_classes if classifier is not None else None)
    if classifier is not None:
        if data.image_shape != classifier.input_shape:
            raise DeepdotError(
                f"{data.name}: images are {'x'.join(map(str, data.image_shape))} but the model takes "
                f"{'x'.join(map(str, classifier.input_shape))}"
            )
        if data.num_classes > classifier.num_classes:
            raise DeepdotError(
                f"{data.name}: labels go up to {data.num_classes - 1} but the model has {classifier.num_classes} classes"
            )
        data = ImageData(data.x, data.y, classifier.num_classes, data.name, data.groups)
    if max_images is not None and max_images < len(data):
        data = data.take(max_images, seed=0)
    return data


def default_architecture(spec: str, shape: tuple[int, int, int], num_classes: int) -> str:
    """The built-in architecture that fits a data set (override with ``--arch``)."""
    if spec.split(":")[0] == "digits" or shape[1:] == (16, 16):
        return "digits_net"
    if shape[1:] == (28, 28):
        return "nc_mnist"
    if shape[1:] == (32, 32) and num_classes == 43:
        return "nc_gtsrb"
    if shape[1:] == (32, 32):
        return "resnet20"
    raise DeepdotError(
        f"no built-in architecture takes {shape[1]}x{shape[2]} images; choose one with --arch (see `deepdot models`)"
    )


def _train_and_test(data: str, test_data: str | None, holdout: float, seed: int) -> tuple[Any, Any]:
    """Training data and the held-out test data (a built-in set's own test split, ``--test-data``,
    or a ``holdout`` share of ``data``)."""
    from deepdot.io import load_data

    train_set = load_data(data, split="train")
    if test_data is not None:
        test_set = load_data(test_data, split="test", num_classes=train_set.num_classes)
    elif data.split(":")[0] == "digits":
        test_set = load_data("digits:test")
    else:
        train_set, test_set = train_set.split(holdout, seed=seed)
    if test_set.image_shape != train_set.image_shape:
        raise DeepdotError(
            f"{test_set.name}: test images are {test_set.image_shape}, training images {train_set.image_shape}"
        )
    k = max(train_set.num_classes, test_set.num_classes)
    from deepdot.data import ImageData

    return (
        ImageData(train_set.x, train_set.y, k, train_set.name, train_set.groups),
        ImageData(test_set.x, test_set.y, k, test_set.name, test_set.groups),
    )


def _report_written(paths: list[Path]) -> None:
    for p in paths:
        console.print(f"wrote {p}", markup=False)


class Corner(str, Enum):
    bottom_right = "bottom-right"
    bottom_left = "bottom-left"
    top_right = "top-right"
    top_left = "top-left"
    center = "center"


class TriggerType(str, Enum):
    square = "square"
    image = "image"
    blended = "blended"
    pixels = "pixels"


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
    pos = _parse_ints(position, "--trigger-position")
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
            _read_picture(image, "RGBA"), shape, size or max(default_size, shape[1] // 4), alpha=alpha or 1.0, **place
        )
    if kind is TriggerType.blended:
        arr = _read_picture(image, "RGB") if image is not None else None
        return triggers.blended(shape, alpha or 0.1, image=arr, seed=seed)
    return triggers.random_pixels(shape, pixels, seed=seed)


def _read_picture(path: Path, mode: str) -> Any:
    """A trigger picture as an H×W×channels uint8 array (size checked before it is decoded)."""
    import numpy as np

    from deepdot.io.data import open_image

    with open_image(path, DeepdotError) as im:
        return np.asarray(im.convert(mode))


# --------------------------------------------------------------------------------------------
# commands


@app.command("models")
def models_command() -> None:
    """List the built-in architectures."""
    from rich.table import Table

    from deepdot.models import ARCHITECTURES

    table = Table(title="Built-in architectures")
    for col in ("name", "input", "classes", "preprocess", "description"):
        table.add_column(col)
    for a in ARCHITECTURES.values():
        pre = a.preprocess if isinstance(a.preprocess, str) else "mean/std"
        table.add_row(a.name, "x".join(map(str, a.input_shape)), str(a.num_classes), pre, a.description)
    console.print(table)


DataOpt = Annotated[
    str,
    typer.Option(
        "--data",
        help="Data: 'digits' (built in), an .npz (x, y), a Neural Cleanse .h5 (X_test/Y_test) or a folder of class subfolders.",
    ),
]
OutOpt = Annotated[Path, typer.Option("--out", help="Output folder.")]
ModelArchOpt = Annotated[
    str | None,
    typer.Option("--arch", help="Architecture of a plain state_dict file (.pt/.pth), see `deepdot models`."),
]
AllowCodeOpt = Annotated[
    bool,
    typer.Option(
        "--allow-code",
        "--allow-pickle",
        help="Let the model file run its own code: unpickle a whole pickled model, run TorchScript without checking "
        "its operators. DANGEROUS: only for files you trust. (--allow-pickle is the former name.)",
    ),
]
PreprocessOpt = Annotated[
    str | None,
    typer.Option(
        "--preprocess",
        help="Model input preprocessing: raw (0-255), unit ([0,1]), imagenet, inception, or 'mean=a,b,c std=d,e,f'.",
    ),
]


# options shared by `train` and `attack`
TrainArchOpt = Annotated[str | None, typer.Option(help="Architecture (see `deepdot models`); default fits the data.")]
TestDataOpt = Annotated[
    str | None, typer.Option(help="Test data; default: the built-in test split or a held-out share.")
]
HoldoutOpt = Annotated[float, typer.Option(help="Share of --data held out for testing when there is no --test-data.")]
EpochsOpt = Annotated[int, typer.Option(help="Training epochs.")]
BatchOpt = Annotated[int, typer.Option(help="Training batch size.")]
LrOpt = Annotated[float, typer.Option(help="Adam learning rate.")]
AugmentOpt = Annotated[bool, typer.Option(help="Random crop + flip (CIFAR-style).")]
SeedOpt = Annotated[int, typer.Option(help="Random seed (runs are repeatable).")]


def _fresh_model(arch: str | None, data: str, train_set: Any, preprocess: str | None, seed: int) -> tuple[str, Any]:
    """(architecture name, a newly initialised classifier) for the training data, seeded."""
    import torch

    from deepdot.models import build_classifier, parse_preprocess

    arch = arch or default_architecture(data, train_set.image_shape, train_set.num_classes)
    torch.manual_seed(seed)
    model = build_classifier(
        arch,
        num_classes=train_set.num_classes,
        input_shape=train_set.image_shape,
        preprocess=parse_preprocess(preprocess) if preprocess else None,
    )
    return arch, model


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
    train_set, test_set = _train_and_test(data, test_data, holdout, seed)
    arch, model = _fresh_model(arch, data, train_set, preprocess, seed)
    config = TrainConfig(epochs=epochs, batch_size=batch_size, lr=lr, augment=augment, seed=seed)
    with _bars() as bars:
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
    _report_written([weights, weights.with_suffix(".json"), write_json(out / "train.json", summary)])


@app.command("attack")
@handle_errors
def attack_command(
    data: DataOpt = "digits",
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
    """Train a BadNets-backdoored model; writes MODEL, trigger.npz (+ PNGs) and attack.json."""
    from deepdot.attacks import BadNets
    from deepdot.io.files import ensure_dir, save_trigger, write_json
    from deepdot.io.models import save_model
    from deepdot.metrics import ALL_TO_ALL
    from deepdot.report.console import print_figures
    from deepdot.training import TrainConfig

    ensure_dir(out)
    train_set, test_set = _train_and_test(data, test_data, holdout, seed)
    planted = build_trigger(
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
    arch, model = _fresh_model(arch, data, train_set, preprocess, seed)
    attack = BadNets(trigger=planted, target=ALL_TO_ALL if all_to_all else target, poison_rate=poison_rate, seed=seed)
    config = TrainConfig(epochs=epochs, batch_size=batch_size, lr=lr, augment=augment, seed=seed)
    with _bars() as bars:
        result = attack.run(model, train_set, test_set, config, progress=bars)
    summary = {
        **result.to_dict(),
        "architecture": arch,
        "poison_rate": poison_rate,
        "train_data": train_set.name,
        "test_data": test_set.name,
        "epochs": epochs,
        "seed": seed,
        "trigger": {"type": trigger_type.value if trigger is None else str(trigger), "mask_l1": planted.mask_l1},
    }
    if all_to_all:
        summary["target"] = "all-to-all"
    weights = save_model(model, out)
    paths = [
        weights,
        weights.with_suffix(".json"),
        save_trigger(planted, out / "trigger.npz"),
        save_trigger(planted, out / "trigger"),
    ]
    paths.append(write_json(out / "attack.json", summary))
    print_figures(console, f"Backdoored model ({arch}, BadNets)", summary)
    _report_written(paths)


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
    classifier = _load_model(model, preprocess, arch, allow_code)
    test_set = _load_data_for(data, "test", classifier)
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
        _report_written([write_json(out / "evaluate.json", figures)])


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
    from deepdot.io.checkpoint import Checkpoint, data_digest
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
    classifier = _load_model(model, preprocess, arch, allow_code)
    scan_data = _load_data_for(data, "test", classifier, max_images)
    from deepdot.io.models import model_digest

    key = {  # everything that changes the result: a checkpoint made under another key is discarded
        "model": model_digest(model),
        "preprocess": classifier.preprocess,
        "data": data_digest(scan_data),
        "images": len(scan_data),
        "settings": scanner.settings(),
        "labels": labels,
    }
    chosen = _parse_ints(labels, "--labels")
    checkpoint = Checkpoint(out, key)
    done = scanner.reusable(checkpoint.load(), chosen or range(classifier.num_classes)) if resume else {}
    checkpoint.start()
    if done:
        console.print(f"resuming: {len(done)} label(s) already done in {checkpoint.folder}", markup=False)
    console.print(
        f"scanning {model} ({classifier.num_classes} labels) on {len(scan_data)} images of {scan_data.name}, {mode.value} mode",
        markup=False,
    )
    with _bars() as bars:
        result = scanner.scan(
            classifier,
            scan_data,
            labels=chosen,
            suspected=_parse_ints(suspected, "--suspected") or (),
            done=done,
            on_label=checkpoint.save,
            progress=bars,
        )
    json_path = write_scan(
        out,
        result,
        {
            "model": str(model),
            "data": scan_data.name,
            "output_kind": classifier.output_kind,
            "objective": classifier.output_note,
        },
    )
    print_scan(console, result, str(model))
    console.print(f"objective: {classifier.output_note}")
    console.print(f"wrote {json_path} and label_<k>_{{mask,pattern,fusion}}.png in {out}", markup=False)
    raise typer.Exit(EXIT_BACKDOOR if result.infected else EXIT_CLEAN)


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
    with _bars() as bars:
        summary = run_demo(out, cache, retrain=retrain, progress=bars, log=console.print)
    console.print(f"demo finished in {time.perf_counter() - start:.0f} s")
    if not summary["correct"]:
        # not exit 1: that code means "backdoor found" and nothing else
        raise DeepdotError("the demo's verdicts were not the expected ones (see above): please report it")


# Commands that live in their own modules register themselves on ``app`` when imported.
from deepdot import cli_mitigate  # noqa: E402,F401


def main(argv: list[str] | None = None) -> None:
    """The ``deepdot`` console script."""
    sys.exit(run(sys.argv[1:] if argv is None else argv))


def run(args: list[str]) -> int:
    """Run the command line on ``args`` and return its exit code.

    Usage errors (an unknown option, a bad value) are one line here too, like every other
    error: the command's failures are handled by :func:`handle_errors`, the parser's here.
    """
    from typer import _click

    signal.signal(signal.SIGTERM, _terminate)
    command = typer.main.get_command(app)
    try:
        result = command.main(args=args, prog_name="deepdot", standalone_mode=False)
    except _click.exceptions.NoArgsIsHelpError as exc:
        console.print(exc.ctx.get_help() if exc.ctx else "", markup=False, highlight=False)
        return EXIT_INPUT
    except _click.exceptions.UsageError as exc:
        where = (
            f"deepdot {exc.ctx.command_path.split(' ', 1)[1]}" if exc.ctx and " " in exc.ctx.command_path else "deepdot"
        )
        return _one_line(f"{exc.format_message()} (see `{where} --help`)")
    except _click.exceptions.ClickException as exc:
        return _one_line(exc.format_message())
    except (typer.Abort, EOFError):
        err_console.print("aborted")
        return EXIT_INTERRUPTED
    except KeyboardInterrupt as exc:  # raised outside a command (while parsing or importing)
        return EXIT_TERMINATED if isinstance(exc, Terminated) else EXIT_INTERRUPTED
    except BrokenPipeError:
        return EXIT_INPUT
    return result if isinstance(result, int) else EXIT_CLEAN


def _one_line(message: str) -> int:
    try:
        fail(" ".join(message.split()))
    except typer.Exit as done:
        return done.exit_code


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
