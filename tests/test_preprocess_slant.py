"""The slant limit in serving/preprocess.py: a steep slant is sheared back to ~11°, a mild one (as
MNIST's writers had) is left alone, and both directions are handled."""
import numpy as np
import pytest

from bench.bench_drawn import reader
from serving.preprocess import SLANT_LIMIT, limit_slant, preprocess, slant



def slanted_bar(shift_per_row: float, height: int = 60, width: int = 6) -> np.ndarray:
    """A bar of `width` px leaning by `shift_per_row` px per row up (positive: top to the right)."""
    pad = int(abs(shift_per_row) * height) + width
    image = np.zeros((height, 2 * pad + width), dtype=np.float32)
    for row in range(height):
        left = pad + int(round(shift_per_row * (height - 1 - row)))
        image[row, left:left + width] = 1.0
    return image


@pytest.mark.parametrize("lean", [0.5, -0.5, 0.35])
def test_a_steep_slant_is_brought_to_the_limit(lean):
    bar = slanted_bar(lean)
    assert abs(slant(bar)) == pytest.approx(abs(lean), abs=0.03)
    upright = limit_slant(bar)
    assert abs(slant(upright)) == pytest.approx(SLANT_LIMIT, abs=0.04)
    assert np.sign(slant(upright)) == np.sign(slant(bar))  # the writer's direction stays
    assert upright.shape[1] < bar.shape[1]  # the box is cropped to the ink again
    assert upright.sum() == pytest.approx(bar.sum(), rel=0.05)  # no ink lost


@pytest.mark.parametrize("lean", [0.0, 0.1, -0.15])
def test_a_mild_slant_is_left_alone(lean):
    bar = slanted_bar(lean)
    assert limit_slant(bar) is bar


def test_served_drawings_come_out_within_the_limit():
    canvas = np.full((280, 280), 255, dtype=np.uint8)  # black pen on white, a "1" leaning 27°
    bar = slanted_bar(0.5, height=200, width=14)  # 242 px wide
    canvas[40:240, 19:261] = np.where(bar > 0, 0, 255)
    assert abs(slant(reader(slant_limit=float("inf"))(canvas).astype(np.float32))) > 0.4
    assert abs(slant(preprocess(canvas).astype(np.float32))) < SLANT_LIMIT + 0.07


def test_most_mnist_digits_pass_unchanged(test_digits):
    images = test_digits[0][:200]
    same = [np.array_equal(preprocess(image), reader(slant_limit=float("inf"))(image)) for image in images]
    assert sum(same) >= 100  # measured 124 of 200: a full deslant would change nearly all



def test_a_crafted_slant_cannot_blow_up_the_sheared_image(monkeypatch):
    """Moments can be steered (a line with two stray pixels a row off): the shear, hence the image
    the deslant allocates, is capped at about twice the crop's width."""
    from PIL import Image

    sizes, transform = [], Image.Image.transform
    monkeypatch.setattr(Image.Image, "transform", lambda self, size, *a, **k: sizes.append(size) or transform(self, size, *a, **k))
    crop = np.zeros((40, 2000), np.float32)
    crop[20, :] = 1.0
    crop[19, 1999] = crop[21, 0] = 1.0
    assert abs(slant(crop)) > 100  # far beyond any digit's slant
    limit_slant(crop)
    assert sizes and sizes[0][0] * sizes[0][1] <= 2 * crop.size + 4 * 40
