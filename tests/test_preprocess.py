"""The one preprocessing function (serving/preprocess.py), without Ray: any drawing -> MNIST format."""
import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from bench.drawings import STYLES, encode, redraw
from serving.preprocess import (BOX, MAX_PIXELS, BadImage, decode_image, from_pixels, preprocess,
                                preprocess_steps)


def centre_of_mass(image: np.ndarray) -> tuple[float, float]:
    weights = image.astype(np.float64)
    rows, cols = np.indices(image.shape)
    return float((rows * weights).sum() / weights.sum()), float((cols * weights).sum() / weights.sum())


def ink_box(image: np.ndarray, threshold: int = 50) -> tuple[int, int]:
    rows, cols = np.flatnonzero((image > threshold).any(1)), np.flatnonzero((image > threshold).any(0))
    return rows[-1] - rows[0] + 1, cols[-1] - cols[0] + 1


def png(array: np.ndarray, mode: str | None = None) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array, mode).save(buffer, "PNG")
    return buffer.getvalue()


def test_mnist_digits_come_back_as_themselves(test_digits):
    """MNIST was made this way, so re-preprocessing an MNIST digit barely changes it."""
    images = test_digits[0][:200]
    again = np.stack([preprocess(image) for image in images])
    assert again.dtype == np.uint8 and again.shape == (200, 28, 28)
    assert np.abs(again.astype(int) - images).mean() < 6.0  # grey levels out of 255
    # ... and exactly so without the slant limit, which shears MNIST's steepest third on purpose
    from bench.bench_drawn import reader
    mnist_steps = np.stack([reader(slant_limit=float("inf"))(image) for image in images])
    assert np.abs(mnist_steps.astype(int) - images).mean() < 2.0


@pytest.mark.parametrize("style", STYLES)
def test_every_colour_scheme_gives_the_same_digit(test_digits, style):
    """Black on white, a canvas's alpha-only stroke, white on black JPEG, blue ink on paper."""
    digit = test_digits[0][0]
    reference = preprocess(decode_image(encode(redraw(digit, "black_on_white", np.random.default_rng(3)),
                                               "black_on_white")))
    drawn = preprocess(decode_image(encode(redraw(digit, style, np.random.default_rng(3)), style)))
    assert np.abs(drawn.astype(int) - reference).mean() < 4.0


def test_result_is_centred_by_mass_in_a_20px_box(test_digits):
    rng = np.random.default_rng(0)
    for digit in test_digits[0][:20]:
        result = preprocess(decode_image(encode(redraw(digit, "black_on_white", rng), "black_on_white")))
        row, col = centre_of_mass(result)
        assert abs(row - 14) <= 0.75 and abs(col - 14) <= 0.75
        assert max(ink_box(result, threshold=0)) <= BOX


def test_steps_are_the_documented_stages(test_digits):
    image = redraw(test_digits[0][1], "alpha_stroke", np.random.default_rng(1))
    steps = preprocess_steps(image, keep_full=True)
    assert steps.gray.shape == (image.height, image.width) and steps.gray.dtype == np.uint8
    assert steps.ink.min() >= 0 and steps.ink.max() == 1.0
    top, left, bottom, right = steps.box
    assert np.array_equal(steps.crop, steps.ink[top:bottom, left:right])
    assert max(steps.fitted.shape) == BOX
    assert np.array_equal(steps.result, preprocess(image))


def test_aspect_ratio_is_kept():
    """A tall thin stroke stays tall and thin (a '1' must not become a blob)."""
    canvas = np.full((400, 400), 255, np.uint8)
    canvas[50:350, 190:210] = 0
    result = preprocess(canvas)
    height, width = ink_box(result)
    assert height == BOX and width <= 3


def test_fat_digit_covering_most_of_the_canvas():
    """The background comes from the border: ink over half the image must not flip polarity."""
    canvas = np.full((100, 100), 255, np.uint8)
    canvas[5:95, 5:95] = 0  # 81% ink
    canvas[30:70, 30:70] = 255
    result = preprocess(canvas)
    assert result[14, 14] < 50 and result[14, 5] > 200  # ring of ink, hole in the middle


def test_thin_stroke_on_a_big_canvas_stays_visible():
    canvas = np.full((2000, 2000), 255, np.uint8)
    canvas[200:1800, 1000:1002] = 0
    assert preprocess(canvas).max() == 255


def test_sketchpad_value_and_rgb_arrays():
    """Gradio's Sketchpad (image_mode L) gives H x W uint8, white background, black stroke."""
    grey = np.full((280, 280), 255, np.uint8)
    grey[60:220, 120:150] = 0
    rgb = np.repeat(grey[..., None], 3, axis=2)
    rgba = np.zeros((280, 280, 4), np.uint8)
    rgba[..., 3] = 255 - grey
    results = [preprocess(a) for a in (grey, rgb, rgba, Image.fromarray(grey))]
    for other in results[1:]:
        assert np.array_equal(results[0], other)


@pytest.mark.parametrize("image", [
    np.full((50, 50), 255, np.uint8),                      # white page
    np.zeros((50, 50), np.uint8),                          # black page
    np.zeros((50, 50, 4), np.uint8),                       # fully transparent canvas
    (np.random.default_rng(0).integers(120, 140, (50, 50))).astype(np.uint8),  # grey noise only
], ids=["white", "black", "transparent", "faint-noise"])
def test_blank_drawings_are_refused(image):
    with pytest.raises(BadImage, match="blank"):
        preprocess(image)


def test_decode_refuses_what_is_not_png_or_jpeg():
    with pytest.raises(BadImage, match="not a PNG or JPEG"):
        decode_image(b"hello")
    gif = io.BytesIO()
    Image.new("L", (8, 8)).save(gif, "GIF")
    with pytest.raises(BadImage, match="not a PNG or JPEG"):
        decode_image(gif.getvalue())


def test_decode_refuses_truncated_images():
    data = png(np.full((64, 64), 200, np.uint8))
    with pytest.raises(BadImage):
        decode_image(data[: len(data) // 2])


def huge_png_header(width: int, height: int) -> bytes:
    """A valid PNG header that claims a huge size (a decompression bomb's first bytes)."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    header = chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
    return b"\x89PNG\r\n\x1a\n" + header + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def test_decode_checks_the_pixel_limit_before_decoding():
    with pytest.raises(BadImage, match="over the limit of"):
        decode_image(huge_png_header(20000, 20000))
    side = int(MAX_PIXELS ** 0.5) + 1
    with pytest.raises(BadImage, match=f"{side}x{side} pixels, over the limit of"):
        decode_image(huge_png_header(side, side))


def test_sixteen_bit_and_palette_pngs():
    grey16 = np.zeros((40, 40), np.uint16)
    grey16[10:30, 18:22] = 65535
    assert preprocess(decode_image(png(grey16))).max() == 255
    palette = Image.fromarray(np.where(grey16 > 0, 255, 0).astype(np.uint8)).convert("P")
    buffer = io.BytesIO()
    palette.save(buffer, "PNG")
    assert preprocess(decode_image(buffer.getvalue())).max() == 255


def test_from_pixels_scales_floats_and_integers_alike(test_digits):
    digit = test_digits[0][0]
    assert np.array_equal(from_pixels(digit.tolist(), 255), digit)
    assert np.array_equal(from_pixels((digit / 255.0).tolist(), 1.0), digit)


# ---------------------------------------------------------------- the work budget (serving/budget.py)

def photo_of(digit: np.ndarray, side: int, exif_orientation: int | None = None) -> bytes:
    """`digit` (white on black) as a dark-ink-on-paper JPEG photo of `side` x `side` pixels."""
    image = Image.fromarray(255 - digit).resize((side, side), Image.Resampling.BILINEAR).convert("RGB")
    buffer = io.BytesIO()
    options = {}
    if exif_orientation:
        exif = Image.Exif()
        exif[0x0112] = exif_orientation
        options["exif"] = exif.tobytes()
    image.save(buffer, "JPEG", quality=85, **options)
    return buffer.getvalue()


def test_a_large_photo_is_decoded_smaller_not_refused(test_digits):
    from serving.preprocess import DRAFT_PIXELS, MAX_PHOTO_PIXELS
    digit = test_digits[0][0]
    big = photo_of(digit, 6000)  # 36 Mpx: over the per-image limit if decoded in full
    image = decode_image(big)
    assert image.size[0] * image.size[1] <= DRAFT_PIXELS and image.size[0] >= 6000 // 8
    reference = preprocess(decode_image(photo_of(digit, 280)))
    assert np.abs(preprocess(image).astype(int) - reference.astype(int)).mean() < 12
    side = int(MAX_PHOTO_PIXELS ** 0.5) + 8
    with pytest.raises(BadImage, match=f"{side}x{side} pixels, over the limit of {MAX_PHOTO_PIXELS}"):
        decode_image(huge_jpeg_header(side, side))


def huge_jpeg_header(width: int, height: int) -> bytes:
    """A small JPEG's bytes with the frame header's size patched: a bomb's first bytes."""
    data = bytearray(photo_of(np.zeros((28, 28), np.uint8), 16))
    at = data.index(b"\xff\xc0") + 5
    data[at:at + 4] = struct.pack(">HH", height, width)
    return bytes(data)


def test_exif_orientation_turns_a_photo_upright(test_digits):
    digit = test_digits[0][0]
    upright = preprocess(decode_image(photo_of(digit, 280)))
    # Stored rotated by 90 degrees, with the tag saying how to turn it back (6: rotate 270 to view).
    stored = np.rot90(digit, 1)
    turned = preprocess(decode_image(photo_of(stored, 280, exif_orientation=6)))
    assert np.abs(turned.astype(int) - upright.astype(int)).mean() < 12
    assert np.abs(preprocess(decode_image(photo_of(stored, 280))).astype(int) - upright.astype(int)).mean() > 12


def test_the_request_budget_is_checked_on_headers_before_decoding():
    from serving.budget import MAX_REQUEST_PIXELS, OverBudget, open_all
    side = int(MAX_PIXELS ** 0.5)
    at_limit = huge_png_header(side, side)  # claims 2048x2048; its data is not even there
    count = MAX_REQUEST_PIXELS // (side * side)
    open_all([at_limit] * count, ["x"] * count)  # headers only: fine, however broken the data
    with pytest.raises(OverBudget, match=f"over the limit of {MAX_REQUEST_PIXELS} decoded pixels per request"):
        open_all([at_limit] * (count + 1), ["x"] * (count + 1))


def test_errors_carry_no_library_text():
    data = png(np.full((64, 64), 200, np.uint8))
    with pytest.raises(BadImage) as refused:
        decode_image(data[: len(data) // 2])
    assert str(refused.value) == "the image is truncated or corrupt"
