"""Stroke-width normalisation in serving/preprocess.py: drawn strokes far from MNIST's get one pixel
nearer; MNIST's own digits pass unchanged. And the bench's reader is exactly what is served."""
import numpy as np
import pytest

from bench.bench_drawn import reader
from bench.drawn_digits import KINDS, redraw
from serving.preprocess import THICK_STROKE, THIN_STROKE, even_stroke, preprocess, stroke_width


def bar(width: int) -> np.ndarray:
    image = np.zeros((20, 12), dtype=np.float32)
    image[:, 6 - width // 2: 6 - width // 2 + width] = 1.0
    return image


def test_the_width_estimate_reads_a_bar_of_known_width():
    for width in (1, 2, 3, 5):
        assert stroke_width(bar(width)) == pytest.approx(width, rel=0.15)


def test_thin_strokes_thicken_and_fat_ones_thin_by_a_pixel():
    thin, fat = bar(1), np.pad(bar(7), ((0, 0), (2, 2)))
    assert stroke_width(thin) < THIN_STROKE and stroke_width(fat) > THICK_STROKE
    assert stroke_width(even_stroke(thin)) > stroke_width(thin) + 1
    assert stroke_width(even_stroke(fat)) < stroke_width(fat) - 1
    assert even_stroke(thin).max() == 1.0 and even_stroke(fat).shape == fat.shape


def test_mnist_like_strokes_are_untouched(test_digits):
    normal = bar(2)
    assert even_stroke(normal) is normal
    images = test_digits[0][:200]
    assert all(np.array_equal(preprocess(image), reader(stroke=False)(image)) for image in images)


def test_the_bench_reader_is_what_serving_does(test_digits):
    rng = np.random.default_rng(0)
    canvases = [redraw(test_digits[0][i], KINDS[i % len(KINDS)], rng) for i in range(12)]
    assert all(np.array_equal(reader()(canvas), preprocess(canvas)) for canvas in canvases)
    thin = redraw(test_digits[0][0], "thin", np.random.default_rng(1))
    assert (preprocess(thin) > 127).sum() > (reader(stroke=False)(thin) > 127).sum()  # the thin pen thickened
