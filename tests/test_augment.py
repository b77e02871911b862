"""Training-time augmentation (training/augment.py), without Ray: batched, seeded, and off with --no-augment."""
import dataclasses
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from training.augment import (DEFAULT, AugmentSettings, augment_batch, batch_seed, elastic_field, max_3x3, sampling_grid,
                              training_batch)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "training"))
import train  # noqa: E402  (the entrypoint is a script, as Ray runs it)


@pytest.fixture(scope="module")
def digits(mnist_storage):
    from training.data import load_mnist
    images, labels = load_mnist(mnist_storage, train=True)
    return images[:200], labels[:200]


def test_uint8_in_uint8_out_same_shape(digits):
    images = digits[0][:50]
    out = augment_batch(images, seed=1)
    assert out.dtype == torch.uint8 and out.shape == images.shape


@pytest.mark.parametrize("shape", [(8, 28, 28), (8, 1, 28, 28)])
def test_float_in_float_out_same_shape(digits, shape):
    images = (digits[0][:8].float() / 255).reshape(shape)
    out = augment_batch(images, seed=1)
    assert out.dtype == torch.float32 and out.shape == images.shape
    assert 0 <= out.min() and out.max() <= 1.0 + 1e-6


def test_same_seed_same_batch_other_seed_other_batch(digits):
    images = digits[0][:64]
    assert torch.equal(augment_batch(images, seed=7), augment_batch(images, seed=7))
    assert not torch.equal(augment_batch(images, seed=7), augment_batch(images, seed=8))


def test_it_changes_every_image_but_keeps_the_digit(digits):
    images = digits[0][:100]
    before = images.float()
    out = augment_batch(images, seed=3).float()
    changed = (out - before).abs().flatten(1).mean(1)
    assert (changed > 1.0).all()  # every image moved or changed stroke (grey levels out of 255)
    ink = out.sum((1, 2)) / before.sum((1, 2))
    assert ((ink > 0.25) & (ink < 4)).all()  # ... and none lost its ink or became a blob (a 1-px "1" can triple)


def test_the_input_is_left_alone(digits):
    images = digits[0][:20].clone()
    augment_batch(images, seed=5)
    assert torch.equal(images, digits[0][:20])


def test_stroke_jitter_thickens_and_thins():
    settings = AugmentSettings(rotation=0, shear=0, scale=0, translation=0, stroke=1.0)
    bar = torch.zeros(400, 28, 28, dtype=torch.uint8)
    bar[:, 6:22, 12:16] = 255  # a 4-pixel-wide stroke
    ink = augment_batch(bar, seed=0, settings=settings).float().sum((1, 2)) / bar[0].float().sum()
    assert ink.max() > 1.2 and ink.min() < 0.85


def test_without_stroke_jitter_the_affine_alone_keeps_ink_near_constant(digits):
    settings = AugmentSettings(stroke=0.0)
    images = digits[0][:100]
    ink = augment_batch(images, seed=2, settings=settings).float().sum((1, 2)) / images.float().sum((1, 2))
    assert ((ink - 1).abs() < 0.35).all()  # scale 0.88..1.12 changes the area by at most ~25%


def test_zero_settings_are_the_identity(digits):
    still = AugmentSettings(rotation=0, shear=0, scale=0, translation=0, stroke=0)
    images = digits[0][:30]
    assert torch.equal(augment_batch(images, seed=0, settings=still), images)


def test_fast_kernels_match_torch():
    x = torch.rand(5, 1, 28, 28)
    assert torch.equal(max_3x3(x), F.max_pool2d(x, 3, stride=1, padding=1))
    theta = torch.randn(5, 2, 3)
    assert torch.allclose(sampling_grid(theta), F.affine_grid(theta, [5, 1, 28, 28], align_corners=False), atol=1e-5)


def test_bad_shapes_are_refused():
    with pytest.raises(ValueError, match=r"expected images \[N, 28, 28\]"):
        augment_batch(torch.zeros(4, 32, 32, dtype=torch.uint8), seed=0)


def test_seeds_differ_per_shard_and_step():
    seeds = {batch_seed(0, rank, step) for rank in range(3) for step in range(1000)}
    assert len(seeds) == 3000
    assert batch_seed(0, 1, 5) == batch_seed(0, 1, 5) != batch_seed(1, 1, 5)


def test_augmentation_is_on_by_default_and_off_with_no_augment(digits):
    on, off = train.parse_args([]), train.parse_args(["--no-augment"])
    assert train.augmentation(on) == DEFAULT.to_metadata()
    assert train.augmentation(off) is None
    batch = digits[0][:10]
    # the worker's hook: with --no-augment the very same batch goes to the training step
    assert training_batch(batch, train.augmentation(off), 0, 0, 0) is batch
    augmented = training_batch(batch, train.augmentation(on), 0, 0, 0)
    assert torch.equal(augmented, augment_batch(batch, batch_seed(0, 0, 0)))
    assert not torch.equal(augmented, batch)


# ---------------------------------------------------------------- elastic distortion (off by default)

def test_elastic_field_has_the_asked_size_and_is_smooth():
    field = elastic_field(300, torch.Generator().manual_seed(0), amount=2.0, sigma=4.0) * 14  # -> pixels
    assert field.shape == (300, 28, 28, 2)
    inner = field[:, 8:20, 8:20]
    assert 1.7 < inner.std() < 2.3  # `amount` is the displacement's std, in pixels
    neighbours = (inner[:, 1:] - inner[:, :-1]).abs().mean() / inner.abs().mean()
    assert neighbours < 0.25  # a smooth field, not per-pixel noise (which would give ~1.1)


def test_elastic_is_off_by_default_and_leaves_the_rest_of_the_stream_alone(digits):
    images = digits[0][:64]
    assert DEFAULT.elastic == 0 and "elastic" not in DEFAULT.describe()
    tiny = dataclasses.replace(DEFAULT, elastic=1e-4)  # same affine and stroke draws, a negligible field
    assert (augment_batch(images, 7, tiny).int() - augment_batch(images, 7).int()).abs().max() <= 1
    strong = dataclasses.replace(DEFAULT, elastic=2.0)
    assert "elastic 2 px" in strong.describe()
    changed = (augment_batch(images, 7, strong).float() - augment_batch(images, 7).float()).abs().flatten(1).mean(1)
    assert (changed > 1.0).float().mean() > 0.9  # nearly every image is bent further


def test_elastic_alone_bends_the_digit_but_keeps_its_ink_and_place(digits):
    only = AugmentSettings(rotation=0, shear=0, scale=0, translation=0, stroke=0, elastic=1.5)
    images = digits[0][:100]
    out = augment_batch(images, seed=4, settings=only).float()
    before = images.float()
    assert ((out - before).abs().flatten(1).mean(1) > 1.0).all()
    ink = out.sum((1, 2)) / before.sum((1, 2))
    assert ((ink > 0.5) & (ink < 2)).all()  # local stretches change the area (by ~ amount / sigma)
    rows = torch.arange(28.0)
    centre = lambda x: (x.sum(2) @ rows) / x.sum((1, 2))  # noqa: E731  (row of the centre of mass)
    moved = (centre(out) - centre(before)).abs()  # a smooth field moves the whole digit a little too
    assert moved.median() < 1.5 and moved.max() < 4


def test_elastic_flag_reaches_the_workers_settings_and_bad_values_are_refused(digits):
    settings = train.augmentation(train.parse_args(["--elastic", "1.5"]))
    assert settings == {**DEFAULT.to_metadata(), "elastic": 1.5}
    batch = digits[0][:10]
    assert torch.equal(training_batch(batch, settings, 0, 0, 0),
                       augment_batch(batch, batch_seed(0, 0, 0), dataclasses.replace(DEFAULT, elastic=1.5)))
    for bad in ("-1", "9", "nan"):
        with pytest.raises(SystemExit):
            train.parse_args(["--elastic", bad])


def test_the_ab_bench_reads_its_settings_and_refuses_unknown_ones():
    from bench.augment_ab import parse_settings
    assert parse_settings("none") is None and parse_settings("default") == DEFAULT.to_metadata()
    assert parse_settings("default,elastic=1.5,shear=20") == {**DEFAULT.to_metadata(), "elastic": 1.5, "shear": 20.0}
    for bad in ("plain", "default,wobble=1", "none,elastic=1"):
        with pytest.raises(ValueError):
            parse_settings(bad)


def test_the_drawn_bench_times_augmentation_beside_a_workers_training_step(mnist_storage):
    """bench_drawn's cost figure runs the worker's own train_step on augmented batches."""
    from bench.bench_drawn import augmentation_cost

    cost = augmentation_cost(mnist_storage, steps=2)
    assert cost["steps"] == 2 and cost["augment_ms"] > 0 and cost["step_ms"] > 0
    assert cost["ratio"] == cost["augment_ms"] / cost["step_ms"]


def test_the_ab_bench_trains_with_the_workers_own_step(digits):
    """augment_ab's one-process runs use training/worker.py's train_step, augmented batches and all."""
    from bench.augment_ab import train_one

    images, labels = digits
    model, run = train_one(images[:200], labels[:200], DEFAULT.to_metadata(), seed=0, epochs=1)
    assert run["steps"] == 2 and run["augment_ms"] > 0 and run["step_ms"] > 0
    assert not model.training
