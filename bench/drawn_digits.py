"""An evaluation set of "people's drawings", built by code and never trained on.

Two sources, each balanced over the ten classes, each drawn on a 280x280 sketchpad-like canvas
(black pen on white) and read through serving/preprocess.py exactly as the page reads a drawing:

- "mnist_redrawn": MNIST *test* digits drawn again with a solid pen (no grey anti-aliased
  strokes) and strong distortions, one kind per digit in turn: thick pen, thin pen, slant,
  rotation, narrow, and a mix of milder ones;
- "fonts": the digits of every TrueType font on this machine (`fc-list`; Debian's DejaVu family
  here), in varied stroke weights, sizes, slants and small rotations.

    build_drawn_set(test_images, test_labels)  -> DrawnSet(images uint8 [N, 28, 28], labels, sources)

The same seed gives the same set, byte for byte (on the same fonts and Pillow).
"""
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from serving.preprocess import preprocess

CANVAS = 280                 # the page's sketchpad, 10 canvas pixels per MNIST pixel
KINDS = ("thick", "thin", "slant", "rotate", "narrow", "mixed")
FONT_VARIANTS = ("regular", "heavy", "slanted", "mixed")


@dataclass
class DrawnSet:
    images: np.ndarray       # uint8 [N, 28, 28], white digit on black, as the model sees it
    labels: np.ndarray       # int64 [N]
    sources: np.ndarray      # str [N]: "mnist_redrawn" or "fonts"
    kinds: np.ndarray        # str [N]: the distortion (KINDS) or font variant (FONT_VARIANTS)


def build_drawn_set(test_images: np.ndarray, test_labels: np.ndarray, per_class: int = 100, seed: int = 0,
                    fonts: list[Path] | None = None, read: Callable[[np.ndarray], np.ndarray] = preprocess) -> DrawnSet:
    """`per_class` redrawn MNIST test digits per class, plus every font's ten digits in each of
    FONT_VARIANTS. `read` turns a canvas into the 28x28 input (serving's preprocess by default;
    the bench passes variants)."""
    rng = np.random.default_rng(seed)
    rows = []
    test_images, test_labels = np.asarray(test_images), np.asarray(test_labels)
    for digit in range(10):
        chosen = rng.choice(np.flatnonzero(test_labels == digit), size=per_class, replace=False)
        for i, index in enumerate(chosen):
            kind = KINDS[i % len(KINDS)]
            rows.append((read(redraw(test_images[index], kind, rng)), digit, "mnist_redrawn", kind))
    for font in (machine_fonts() if fonts is None else fonts):
        for digit in range(10):
            for variant in FONT_VARIANTS:
                rows.append((read(render_font_digit(font, digit, variant, rng)), digit, "fonts", variant))
    images, labels, sources, kinds = zip(*rows)
    return DrawnSet(np.stack(images), np.array(labels, dtype=np.int64), np.array(sources), np.array(kinds))


def machine_fonts() -> list[Path]:
    """TrueType fonts that fontconfig knows, sorted, without symbol-only fonts."""
    try:
        listed = subprocess.run(["fc-list", "--format", "%{file}\n"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return []
    return sorted({Path(line) for line in listed.splitlines() if line.lower().endswith(".ttf") and "math" not in line.lower()})


# ---------------------------------------------------------------- MNIST test digits, redrawn

def redraw(digit: np.ndarray, kind: str, rng: np.random.Generator) -> np.ndarray:
    """A 28x28 MNIST digit -> a 280x280 canvas (uint8, black pen on white) with a `kind` distortion."""
    big = np.asarray(Image.fromarray(np.asarray(digit, dtype=np.uint8)).resize((CANVAS, CANVAS), Image.Resampling.BILINEAR))
    level, grow, angle, shear, narrow = 128, 0, 0.0, 0.0, 1.0
    if kind == "thick":
        level, grow = 64, int(rng.integers(8, 15))               # +0.8..1.4 MNIST px each side
    elif kind == "thin":
        level, grow = 200, -int(rng.integers(2, 5))
    elif kind == "slant":
        shear = float(rng.choice([-1, 1]) * rng.uniform(0.35, 0.6))   # 19..31 degrees
    elif kind == "rotate":
        angle = float(rng.choice([-1, 1]) * rng.uniform(18, 30))
    elif kind == "narrow":
        narrow = float(rng.uniform(0.55, 0.75))
    elif kind == "mixed":
        level, grow = int(rng.integers(64, 200)), int(rng.integers(-2, 8))
        angle, shear, narrow = float(rng.uniform(-15, 15)), float(rng.uniform(-0.3, 0.3)), float(rng.uniform(0.75, 1.0))
    else:
        raise ValueError(f"unknown kind {kind!r}; one of {KINDS}")
    pen = Image.fromarray(np.where(big >= level, 255, 0).astype(np.uint8))  # a solid pen, as on the sketchpad
    if grow > 0:
        pen = dilate(pen, grow)
    elif grow < 0 and dilate(pen.point(lambda v: 255 - v), -grow).point(lambda v: 255 - v).getbbox():
        pen = dilate(pen.point(lambda v: 255 - v), -grow).point(lambda v: 255 - v)  # erosion, unless it erases all
    return to_canvas(transform(pen, angle, shear, narrow), rng)


def dilate(pen: Image.Image, radius: int) -> Image.Image:
    """Binary dilation by a (2r+1)-square: any ink under a box blur (PIL's MaxFilter is O(r^2) per pixel)."""
    return pen.filter(ImageFilter.BoxBlur(radius)).point(lambda v: 255 if v > 0 else 0)


def transform(ink: Image.Image, angle: float, shear: float, narrow: float) -> Image.Image:
    """Rotate (degrees), slant (x += shear * y, upright at the centre) and narrow about the centre."""
    if angle == 0 and shear == 0 and narrow == 1:
        return ink
    a = np.deg2rad(angle)
    forward = np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]]) @ np.array([[narrow, -shear], [0, 1]])
    inverse = np.linalg.inv(forward)  # PIL maps output pixels back to input pixels
    centre = np.array([ink.width / 2, ink.height / 2])
    offset = centre - inverse @ centre
    data = (inverse[0, 0], inverse[0, 1], offset[0], inverse[1, 0], inverse[1, 1], offset[1])
    return ink.transform(ink.size, Image.Transform.AFFINE, data, resample=Image.Resampling.BILINEAR)


def to_canvas(ink: Image.Image, rng: np.random.Generator) -> np.ndarray:
    """White ink on black -> the digit at a random size and place on the white canvas, black pen."""
    box = ink.getbbox()
    if box is None:
        raise ValueError("the distortion erased the digit")
    digit = ink.crop(box)
    scale = rng.uniform(0.45, 0.85) * CANVAS / max(digit.size)
    digit = digit.resize((max(1, round(digit.width * scale)), max(1, round(digit.height * scale))), Image.Resampling.BILINEAR)
    canvas = Image.new("L", (CANVAS, CANVAS), 0)
    canvas.paste(digit, (int(rng.integers(0, CANVAS - digit.width + 1)), int(rng.integers(0, CANVAS - digit.height + 1))))
    return 255 - np.asarray(canvas)


# ---------------------------------------------------------------- font digits

def render_font_digit(font: Path, digit: int, variant: str, rng: np.random.Generator) -> np.ndarray:
    """One digit of `font` on the canvas: regular, heavy (a wider outline stroke), slanted, or a mix."""
    size = int(rng.integers(60, 100))  # rendered at half the canvas' scale (4x fewer pixels), then enlarged
    weight, angle, shear = 0, 0.0, 0.0
    if variant == "heavy":
        weight = int(rng.integers(2, 5))
    elif variant == "slanted":
        shear = float(rng.uniform(0.2, 0.45))          # right-leaning, as most hands slant
    elif variant == "mixed":
        weight, angle, shear = int(rng.integers(0, 4)), float(rng.uniform(-12, 12)), float(rng.uniform(-0.1, 0.35))
    elif variant != "regular":
        raise ValueError(f"unknown variant {variant!r}; one of {FONT_VARIANTS}")
    ink = Image.new("L", (CANVAS, CANVAS), 0)
    ImageDraw.Draw(ink).text((CANVAS // 2, CANVAS // 2), str(digit), fill=255, anchor="mm", stroke_width=weight, stroke_fill=255,
                             font=ImageFont.truetype(str(font), size))
    return to_canvas(transform(ink, angle, shear, 1.0), rng)
