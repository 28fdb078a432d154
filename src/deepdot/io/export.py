"""Exporting deepdot models to the formats other tools read: ONNX and Keras HDF5.

* :func:`export_onnx` writes the bare network (``torch.onnx.export``, legacy TorchScript-based
  exporter) with a dynamic batch dimension; the preprocessing and input shape are recorded as
  ONNX ``metadata_props``, which :func:`deepdot.io.models.load_model` reads back.
* :func:`export_keras_h5` rebuilds a plain sequential convolutional network (Conv2d, ReLU,
  MaxPool2d, Dropout, Flatten, Linear: the Neural Cleanse MNIST/GTSRB networks) as a real Keras
  ``Sequential`` model, channels-last and ending in a softmax as Neural Cleanse's Keras models
  do, and saves it with ``model.save()``. Keras files do not record preprocessing: load them
  with ``preprocess=`` (the CLI's ``--preprocess``), e.g. ``"raw"`` for the NC replicas.

Both need optional packages (``onnx``; ``keras`` with a backend, here PyTorch: Keras is imported
with ``KERAS_BACKEND=torch`` unless the variable is already set); they are imported only when
an export is asked for.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from deepdot.errors import ModelError
from deepdot.models import Classifier


def export_onnx(classifier: Classifier, path: str | Path, *, opset: int | None = None) -> Path:
    """Write ``classifier``'s network to an ONNX file, its preprocessing in the metadata.

    The graph takes preprocessed N×C×H×W input (batch dimension dynamic) and outputs the
    network's scores (logits for deepdot's own models). Returns the path written.
    """
    try:
        import onnx
    except ImportError as exc:
        raise ModelError("exporting to ONNX needs the onnx package: pip install 'deepdot[formats]'") from exc
    p = Path(path).expanduser()
    p.parent.mkdir(parents=True, exist_ok=True)
    network = classifier.network.eval()
    example = torch.zeros(1, *classifier.input_shape, device=classifier.device)
    kwargs: dict[str, Any] = {"opset_version": opset} if opset is not None else {}
    with torch.no_grad():
        torch.onnx.export(
            network,
            (example,),
            str(p),
            dynamo=False,
            input_names=["input"],
            output_names=["scores"],
            dynamic_axes={"input": {0: "batch"}, "scores": {0: "batch"}},
            **kwargs,
        )
    model = onnx.load(str(p))
    record = {
        "preprocess": classifier.preprocess.to_metadata(),
        "input_shape": json.dumps(list(classifier.input_shape)),
        "output_kind": classifier.output_kind,
    }
    if classifier.architecture:
        record["architecture"] = classifier.architecture
    del model.metadata_props[:]
    for key, value in record.items():
        model.metadata_props.add(key=key, value=value)
    onnx.save(model, str(p))
    return p


def _keras() -> Any:
    os.environ.setdefault("KERAS_BACKEND", "torch")
    try:
        import keras
    except ImportError as exc:
        raise ModelError("exporting to Keras needs the keras package (and a backend such as torch)") from exc
    return keras


def _keras_layers(network: nn.Module, input_shape: tuple[int, int, int]) -> list[tuple[str, Any, Any, str | None]]:
    """(kind, module, extra, activation) per Keras layer to build; ReLUs become the activation
    of the layer before them.

    ``extra``: a convolution's padding ('same'/'valid'), a pool's (size, stride), a dropout's rate,
    and for the first Linear after a Flatten the (C, H, W) shape flattened (to reorder its input
    rows); else None.
    """
    modules = list(network.children()) if isinstance(network, nn.Sequential) else [network]
    c, h, w = input_shape
    plan: list[list[Any]] = []  # [kind, module, extra, activation]
    flat_shape: tuple[int, int, int] | None = None
    for m in modules:
        if isinstance(m, nn.Conv2d):
            k = m.kernel_size
            same = m.padding == (k[0] // 2, k[1] // 2) and m.stride == (1, 1) and k[0] % 2 == 1 and k[1] % 2 == 1
            if not (same or m.padding == (0, 0)) or m.groups != 1 or m.dilation != (1, 1):
                raise ModelError(f"cannot export {m} to Keras: only 'same'/'valid' ungrouped convolutions")
            if m.padding != (0, 0) and m.padding_mode != "zeros":
                raise ModelError(f"cannot export {m} to Keras: padding mode {m.padding_mode!r}")
            plan.append(["conv", m, "same" if m.padding != (0, 0) else "valid", None])
            if not same:
                h = (h - k[0]) // m.stride[0] + 1
                w = (w - k[1]) // m.stride[1] + 1
            c = m.out_channels
        elif isinstance(m, nn.ReLU):
            if not plan or plan[-1][3] is not None or plan[-1][0] not in ("conv", "dense"):
                raise ModelError("cannot export to Keras: a ReLU that does not follow a Conv2d or Linear")
            plan[-1][3] = "relu"
        elif isinstance(m, nn.MaxPool2d):
            size = m.kernel_size if isinstance(m.kernel_size, int) else m.kernel_size[0]
            stride = m.stride if isinstance(m.stride, int) else m.stride[0]
            if m.padding not in (0, (0, 0)) or m.ceil_mode or m.dilation not in (1, (1, 1)):
                raise ModelError(f"cannot export {m} to Keras: only unpadded max pooling")
            plan.append(["pool", m, (size, stride), None])
            h, w = (h - size) // stride + 1, (w - size) // stride + 1
        elif isinstance(m, nn.Dropout):
            plan.append(["dropout", m, m.p, None])
        elif isinstance(m, nn.Flatten):
            plan.append(["flatten", m, None, None])
            flat_shape = (c, h, w)
        elif isinstance(m, nn.Linear):
            plan.append(["dense", m, flat_shape, None])
            flat_shape = None
        else:
            raise ModelError(f"cannot export layer {type(m).__name__} to Keras (plain sequential CNNs only)")
    return [tuple(step) for step in plan]  # type: ignore[misc]


def export_keras_h5(classifier: Classifier, path: str | Path, *, softmax: bool = True) -> Path:
    """Write ``classifier``'s network as a Keras Sequential model to an HDF5 ``.h5`` file.

    The Keras model is channels-last (input H×W×C), takes preprocessed input and, with
    ``softmax`` (the default, as Neural Cleanse's models), ends in a softmax. Convolution kernels
    are transposed to H×W×in×out, and the first Dense layer after Flatten has its input rows
    reordered from PyTorch's C,H,W flattening order to Keras' H,W,C. Returns the path written.

    Raises:
        ModelError: the network is not a plain ``nn.Sequential`` of Conv2d ('same' or 'valid'),
            ReLU, MaxPool2d, Dropout, Flatten and Linear layers, or Keras is missing.
    """
    keras = _keras()
    from keras import layers

    p = Path(path).expanduser()
    if p.suffix.lower() not in (".h5", ".hdf5"):
        raise ModelError(f"{p}: a Keras HDF5 file must end in .h5 or .hdf5")
    c, h, w = classifier.input_shape
    plan = _keras_layers(classifier.network, (c, h, w))
    dense_steps = [i for i, step in enumerate(plan) if step[0] == "dense"]
    built: list[Any] = [keras.Input((h, w, c))]
    weights: list[tuple[Any, list[np.ndarray]]] = []
    for i, (kind, module, extra, activation) in enumerate(plan):
        if kind == "conv":
            layer = layers.Conv2D(
                module.out_channels,
                module.kernel_size,
                strides=module.stride,
                padding=extra,
                activation=activation,
                use_bias=module.bias is not None,
            )
            kernel = module.weight.detach().cpu().permute(2, 3, 1, 0).numpy()  # O,I,H,W -> H,W,I,O
            values = [kernel] + ([module.bias.detach().cpu().numpy()] if module.bias is not None else [])
        elif kind == "dense":
            last = i == dense_steps[-1]
            layer = layers.Dense(
                module.out_features,
                activation=("softmax" if softmax else None) if last else activation,
                use_bias=module.bias is not None,
            )
            if last and activation is not None:
                raise ModelError("cannot export to Keras: the final Linear layer is followed by a ReLU")
            weight = module.weight.detach().cpu()
            if extra is not None:  # rows in PyTorch's C,H,W flatten order -> Keras' H,W,C
                fc, fh, fw = extra
                weight = weight.reshape(-1, fc, fh, fw).permute(0, 2, 3, 1).reshape(weight.shape[0], -1)
            values = [weight.T.contiguous().numpy()]
            values += [module.bias.detach().cpu().numpy()] if module.bias is not None else []
        elif kind == "pool":
            layer = layers.MaxPooling2D(pool_size=extra[0], strides=extra[1])
            values = []
        elif kind == "dropout":
            layer = layers.Dropout(float(extra))
            values = []
        else:
            layer = layers.Flatten()
            values = []
        built.append(layer)
        if values:
            weights.append((layer, values))
    model = keras.Sequential(built)
    for layer, values in weights:
        layer.set_weights([np.ascontiguousarray(v, dtype=np.float32) for v in values])
    p.parent.mkdir(parents=True, exist_ok=True)
    model.save(str(p))
    return p
