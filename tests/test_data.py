import h5py
import numpy as np
import pytest
import torch
from PIL import Image

from conftest import shared
from deepdot.data import ImageData
from deepdot.errors import DataError
from deepdot.io import load_data


def test_digits_builtin_splits_are_disjoint_and_unit_range():
    train, test = load_data("digits:train"), load_data("digits:test")
    assert train.x.shape[1:] == (1, 16, 16) and test.x.shape[1:] == (1, 16, 16)
    assert len(train) + len(test) == 1797
    assert train.x.dtype == torch.float32 and 0 <= float(train.x.min()) and float(train.x.max()) <= 1
    # no test image appears in the training split
    train_rows = {tuple(r) for r in train.x.flatten(1).numpy().round(5).tolist()}
    overlap = sum(tuple(r) in train_rows for r in test.x.flatten(1).numpy().round(5).tolist())
    assert overlap <= 3  # sklearn's digits has a handful of exact duplicates of its own
    assert set(test.y.tolist()) == set(range(10))


def test_digits_split_word_follows_context():
    assert load_data("digits", split="train").name == "digits:train"
    assert load_data("digits").name == "digits:test"


@pytest.mark.parametrize("layout", ["nhwc_uint8", "nchw_float", "nhw_gray"])
def test_npz_layouts(tmp_path, layout):
    rng = np.random.default_rng(0)
    if layout == "nhwc_uint8":
        x = rng.integers(0, 256, (6, 8, 8, 3), dtype=np.uint8)
        expect = x.transpose(0, 3, 1, 2) / 255.0
    elif layout == "nchw_float":
        x = rng.random((6, 3, 8, 8)).astype(np.float32)
        expect = x
    else:
        x = rng.integers(0, 256, (6, 8, 8), dtype=np.uint8)
        expect = x[:, None] / 255.0
    y = np.array([0, 1, 2, 0, 1, 2])
    np.savez(tmp_path / "d.npz", x=x, y=y)
    data = load_data(tmp_path / "d.npz")
    assert data.num_classes == 3
    np.testing.assert_allclose(data.x.numpy(), expect, atol=1e-6)
    assert data.y.tolist() == y.tolist()


def test_nc_h5_with_one_hot_labels(tmp_path):
    x = np.random.default_rng(0).integers(0, 256, (5, 32, 32, 3)).astype(np.float32)  # NC stores raw floats
    y = np.eye(4)[[0, 3, 1, 2, 3]]
    with h5py.File(tmp_path / "d.h5", "w") as f:
        f["X_test"], f["Y_test"] = x, y
        f["X_train"], f["Y_train"] = x[:2], y[:2]
    data = load_data(tmp_path / "d.h5")
    assert data.x.shape == (5, 3, 32, 32) and data.num_classes == 4
    assert data.y.tolist() == [0, 3, 1, 2, 3]
    assert len(load_data(tmp_path / "d.h5", split="train")) == 2


def test_image_folder(tmp_path):
    for label in ("0", "1", "2"):
        (tmp_path / label).mkdir()
        for i in range(2):
            Image.fromarray(np.full((10, 12, 3), 40 * int(label) + i, np.uint8)).save(tmp_path / label / f"{i}.png")
    data = load_data(tmp_path)
    assert data.x.shape == (6, 3, 10, 12)
    assert data.y.tolist() == [0, 0, 1, 1, 2, 2]
    assert abs(float(data.x[2, 0, 0, 0]) - 40 / 255) < 1e-6


@pytest.mark.parametrize(
    "case, message",
    [
        ("lengths", "images but"),
        ("empty", "empty"),
        ("labels", "labels must lie in"),
        ("keys", "needs arrays 'x' and 'y'"),
        ("corrupt", "not a readable .npz"),
    ],
)
def test_bad_npz_gives_one_line_naming_file(tmp_path, case, message):
    path = tmp_path / f"{case}.npz"
    x = np.zeros((4, 8, 8, 3), np.uint8)
    if case == "lengths":
        np.savez(path, x=x, y=np.zeros(3, int))
    elif case == "empty":
        np.savez(path, x=x[:0], y=np.zeros(0, int))
    elif case == "labels":
        np.savez(path, x=x, y=np.array([0, 1, -1, 2]))
    elif case == "keys":
        np.savez(path, images=x)
    else:
        path.write_bytes(b"PK\x03\x04 this is not a real zip")
    with pytest.raises(DataError) as info:
        load_data(path)
    text = str(info.value)
    assert message in text and str(path) in text and "\n" not in text


def test_labels_beyond_declared_classes_rejected(tmp_path):
    np.savez(tmp_path / "d.npz", x=np.zeros((2, 8, 8), np.uint8), y=np.array([0, 12]))
    with pytest.raises(DataError, match="0..9"):
        load_data(tmp_path / "d.npz", num_classes=10)


def test_missing_and_unknown_formats(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        load_data(tmp_path / "nope.npz")
    (tmp_path / "d.csv").write_text("1,2")
    with pytest.raises(DataError, match="unsupported data format"):
        load_data(tmp_path / "d.csv")


def test_group_split_keeps_tracks_together():
    x = torch.zeros(40, 1, 4, 4)
    y = torch.tensor([0] * 20 + [1] * 20)
    groups = torch.arange(40) // 5  # 8 tracks of 5 frames
    data = ImageData(x, y, 2, "t", groups)
    train, val = data.split(0.25, seed=0)
    assert set(train.groups.tolist()).isdisjoint(val.groups.tolist())
    assert set(val.y.tolist()) == {0, 1}


@pytest.mark.parametrize(
    "path, shape, classes",
    [
        ("gtsrb32/gtsrb32_test.npz", (12630, 3, 32, 32), 43),
        ("mnist/mnist_test.npz", (10000, 1, 28, 28), 10),
        ("cifar10/cifar10_test.npz", (10000, 3, 32, 32), 10),
    ],
)
def test_shared_real_data(path, shape, classes):
    data = load_data(shared(path))
    assert tuple(data.x.shape) == shape and data.num_classes == classes
    assert 0.0 <= float(data.x.min()) and float(data.x.max()) <= 1.0


def test_gtsrb_training_file_splits_by_track():
    data = load_data(shared("gtsrb32/gtsrb32_train.npz"))
    assert data.groups is not None
    train, val = data.split(0.2, seed=0)
    assert set(train.groups.tolist()).isdisjoint(val.groups.tolist())
    assert 0.15 < len(val) / len(data) < 0.25
