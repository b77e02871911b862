"""MNIST digits re-drawn the way people draw on a canvas: enlarged, thick, off-centre, in the
colour schemes that clients send. Used by the tests, the serving benchmark's payloads, the page's
examples and the preprocessing figure (bench/figure.py). Tooling, kept outside the serving package
so that editing it never changes the code hash that Serve deploys.
"""
import io

import numpy as np
from PIL import Image, ImageFilter

STYLES = ("black_on_white", "alpha_stroke", "white_on_black_jpeg", "blue_on_paper_jpeg")


def redraw(digit: np.ndarray, style: str, rng: np.random.Generator) -> Image.Image:
    """A 28x28 uint8 MNIST digit (white on black) -> a canvas-like drawing in `style`."""
    scale = int(rng.integers(6, 15))                      # 168..392 px tall
    # A thicker pen than MNIST's: dilate by 2 px at 6x (a third of an MNIST pixel each side).
    thick = Image.fromarray(np.asarray(digit, dtype=np.uint8)).resize((168, 168), Image.Resampling.BILINEAR)
    thick = thick.filter(ImageFilter.MaxFilter(5))
    big = thick.resize((28 * scale, 28 * scale), Image.Resampling.BILINEAR)
    width, height = int(28 * scale * rng.uniform(1.2, 2.0)), int(28 * scale * rng.uniform(1.1, 1.6))
    left, top = int(rng.integers(0, width - 28 * scale)), int(rng.integers(0, height - 28 * scale))
    ink = Image.new("L", (width, height), 0)
    ink.paste(big, (left, top))
    ink_array = np.asarray(ink)
    if style == "black_on_white":
        return Image.fromarray(255 - ink_array)
    if style == "alpha_stroke":  # what a canvas exports: black strokes, the shape only in alpha
        rgba = np.zeros((height, width, 4), dtype=np.uint8)
        rgba[..., 3] = ink_array
        return Image.fromarray(rgba, "RGBA")
    if style == "white_on_black_jpeg":
        return Image.fromarray(ink_array).convert("RGB")
    if style == "blue_on_paper_jpeg":
        paper = np.array([235, 232, 220], dtype=np.float32)
        pen = np.array([20, 40, 160], dtype=np.float32)
        alpha = (ink_array / 255.0)[..., None]
        return Image.fromarray((paper * (1 - alpha) + pen * alpha).astype(np.uint8), "RGB")
    raise ValueError(f"unknown style {style!r}; one of {STYLES}")


def encode(image: Image.Image, style: str) -> bytes:
    """PNG, or JPEG for the *_jpeg styles (lossy, as photos and some canvases are)."""
    buffer = io.BytesIO()
    if style.endswith("_jpeg"):
        image.save(buffer, "JPEG", quality=90)
    else:
        image.save(buffer, "PNG")
    return buffer.getvalue()


def redrawn_set(images: np.ndarray, seed: int = 0) -> list[tuple[str, bytes]]:
    """(style, encoded bytes) for each digit, cycling through the styles."""
    rng = np.random.default_rng(seed)
    out = []
    for i, digit in enumerate(images):
        style = STYLES[i % len(STYLES)]
        out.append((style, encode(redraw(digit, style, rng), style)))
    return out
