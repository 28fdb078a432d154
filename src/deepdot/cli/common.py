"""What the commands share: option types, loading a model or data from command-line values,
progress bars, and listing written files."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from deepdot.cli.app import console, err_console
from deepdot.errors import DeepdotError


def progress_bars() -> Any:
    from deepdot.report.console import ProgressBars

    return ProgressBars(err_console, enabled=err_console.is_terminal)


def parse_ints(text: str | None, what: str) -> list[int] | None:
    if text is None or text.strip() == "":
        return None
    try:
        return [int(v) for v in text.replace(" ", "").split(",") if v != ""]
    except ValueError:
        raise DeepdotError(f"{what}: expected comma-separated whole numbers, got {text!r}") from None


def load_model_arg(path: Path, preprocess: str | None, arch: str | None = None, allow_code: bool = False) -> Any:
    """Load any supported model file (see ``deepdot.io.models.load_model``); ``--preprocess``
    is parsed here, where it enters (``Preprocess.parse``)."""
    from deepdot.io.models import load_model
    from deepdot.models import Preprocess

    return load_model(
        path, preprocess=Preprocess.parse(preprocess) if preprocess else None, arch=arch, allow_code=allow_code
    )


def load_data_for(spec: str, split: str, classifier: Any = None, max_images: int | None = None) -> Any:
    """Data from ``--data`` (fitted to ``classifier`` when given), at most ``max_images`` of it."""
    from deepdot.io import load_data

    data = load_data(spec, split=split, num_classes=classifier.num_classes if classifier is not None else None)
    if classifier is not None:
        data = fit_to(data, classifier)
    if max_images is not None and max_images < len(data):
        data = data.take(max_images, seed=0)
    return data


def fit_to(data: Any, classifier: Any) -> Any:
    """``data`` checked against the model (image shape, label range), with its label count."""
    return data.fitted_to(classifier.input_shape, classifier.num_classes)


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


def train_and_test(data: str, test_data: str | None, holdout: float, seed: int) -> tuple[Any, Any]:
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


def report_written(paths: list[Path]) -> None:
    for p in paths:
        console.print(f"wrote {p}", markup=False)


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


def fresh_model(arch: str | None, data: str, train_set: Any, preprocess: str | None, seed: int) -> tuple[str, Any]:
    """(architecture name, a newly initialised classifier) for the training data, seeded."""
    import torch

    from deepdot.models import Preprocess, build_classifier

    arch = arch or default_architecture(data, train_set.image_shape, train_set.num_classes)
    torch.manual_seed(seed)
    model = build_classifier(
        arch,
        num_classes=train_set.num_classes,
        input_shape=train_set.image_shape,
        preprocess=Preprocess.parse(preprocess) if preprocess else None,
    )
    return arch, model
