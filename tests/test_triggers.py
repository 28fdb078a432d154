import numpy as np
import pytest
import torch
from PIL import Image

from conftest import shared
from deepdot import triggers
from deepdot.errors import DeepdotError
from deepdot.io.files import load_trigger, save_trigger
from deepdot.triggers import Trigger, mask_iou


def test_neural_cleanse_square_spec():
    t = triggers.square((3, 32, 32), 4, corner="bottom-right", margin=1)
    rows, cols = torch.nonzero(t.mask, as_tuple=True)
    assert (rows.min(), rows.max(), cols.min(), cols.max()) == (27, 30, 27, 30)
    assert t.mask_l1 == 16
    assert torch.all(t.pattern[:, 27:31, 27:31] == 1)


def test_apply_is_pure_and_stamps_only_the_mask():
    t = triggers.square((3, 8, 8), 2, corner="top-left", margin=0, color=(1.0, 0.0, 0.0))
    x = torch.full((2, 3, 8, 8), 0.5)
    before = x.clone()
    y = t.apply(x)
    assert torch.equal(x, before)
    assert torch.equal(y[:, :, 2:, :], x[:, :, 2:, :])
    assert torch.all(y[:, 0, :2, :2] == 1) and torch.all(y[:, 1, :2, :2] == 0)


def test_trigger_is_frozen_and_validated():
    t = triggers.square((1, 8, 8), 2)
    with pytest.raises(AttributeError):
        t.mask = torch.zeros(8, 8)  # type: ignore[misc]
    with pytest.raises(DeepdotError):
        Trigger(torch.zeros(8, 8), torch.zeros(1, 4, 4))
    with pytest.raises(DeepdotError):
        Trigger(torch.full((8, 8), 2.0), torch.zeros(1, 8, 8))
    with pytest.raises(DeepdotError, match="does not fit"):
        triggers.square((1, 8, 8), 9)


def test_position_and_corners():
    t = triggers.square((1, 10, 10), 3, position=(2, 5))
    assert torch.nonzero(t.mask)[0].tolist() == [2, 5]
    tl = triggers.square((1, 10, 10), 3, corner="top-left", margin=1)
    assert torch.nonzero(tl.mask)[0].tolist() == [1, 1]


def test_blended_and_pixels():
    b = triggers.blended((3, 8, 8), 0.2, seed=1)
    assert torch.allclose(b.mask, torch.full((8, 8), 0.2))
    x = torch.zeros(1, 3, 8, 8)
    assert torch.allclose(b.apply(x), 0.2 * b.pattern.unsqueeze(0))
    p = triggers.random_pixels((3, 8, 8), 5, seed=3)
    assert p.mask_l1 == 5 and torch.equal(p.mask, triggers.random_pixels((3, 8, 8), 5, seed=3).mask)


def test_image_trigger_from_armory_png():
    png = shared("triggers/armory/peace.png")
    with Image.open(png) as im:
        arr = np.asarray(im.convert("RGBA"))
    t = triggers.image_patch(arr, (3, 32, 32), 8, corner="bottom-right", margin=1)
    assert t.mask[:23].sum() == 0 and t.mask[23:31, 23:31].sum() > 0


def test_round_trips(tmp_path):
    t = triggers.blended((3, 8, 8), 0.3, seed=2)
    save_trigger(t, tmp_path / "t.npz")
    back = load_trigger(tmp_path / "t.npz")
    assert torch.equal(back.mask, t.mask) and torch.equal(back.pattern, t.pattern)
    save_trigger(t, tmp_path / "png")
    png = load_trigger(tmp_path / "png")
    assert torch.allclose(png.pattern, t.pattern, atol=1 / 255)
    gray = triggers.square((1, 8, 8), 2)
    save_trigger(gray, tmp_path / "gray")
    assert load_trigger(tmp_path / "gray", (1, 8, 8)).pattern.shape == (1, 8, 8)


def test_reference_recovered_gtsrb_trigger_loads_and_sits_bottom_right():
    recovered = load_trigger(shared("triggers/neural_cleanse_reversed/gtsrb_mask.png"), (3, 32, 32))
    planted = triggers.square((3, 32, 32), 4)
    assert 10 < recovered.mask_l1 < 60
    rows, cols = torch.nonzero(recovered.mask > 0.5, as_tuple=True)
    assert rows.float().mean() > 24 and cols.float().mean() > 24
    assert mask_iou(recovered.mask, planted.mask) > 0.2


def test_mask_iou():
    a = triggers.square((1, 8, 8), 2, position=(0, 0)).mask
    b = triggers.square((1, 8, 8), 2, position=(0, 1)).mask
    assert mask_iou(a, a) == 1.0
    assert mask_iou(a, b) == pytest.approx(2 / 6)
    assert mask_iou(torch.zeros(4, 4), torch.zeros(4, 4)) == 0.0


def test_hardened_stamps_at_full_strength_where_the_mask_reaches_the_threshold():
    mask = torch.tensor([[0.05, 0.1], [0.5, 0.0]])
    pattern = torch.full((1, 2, 2), 0.8)
    soft = Trigger(mask, pattern)
    hard = soft.hardened(0.1)
    assert torch.equal(hard.mask, torch.tensor([[0.0, 1.0], [1.0, 0.0]]))
    assert torch.equal(hard.pattern, pattern) and hard.mask_l1 == 2.0
    x = torch.zeros(1, 1, 2, 2)
    assert torch.allclose(hard.apply(x)[0, 0], torch.tensor([[0.0, 0.8], [0.8, 0.0]]))
    assert soft.hardened(0.6).mask_l1 == 0.0
