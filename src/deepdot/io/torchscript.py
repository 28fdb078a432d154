"""Reading TorchScript archives without letting them act.

A TorchScript archive is a program, not weights: its ``code/`` folder holds source that the
TorchScript interpreter runs. Two moments run it:

* **loading**: ``torch.jit.load`` calls the ``__setstate__`` method of every scripted object
  that defines one, and the ``__setstate__`` of C++ "torchbind" classes (``torch.classes.*``);
* **calling**: ``forward`` (and every method and hook it reaches) runs whatever operators the
  file's code names — ``torch.from_file`` can create or overwrite any file the user can write.

So a hostile archive is checked twice, and refused with one line naming what it found:

1. *before loading* (:func:`check_archive`): the archive is read with the same reader
   ``torch.jit.load`` uses; its unpacked size is bounded (:data:`deepdot.io.limits.MODEL_BYTES`)
   and no record other than tensor data may mention ``__setstate__`` or ``torch.classes``
   (source code cannot name a method without spelling it, so a file that never spells it
   defines no load-time code);
2. *after loading, before anything runs* (:func:`check_module`): every method of every
   submodule, its forward hooks and pre-hooks, is inlined into one graph and every operator in
   it must be on :data:`ALLOWED_OPS`, an explicit list of pure tensor operations (convolution,
   linear algebra, pooling, normalisation, activations, reshaping, arithmetic, softmax) and the
   control operations that traced or scripted classifiers use. Operators that read or write
   files, storages or memory maps, print, touch random state, call custom classes or Python,
   or create tensors of a size the file chooses (``zeros``, ``expand``, ``repeat``,
   ``upsample``, ``pad``, …) are not on it.

A user who trusts a file can skip both checks (``allow_code=True``, ``--allow-code``).

Why check, and not convert the graph into an ordinary module as the ONNX importer does: a
checked archive runs under TorchScript itself, so every op keeps TorchScript's own semantics
with no second interpreter to get wrong, while the allow-list gives the same guarantee — only
listed operators can run. Converting would also make the models hookable (mitigation by
pruning needs hooks); that is left to the architectures issue, which widens the list anyway.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import torch

from deepdot.errors import ModelError, describe
from deepdot.io.limits import MODEL_BYTES

# Load-time code: ``__setstate__`` methods (scripted classes) and torchbind classes (C++ objects
# whose ``__setstate__`` runs while unpickling); ``__getstate__`` runs when a model is saved again
# (``deepdot mitigate`` copies TorchScript models by saving and reloading them).
_LOAD_TIME_MARKERS = (b"__setstate__", b"__getstate__", b"torch.classes")

# Operators a classifier's forward pass may use. Everything else is refused (see module doc).
ALLOWED_OPS = frozenset(
    {
        # convolution and linear algebra
        "aten::_convolution", "aten::conv1d", "aten::conv2d", "aten::conv3d", "aten::convolution",
        "aten::linear", "aten::matmul", "aten::mm", "aten::bmm", "aten::addmm", "aten::baddbmm",
        # pooling
        "aten::max_pool1d", "aten::max_pool2d", "aten::max_pool3d", "aten::avg_pool1d", "aten::avg_pool2d",
        "aten::avg_pool3d", "aten::adaptive_avg_pool1d", "aten::adaptive_avg_pool2d", "aten::adaptive_max_pool2d",
        "aten::max_pool2d_with_indices", "aten::adaptive_max_pool1d",
        # normalisation
        "aten::batch_norm", "aten::_batch_norm_impl_index", "aten::native_batch_norm", "aten::layer_norm",
        "aten::group_norm", "aten::instance_norm", "aten::local_response_norm",
        # activations
        "aten::relu", "aten::relu_", "aten::relu6", "aten::relu6_", "aten::hardtanh", "aten::hardtanh_",
        "aten::leaky_relu", "aten::leaky_relu_", "aten::elu", "aten::elu_", "aten::selu", "aten::selu_",
        "aten::celu", "aten::gelu", "aten::silu", "aten::silu_", "aten::sigmoid", "aten::sigmoid_",
        "aten::tanh", "aten::tanh_", "aten::hardswish", "aten::hardswish_", "aten::hardsigmoid",
        "aten::hardsigmoid_", "aten::softplus", "aten::mish", "aten::prelu", "aten::threshold",
        "aten::threshold_", "aten::clamp", "aten::clamp_", "aten::clamp_min", "aten::clamp_min_",
        "aten::clamp_max", "aten::clip", "aten::softmax", "aten::log_softmax", "aten::_softmax",
        # dropout (identity in eval mode)
        "aten::dropout", "aten::dropout_", "aten::feature_dropout", "aten::alpha_dropout",
        "aten::feature_alpha_dropout",
        # reshaping and indexing (no larger than their input)
        "aten::view", "aten::reshape", "aten::flatten", "aten::permute", "aten::transpose", "aten::t",
        "aten::contiguous", "aten::squeeze", "aten::unsqueeze", "aten::chunk", "aten::split",
        "aten::split_with_sizes", "aten::unbind", "aten::cat", "aten::concat", "aten::stack", "aten::narrow",
        "aten::slice", "aten::select", "aten::index_select", "aten::view_as", "aten::reshape_as",
        "aten::flip", "aten::roll", "aten::channel_shuffle", "aten::pixel_shuffle", "aten::pixel_unshuffle",
        "aten::numel", "aten::size", "aten::dim", "aten::detach", "aten::type_as", "aten::to", "aten::float",
        "aten::zeros_like", "aten::ones_like", "aten::expand_as",
        # arithmetic and reductions (tensors and scalars)
        "aten::add", "aten::add_", "aten::sub", "aten::sub_", "aten::rsub", "aten::mul", "aten::mul_",
        "aten::div", "aten::div_", "aten::neg", "aten::pow", "aten::sqrt", "aten::rsqrt", "aten::exp",
        "aten::log", "aten::abs", "aten::erf", "aten::reciprocal", "aten::sign", "aten::floor", "aten::ceil",
        "aten::round", "aten::mean", "aten::sum", "aten::max", "aten::min", "aten::amax", "aten::amin",
        "aten::maximum", "aten::minimum", "aten::argmax", "aten::norm", "aten::var", "aten::std",
        "aten::where", "aten::masked_fill", "aten::floordiv", "aten::floor_divide", "aten::remainder",
        "aten::__and__", "aten::__or__", "aten::__not__", "aten::eq", "aten::ne", "aten::lt", "aten::le",
        "aten::gt", "aten::ge", "aten::__is__", "aten::__isnot__", "aten::__contains__",
        # the bookkeeping of scripted modules: sizes, lists, checks and their messages
        "aten::len", "aten::__getitem__", "aten::append", "aten::list", "aten::Int", "aten::Float",
        "aten::Bool", "aten::ScalarImplicit", "aten::format", "aten::str", "aten::item", "aten::tensor",
        "aten::warn",  # a Python warning (nn.Softmax without dim); deepdot silences warnings for users
        "prim::Constant", "prim::GetAttr", "prim::SetAttr", "prim::ListConstruct", "prim::ListUnpack",
        "prim::TupleConstruct", "prim::TupleUnpack", "prim::TupleIndex", "prim::If", "prim::Loop",
        "prim::RaiseException", "prim::unchecked_cast", "prim::Uninitialized", "prim::NumToTensor",
        "prim::device", "prim::dtype", "prim::min", "prim::max", "prim::isinstance", "prim::dim",
        "prim::shape", "prim::is_cuda", "prim::layout",
    }
)  # fmt: skip


def is_flatbuffer(head: bytes) -> bool:
    """Whether a file's first bytes are PyTorch's flatbuffer format (``PTMF`` at offset 4)."""
    return head[4:8] == b"PTMF"


def read_archive(path: Path) -> bytes:
    """The archive's bytes, read once: the checks and the loader must see the same bytes (a file
    swapped between check and load, or read differently by two readers, would slip through).

    Only a plain zip is accepted: ``torch.jit.load`` also takes PyTorch's flatbuffer format,
    which it recognises by the bytes ``PTMF`` at offset 4 *before* looking for a zip, while the
    zip reader finds a zip appended at the end. A file that is both would be checked as its
    harmless zip and loaded as its flatbuffer (whose ``__setstate__`` runs at load).
    """
    try:
        MODEL_BYTES.check(path.stat().st_size, f"{path}: the TorchScript archive", ModelError)
        data = path.read_bytes()
    except OSError as exc:
        raise ModelError(f"{path}: cannot read ({exc.strerror or exc})") from exc
    if not data.startswith(b"PK\x03\x04") or is_flatbuffer(data):
        raise ModelError(
            f"{path}: refused: not a plain TorchScript zip archive (other layouts can hide code); "
            "if you trust the file, pass --allow-code"
        )
    return data


def check_archive(path: Path, data: bytes) -> None:
    """Refuse an archive (its bytes ``data``) that would run code or exhaust memory while
    ``torch.jit.load`` reads it."""
    try:
        reader = torch._C.PyTorchFileReader(io.BytesIO(data))
        records = reader.get_all_records()
        sizes = {name: int(reader.get_record_size(name)) for name in records}
    except (RuntimeError, ValueError, OSError) as exc:
        raise ModelError(f"{path}: corrupt or truncated TorchScript archive ({describe(exc)})") from exc
    MODEL_BYTES.check(sum(sizes.values()), f"{path}: the archive's contents", ModelError)
    for name in records:
        if name.startswith("data/") or name.startswith(".data/"):
            continue  # tensor storages: bytes the interpreter never reads as code
        try:
            content = bytes(reader.get_record(name))
        except (RuntimeError, ValueError, OSError) as exc:
            raise ModelError(f"{path}: corrupt or truncated TorchScript archive ({describe(exc)})") from exc
        for marker in _LOAD_TIME_MARKERS:
            if marker in content:
                raise ModelError(
                    f"{path}: refused: its record {name} holds {marker.decode()}, code that would run while the "
                    "file is loaded or saved; if you trust the file, pass --allow-code"
                )


def check_module(module: torch.jit.ScriptModule, path: Path) -> None:
    """Refuse a loaded archive whose methods or hooks use an operator not on :data:`ALLOWED_OPS`."""
    for owner, name, graph in _graphs(module):
        graph = graph.copy()
        torch._C._jit_pass_inline(graph)
        bad = _first_forbidden(graph.block())
        if bad is not None:
            where = f"{owner}.{name}" if owner else name
            raise ModelError(
                f"{path}: refused: {where} uses {bad}, which is not among the pure, bounded tensor operations "
                "deepdot allows in TorchScript; if you trust the file, pass --allow-code"
            )


def load_torchscript(path: Path, *, allow_code: bool = False) -> tuple[torch.jit.ScriptModule, dict[str, Any]]:
    """A checked TorchScript module and the ``model.json`` embedded in the archive (or ``{}``).

    Args:
        path: the archive.
        allow_code: skip both checks (the file's code may then run: only for trusted files).

    Raises:
        ModelError: one line naming the file and what was refused or is corrupt.
    """
    if allow_code:
        source: Any = str(path)
    else:
        data = read_archive(path)
        check_archive(path, data)
        source = io.BytesIO(data)  # the very bytes that were checked
    extra = {"model.json": ""}
    try:
        module = torch.jit.load(source, map_location="cpu", _extra_files=extra)
    except (RuntimeError, ValueError, OSError, IndexError, KeyError, TypeError) as exc:
        raise ModelError(f"{path}: corrupt or truncated TorchScript archive ({describe(exc)})") from exc
    if not allow_code:
        check_module(module, path)
    embedded: dict[str, Any] = {}
    if extra["model.json"]:
        try:
            embedded = json.loads(extra["model.json"])
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ModelError(f"{path}: its embedded model.json is not valid JSON ({exc})") from exc
        if not isinstance(embedded, dict):
            raise ModelError(f"{path}: its embedded model.json is not a JSON object")
    return module, embedded


def _graphs(module: torch.jit.ScriptModule) -> list[tuple[str, str, torch.Graph]]:
    """(submodule name, method or hook name, graph) for everything a call can reach."""
    found = []
    for owner, sub in module.named_modules():
        c = sub._c
        for name in c._method_names():
            found.append((owner, name, c._get_method(name).graph))
        for kind, hooks in (("forward hook", c._get_forward_hooks()), ("pre-hook", c._get_forward_pre_hooks())):
            for hook in hooks:
                found.append((owner, f"{kind} {hook.name}", hook.graph))
    return found


#: arithmetic that TorchScript also defines on lists (``[0.0] * 100_000_000``): tensors only
_LIST_ARITHMETIC = frozenset({"aten::add", "aten::add_", "aten::mul", "aten::mul_"})
#: how a loop's trip count may be computed for the loop to count as bounded
_COUNTS = frozenset({"aten::len", "aten::dim", "aten::sub", "aten::add", "aten::__range_length", "prim::min"})
MAX_CONSTANT_TRIPS = 64


def _first_forbidden(block: torch.Block, in_loop: bool = False) -> str | None:
    """The first operator of ``block`` (and its sub-blocks) that may not run, described."""
    for node in block.nodes():
        kind = node.kind()
        if kind not in ALLOWED_OPS:
            return kind
        outputs = [o.type().kind() for o in node.outputs()]
        if kind in _LIST_ARITHMETIC and "ListType" in outputs:
            return f"{kind} on a list (a size the file chooses)"
        if in_loop and "TensorType" in outputs:
            return f"{kind} inside a loop (tensor work repeated a number of times the file chooses)"
        if kind == "prim::Loop" and not _bounded(node.inputsAt(0)):
            return "prim::Loop without a small fixed bound (a while loop, or a count the file chooses)"
        for sub in node.blocks():
            bad = _first_forbidden(sub, in_loop or kind == "prim::Loop")
            if bad is not None:
                return bad
    return None


def _bounded(count: torch.Value) -> bool:
    """Whether a loop's trip count is a small constant, or arithmetic on sizes and lengths
    (scripted modules loop over a tensor's dimensions to check them)."""
    node = count.node()
    if node.kind() == "prim::Constant":
        value = count.toIValue()
        return isinstance(value, int) and 0 <= value <= MAX_CONSTANT_TRIPS
    if node.kind() in ("aten::len", "aten::dim"):
        return True
    return node.kind() in _COUNTS and all(_bounded(v) for v in node.inputs())
