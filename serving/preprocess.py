"""One preprocessing function for every input path: HTTP images, the sketchpad, and tests.

A drawing of any size and colour scheme becomes a 28x28 MNIST-format uint8 image (white digit on
black) the way MNIST itself was made (LeCun et al.): crop to the ink, scale the longest side to
20 px keeping the aspect ratio, then place it in a 28x28 field so that its centre of mass sits at
the centre. The model normalises it exactly as in training (`training.model.to_input`).

    preprocess(image)        -> uint8 [28, 28]
    preprocess_steps(image)  -> every intermediate stage (used by docs/preprocessing.png)
"""
import io
from dataclasses import dataclass

import numpy as np
from PIL import Image, UnidentifiedImageError

MAX_PIXELS = 4096 * 4096  # decoded-size limit: a tiny PNG can hold a huge (bomb) image
FORMATS = ("PNG", "JPEG")
BOX = 20          # MNIST digits fit a 20x20 box ...
FIELD = 28        # ... centred by mass in a 28x28 field
CENTRE = 14.0     # where MNIST's centres of mass sit (row and column index, measured: 13.99, 14.01)
MIN_CONTRAST = 40  # grey levels between background and the strongest ink; less is a blank drawing
NOISE_FLOOR = 0.1  # ink weaker than this (JPEG ringing, paper texture) is background
BBOX_INK = 0.2     # ink that counts for the bounding box


class BadImage(ValueError):
    """The input cannot be turned into a digit; the message says why (served as a 4xx)."""


@dataclass
class Steps:
    """Every stage of `preprocess_steps`, for the documentation picture and for tests."""
    gray: np.ndarray      # float [H, W] 0..255, alpha composited
    ink: np.ndarray       # float [H, W] 0..1, white ink on black, contrast stretched
    crop: np.ndarray      # float, the ink's bounding box
    fitted: np.ndarray    # float, longest side 20 px
    result: np.ndarray    # uint8 [28, 28], centred by mass


def decode_image(data: bytes) -> Image.Image:
    """PNG or JPEG bytes -> a loaded PIL image, refusing anything else and oversized images."""
    too_big = f"over the limit of {MAX_PIXELS} pixels"
    try:
        image = Image.open(io.BytesIO(data), formats=FORMATS)
    except Image.DecompressionBombError:  # PIL's own, far higher, limit: still ours to report
        raise BadImage(f"the image is {too_big}") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
        raise BadImage("the bytes are not a PNG or JPEG image") from None
    width, height = image.size
    if width * height > MAX_PIXELS:  # checked on the header, before decoding
        raise BadImage(f"the image is {width}x{height} pixels, {too_big}")
    try:
        image.load()
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
        raise BadImage(f"the image is truncated or corrupt ({error})") from None
    return image


def preprocess(image) -> np.ndarray:
    """A PIL image or array (H x W grey, H x W x 3 RGB, H x W x 4 RGBA) -> uint8 [28, 28] MNIST."""
    return preprocess_steps(image).result


def preprocess_steps(image) -> Steps:
    gray = composite_gray(*gray_and_alpha(image))
    ink = to_ink(gray)
    crop = crop_to_ink(ink)
    fitted = fit_box(crop, BOX)
    return Steps(gray, ink, crop, fitted, centre_by_mass(fitted))


def gray_and_alpha(image) -> tuple[np.ndarray, np.ndarray | None]:
    """Luminance (float 0..255) and alpha (float 0..1, or None when the image is opaque)."""
    if isinstance(image, Image.Image):
        if image.mode in ("I", "I;16", "I;16B", "I;16L", "F"):  # 16-bit or float grey PNGs
            array = np.asarray(image, dtype=np.float32)
            return array * (255.0 / max(float(array.max()), 1.0)), None
        has_alpha = image.mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in image.info
        if has_alpha:
            la = np.asarray(image.convert("RGBA").convert("LA"), dtype=np.float32)
            return la[..., 0], la[..., 1] / 255.0
        return np.asarray(image.convert("L"), dtype=np.float32), None
    array = np.asarray(image)
    if array.dtype == bool:
        array = array.astype(np.uint8) * 255
    if array.ndim == 2:
        return array.astype(np.float32), None
    if array.ndim == 3 and array.shape[2] in (1, 2, 3, 4):
        channels = array.astype(np.float32)
        gray = (channels[..., 0] if array.shape[2] < 3 else
                channels[..., :3] @ np.array([0.299, 0.587, 0.114], dtype=np.float32))
        alpha = channels[..., -1] / 255.0 if array.shape[2] in (2, 4) else None
        return gray, alpha
    raise BadImage(f"an image array must be H x W or H x W x 1..4, not {list(array.shape)}")


def composite_gray(gray: np.ndarray, alpha: np.ndarray | None) -> np.ndarray:
    """Flatten transparency onto a background that contrasts with the drawn pixels.

    A canvas exports strokes as colour + alpha over a transparent (often RGB 0) background; a dark
    stroke is put on white, a light one on black, so the stroke survives whatever its colour.
    """
    if gray.size == 0:
        raise BadImage("the image is empty")
    if alpha is None or alpha.min() >= 1.0:
        return gray
    weight = float(alpha.sum())
    if weight == 0:
        raise BadImage("the drawing is blank: every pixel is fully transparent")
    stroke = float((gray * alpha).sum()) / weight
    background = 255.0 if stroke < 128 else 0.0
    return gray * alpha + background * (1.0 - alpha)


def to_ink(gray: np.ndarray) -> np.ndarray:
    """White ink on black in 0..1: invert light backgrounds, stretch contrast, drop faint noise.

    The background is the median of the image's border, which a drawing rarely fills (the median
    of the whole image is wrong for a fat digit that covers more than half the canvas).
    """
    border = np.concatenate([gray[0], gray[-1], gray[1:-1, 0], gray[1:-1, -1]])
    background = float(np.median(border))
    if background > 127.5:  # dark ink on a light background
        gray, background = 255.0 - gray, 255.0 - background
    peak = float(gray.max())
    if peak - background < MIN_CONTRAST:
        raise BadImage("the drawing is blank: no stroke stands out from the background")
    ink = (gray - np.float32(background)) * np.float32(1.0 / (peak - background))
    np.clip(ink, 0.0, 1.0, out=ink)
    ink[ink < NOISE_FLOOR] = 0.0
    return ink


def crop_to_ink(ink: np.ndarray) -> np.ndarray:
    mask = ink >= BBOX_INK
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    return ink[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]


def fit_box(crop: np.ndarray, box: int) -> np.ndarray:
    """Scale so the longest side is `box` pixels, keeping the aspect ratio (area-averaged)."""
    height, width = crop.shape
    scale = box / max(height, width)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    method = Image.Resampling.BOX if scale < 1 else Image.Resampling.BILINEAR
    fitted = np.asarray(Image.fromarray(crop.astype(np.float32), mode="F").resize(size, method))
    peak = float(fitted.max())
    return np.clip(fitted / peak, 0.0, 1.0) if peak > 0 else fitted  # thin strokes stay visible


def centre_by_mass(small: np.ndarray) -> np.ndarray:
    """Place `small` in a 28x28 field with its centre of mass at MNIST's (14, 14), whole pixels."""
    height, width = small.shape
    total = float(small.sum())
    row = float(small.sum(axis=1) @ np.arange(height)) / total
    col = float(small.sum(axis=0) @ np.arange(width)) / total
    top = min(max(round(CENTRE - row), 0), FIELD - height)
    left = min(max(round(CENTRE - col), 0), FIELD - width)
    field = np.zeros((FIELD, FIELD), dtype=np.float32)
    field[top:top + height, left:left + width] = small
    return np.rint(field * 255.0).astype(np.uint8)


def from_pixels(pixels, scale: float) -> np.ndarray:
    """An MNIST-format array (white digit on black) -> uint8 [28, 28]; no resizing.

    `scale` is the value of full ink: 255 for integer pixels, 1 for float pixels. Callers check
    the shape and range first (the API does, with messages); this only converts.
    """
    array = np.asarray(pixels, dtype=np.float32).reshape(FIELD, FIELD)
    return np.rint(array * (255.0 / scale)).astype(np.uint8)
