"""The file-structure limits (serving/structure.py) and the bounded preprocessing buffers, on the
hostile inputs of tests/hostile.py: each class is refused with a message naming its limit, or
served; ordinary files pass unchanged. The costs are measured in tests/test_cost_oracle.py."""
import io
import struct

import numpy as np
import pytest
from PIL import Image

from serving import structure
from serving.budget import OverBudget, open_all
from serving.preprocess import MAX_CROP_SIDE, MAX_PIXELS, BadImage, decode_image, open_image, preprocess_steps
from tests import hostile


def with_frame_size(data: bytes, width: int, height: int) -> bytes:
    """A JPEG whose SOF header claims another size (nothing else changed)."""
    at = next(i for i in range(2, len(data) - 1) if data[i] == 0xFF and data[i + 1] in structure.SOF_MARKERS)
    return data[:at + 5] + struct.pack(">HH", height, width) + data[at + 9:]


@pytest.mark.parametrize("data, limit", [
    (hostile.iccp_flood(2, inflated=1000), "one iCCP chunk"),
    (hostile.iccp_flood(1, inflated=100 * 1024 * 1024), "one iCCP chunk"),  # ~100 KB of zlib
    (hostile.text_flood(structure.MAX_TEXT_CHUNKS + 1), "16 chunks"),
    (hostile.text_flood(structure.MAX_TEXT_CHUNKS + 1, after_idat=True), "16 chunks"),
    (hostile.text_flood(2, b"tEXt", inflated=1000) + b"", None),
    (hostile.empty_chunk_flood(structure.MAX_PNG_CHUNKS), "chunks"),
    (hostile.empty_chunk_flood(10, kind=b"abCD"), None),
    (hostile.png(8, 8, extra=hostile.chunk(b"eXIf", bytes(100_000))), "ancillary chunk"),
])
def test_png_chunks_are_bounded_before_pillow_reads_them(data, limit):
    if limit is None:
        decode_image(data)
        return
    with pytest.raises(BadImage, match=limit):
        decode_image(data)


def test_a_png_with_one_colour_profile_is_read():
    image = decode_image(hostile.png(8, 8, extra=hostile.iccp_chunk(3000)))
    assert len(image.info["icc_profile"]) == 3000


def test_a_progressive_jpeg_scan_flood_is_refused():
    with pytest.raises(BadImage, match=f"more than {structure.MAX_JPEG_SCANS} scans"):
        decode_image(hostile.progressive_jpeg(64, 64, extra_scans=structure.MAX_JPEG_SCANS))
    assert decode_image(hostile.progressive_jpeg(64, 64, extra_scans=5)).size == (64, 64)


def test_a_progressive_jpeg_is_bounded_by_its_coefficient_memory():
    small = hostile.progressive_jpeg(64, 64)
    with pytest.raises(BadImage, match="MiB of coefficients"):
        open_image(with_frame_size(small, 6000, 6000))  # 103 MiB of coefficients, refused from the header
    baseline = io.BytesIO()
    Image.new("L", (64, 64)).save(baseline, "JPEG")
    open_image(with_frame_size(baseline.getvalue(), 6000, 6000))  # one pass: no coefficient buffer


def test_a_progressive_jpegs_scans_count_in_the_request_budget():
    photo = hostile.progressive_jpeg(2048, 2048)
    images, total = open_all([photo], ["image"])
    assert total > 2048 * 2048 * 2  # its ten scans weigh as much as a few images of its size
    with pytest.raises(OverBudget, match="decoded pixels per request"):
        open_all([hostile.progressive_jpeg(2048, 2048, extra_scans=20)], ["image"])


@pytest.mark.parametrize("width, height", [(2048, 2048), (256, 16384), (64, 65536), (65536, 64)])
def test_the_deslant_buffers_are_bounded_by_the_crop_limit_not_the_aspect_ratio(width, height):
    if width * height > MAX_PIXELS:
        pytest.skip("over the pixel limit")
    steps = preprocess_steps(decode_image(hostile.slanted_stroke(width, height)))
    assert max(steps.crop.shape) <= MAX_CROP_SIDE
    assert steps.upright.shape[0] <= MAX_CROP_SIDE and steps.upright.shape[1] <= 2 * MAX_CROP_SIDE + 2
    assert steps.result.shape == (28, 28) and steps.result.max() == 255


def test_a_crop_within_the_limit_is_not_rescaled():
    rows = np.full((300, 300), 255, np.uint8)
    rows[20:280, 140:150] = 0
    steps = preprocess_steps(decode_image(hostile.png(300, 300, rows)))
    assert steps.crop.shape == (260, 10)
