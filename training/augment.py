"""Training-time augmentation: digits drawn the way people draw them, one batch at a time.

People's digits are rotated, slanted, larger or smaller, off-centre, and drawn with thicker or
thinner pens than MNIST's writers used. Each training batch gets a small random affine
transformation per image (rotation, shear, scale, translation: one `affine_grid`/`grid_sample`
call for the whole batch) and, on a random part of the batch, a thicker or thinner stroke
(a 3x3 grey dilation or erosion, blended in by a random amount). Optionally (`elastic` > 0, off by
default: see bench/results/drawn_ab.md) an elastic distortion (Simard et al. 2003): a smooth random
displacement field added to the same sampling grid, so it costs no second resampling. No per-image
Python loops.

Every batch's randomness comes from one seed (`batch_seed(run seed, shard, step)`), so a run is
reproducible, and a worker that resumes mid-round draws the same augmentation again.
"""
import functools
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

SIDE = 28


@dataclass(frozen=True)
class AugmentSettings:
    rotation: float = 10.0       # degrees, uniform in +-rotation
    shear: float = 12.0          # degrees of slant, uniform in +-shear (x shear: italic-like)
    scale: float = 0.12          # size factor, uniform in [1-scale, 1+scale]
    translation: float = 2.0     # pixels in x and y, uniform in +-translation
    stroke: float = 0.5          # share of the batch whose stroke is thickened or thinned (half each)
    thin_max: float = 0.6        # an erosion is blended in by at most this much (a full 3x3 erosion erases thin strokes)
    elastic: float = 0.0         # px: typical displacement (std) of the elastic distortion; 0 = off
    elastic_sigma: float = 4.0   # px: smoothness of its displacement field (Gaussian sigma)

    def to_metadata(self) -> dict:
        return asdict(self)

    def describe(self) -> str:
        return (f"rotation ±{self.rotation:g}°, shear ±{self.shear:g}°, scale ±{100 * self.scale:g}%, "
                f"shift ±{self.translation:g} px, stroke width jitter on {100 * self.stroke:g}%"
                + (f", elastic {self.elastic:g} px (σ {self.elastic_sigma:g} px)" if self.elastic > 0 else ""))


DEFAULT = AugmentSettings()


def batch_seed(run_seed: int, rank: int, step: int) -> int:
    """One seed per (run, shard, global step): reproducible, and independent of restarts."""
    return ((run_seed * 1_000_003 + rank) * 1_000_003 + step) % (2 ** 63)


def training_batch(images: torch.Tensor, settings: dict | None, run_seed: int, rank: int, step: int) -> torch.Tensor:
    """The worker's hook: shard `rank`'s batch of global step `step`, augmented with `settings`
    (AugmentSettings as a dict, as the job's config carries it), or returned as is when None."""
    if settings is None:
        return images
    return augment_batch(images, batch_seed(run_seed, rank, step), AugmentSettings(**settings))


def augment_batch(images: torch.Tensor, seed: int, settings: AugmentSettings = DEFAULT) -> torch.Tensor:
    """Augment a batch. uint8 [N, 28, 28] (as the shards hold it) -> uint8 [N, 28, 28]; float in
    0..1, [N, 28, 28] or [N, 1, 28, 28] -> float of the same shape. The input is not modified."""
    if images.ndim not in (3, 4) or images.shape[-2:] != (SIDE, SIDE) or (images.ndim == 4 and images.shape[1] != 1):
        raise ValueError(f"expected images [N, 28, 28] or [N, 1, 28, 28], got {list(images.shape)}")
    generator = torch.Generator().manual_seed(seed)
    x = images.reshape(-1, 1, SIDE, SIDE).to(torch.float32)
    if images.dtype == torch.uint8:
        x = x / 255.0
    x = jitter_stroke(x, generator, settings)
    x = random_affine(x, generator, settings)
    if images.dtype == torch.uint8:
        return x.mul_(255.0).round_().clamp_(0, 255).to(torch.uint8).reshape(images.shape)
    return x.to(images.dtype).reshape(images.shape)


def uniform(n: int, low: float, high: float, generator: torch.Generator) -> torch.Tensor:
    return torch.rand(n, generator=generator) * (high - low) + low


def jitter_stroke(x: torch.Tensor, generator: torch.Generator, settings: AugmentSettings) -> torch.Tensor:
    """Thicken a random quarter of the batch and thin another (with the default 0.5), each by a random
    amount: the image blended towards its 3x3 grey dilation (max-pool) or erosion (-max-pool(-x))."""
    n = len(x)
    choice = torch.rand(n, generator=generator)
    amount = torch.rand(n, generator=generator)
    thicker = (choice < settings.stroke / 2).float() * amount
    thinner = ((choice >= settings.stroke / 2) & (choice < settings.stroke)).float() * amount * settings.thin_max
    if not (thicker.any() or thinner.any()):
        return x
    dilated, eroded = max_3x3(x), -max_3x3(-x)
    thicker, thinner = thicker.view(n, 1, 1, 1), thinner.view(n, 1, 1, 1)
    return x + thicker * (dilated - x) + thinner * (eroded - x)


def random_affine(x: torch.Tensor, generator: torch.Generator, settings: AugmentSettings) -> torch.Tensor:
    """One random rotation, x-shear, scale and shift per image, bilinear, zeros outside."""
    n = len(x)
    angle = torch.deg2rad(uniform(n, -settings.rotation, settings.rotation, generator))
    shear = torch.tan(torch.deg2rad(uniform(n, -settings.shear, settings.shear, generator)))
    scale = uniform(n, 1 - settings.scale, 1 + settings.scale, generator)
    shift = uniform(2 * n, -settings.translation, settings.translation, generator).view(n, 2) * (2.0 / SIDE)
    cos, sin = torch.cos(angle), torch.sin(angle)
    # forward map (input -> output) = scale * rotation @ shear; affine_grid wants its inverse.
    forward = torch.stack([torch.stack([cos, cos * shear - sin], 1),
                           torch.stack([sin, sin * shear + cos], 1)], 1) * scale.view(n, 1, 1)
    inverse = torch.linalg.inv(forward)
    theta = torch.cat([inverse, -(inverse @ shift.unsqueeze(2))], 2)
    grid = sampling_grid(theta)
    if settings.elastic > 0:  # drawn last, so that runs without it keep their random stream
        grid = grid + elastic_field(n, generator, settings.elastic, settings.elastic_sigma)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def elastic_field(n: int, generator: torch.Generator, amount: float, sigma: float) -> torch.Tensor:
    """n smooth random displacement fields [n, 28, 28, 2] in grid_sample's units, with a std of `amount` px.

    Simard's field is white noise blurred by a Gaussian of `sigma` px. The same field, at a quarter of
    the cost: unit noise on a 2-px lattice (14x14), each point spreading as that Gaussian (two small
    matrix products instead of a convolution: 1-channel convolutions are slow on CPU).
    """
    spread = lattice_gaussian(sigma)                      # [28, 14]
    noise = torch.randn(2 * n, LATTICE, LATTICE, generator=generator)
    smooth = spread @ noise @ spread.T                     # [2n, 28, 28]
    # The variance at pixel i of a sum of unit-noise bumps is (sum_j spread[i, j]^2)^2 (x and y): std 1 mid-field.
    scale = amount * (2.0 / SIDE) / float((spread[SIDE // 2] ** 2).sum())
    return (smooth * scale).view(n, 2, SIDE, SIDE).permute(0, 2, 3, 1)


LATTICE = SIDE // 2


@functools.lru_cache(maxsize=8)
def lattice_gaussian(sigma: float) -> torch.Tensor:
    """[28, 14]: the Gaussian weight of lattice point j (at pixel 2j + 0.5) on pixel i."""
    pixels = torch.arange(SIDE, dtype=torch.float32).view(-1, 1)
    points = torch.arange(LATTICE, dtype=torch.float32).view(1, -1) * 2 + 0.5
    return torch.exp(-0.5 * ((pixels - points) / sigma) ** 2)


def max_3x3(x: torch.Tensor) -> torch.Tensor:
    """F.max_pool2d(x, 3, stride=1, padding=1), separably: 20x faster on CPU for 1-channel 28x28."""
    padded = F.pad(x, (1, 1, 1, 1), value=float(x.min()))
    rows = torch.maximum(torch.maximum(padded[..., :-2], padded[..., 1:-1]), padded[..., 2:])
    return torch.maximum(torch.maximum(rows[..., :-2, :], rows[..., 1:-1, :]), rows[..., 2:, :])


# Pixel centres in affine_grid's normalised coordinates (align_corners=False).
_CENTRES = (torch.arange(SIDE, dtype=torch.float32) * 2 + 1) / SIDE - 1
_GRID_X, _GRID_Y = _CENTRES.repeat(SIDE), _CENTRES.repeat_interleave(SIDE)


def sampling_grid(theta: torch.Tensor) -> torch.Tensor:
    """F.affine_grid(theta, [N, 1, 28, 28], align_corners=False), as broadcast products: 2x faster on CPU."""
    t = theta.unsqueeze(-1)
    x = t[:, 0, 0] * _GRID_X + t[:, 0, 1] * _GRID_Y + t[:, 0, 2]
    y = t[:, 1, 0] * _GRID_X + t[:, 1, 1] * _GRID_Y + t[:, 1, 2]
    return torch.stack([x, y], -1).view(-1, SIDE, SIDE, 2)
