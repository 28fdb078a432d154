"""ONNX models converted to PyTorch, so deepdot can take gradients through them.

The file is parsed with the ``onnx`` package (the optional ``formats`` extra; imported only
here) and every node becomes a standard PyTorch layer (``nn.Conv2d``, ``nn.Linear``,
``nn.BatchNorm2d`` …) registered under a name derived from the node's weights or name. Nothing in
the file is executed; weights stored outside the file (ONNX "external data") are refused rather
than read from paths the file names.

Supported operators: see :data:`SUPPORTED_OPS`. ``Reshape`` with a constant target shape always
keeps the batch dimension (image classifiers never mix images), so models exported with a fixed
batch size of 1 still take batches.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from deepdot.errors import DeepdotError, ModelError
from deepdot.io.convert import (
    Add,
    Arithmetic,
    Concat,
    ConvertedModel,
    GraphNetwork,
    Permute,
    SamePad2d,
    Step,
    batch_norm,
    chain,
    check_input_shape,
    check_padding,
    module_name,
    short_reason,
)
from deepdot.io.files import replacing
from deepdot.io.limits import MODEL_BYTES, Budget, weights_budget

SUPPORTED_OPS = (
    "Conv",
    "Gemm",
    "MatMul",
    "Add",
    "Sub",
    "Mul",
    "Div",
    "Relu",
    "LeakyRelu",
    "Sigmoid",
    "Tanh",
    "Softmax",
    "MaxPool",
    "AveragePool",
    "GlobalAveragePool",
    "GlobalMaxPool",
    "BatchNormalization",
    "Flatten",
    "Reshape",
    "Transpose",
    "Concat",
    "Shape",
    "Gather",
    "Unsqueeze",
    "Dropout",
    "Identity",
    "Constant",
)


#: Operators whose constant inputs are passed at run time; other operators bake them into the layer.
_RUNTIME_CONSTANT_OPS = ("Add", "Sub", "Mul", "Div", "Concat", "Gather")


class _Unsupported(Exception):
    """Something the converter cannot handle (becomes a ModelError naming the file)."""


def load_onnx(path: str | Path) -> ConvertedModel:
    """Convert an ONNX model file to PyTorch.

    The file is hostile input: its size and the size of every tensor it declares are bounded
    (:data:`~deepdot.io.limits.MODEL_BYTES`) and every tensor's data must be exactly as long as
    its dimensions say before anything is built from it. Whatever else goes wrong while reading
    or converting the file becomes a one-line ``ModelError``, never a traceback.

    Raises:
        ModelError: the ``onnx`` package is missing, the file is corrupt or truncated, too large,
            uses an unsupported operator, keeps its weights in external files, or has several
            inputs/outputs.
    """
    p = Path(path)
    try:
        import onnx
    except ImportError as exc:
        raise ModelError(f"{p}: reading ONNX models needs the onnx package: pip install 'deepdot[formats]'") from exc
    try:
        return _load_onnx(p, onnx)
    except DeepdotError:
        raise
    except _Unsupported as exc:
        raise ModelError(f"{p}: {exc}") from exc
    except Exception as exc:  # noqa: BLE001 - a hostile file can make parsing or converting fail in any way
        raise ModelError(f"{p}: corrupt or unsupported ONNX model ({short_reason(exc)})") from exc


def _load_onnx(p: Path, onnx: Any) -> ConvertedModel:
    from google.protobuf.message import DecodeError

    try:
        size = p.stat().st_size
    except OSError as exc:
        raise ModelError(f"{p}: cannot read ({exc.strerror or exc})") from exc
    MODEL_BYTES.check(size, f"{p}: the ONNX file", ModelError)
    try:
        model = onnx.load(str(p), load_external_data=False)
    except (DecodeError, OSError, ValueError, RuntimeError, RecursionError, UnicodeDecodeError) as exc:
        raise ModelError(f"{p}: corrupt, truncated or not an ONNX model ({short_reason(exc)})") from exc
    if not model.graph.node:
        raise ModelError(f"{p}: corrupt, truncated or not an ONNX model (its graph has no nodes)")
    _refuse_external_anywhere(p, model, onnx)
    converted = _convert_graph(model.graph, onnx, weights_budget(p))
    check_input_shape(p, converted.input_shape)
    metadata = {str(prop.key): str(prop.value) for prop in model.metadata_props}
    return ConvertedModel(
        network=converted.network,
        input_shape=converted.input_shape,
        output_kind=converted.output_kind,
        softmax_removed=converted.softmax_removed,
        last_conv_layer=converted.last_conv_layer,
        penultimate_layer=converted.penultimate_layer,
        metadata=metadata,
        layer_modules=converted.layer_modules,
    )


def _refuse_external_anywhere(path: Path, model: Any, onnx: Any) -> None:
    """Refuse a tensor whose data lives in another file anywhere in the model: initializers and
    every node's attributes (also nodes the output never needs), subgraphs and functions. Such
    a tensor names a file, which reading would open and onnx's own save would write."""
    external = onnx.TensorProto.EXTERNAL

    def tensors_of(graph: Any) -> Any:
        yield from graph.initializer
        for node in graph.node:
            yield from _attribute_tensors(node.attribute, onnx, tensors_of)

    graphs = [model.graph, *(f for f in model.functions)]
    for graph in graphs:
        nodes_only = not hasattr(graph, "initializer")
        found = (
            _attribute_tensors([a for n in graph.node for a in n.attribute], onnx, tensors_of)
            if nodes_only
            else tensors_of(graph)
        )
        for tensor in found:
            if tensor.data_location == external or len(tensor.external_data):
                raise ModelError(
                    f"{path}: refused: tensor {str(tensor.name)!r} is stored in an external file; deepdot reads "
                    "self-contained ONNX files only"
                )


def _attribute_tensors(attributes: Any, onnx: Any, tensors_of: Any) -> Any:
    """Tensors held by node attributes, including those of subgraphs."""
    for attr in attributes:
        if attr.HasField("t"):
            yield attr.t
        yield from attr.tensors
        if attr.HasField("g"):
            yield from tensors_of(attr.g)
        for sub in attr.graphs:
            yield from tensors_of(sub)


#: The type of each attribute the supported operators read: a corrupt file may hold anything.
_ATTRIBUTE_KINDS = {
    "kernel_shape": "ints",
    "strides": "ints",
    "dilations": "ints",
    "pads": "ints",
    "perm": "ints",
    "axes": "ints",
    "group": "int",
    "transA": "int",
    "transB": "int",
    "axis": "int",
    "ceil_mode": "int",
    "count_include_pad": "int",
    "alpha": "float",
    "beta": "float",
    "epsilon": "float",
    "auto_pad": "text",
}


def _attributes(node: Any, onnx: Any) -> dict[str, Any]:
    """A node's attributes by name; those a supported operator reads are checked to be of their type."""
    attrs = {attr.name: onnx.helper.get_attribute_value(attr) for attr in node.attribute}
    if node.op_type not in SUPPORTED_OPS:
        return attrs
    for key, value in attrs.items():
        kind = _ATTRIBUTE_KINDS.get(key) if isinstance(key, str) else "name"
        if kind is None:
            continue
        if kind == "int":
            ok = isinstance(value, int) and not isinstance(value, bool)
        elif kind == "float":
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        elif kind == "ints":
            ok = isinstance(value, (list, tuple)) and len(value) <= 16 and all(isinstance(v, int) for v in value)
        else:
            ok = kind == "text" and isinstance(value, (str, bytes))
        if not ok:
            raise _Unsupported(
                f"{node.op_type} node {node.name!r} has a malformed {key!r} attribute ({str(value)[:60]!r})"
            )
    return attrs


def _required(node: Any, attrs: dict[str, Any], key: str) -> Any:
    if key not in attrs:
        raise _Unsupported(f"{node.op_type} node {node.name!r} has no {key!r} attribute")
    return attrs[key]


def _check_names(graph: Any) -> None:
    """Refuse names that are not text (protobuf hands over invalid UTF-8 as bytes)."""
    named = [*graph.input, *graph.output, *graph.initializer]
    texts = [v.name for v in named] + [
        t for node in graph.node for t in (node.name, node.op_type, *node.input, *node.output)
    ]
    for text in texts:
        if not isinstance(text, str):
            raise _Unsupported(f"the graph names a node or tensor {text[:60]!r}, which is not valid UTF-8 text")


#: The field of a TensorProto that holds its values when it has no ``raw_data``, by data type.
_TYPED_FIELDS = {
    "FLOAT": "float_data",
    "UINT8": "int32_data",
    "INT8": "int32_data",
    "UINT16": "int32_data",
    "INT16": "int32_data",
    "INT32": "int32_data",
    "INT64": "int64_data",
    "BOOL": "int32_data",
    "FLOAT16": "int32_data",
    "DOUBLE": "double_data",
    "UINT32": "uint64_data",
    "UINT64": "uint64_data",
    "BFLOAT16": "int32_data",
}
_FLOAT_TYPES = ("FLOAT", "FLOAT16", "DOUBLE", "BFLOAT16")


def _to_tensor(proto: Any, onnx: Any, budget: Budget) -> torch.Tensor:
    """A TensorProto as a tensor, once its size is within the limit and its data matches its dims."""
    name = proto.name
    if proto.data_location == onnx.TensorProto.EXTERNAL:
        raise _Unsupported(f"tensor {name!r} is stored in an external file; deepdot reads self-contained ONNX only")
    type_name = onnx.TensorProto.DataType.Name(proto.data_type) if proto.data_type in _data_type_values(onnx) else None
    if type_name not in _TYPED_FIELDS:
        shown = type_name or f"number {proto.data_type}"
        raise _Unsupported(f"tensor {name!r} has data type {shown}, which deepdot does not read")
    dims = [int(d) for d in proto.dims]
    if any(d < 0 for d in dims):
        raise _Unsupported(f"tensor {name!r} has negative dimensions {dims}")
    count = math.prod(dims)
    itemsize = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(proto.data_type)).itemsize
    budget.take(count * max(itemsize, 4))  # floating-point tensors are widened to float32
    if proto.raw_data:
        if len(proto.raw_data) != count * itemsize:
            raise _Unsupported(
                f"tensor {name!r} declares shape {dims} of {type_name} ({count * itemsize} bytes) but holds "
                f"{len(proto.raw_data)} bytes of data (a corrupt or truncated file)"
            )
    else:
        held = len(getattr(proto, _TYPED_FIELDS[type_name]))
        if held != count:
            raise _Unsupported(
                f"tensor {name!r} declares shape {dims} ({count} values) but holds {held} values "
                "(a corrupt or truncated file)"
            )
    array = onnx.numpy_helper.to_array(proto)
    if type_name in _FLOAT_TYPES:
        array = array.astype(np.float32)
    elif array.dtype.kind == "u" and array.dtype.itemsize > 1:
        array = array.astype(np.int64)
    return torch.from_numpy(np.array(array, copy=True))


def _data_type_values(onnx: Any) -> set[int]:
    return set(onnx.TensorProto.DataType.values())


def _convert_graph(graph: Any, onnx: Any, budget: Budget) -> ConvertedModel:
    _check_names(graph)
    constants: dict[str, torch.Tensor] = {init.name: _to_tensor(init, onnx, budget) for init in graph.initializer}
    inputs = [i for i in graph.input if i.name not in constants]
    if len(inputs) != 1 or len(graph.output) != 1:
        raise _Unsupported(
            f"the model has {len(inputs)} inputs and {len(graph.output)} outputs; deepdot needs one of each"
        )
    graph_input = inputs[0]
    dims = [d.dim_value if d.HasField("dim_value") else None for d in graph_input.type.tensor_type.shape.dim]
    input_shape, channels_last = _image_shape(dims)

    producers = {out: node for node in graph.node for out in node.output}
    output_name = graph.output[0].name
    output_kind, softmax_removed = "logits", False
    final = _skip_identities(output_name, producers)
    if final is not None and final.op_type == "Softmax" and _attributes(final, onnx).get("axis", -1) in (1, -1):
        output_kind, softmax_removed = "probabilities", True
        output_name = final.input[0]

    layers: dict[str, nn.Module] = {}
    steps: list[Step] = []
    kinds: list[tuple[str, str]] = []  # (module name, op type), in order
    layer_modules: dict[str, str] = {}  # node (by its first output) -> module name
    input_name = graph_input.name
    if channels_last:  # deepdot feeds N×C×H×W; the graph wants N×H×W×C
        input_name = "deepdot_nchw_input"
        layers["to_channels_last"] = Permute((0, 2, 3, 1))
        steps.append(Step("to_channels_last", (input_name,), graph_input.name))
    needed = _needed_nodes(output_name, producers)
    for node in graph.node:
        if id(node) not in needed:
            continue
        attrs = _attributes(node, onnx)
        if node.op_type == "Constant":
            if "value" in attrs:
                constants[node.output[0]] = _to_tensor(attrs["value"], onnx, budget)
            else:
                constants[node.output[0]] = _constant(attrs)
            continue
        if node.op_type == "Identity" and node.input[0] in constants:  # an alias of a weight
            constants[node.output[0]] = constants[node.input[0]]
            continue
        module = _convert_node(node, attrs, constants)
        name = module_name(_preferred_name(node, constants), layers, fallback=node.op_type.lower())
        layers[name] = module
        layer_modules[node.output[0]] = name
        args = tuple(
            i
            for position, i in enumerate(node.input)
            if i and (i not in constants or position == 0 or node.op_type in _RUNTIME_CONSTANT_OPS)
        )
        _check_arity(node, args)
        steps.append(Step(name, args, node.output[0]))
        kinds.append((name, node.op_type))
    used = {i for step in steps for i in step.inputs}
    network = GraphNetwork(input_name, steps, output_name, layers, {k: v for k, v in constants.items() if k in used})
    convs = [n for n, op in kinds if op == "Conv"]
    dense = [i for i, (_, op) in enumerate(kinds) if op in ("Gemm", "MatMul")]
    last_conv = convs[-1] if convs else None
    if last_conv is not None:  # its activation (or residual sum), before the features are flattened
        position = [n for n, _ in kinds].index(last_conv)
        for name, op in kinds[position + 1 :]:
            if op in ("Flatten", "Reshape", "GlobalAveragePool", "GlobalMaxPool", "Gemm", "MatMul"):
                break
            if op in ("Relu", "LeakyRelu", "BatchNormalization", "Add"):
                last_conv = name
    penultimate = kinds[dense[-1] - 1][0] if dense and dense[-1] > 0 else None
    return ConvertedModel(
        network=network,
        input_shape=input_shape,
        output_kind=output_kind,
        softmax_removed=softmax_removed,
        last_conv_layer=last_conv,
        penultimate_layer=penultimate,
        layer_modules=layer_modules,
    )


def _image_shape(dims: Sequence[int | None]) -> tuple[tuple[int, int, int] | None, bool]:
    """((C, H, W) or None when not fixed, whether the input is channels-last N×H×W×C)."""
    if len(dims) != 4:
        raise _Unsupported(f"the model's input has {len(dims)} dimensions; deepdot needs images (N×C×H×W)")
    shape = list(dims[1:])
    if any(d is None or d <= 0 for d in shape):
        return None, False
    c, h, w = (int(d) for d in shape)  # type: ignore[arg-type]
    if c not in (1, 3, 4) and w in (1, 3, 4):
        return (w, c, h), True
    return (c, h, w), False


#: Operators that take exactly two tensors at run time.
_BINARY_OPS = ("Add", "Sub", "Mul", "Div", "Gather")


def _check_arity(node: Any, args: tuple[str, ...]) -> None:
    """Refuse a node without the run-time inputs its layer needs (it would fail mid-forward)."""
    if not args or (node.op_type in _BINARY_OPS and len(args) != 2):
        raise _Unsupported(f"{node.op_type} node {node.name!r} has {len(args)} usable inputs")


def _skip_identities(name: str, producers: dict[str, Any]) -> Any:
    node = producers.get(name)
    seen: set[int] = set()
    while node is not None and node.op_type in ("Identity", "Dropout") and node.input and id(node) not in seen:
        seen.add(id(node))
        node = producers.get(node.input[0])
    return node


def _needed_nodes(output: str, producers: dict[str, Any]) -> set[int]:
    """ids of the nodes the output depends on."""
    needed: set[int] = set()
    stack = [output]
    while stack:
        node = producers.get(stack.pop())
        if node is None or id(node) in needed:
            continue
        needed.add(id(node))
        stack.extend(i for i in node.input if i)
    return needed


def _constant(attrs: dict[str, Any]) -> torch.Tensor:
    for key in ("value_float", "value_int"):
        if key in attrs:
            return torch.tensor(attrs[key])
    for key in ("value_floats", "value_ints"):
        if key in attrs:
            return torch.tensor(list(attrs[key]))
    raise _Unsupported(f"unsupported Constant node form ({', '.join(attrs)})")


def _preferred_name(node: Any, constants: dict[str, torch.Tensor]) -> str:
    """``conv1`` for a node whose weight is ``conv1.weight`` (PyTorch exports), else the node name."""
    for i in node.input[1:2]:
        if i in constants and i.endswith(".weight"):
            return i[: -len(".weight")]
    return node.name or node.op_type.lower()


def _need_constant(node: Any, position: int, constants: dict[str, torch.Tensor]) -> torch.Tensor:
    if len(node.input) <= position or node.input[position] not in constants:
        raise _Unsupported(f"{node.op_type} node {node.name!r} needs a constant input {position} (a weight)")
    return constants[node.input[position]]


def _pads(attrs: dict[str, Any]) -> tuple[int, int, int, int]:
    """ONNX pads (top, left, bottom, right)."""
    pads = list(attrs.get("pads", [0, 0, 0, 0]))
    if len(pads) != 4:
        raise _Unsupported(f"only 2-D convolutions and pools are supported (pads {pads})")
    try:
        check_padding(pads, "a node")
    except ValueError as exc:
        raise _Unsupported(str(exc)) from None
    return pads[0], pads[1], pads[2], pads[3]


def _same_pad(attrs: dict[str, Any], kernel: Sequence[int], value: float = 0.0) -> nn.Module | None:
    mode = attrs.get("auto_pad", b"NOTSET")
    mode = mode.decode() if isinstance(mode, bytes) else str(mode)
    if mode in ("SAME_UPPER", "SAME_LOWER"):
        strides = list(attrs.get("strides", [1, 1]))
        return SamePad2d(kernel, strides, list(attrs.get("dilations", [1, 1])), value, lower=mode == "SAME_LOWER")
    return None


def _asymmetric_pad(pads: tuple[int, int, int, int], value: float = 0.0) -> tuple[nn.Module | None, tuple[int, int]]:
    """(explicit padding layer or None, symmetric padding for the torch layer)."""
    top, left, bottom, right = pads
    if (top, left) == (bottom, right):
        return None, (top, left)
    return nn.ConstantPad2d((left, right, top, bottom), value), (0, 0)


def _convert_node(node: Any, attrs: dict[str, Any], constants: dict[str, torch.Tensor]) -> nn.Module:
    op = node.op_type
    simple: dict[str, Callable[[], nn.Module]] = {
        "Relu": nn.ReLU,
        "Sigmoid": nn.Sigmoid,
        "Tanh": nn.Tanh,
        "Identity": nn.Identity,
        "Dropout": nn.Identity,
        "GlobalAveragePool": lambda: nn.AdaptiveAvgPool2d(1),
        "GlobalMaxPool": lambda: nn.AdaptiveMaxPool2d(1),
        "Add": Add,
        "Sub": lambda: Arithmetic("sub"),
        "Mul": lambda: Arithmetic("mul"),
        "Div": lambda: Arithmetic("div"),
        "Shape": _Shape,
    }
    if op in simple:
        return simple[op]()
    if op == "Conv":
        return _conv(node, attrs, constants)
    if op == "Gemm":
        if attrs.get("transA", 0):
            raise _Unsupported(f"Gemm node {node.name!r} transposes its input (transA=1)")
        weight = _need_constant(node, 1, constants) * float(attrs.get("alpha", 1.0))
        if weight.dim() != 2:
            raise _Unsupported(f"Gemm node {node.name!r} multiplies by a {weight.dim()}-D tensor")
        weight = weight if attrs.get("transB", 0) else weight.T
        linear = nn.Linear(weight.shape[1], weight.shape[0], bias=len(node.input) > 2 and bool(node.input[2]))
        with torch.no_grad():
            linear.weight.copy_(weight)
            if linear.bias is not None:
                bias = _need_constant(node, 2, constants) * float(attrs.get("beta", 1.0))
                linear.bias.copy_(bias.reshape(-1).expand(weight.shape[0]))
        return linear
    if op == "MatMul":
        weight = _need_constant(node, 1, constants)
        if weight.dim() != 2:
            raise _Unsupported(f"MatMul node {node.name!r} multiplies by a {weight.dim()}-D tensor")
        linear = nn.Linear(weight.shape[0], weight.shape[1], bias=False)
        with torch.no_grad():
            linear.weight.copy_(weight.T)
        return linear
    if op == "LeakyRelu":
        return nn.LeakyReLU(float(attrs.get("alpha", 0.01)))
    if op == "Softmax":
        return nn.Softmax(dim=int(attrs.get("axis", -1)))
    if op in ("MaxPool", "AveragePool"):
        return _pool(node, attrs)
    if op == "BatchNormalization":
        scale, bias, mean, var = (_need_constant(node, i, constants) for i in range(1, 5))
        return batch_norm(scale, bias, mean, var, float(attrs.get("epsilon", 1e-5)))
    if op == "Flatten":
        axis = int(attrs.get("axis", 1))
        return nn.Flatten() if axis == 1 else _Flatten(axis)
    if op == "Reshape":
        if len(node.input) < 2 or not node.input[1]:
            raise _Unsupported(f"Reshape node {node.name!r} has no target shape")
        if node.input[1] in constants:
            target = constants[node.input[1]]
            if target.dim() != 1 or target.is_floating_point():
                raise _Unsupported(f"Reshape node {node.name!r} has target shape {str(target.tolist())[:60]}")
            return _Reshape([int(v) for v in target.tolist()])
        return _Reshape(None)
    if op == "Transpose":
        return Permute(_required(node, attrs, "perm"))
    if op == "Concat":
        return Concat(int(_required(node, attrs, "axis")))
    if op == "Gather":
        return _Gather(int(attrs.get("axis", 0)))
    if op == "Unsqueeze":
        axes = attrs.get("axes")
        if axes is None:
            axes = _need_constant(node, 1, constants).tolist()
        return _Unsqueeze([int(a) for a in axes])
    raise _Unsupported(f"unsupported ONNX operator {op!r} (node {node.name!r}); supported: {', '.join(SUPPORTED_OPS)}")


def _conv(node: Any, attrs: dict[str, Any], constants: dict[str, torch.Tensor]) -> nn.Module:
    weight = _need_constant(node, 1, constants)
    if weight.dim() != 4:
        raise _Unsupported(f"Conv node {node.name!r} is not a 2-D convolution (weight {tuple(weight.shape)})")
    cout, cin_per_group, kh, kw = weight.shape
    groups = int(attrs.get("group", 1))
    same = _same_pad(attrs, (kh, kw))
    pad, padding = _asymmetric_pad(_pads(attrs)) if same is None else (same, (0, 0))
    has_bias = len(node.input) > 2 and bool(node.input[2])
    conv = nn.Conv2d(
        cin_per_group * groups,
        cout,
        (kh, kw),
        stride=tuple(attrs.get("strides", [1, 1])),
        padding=padding,
        dilation=tuple(attrs.get("dilations", [1, 1])),
        groups=groups,
        bias=has_bias,
    )
    with torch.no_grad():
        conv.weight.copy_(weight)
        if conv.bias is not None:
            bias = _need_constant(node, 2, constants)
            if bias.numel() != cout:
                raise _Unsupported(f"Conv node {node.name!r} has {bias.numel()} biases for {cout} output channels")
            conv.bias.copy_(bias.reshape(-1))
    return chain(("pad", pad), ("conv", conv))


def _pool(node: Any, attrs: dict[str, Any]) -> nn.Module:
    kernel = tuple(_required(node, attrs, "kernel_shape"))
    if len(kernel) != 2:
        raise _Unsupported(f"{node.op_type} node {node.name!r} is not a 2-D pool")
    strides = tuple(attrs.get("strides", [1, 1]))
    ceil_mode = bool(attrs.get("ceil_mode", 0))
    is_max = node.op_type == "MaxPool"
    fill = float("-inf") if is_max else 0.0
    same = _same_pad(attrs, kernel, fill)
    pad, padding = _asymmetric_pad(_pads(attrs), fill) if same is None else (same, (0, 0))
    if is_max:
        dilation = tuple(attrs.get("dilations", [1, 1]))
        pool: nn.Module = nn.MaxPool2d(kernel, strides, padding, dilation=dilation, ceil_mode=ceil_mode)
    else:
        count_pad = bool(attrs.get("count_include_pad", 0))
        if pad is not None and not count_pad:
            raise _Unsupported(f"AveragePool node {node.name!r} has asymmetric padding that must not be counted")
        pool = nn.AvgPool2d(kernel, strides, padding, ceil_mode=ceil_mode, count_include_pad=count_pad)
    return chain(("pad", pad), ("pool", pool))


class _Flatten(nn.Module):
    """ONNX ``Flatten`` with an axis other than 1: a 2-D tensor split before ``axis``."""

    def __init__(self, axis: int) -> None:
        super().__init__()
        self.axis = axis

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        axis = self.axis % x.dim() if x.dim() else 0
        lead = int(np.prod(x.shape[:axis])) if axis else 1
        return x.reshape(lead, -1)


class _Reshape(nn.Module):
    """ONNX ``Reshape`` (0 copies a dimension, -1 is inferred), keeping the batch dimension.

    Args:
        shape: the constant target shape, or None when it is computed in the graph.
    """

    def __init__(self, shape: list[int] | None) -> None:
        super().__init__()
        self.shape = shape

    def forward(self, x: torch.Tensor, shape: torch.Tensor | None = None) -> torch.Tensor:
        target = self.shape if self.shape is not None else [int(v) for v in shape.tolist()]  # type: ignore[union-attr]
        dims = [x.shape[i] if v == 0 else v for i, v in enumerate(target)]
        if self.shape is not None and dims:
            dims[0] = x.shape[0]
        return x.reshape(dims)


class _Shape(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tensor(x.shape, dtype=torch.long)


class _Gather(nn.Module):
    def __init__(self, axis: int) -> None:
        super().__init__()
        self.axis = axis

    def forward(self, x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        return torch.index_select(x, self.axis, index.reshape(-1).long()).reshape(
            x.shape[: self.axis] + index.shape + x.shape[self.axis + 1 :]
        )


class _Unsqueeze(nn.Module):
    def __init__(self, axes: list[int]) -> None:
        super().__init__()
        self.axes = sorted(axes)

    def forward(self, x: torch.Tensor, *_axes: torch.Tensor) -> torch.Tensor:
        for axis in self.axes:
            x = x.unsqueeze(axis)
        return x


# -- writing weights back --------------------------------------------------------------------
def write_onnx_weights(
    network: nn.Module, source: str | Path, dest: str | Path, metadata: dict[str, str] | None = None
) -> Path:
    """Write ``network``'s weights into a copy of the ONNX file ``source`` it was converted from.

    ``network`` must have the structure :func:`load_onnx` builds from ``source`` (a repaired
    copy: the mitigations change weights, never layers). The copy keeps everything else of the
    file: its graph, node and tensor names, input layout, final softmax and opset, so it loads
    back with the same layer names. ``metadata`` entries are set in its ``metadata_props``.
    Returns ``dest``.

    Raises:
        ModelError: ``source`` is unreadable, ``network`` does not match it, a repaired weight
            has no place in the file (e.g. a bias stored as one value shared by all units), or
            ``dest`` cannot be written.
    """
    import onnx

    src, out = Path(source), Path(dest)
    converted = load_onnx(src)
    expected = {k: tuple(v.shape) for k, v in converted.network.state_dict().items()}
    if expected != {k: tuple(v.shape) for k, v in network.state_dict().items()}:
        raise ModelError(f"{src}: the network to write no longer has this ONNX model's layers and weight shapes")
    model = onnx.load(str(src), load_external_data=False)
    nodes = {node.output[0]: node for node in model.graph.node if node.output}
    store = _TensorStore(model.graph, onnx, src)
    modules = dict(network.named_modules())
    weighted = (nn.Conv2d, nn.Linear, nn.modules.batchnorm._BatchNorm)
    covered: set[int] = set()
    for output, name in converted.layer_modules.items():
        leaves = [m for m in modules[name].modules() if isinstance(m, weighted)]
        if not leaves:
            continue
        if len(leaves) > 1:
            raise ModelError(f"{src}: node {output!r} became {len(leaves)} weighted modules; cannot write it back")
        node = nodes[output]
        for position, value in _node_weights(node, _attributes(node, onnx), leaves[0], src):
            store.put(node.input[position], value.detach().cpu().numpy(), node.op_type)
        covered.add(id(leaves[0]))
    stray = [n for n, m in modules.items() if isinstance(m, weighted) and id(m) not in covered]
    if stray:
        raise ModelError(f"{src}: module {stray[0]!r} holds weights that belong to no ONNX node; cannot write it back")
    props = {prop.key: prop.value for prop in model.metadata_props}
    props.update(metadata or {})
    del model.metadata_props[:]
    for key, value in props.items():
        model.metadata_props.add(key=key, value=value)
    try:
        with replacing(out) as tmp:
            # the serialized bytes, never onnx.save: its external-data pass writes tensor bytes to
            # file names the model itself chooses
            tmp.write_bytes(model.SerializeToString())
    except OSError as exc:
        raise ModelError(f"{out}: cannot write the model there ({exc.strerror or exc})") from exc
    return out


def _node_weights(node: Any, attrs: dict[str, Any], leaf: nn.Module, path: Path) -> list[tuple[int, torch.Tensor]]:
    """(input position, value in the node's own layout) for each weight of a converted node:
    the inverse of :func:`_convert_node` (Gemm's ``alpha``/``beta`` and ``transB`` undone)."""
    op = node.op_type
    if op == "Conv" and isinstance(leaf, nn.Conv2d):
        return [(1, leaf.weight)] + ([(2, leaf.bias)] if leaf.bias is not None else [])
    if op == "MatMul" and isinstance(leaf, nn.Linear):
        return [(1, leaf.weight.T)]
    if op == "Gemm" and isinstance(leaf, nn.Linear):
        alpha, beta = float(attrs.get("alpha", 1.0)), float(attrs.get("beta", 1.0))
        if alpha == 0 or (leaf.bias is not None and beta == 0):
            raise ModelError(f"{path}: Gemm node {node.name!r} scales by zero; its weights cannot be written back")
        weight = leaf.weight / alpha
        values = [(1, weight if attrs.get("transB", 0) else weight.T)]
        return values + ([(2, leaf.bias / beta)] if leaf.bias is not None else [])
    if op == "BatchNormalization" and isinstance(leaf, nn.modules.batchnorm._BatchNorm):
        assert leaf.running_mean is not None and leaf.running_var is not None  # built with running statistics
        return [(1, leaf.weight), (2, leaf.bias), (3, leaf.running_mean), (4, leaf.running_var)]
    raise ModelError(f"{path}: cannot write the weights of {op} node {node.name!r} back")


class _TensorStore:
    """The graph's constant tensors (initializers, ``Constant`` nodes), by name, for overwriting in
    place. A weight that is an ``Identity`` alias of another (exporters merge equal tensors, e.g.
    a fresh batch norm's scale and variance) gets a tensor of its own: the two may now differ."""

    def __init__(self, graph: Any, onnx: Any, path: Path) -> None:
        self.graph, self.onnx, self.path = graph, onnx, path
        self.initializers = {init.name: init for init in graph.initializer}
        self.constants = {n.output[0]: n for n in graph.node if n.op_type == "Constant" and n.output}
        self.aliases = {n.output[0]: n for n in graph.node if n.op_type == "Identity" and n.input and n.output}
        self.written: dict[str, np.ndarray] = {}

    def put(self, name: str, value: np.ndarray, op: str) -> None:
        """Store ``value`` as the tensor ``name`` (same shape, or same size reshaped; same dtype)."""
        proto = self._tensor(name, op, set())
        shape = tuple(int(d) for d in proto.dims)
        if int(np.prod(shape)) != value.size:
            raise ModelError(
                f"{self.path}: weight {name!r} is stored as {shape}, too small for the {value.size} repaired values"
            )
        array = value.reshape(shape).astype(self.onnx.helper.tensor_dtype_to_np_dtype(proto.data_type))
        if name in self.written:
            if not np.array_equal(self.written[name], array):
                raise ModelError(f"{self.path}: weight {name!r} is shared by several nodes that now differ")
            return
        self.written[name] = array
        proto.CopyFrom(self.onnx.numpy_helper.from_array(array, proto.name))

    def _tensor(self, name: str, op: str, seen: set[str]) -> Any:
        """The TensorProto holding ``name``; an alias is turned into an initializer of its own."""
        if name in self.initializers:
            return self.initializers[name]
        if name in self.constants:
            for attr in self.constants[name].attribute:
                if attr.name == "value":
                    return attr.t
        elif name in self.aliases and name not in seen:
            source = self._tensor(self.aliases[name].input[0], op, seen | {name})
            self.graph.node.remove(self.aliases.pop(name))
            own = self.graph.initializer.add()
            own.CopyFrom(source)
            own.name = name
            self.initializers[name] = own
            return own
        raise ModelError(f"{self.path}: weight {name!r} of an {op} node is not a stored tensor it can be written to")
