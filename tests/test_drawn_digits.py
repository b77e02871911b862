"""The "people's drawings" evaluation set (bench/drawn_digits.py): balanced, deterministic, MNIST-format."""
import numpy as np
import pytest

from bench.drawn_digits import FONT_VARIANTS, KINDS, build_drawn_set, machine_fonts, redraw
from serving.preprocess import preprocess


@pytest.fixture(scope="module")
def small_set(test_digits):
    return build_drawn_set(*test_digits, per_class=len(KINDS), seed=3, fonts=machine_fonts()[:1])


def test_classes_are_balanced_in_each_source(small_set):
    for source in set(small_set.sources):
        counts = np.bincount(small_set.labels[small_set.sources == source], minlength=10)
        assert len(set(counts)) == 1 and counts[0] > 0, (source, counts)
    redrawn = small_set.sources == "mnist_redrawn"
    assert redrawn.sum() == 10 * len(KINDS)
    assert set(small_set.kinds[redrawn]) == set(KINDS)  # every distortion, for every class


def test_same_seed_same_set_other_seed_other_set(small_set, test_digits):
    again = build_drawn_set(*test_digits, per_class=len(KINDS), seed=3, fonts=machine_fonts()[:1])
    assert np.array_equal(again.images, small_set.images) and np.array_equal(again.labels, small_set.labels)
    other = build_drawn_set(*test_digits, per_class=len(KINDS), seed=4, fonts=[])
    assert not np.array_equal(other.images, small_set.images[:len(other.images)])


def test_images_are_mnist_format_through_serving_preprocessing(small_set):
    assert small_set.images.dtype == np.uint8 and small_set.images.shape[1:] == (28, 28)
    assert (small_set.images.max(axis=(1, 2)) == 255).all()  # every digit has ink ...
    sides = []
    for image in small_set.images:  # ... fitted to MNIST's 20x20 box, longest side 20 px
        rows, cols = np.flatnonzero(image.any(axis=1)), np.flatnonzero(image.any(axis=0))
        sides.append(max(rows[-1] - rows[0], cols[-1] - cols[0]) + 1)
    assert set(sides) <= {18, 19, 20} and sides.count(20) > len(sides) // 2  # 18-19: a fat pen, thinned


def test_redraws_are_canvases_and_really_distorted(test_digits):
    digit = test_digits[0][0]
    rng = np.random.default_rng(0)
    plain = preprocess(redraw(digit, "mixed", np.random.default_rng(0)))
    for kind in KINDS:
        canvas = redraw(digit, kind, rng)
        assert canvas.shape == (280, 280) and canvas.dtype == np.uint8
        assert np.median(canvas) == 255  # black pen on white, as the sketchpad exports it
    thick = preprocess(redraw(digit, "thick", np.random.default_rng(1)))
    thin = preprocess(redraw(digit, "thin", np.random.default_rng(1)))
    assert (thick > 127).sum() > 1.5 * (thin > 127).sum()
    assert plain.shape == (28, 28)


@pytest.mark.skipif(not machine_fonts(), reason="no TrueType fonts on this machine (fc-list)")
def test_fonts_give_every_digit_in_every_variant(small_set):
    fonts = small_set.sources == "fonts"
    assert fonts.sum() == 10 * len(FONT_VARIANTS)
    assert set(small_set.kinds[fonts]) == set(FONT_VARIANTS)
