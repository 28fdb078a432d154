"""Hostile data and trigger files end in one DataError line (exit code 2 from the CLI), never a
traceback, a Pillow warning, gigabytes of memory, or a read of a file outside the data.

Every hostile file is built here, in ``tmp_path``; limits are lowered through the environment so
that a reader which forgot a check would still allocate only megabytes.
"""

from __future__ import annotations

import io
import os
import struct
import subprocess
import sys
import tracemalloc
import warnings
import zipfile
import zlib
from collections.abc import Callable
from pathlib import Path

import h5py
import numpy as np
import pytest
from PIL import Image

from conftest import shared
from deepdot.errors import DataError, DeepdotError
from deepdot.io import load_data
from deepdot.io.files import load_trigger

DEEPDOT = Path(sys.executable).parent / "deepdot"
Case = tuple[Path, Path, str]  # (what the reader is given, the path its message names, a word of it)
LIMITS = {"DEEPDOT_MAX_DATA_MB": "64", "DEEPDOT_MAX_IMAGE_PIXELS": str(4096 * 4096)}


# ---------------------------------------------------------------- builders of hostile files


def _npy_header(shape: tuple[int, ...], dtype: str = "|u1") -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": dtype, "fortran_order": False, "shape": shape})
    return buf.getvalue()


def _bomb_npz(path: Path, shape: tuple[int, ...], write: int | None = None) -> Path:
    """An .npz whose x.npy declares ``shape`` (uint8), with ``write`` bytes of zeros after the
    header (all of them by default), streamed so the test itself never holds the array."""
    total = int(np.prod(shape)) if write is None else write
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        with z.open("x.npy", "w", force_zip64=True) as fh:
            fh.write(_npy_header(shape))
            block = bytes(1 << 20)
            for start in range(0, total, len(block)):
                fh.write(block[: min(len(block), total - start)])
        z.writestr("y.npy", _npy_bytes(np.zeros(shape[0], np.int64)))
    return path


def _npy_bytes(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a)
    return buf.getvalue()


def _valid_npz(path: Path, n: int = 6) -> Path:
    x = np.random.default_rng(0).integers(0, 256, (n, 16, 16), dtype=np.uint8)
    np.savez_compressed(path, x=x, y=np.arange(n) % 3)
    return path


def _png_bytes(width: int = 4, height: int = 4, mode: str = "L") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, (width, height), 128).save(buf, format="PNG")
    return buf.getvalue()


def _png_declaring(width: int, height: int) -> bytes:
    """A valid 4×4 PNG whose IHDR is patched to declare ``width`` × ``height`` (CRC fixed)."""
    data = bytearray(_png_bytes())
    assert data[12:16] == b"IHDR"
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def _folder(root: Path, images: dict[str, bytes]) -> Path:
    """A class folder ``root`` with ``{"0/a.png": bytes, …}``; returns ``root``."""
    for name, data in images.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    return root


def _h5(path: Path, build: Callable[[h5py.File], None], labels: int = 4) -> Path:
    with h5py.File(path, "w") as f:
        build(f)
        if "Y_test" not in f:
            f["Y_test"] = np.arange(labels) % 2
    return path


def _canary(tmp: Path) -> Path:
    """A file outside the data whose bytes must never reach deepdot."""
    p = tmp / "outside" / "secret.bin"
    p.parent.mkdir(exist_ok=True)
    p.write_bytes(b"CANARY" * 200)
    return p


def npz_bomb(tmp: Path) -> Case:
    # 60 MB of zeros in a ~60 KB file; decoded (uint8 + float32) it is 300 MB, over the 64 MB limit
    p = _bomb_npz(tmp / "bomb.npz", (2000, 3, 100, 100))
    assert p.stat().st_size < 1_000_000
    return p, p, "DEEPDOT_MAX_DATA_MB"


def npz_bomb_header(tmp: Path) -> Case:
    # the brief's 200 KB file: a header declaring 20000×3×100×100, refused before any data
    q = _bomb_npz(tmp / "bomb_header.npz", (20000, 3, 100, 100), write=1 << 20)
    return q, q, "over the limit"


def npz_object(tmp: Path) -> Case:
    p = tmp / "object.npz"
    np.savez(p, x=np.array([{"a": 1}] * 4, dtype=object), y=np.zeros(4, int))
    return p, p, "Python objects"


def npz_structured(tmp: Path) -> Case:
    p = tmp / "structured.npz"
    np.savez(p, x=np.zeros((4, 8, 8), dtype=[("a", "u1"), ("b", "f4")]), y=np.zeros(4, int))
    return p, p, "structured"


def npz_strings(tmp: Path) -> Case:
    p = tmp / "strings.npz"
    np.savez(p, x=np.array(["a"] * 4), y=np.zeros(4, int))
    return p, p, "dtype"


def npz_truncated(tmp: Path) -> Case:
    p = _valid_npz(tmp / "truncated.npz", 200)
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
    return p, p, "not a readable"


def npz_corrupt_deflate(tmp: Path) -> Case:
    p = tmp / "flipped.npz"
    np.savez_compressed(p, x=np.random.default_rng(0).integers(0, 256, (50, 16, 16), dtype=np.uint8), y=np.zeros(50))
    data = bytearray(p.read_bytes())
    for i in range(200, 600):
        data[i] ^= 0x5A
    p.write_bytes(bytes(data))
    return p, p, "not a readable"


def npz_member_not_npy(tmp: Path) -> Case:
    p = tmp / "junk_member.npz"
    with zipfile.ZipFile(p, "w") as z:
        z.writestr("x.npy", b"not an npy file at all")
        z.writestr("y.npy", _npy_bytes(np.zeros(4, np.int64)))
    return p, p, "not a readable"


def npz_num_classes_array(tmp: Path) -> Case:
    p = tmp / "num_classes.npz"
    np.savez(p, x=np.zeros((4, 8, 8), np.uint8), y=np.zeros(4, int), num_classes=np.arange(3))
    return p, p, "num_classes"


def npz_float_overflow(tmp: Path) -> Case:
    # float64 beyond float32's range: the cast would warn and give Inf
    p = tmp / "overflow.npz"
    np.savez(p, x=np.full((4, 8, 8), 1e300), y=np.zeros(4, int))
    return p, p, "Inf"


def npz_huge_float_labels(tmp: Path) -> Case:
    # the cast to int64 would warn and wrap
    p = tmp / "labels.npz"
    np.savez(p, x=np.zeros((2, 8, 8), np.uint8), y=np.array([0.0, 1e300]))
    return p, p, "labels"


def npz_many_classes(tmp: Path) -> Case:
    # one stray label must not make a model with a billion outputs
    p = tmp / "classes.npz"
    np.savez(p, x=np.zeros((2, 8, 8), np.uint8), y=np.array([0, 10**9]))
    return p, p, "classes"


def h5_external_storage(tmp: Path) -> Case:
    secret = _canary(tmp)

    def build(f: h5py.File) -> None:
        f.create_dataset("X_test", shape=(4, 10, 10), dtype="u1", external=[(str(secret), 0, h5py.h5f.UNLIMITED)])

    q = _h5(tmp / "external.h5", build)
    return q, q, "another file"


def h5_external_relative(tmp: Path) -> Case:
    """External storage under a relative name that does not exist: nothing may be created."""

    def build(f: h5py.File) -> None:
        f.create_dataset("X_test", shape=(4, 10, 10), dtype="u1", external=[("created.bin", 0, h5py.h5f.UNLIMITED)])

    q = _h5(tmp / "external_relative.h5", build)
    return q, q, "another file"


def h5_virtual(tmp: Path) -> Case:
    secret = tmp / "outside" / "source.h5"
    secret.parent.mkdir(exist_ok=True)
    with h5py.File(secret, "w") as s:
        s["data"] = np.full((4, 10, 10), 7, np.uint8)

    def build(f: h5py.File) -> None:
        layout = h5py.VirtualLayout(shape=(4, 10, 10), dtype="u1")
        layout[:] = h5py.VirtualSource(str(secret), "data", shape=(4, 10, 10))
        f.create_virtual_dataset("X_test", layout)

    q = _h5(tmp / "virtual.h5", build)
    return q, q, "virtual"


def h5_external_link(tmp: Path) -> Case:
    secret = tmp / "outside" / "other.h5"
    secret.parent.mkdir(exist_ok=True)
    with h5py.File(secret, "w") as s:
        s["X_test"] = np.full((4, 10, 10), 7, np.uint8)

    def build(f: h5py.File) -> None:
        f["X_test"] = h5py.ExternalLink(str(secret), "/X_test")

    q = _h5(tmp / "link.h5", build)
    return q, q, "another file"


def h5_soft_link_through_external(tmp: Path) -> Case:
    secret = tmp / "outside" / "other2.h5"
    secret.parent.mkdir(exist_ok=True)
    with h5py.File(secret, "w") as s:
        s["X_test"] = np.full((4, 10, 10), 7, np.uint8)

    def build(f: h5py.File) -> None:
        f["elsewhere"] = h5py.ExternalLink(str(secret), "/")
        f["X_test"] = h5py.SoftLink("/elsewhere/X_test")

    q = _h5(tmp / "softlink.h5", build)
    return q, q, "link"


def h5_bomb(tmp: Path) -> Case:
    # chunked + gzip, never written: a few KB declaring 600 million values
    def build(f: h5py.File) -> None:
        f.create_dataset("X_test", shape=(20000, 3, 100, 100), dtype="u1", chunks=(1, 3, 100, 100), compression="gzip")

    p = _h5(tmp / "bomb.h5", build, labels=20000)
    assert p.stat().st_size < 1_000_000
    return p, p, "DEEPDOT_MAX_DATA_MB"


def h5_huge_chunk(tmp: Path) -> Case:
    # four small images, but one compressed chunk that decompresses to 102 MB
    def build(f: h5py.File) -> None:
        f.create_dataset(
            "X_test", shape=(4, 1, 16, 16), maxshape=(None, 1, 16, 16), chunks=(400_000, 1, 16, 16), dtype="u1"
        )

    q = _h5(tmp / "chunk.h5", build)
    return q, q, "over the limit"


def h5_group(tmp: Path) -> Case:
    q = _h5(tmp / "group.h5", lambda f: f.create_group("X_test"))
    return q, q, "group"


def h5_strings(tmp: Path) -> Case:
    def build(f: h5py.File) -> None:
        f["X_test"] = np.array([b"abc"] * 4)

    q = _h5(tmp / "strings.h5", build)
    return q, q, "dtype"


def h5_compound(tmp: Path) -> Case:
    def build(f: h5py.File) -> None:
        f["X_test"] = np.zeros((4, 8, 8), dtype=[("a", "u1"), ("b", "f4")])

    q = _h5(tmp / "compound.h5", build)
    return q, q, "dtype"


def h5_truncated(tmp: Path) -> Case:
    p = _h5(tmp / "truncated.h5", lambda f: f.create_dataset("X_test", data=np.ones((4, 10, 10), np.uint8)))
    p.write_bytes(p.read_bytes()[:1500])
    return p, p, "not a readable"


def png_truncated(tmp: Path) -> Case:
    noisy = np.random.default_rng(0).integers(0, 256, (64, 64), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(noisy).save(buf, format="PNG")
    good = buf.getvalue()
    root = _folder(tmp / "trunc", {"0/a.png": good, "1/b.png": good[: len(good) // 2]})
    return root, root / "1" / "b.png", "not a readable image"


def png_20000(tmp: Path) -> Case:
    data = _png_declaring(20000, 20000)
    assert len(data) < 200
    root = _folder(tmp / "huge", {"0/a.png": _png_bytes(), "1/b.png": data})
    return root, root / "1" / "b.png", "too large"


def png_5000(tmp: Path) -> Case:
    # over deepdot's pixel limit but under Pillow's own: deepdot's check must catch it
    root = _folder(tmp / "big", {"0/a.png": _png_bytes(), "1/b.png": _png_declaring(5000, 5000)})
    return root, root / "1" / "b.png", "DEEPDOT_MAX_IMAGE_PIXELS"


def folder_too_many(tmp: Path) -> Case:
    # each image is fine, together they decode to more than the data limit (64 MB)
    img = _png_bytes(2048, 2048)
    root = _folder(tmp / "many", {f"{i % 2}/{i}.png": img for i in range(4)})
    return root, root, "DEEPDOT_MAX_DATA_MB"


def eps_as_png(tmp: Path) -> Case:
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 4 4\nshowpage\n"
    root = _folder(tmp / "eps", {"0/a.png": _png_bytes(), "1/b.png": eps})
    return root, root / "1" / "b.png", "not a readable image"


def fifo_image(tmp: Path) -> Case:
    root = _folder(tmp / "fifo", {"0/a.png": _png_bytes()})
    (root / "1").mkdir()
    os.mkfifo(root / "1" / "b.png")
    return root, root / "1" / "b.png", "not a regular file"


def symlinked_image(tmp: Path) -> Case:
    outside = tmp / "outside.png"
    outside.write_bytes(_png_bytes())
    root = _folder(tmp / "linked", {"0/a.png": _png_bytes(), "1/b.png": _png_bytes()})
    (root / "1" / "c.png").symlink_to(outside)
    return root, root / "1" / "c.png", "outside the data folder"


def symlinked_class(tmp: Path) -> Case:
    outside = _folder(tmp / "elsewhere", {"x.png": _png_bytes()})
    root = _folder(tmp / "linked_class", {"0/a.png": _png_bytes()})
    (root / "1").symlink_to(outside, target_is_directory=True)
    return root, root / "1", "outside the data folder"


CASES: dict[str, Callable[[Path], Case]] = {
    f.__name__: f
    for f in (
        npz_bomb,
        npz_bomb_header,
        npz_object,
        npz_structured,
        npz_strings,
        npz_truncated,
        npz_corrupt_deflate,
        npz_member_not_npy,
        npz_num_classes_array,
        npz_float_overflow,
        npz_huge_float_labels,
        npz_many_classes,
        h5_external_storage,
        h5_external_relative,
        h5_virtual,
        h5_external_link,
        h5_soft_link_through_external,
        h5_bomb,
        h5_huge_chunk,
        h5_group,
        h5_strings,
        h5_compound,
        h5_truncated,
        png_truncated,
        png_20000,
        png_5000,
        folder_too_many,
        eps_as_png,
        fifo_image,
        symlinked_image,
        symlinked_class,
    )
}


# ---------------------------------------------------------------- builders of hostile triggers


def _trigger_npz(path: Path, mask: np.ndarray, pattern: np.ndarray) -> Path:
    np.savez(path, mask=mask, pattern=pattern)
    return path


def trigger_truncated(tmp: Path) -> Case:
    p = _trigger_npz(tmp / "trigger.npz", np.zeros((16, 16), np.float32), np.ones((1, 16, 16), np.float32))
    p.write_bytes(p.read_bytes()[:300])
    return p, p, "not a readable"


def trigger_mismatch(tmp: Path) -> Case:
    q = _trigger_npz(tmp / "mismatch.npz", np.ones((16, 16), np.float32), np.ones((1, 8, 8), np.float32))
    return q, q, "size"


def trigger_out_of_range(tmp: Path) -> Case:
    q = _trigger_npz(tmp / "range.npz", np.full((16, 16), 3.0), np.ones((1, 16, 16)))
    return q, q, "[0, 1]"


def trigger_object(tmp: Path) -> Case:
    p = tmp / "object.npz"
    np.savez(p, mask=np.array([None] * 4, dtype=object), pattern=np.zeros((1, 2, 2)))
    return p, p, "Python objects"


def trigger_missing_pattern(tmp: Path) -> Case:
    p = tmp / "nopattern.npz"
    np.savez(p, mask=np.zeros((16, 16)))
    return p, p, "'pattern'"


def trigger_bomb(tmp: Path) -> Case:
    p = tmp / "bomb.npz"
    with zipfile.ZipFile(p, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("mask.npy", _npy_header((20000, 20000)) + bytes(1000))
        z.writestr("pattern.npy", _npy_header((3, 20000, 20000)) + bytes(1000))
    return p, p, "over the limit"


def trigger_png_20000(tmp: Path) -> Case:
    (tmp / "t").mkdir()
    (tmp / "t" / "mask.png").write_bytes(_png_declaring(20000, 20000))
    (tmp / "t" / "pattern.png").write_bytes(_png_bytes(16, 16))
    return tmp / "t", tmp / "t" / "mask.png", "too large"


def trigger_png_truncated(tmp: Path) -> Case:
    (tmp / "t").mkdir()
    noisy = np.random.default_rng(0).integers(0, 256, (16, 16), dtype=np.uint8)
    Image.fromarray(noisy).save(tmp / "t" / "pattern.png")
    (tmp / "t" / "mask.png").write_bytes((tmp / "t" / "pattern.png").read_bytes()[:60])
    return tmp / "t", tmp / "t" / "mask.png", "not a readable image"


TRIGGER_CASES: dict[str, Callable[[Path], Case]] = {
    f.__name__: f
    for f in (
        trigger_truncated,
        trigger_mismatch,
        trigger_out_of_range,
        trigger_object,
        trigger_missing_pattern,
        trigger_bomb,
        trigger_png_20000,
        trigger_png_truncated,
    )
}


def _files_under(root: Path) -> set[Path]:
    return {p for p in root.rglob("*")}


# ---------------------------------------------------------------- the library


def _build_in(where: Path, build: Callable[[Path], Case], monkeypatch: pytest.MonkeyPatch) -> Case:
    """Build a case with ``where`` as the working directory (HDF5 resolves relative external
    names from it), so nothing can land in the checkout."""
    where.mkdir(exist_ok=True)
    monkeypatch.chdir(where)
    return build(where)


@pytest.mark.parametrize("case", CASES)
def test_hostile_file_is_one_data_error(tmp_path, monkeypatch, case):
    given, named, word = _build_in(tmp_path, CASES[case], monkeypatch)
    for name, value in LIMITS.items():
        monkeypatch.setenv(name, value)
    before = _files_under(tmp_path)
    tracemalloc.start()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no Pillow (or other) warning may reach the user
            with pytest.raises(DataError) as info:
                load_data(given)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    text = str(info.value)
    assert str(named) in text and word in text, text
    assert "\n" not in text and "CANARY" not in text
    assert peak < 32 << 20, f"{case}: {peak / 2**20:.0f} MB allocated before refusing"
    assert _files_under(tmp_path) == before  # nothing created, here or (relative names) in the cwd


def test_external_storage_is_refused_before_reading(tmp_path, monkeypatch):
    """The canary: HDF5 itself returns the outside file's bytes as pixels; deepdot refuses first."""
    given, _, _ = _build_in(tmp_path, h5_external_storage, monkeypatch)
    with h5py.File(given, "r") as f:
        assert bytes(f["X_test"][0, 0, :6]) == b"CANARY"
    with pytest.raises(DataError, match="another file"):
        load_data(given)


# ---------------------------------------------------------------- the command line


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    from deepdot.io.models import save_model
    from deepdot.models import build_classifier

    out = tmp_path_factory.mktemp("model") / "digits_net"
    save_model(build_classifier("digits_net"), out)
    return out


def _evaluate(model_dir: Path, given: Path, trigger: bool) -> list[str]:
    if trigger:
        return ["evaluate", str(model_dir), "--data", "digits", "--trigger", str(given), "--target", "0"]
    return ["evaluate", str(model_dir), "--data", str(given)]


def _assert_one_line(code: int, err: str, named: Path, word: str) -> None:
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, (code, err)
    assert "Traceback" not in err and "Warning" not in err, err
    assert len(lines) == 1 and str(named) in lines[0] and word in lines[0], err


@pytest.mark.parametrize("case", [*CASES, *TRIGGER_CASES])
def test_cli_refuses_each_hostile_file_in_one_line(tmp_path, monkeypatch, model_dir, case):
    """Every case through the command's own error handling (in-process: 36 console-script runs
    would take a minute and a half; the console script itself is run below on one per reader)."""
    from typer.testing import CliRunner

    from deepdot.cli import app

    given, named, word = _build_in(tmp_path, CASES.get(case) or TRIGGER_CASES[case], monkeypatch)
    for name, value in LIMITS.items():
        monkeypatch.setenv(name, value)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a warning would end as an exception, not exit code 2
        result = CliRunner().invoke(app, _evaluate(model_dir, given, case in TRIGGER_CASES))
    _assert_one_line(result.exit_code, result.stderr, named, word)


def test_console_script_refuses_in_one_line(tmp_path, monkeypatch, model_dir):
    """The real ``deepdot`` script, one case per reader, all at once (each run is mostly a second
    of imports): exit code 2, one stderr line, no traceback or Pillow warning."""
    chosen = ["npz_bomb", "h5_external_storage", "png_20000", "trigger_truncated"]
    env = {**os.environ, **LIMITS, "NO_COLOR": "1", "COLUMNS": "400"}
    runs = []
    for case in chosen:
        given, named, word = _build_in(tmp_path / case, CASES.get(case) or TRIGGER_CASES[case], monkeypatch)
        args = [str(DEEPDOT), *_evaluate(model_dir, given, case in TRIGGER_CASES)]
        proc = subprocess.Popen(args, cwd=tmp_path / case, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        runs.append((named, word, proc))
    for named, word, proc in runs:
        _, err = proc.communicate(timeout=300)
        _assert_one_line(proc.returncode, err.decode(), named, word)


# ---------------------------------------------------------------- triggers


@pytest.mark.parametrize("case", TRIGGER_CASES)
def test_hostile_trigger_is_one_line(tmp_path, monkeypatch, case):
    given, named, word = _build_in(tmp_path, TRIGGER_CASES[case], monkeypatch)
    for name, value in LIMITS.items():
        monkeypatch.setenv(name, value)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(DeepdotError) as info:
            load_trigger(given, (1, 16, 16))
    text = str(info.value)
    assert str(named) in text and word in text and "\n" not in text, text


# ---------------------------------------------------------------- good data still loads


def test_good_npz_h5_folder_and_trigger_still_load(tmp_path):
    data = load_data(_valid_npz(tmp_path / "good.npz"))
    assert data.x.shape == (6, 1, 16, 16) and data.num_classes == 3

    x = np.random.default_rng(0).random((5, 32, 32, 3)).astype(np.float32)
    with h5py.File(tmp_path / "good.h5", "w") as f:
        f.create_dataset("stored/X", data=x, chunks=(1, 32, 32, 3), compression="gzip")
        f["X_test"] = h5py.SoftLink("/stored/X")  # a link inside the file is fine
        f["Y_test"] = np.eye(4)[[0, 3, 1, 2, 3]]
    data = load_data(tmp_path / "good.h5")
    assert data.x.shape == (5, 3, 32, 32) and data.num_classes == 4
    np.testing.assert_allclose(data.x.numpy(), x.transpose(0, 3, 1, 2), atol=1e-6)

    root = _folder(tmp_path / "folder", {"0/a.png": _png_bytes(3, 3, "RGB"), "1/b.png": _png_bytes(3, 3, "RGB")})
    (root / "1" / "c.png").symlink_to(root / "0" / "a.png")  # a link inside the folder is fine
    data = load_data(root)
    assert data.x.shape == (3, 3, 3, 3) and data.y.tolist() == [0, 1, 1]
    assert abs(float(data.x[0, 0, 0, 0]) - 128 / 255) < 1e-6

    np.savez(tmp_path / "t.npz", mask=np.zeros((16, 16), np.float32), pattern=np.ones((1, 16, 16), np.float32))
    assert load_trigger(tmp_path / "t.npz", (1, 16, 16)).mask.shape == (16, 16)


def test_npz_with_num_classes_and_filenames(tmp_path):
    p = tmp_path / "d.npz"
    names = np.array([f"{i % 2:05d}/{i // 2:05d}_00000.png" for i in range(8)])
    np.savez(p, x=np.zeros((8, 8, 8, 3), np.uint8), y=np.arange(8) % 2, filenames=names, num_classes=np.int64(5))
    data = load_data(p)
    assert data.num_classes == 5 and data.groups is not None


def test_raising_the_limit_lets_a_big_file_through(tmp_path, monkeypatch):
    p = _bomb_npz(tmp_path / "big.npz", (200, 1, 100, 100))  # 2 MB uint8 -> 10 MB decoded
    monkeypatch.setenv("DEEPDOT_MAX_DATA_MB", "5")
    with pytest.raises(DataError, match="raise DEEPDOT_MAX_DATA_MB"):
        load_data(p)
    monkeypatch.setenv("DEEPDOT_MAX_DATA_MB", "20")
    assert load_data(p).x.shape == (200, 1, 100, 100)


@pytest.mark.parametrize(
    "path, shape",
    [
        ("gtsrb32/gtsrb32_test.npz", (12630, 3, 32, 32)),
        ("mnist/mnist_test.npz", (10000, 1, 28, 28)),
        ("cifar10/cifar10_test.npz", (10000, 3, 32, 32)),
    ],
)
def test_shared_real_data_passes_the_checks(path, shape):
    data = load_data(shared(path))
    assert tuple(data.x.shape) == shape
