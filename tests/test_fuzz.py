"""Seeded fuzzing: randomly corrupted model, data and trigger files never crash deepdot.

Every supported input format is written once per module by its real producer (safetensors +
model.json, a ``state_dict``, TorchScript, ONNX, Keras HDF5 and ``.keras``, ``.npz`` and HDF5
data, a PNG class folder, a trigger ``.npz``). Each case corrupts one pristine file at the byte
level (flipped bytes, truncation, inserted or deleted runs, a zeroed region, a duplicated
region) with its own seed, and runs ``deepdot evaluate`` on it in-process. Whatever the damage,
the command must either still work (a damaged weight is still a weight: exit 0) or refuse the
file with exit code 2 and one line on stderr: never an uncaught exception, a traceback or an
"internal error", and never a file written anywhere.

The cases are reproducible: a case is named ``<format>-<n>`` and its corruption depends only on
that name and the pristine file, which its producer writes byte for byte the same every time.
A few cases also run through the installed ``deepdot`` executable, to check that nothing else
(a library's warning, a traceback) reaches the terminal.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import pytest
from typer.testing import CliRunner

from deepdot.cli import app
from deepdot.io import load_data

#: Cases per format (350 in all; the whole file runs in well under a minute on 2 cores).
CASES = {
    "safetensors": 30,
    "state_dict": 30,
    "torchscript": 30,
    "onnx": 60,
    "keras_h5": 60,
    "keras_zip": 40,
    "data_npz": 25,
    "data_h5": 25,
    "data_png": 25,
    "trigger": 25,
}
KERAS_FORMATS = ("keras_h5", "keras_zip")
runner = CliRunner()
#: A case that hangs (a parser looping in C code, where no Python signal can stop it) fails the
#: run with a stack dump instead of stalling it.
pytestmark = pytest.mark.timeout(120, method="thread")


# -- pristine files ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Pristine:
    """The pristine files of every format, under ``root``."""

    root: Path
    keras: bool  # whether Keras could write its formats

    @property
    def model(self) -> Path:
        """A pristine model (deepdot's own format), for the data and trigger cases."""
        return self.root / "safetensors" / "model.safetensors"


#: Writes the pristine model files into the folder given as its argument, in a fresh interpreter:
#: producers keep state across a session (TorchScript renames a class compiled twice, Keras
#: numbers its layers), so written in-process the files would depend on which tests ran before.
_PRODUCER = r"""
import json, os, re, sys, warnings, zipfile
from pathlib import Path

os.environ["KERAS_BACKEND"] = "torch"
warnings.simplefilter("ignore")
import torch
from deepdot.io import load_data
from deepdot.io.models import save_model
from deepdot.models import build_classifier

root = Path(sys.argv[1])
made = {"onnx": False, "keras": False}
torch.manual_seed(0)
classifier = build_classifier("digits_net")
network = classifier.network.eval()
example = load_data("digits:test").x[:1]
save_model(classifier, root / "safetensors")
(root / "state_dict").mkdir()
torch.save(network.state_dict(), root / "state_dict" / "model.pt")
(root / "torchscript").mkdir()
with torch.no_grad():
    torch.jit.trace(network, example).save(str(root / "torchscript" / "model.pt"))
(root / "torchscript" / "model.json").write_text(json.dumps({"input_shape": [1, 16, 16]}))
try:
    import onnx  # noqa: F401
except ImportError:
    pass
else:
    (root / "onnx").mkdir()
    torch.onnx.export(
        network, example, root / "onnx" / "model.onnx", dynamo=False, input_names=["x"], dynamic_axes={"x": {0: "n"}}
    )
    made["onnx"] = True
try:
    import keras
    from keras import layers
except ImportError:
    pass
else:
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((16, 16, 1)),
            layers.Conv2D(8, 3, padding="same", activation="relu"),
            layers.BatchNormalization(),
            layers.MaxPooling2D(),
            layers.Flatten(),
            layers.Dense(10, activation="softmax"),
        ]
    )
    (root / "keras_h5").mkdir()
    (root / "keras_zip").mkdir()
    model.save(root / "keras_h5" / "model.h5")
    archive = root / "keras_zip" / "model.keras"
    model.save(archive)
    # Without its save date, member timestamps and memory addresses (config.json's shared_object_id).
    with zipfile.ZipFile(archive) as source:
        members = [(info.filename, source.read(info.filename)) for info in source.infolist()]
    ids = {}
    with zipfile.ZipFile(archive, "w") as out:
        for name, data in members:
            if name == "metadata.json":
                data = json.dumps({**json.loads(data), "date_saved": "2000-01-01@00:00:00"}).encode()
            if name == "config.json":
                renumber = lambda m: b'"shared_object_id": %d' % ids.setdefault(m.group(1), len(ids) + 1)
                data = re.sub(rb'"shared_object_id": (\d+)', renumber, data)
            out.writestr(zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0)), data)
    made["keras"] = True
(root / "made.json").write_text(json.dumps(made))
"""


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Pristine:
    root = tmp_path_factory.mktemp("pristine")
    made = subprocess.run([sys.executable, "-c", _PRODUCER, str(root)], capture_output=True, text=True, timeout=300)
    assert made.returncode == 0, f"writing the pristine models failed:\n{made.stderr}"
    keras = json.loads((root / "made.json").read_text())["keras"]
    (root / "made.json").unlink()
    _write_data(root)
    return Pristine(root, keras)


def _write_data(root: Path) -> None:
    """The pristine data sets (60 digits images) and trigger, byte for byte the same every time."""
    test = load_data("digits:test")
    x, y = test.x[:60].numpy(), test.y[:60].numpy()
    (root / "data_npz").mkdir()
    np.savez(root / "data_npz" / "data.npz", x=(x * 255).astype(np.uint8), y=y)
    (root / "data_h5").mkdir()
    with h5py.File(root / "data_h5" / "data.h5", "w") as f:
        f.create_dataset("X_test", data=x.transpose(0, 2, 3, 1) * 255)
        f.create_dataset("Y_test", data=np.eye(10, dtype=np.float32)[y])
    from PIL import Image

    for label in range(10):
        folder = root / "data_png" / "data" / str(label)
        folder.mkdir(parents=True)
        for i, image in enumerate(x[y == label][:2]):
            Image.fromarray((image[0] * 255).astype(np.uint8), mode="L").save(folder / f"{i}.png")
    (root / "trigger").mkdir()
    mask = np.zeros((16, 16), np.float32)
    mask[12:15, 12:15] = 1
    np.savez(root / "trigger" / "trigger.npz", mask=mask, pattern=np.ones((1, 16, 16), np.float32))


# -- corruption ----------------------------------------------------------------------------------
def _position(rng: random.Random, size: int) -> int:
    """A byte offset: uniform half the time, else near the start or the end of the file (where
    headers, indexes and central directories live)."""
    if size <= 1:
        return 0
    roll = rng.random()
    if roll < 0.5:
        return rng.randrange(size)
    near = rng.randrange(min(size, 2048))
    return near if roll < 0.8 else size - 1 - near


def _run_length(rng: random.Random) -> int:
    return rng.choice((1, 2, 4, 8, 16, 64, 256, 1024))


def _flip(data: bytearray, rng: random.Random) -> bytearray:
    for _ in range(rng.randint(1, 16)):
        if data:
            data[_position(rng, len(data))] ^= rng.randint(1, 255)
    return data


def _truncate(data: bytearray, rng: random.Random) -> bytearray:
    return data[: _position(rng, len(data))]


def _insert(data: bytearray, rng: random.Random) -> bytearray:
    at = _position(rng, len(data))
    return data[:at] + bytearray(rng.randbytes(_run_length(rng))) + data[at:]


def _delete(data: bytearray, rng: random.Random) -> bytearray:
    at = _position(rng, len(data))
    return data[:at] + data[at + _run_length(rng) :]


def _zero(data: bytearray, rng: random.Random) -> bytearray:
    at = _position(rng, len(data))
    end = min(len(data), at + _run_length(rng))
    data[at:end] = bytes(end - at)
    return data


def _duplicate(data: bytearray, rng: random.Random) -> bytearray:
    start = _position(rng, len(data))
    region = data[start : start + _run_length(rng)]
    at = _position(rng, len(data))
    return data[:at] + region + data[at:]


CORRUPTIONS: dict[str, Callable[[bytearray, random.Random], bytearray]] = {
    "flip": _flip,
    "truncate": _truncate,
    "insert": _insert,
    "delete": _delete,
    "zero": _zero,
    "duplicate": _duplicate,
}


def corrupt(data: bytes, rng: random.Random) -> tuple[bytes, str]:
    """``data`` damaged by one or (a quarter of the time) two corruptions, and their names."""
    out, names = bytearray(data), []
    for _ in range(2 if rng.random() < 0.25 else 1):
        name = rng.choice(sorted(CORRUPTIONS))
        out = CORRUPTIONS[name](out, rng)
        names.append(name)
    return bytes(out), "+".join(names)


# -- running a case ------------------------------------------------------------------------------
def _victim(fmt: str, folder: Path, rng: random.Random) -> Path:
    """The file of a copied pristine ``folder`` that a case of ``fmt`` corrupts."""
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    if fmt == "safetensors":  # mostly the weights, sometimes model.json
        return folder / ("model.json" if rng.random() < 0.25 else "model.safetensors")
    if fmt == "torchscript":
        return folder / "model.pt"
    return rng.choice(files) if fmt == "data_png" else files[0]


def _command(fmt: str, case: Path, pristine: Pristine) -> list[str]:
    if fmt == "safetensors":
        return ["evaluate", str(case / "model.safetensors"), "--data", "digits"]
    if fmt == "state_dict":
        return ["evaluate", str(case / "model.pt"), "--data", "digits", "--arch", "digits_net"]
    if fmt == "torchscript":
        return ["evaluate", str(case / "model.pt"), "--data", "digits"]
    if fmt == "onnx":
        return ["evaluate", str(case / "model.onnx"), "--data", "digits"]
    if fmt == "keras_h5":
        return ["evaluate", str(case / "model.h5"), "--data", "digits"]
    if fmt == "keras_zip":
        return ["evaluate", str(case / "model.keras"), "--data", "digits"]
    if fmt == "data_npz":
        return ["evaluate", str(pristine.model), "--data", str(case / "data.npz")]
    if fmt == "data_h5":
        return ["evaluate", str(pristine.model), "--data", str(case / "data.h5")]
    if fmt == "data_png":
        return ["evaluate", str(pristine.model), "--data", str(case / "data")]
    assert fmt == "trigger"
    return [
        "evaluate",
        str(pristine.model),
        "--data",
        "digits",
        "--trigger",
        str(case / "trigger.npz"),
        "--target",
        "7",
    ]


def prepare(fmt: str, n: int, pristine: Pristine, tmp_path: Path) -> tuple[list[str], str]:
    """Copy the pristine files of ``fmt`` to ``tmp_path/case``, corrupt one of them; return the
    command to run and a description of the damage."""
    if fmt in KERAS_FORMATS and not pristine.keras:
        pytest.skip("keras is not installed")
    if fmt == "onnx" and not (pristine.root / "onnx").exists():
        pytest.skip("onnx is not installed")
    rng = random.Random(f"deepdot-fuzz-{fmt}-{n}")
    case = tmp_path / "case"
    shutil.copytree(pristine.root / fmt, case)
    victim = _victim(fmt, case, rng)
    data, how = corrupt(victim.read_bytes(), rng)
    victim.write_bytes(data)
    return _command(fmt, case, pristine), f"{how} of {victim.relative_to(case)} ({len(data)} bytes)"


def _listing(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


@pytest.fixture
def sandbox(tmp_path, monkeypatch):
    """A working directory and a canary folder that no case may write to, and small size limits
    (a corrupted header that declares gigabytes must be refused, not allocated)."""
    work, canary = tmp_path / "cwd", tmp_path / "canary"
    work.mkdir()
    canary.mkdir()
    (canary / "keep.txt").write_text("canary")
    monkeypatch.chdir(work)
    monkeypatch.setenv("DEEPDOT_MAX_MODEL_MB", "64")
    monkeypatch.setenv("DEEPDOT_MAX_DATA_MB", "64")
    monkeypatch.setenv("DEEPDOT_MAX_IMAGE_PIXELS", str(1 << 20))
    return tmp_path


def _check(exit_code: int, stderr: str, output: str, what: str) -> None:
    """The contract of ``deepdot evaluate`` on a damaged file."""
    assert exit_code in (0, 2), f"{what}: exit code {exit_code}\n{output}"
    assert "Traceback" not in output, f"{what}: traceback\n{output}"
    assert "internal error" not in output, f"{what}: internal error\n{output}"
    if exit_code == 2:
        lines = [line for line in stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("error:"), f"{what}: not one error line\n{stderr}"


FUZZ = [(fmt, n) for fmt, count in CASES.items() for n in range(count)]


@pytest.mark.parametrize(("fmt", "n"), FUZZ, ids=[f"{fmt}-{n}" for fmt, n in FUZZ])
def test_corrupted_file_is_used_or_refused_in_one_line(pristine, sandbox, fmt, n):
    before = _listing(sandbox)
    args, how = prepare(fmt, n, pristine, sandbox)
    result = runner.invoke(app, args)
    what = f"case {fmt}-{n} ({how}): deepdot {' '.join(args)}"
    assert result.exception is None or isinstance(result.exception, SystemExit), (
        f"{what}: uncaught {type(result.exception).__name__}: {result.exception}"
    )
    _check(result.exit_code, result.stderr, result.output, what)
    after = [p for p in _listing(sandbox) if p != "case" and not p.startswith(f"case{os.sep}")]
    assert after == before, f"{what}: files appeared: {sorted(set(after) - set(before))}"
    case_files = _listing(sandbox / "case")
    assert case_files == _listing(pristine.root / fmt), f"{what}: files appeared beside the model"


# -- through the real executable -------------------------------------------------------------------
#: (format, what to do to it): damage that certainly makes the file unreadable.
SUBPROCESS_CASES = [
    ("onnx", "truncate"),
    ("keras_h5", "truncate"),
    ("torchscript", "truncate"),
    ("data_npz", "garble"),
    ("data_png", "truncate"),
]


def _damage(data: bytes, how: str) -> bytes:
    if how == "truncate":
        return data[: len(data) // 2]
    return data[:16] + bytes(b ^ 0x5A for b in data[16:64]) + data[64:]  # the first member's header


def test_executable_prints_one_line_without_warnings(pristine, sandbox):
    exe = Path(sys.executable).parent / "deepdot"
    if not exe.exists():
        pytest.skip(f"{exe} is not installed")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONWARNINGS", "DEEPDOT_DEBUG")}
    runs = []
    for fmt, how in SUBPROCESS_CASES:
        if fmt in KERAS_FORMATS and not pristine.keras or not (pristine.root / fmt).exists():
            continue
        case = sandbox / f"case_{fmt}"
        shutil.copytree(pristine.root / fmt, case)
        victim = sorted(p for p in case.rglob("*") if p.is_file() and p.suffix not in (".json",))[0]
        victim.write_bytes(_damage(victim.read_bytes(), how))
        args = [str(exe), *_command(fmt, case, pristine)]
        process = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        runs.append((f"{fmt} ({how} of {victim.name})", process))
    for what, process in runs:
        stdout, stderr = process.communicate(timeout=120)
        _check(process.returncode, stderr, stdout + stderr, what)
        assert process.returncode == 2, f"{what}: expected exit 2, got {process.returncode}\n{stdout}{stderr}"
        assert "warn" not in stderr.lower(), f"{what}: a warning reached the terminal\n{stderr}"
        assert len(stderr.strip().splitlines()) == 1, f"{what}: stderr is not one line\n{stderr}"
    assert os.listdir(sandbox / "cwd") == [] and os.listdir(sandbox / "canary") == ["keep.txt"]
