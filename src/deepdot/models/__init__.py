"""Model wrapper, its input preprocessing (:class:`Preprocess`) and built-in architectures."""

from __future__ import annotations

from typing import Any

from deepdot.errors import ModelError
from deepdot.models.architectures import ARCHITECTURES, Architecture
from deepdot.models.classifier import Classifier, parse_preprocess
from deepdot.models.preprocess import PREPROCESS_NAMES, Preprocess, PreprocessSpec

__all__ = [
    "ARCHITECTURES",
    "Architecture",
    "Classifier",
    "PREPROCESS_NAMES",
    "Preprocess",
    "PreprocessSpec",
    "build_classifier",
    "parse_preprocess",
]


def build_classifier(
    architecture: str,
    *,
    num_classes: int | None = None,
    input_shape: tuple[int, int, int] | None = None,
    preprocess: PreprocessSpec | None = None,
    **arch_kwargs: Any,
) -> Classifier:
    """A freshly initialised built-in architecture wrapped in a :class:`Classifier`.

    ``num_classes``, ``input_shape`` (only the channel count may differ from the architecture's)
    and ``preprocess`` default to the architecture's own.
    """
    if architecture not in ARCHITECTURES:
        raise ModelError(f"unknown architecture {architecture!r}; built in: {', '.join(ARCHITECTURES)}")
    arch = ARCHITECTURES[architecture]
    shape = tuple(input_shape or arch.input_shape)
    if tuple(shape[1:]) != tuple(arch.input_shape[1:]):
        raise ModelError(
            f"architecture {architecture} takes {arch.input_shape[1]}x{arch.input_shape[2]} images, "
            f"the data are {shape[1]}x{shape[2]}"
        )
    classes = int(num_classes or arch.num_classes)
    kwargs = dict(arch_kwargs)
    kwargs.setdefault("in_channels", shape[0])
    network = arch.build(num_classes=classes, **kwargs)
    return Classifier(
        network,
        input_shape=shape,
        num_classes=classes,
        preprocess=preprocess if preprocess is not None else arch.preprocess,
        architecture=architecture,
        arch_kwargs=kwargs,
        last_conv_layer=arch.last_conv_layer,
        penultimate_layer=arch.penultimate_layer,
    )
