"""Every request's cost is bounded by what it is (issue 26): each class of hostile input
(tests/hostile.py), swept over its sizes, is refused or served within a budget, measured by the
cost oracle (tests/cost_oracle.py) in a process of its own; none ends in an unexpected error (a
5xx). An ordinary drawing gives the same tensor as before these limits.

Budgets (docs/RELIABILITY.md, "Cost budgets"), generous for a contended 2-core box: what they catch
is seconds and hundreds of MB, the costs these inputs had before (up to 9 s, 2 GB).
    SERVED   what the work budget allows at most: 4 images at 2048x2048, ~0.36 s of CPU
    REFUSED  a refusal from the structure or the header: milliseconds, a few MB
No Ray: the functions the routes call, run in-process.
"""
import asyncio
import hashlib
import json

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bench.drawings import redrawn_set
from serving import ingress, structure
from serving.api import ApiError, v2_decode
from serving.budget import check_sketch_files, decode_all
from serving.preprocess import MAX_PIXELS, BadImage, decode_image, preprocess
from tests import hostile
from tests.bombs import bomb_png
from tests.cost_oracle import MB, measure

SERVED_CPU_S, SERVED_PEAK = 1.0, 128 * MB    # measured: <= 0.2 s and 60 MB (docs/RELIABILITY.md)
REFUSED_CPU_S, REFUSED_PEAK = 0.1, 24 * MB   # measured: <= 10 ms and 8 MB
ORACLE = settings(max_examples=6, deadline=None, derandomize=True, database=None,
                  suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
# preprocess() of the first 300 MNIST test digits, redrawn as canvases (bench/drawings.py, seed 26),
# computed with the code before issue 26: the limits change no ordinary drawing
DRAWINGS_SHA256 = "35819ec4e55ddeb76cc2d152dfaacf273a06aa7b9234b3b7de4a616b93ee14a2"


@pytest.fixture(scope="module", autouse=True)
def warm():
    """First use of Pillow's plugins and numpy's paths happens here, not in the measured children."""
    decode_all([hostile.slanted_stroke(64, 64), hostile.progressive_jpeg(64, 64)], ["a", "b"])


def images_cost(blobs: list[bytes]):
    return measure(decode_all, blobs, [f"images[{i}]" for i in range(len(blobs))], refusals=(BadImage,))


def at_a_limit(cost) -> bool:
    """Refused by a limit (from the structure or the header), not after decoding (a blank drawing)."""
    return cost.outcome == "refused" and ("limit" in cost.error or "more than" in cost.error
                                          or "must be" in cost.error)


def assert_bounded(cost):
    """Refused at a limit for milliseconds, or decoded (served, or found blank) within the budget."""
    assert cost.outcome in ("served", "refused"), str(cost)
    if at_a_limit(cost):
        assert cost.cpu_s <= REFUSED_CPU_S and cost.peak_bytes <= REFUSED_PEAK, str(cost)
    else:
        assert cost.cpu_s <= SERVED_CPU_S and cost.peak_bytes <= SERVED_PEAK, str(cost)


def assert_refused(cost, words: str):
    assert cost.outcome == "refused" and words in cost.error, str(cost)
    assert cost.cpu_s <= REFUSED_CPU_S and cost.peak_bytes <= REFUSED_PEAK, str(cost)


# ---------------------------------------------------------------- PNG chunk floods

@pytest.mark.parametrize("count", [2, 50, 3000])
def test_an_iccp_flood_is_refused_from_the_chunk_list(count):
    assert_refused(images_cost([hostile.iccp_flood(count)]), "iCCP")


@pytest.mark.parametrize("kind", [b"zTXt", b"iTXt", b"tEXt"])
@pytest.mark.parametrize("after_idat", [False, True])
@pytest.mark.parametrize("count", [structure.MAX_TEXT_CHUNKS, 1000])
def test_a_text_flood_is_refused_or_cheap(kind, after_idat, count):
    cost = images_cost([hostile.text_flood(count, kind, after_idat=after_idat)])
    assert_bounded(cost)
    if count > structure.MAX_TEXT_CHUNKS:
        assert "text" in cost.error


@pytest.mark.parametrize("kind", [b"IDAT", b"abCD"])
@pytest.mark.parametrize("count", [4000, 300_000])
def test_a_flood_of_tiny_chunks_is_bounded(kind, count):
    assert_bounded(images_cost([hostile.empty_chunk_flood(count, kind)]))


def test_a_request_of_many_chunk_floods_is_bounded():
    assert_bounded(images_cost([hostile.empty_chunk_flood(4000)] * 64))


# ---------------------------------------------------------------- deslant: any aspect ratio

@given(ratio=st.floats(1, 100), tall=st.booleans(), stroke=st.integers(1, 40))
@ORACLE
def test_a_steep_stroke_at_any_aspect_ratio_costs_what_its_pixels_do(ratio, tall, stroke):
    short = max(8, int((MAX_PIXELS / ratio) ** 0.5))
    long_side = min(int(short * ratio), MAX_PIXELS // short)
    width, height = (short, long_side) if tall else (long_side, short)
    cost = images_cost([hostile.slanted_stroke(width, height, stroke)])
    assert cost.outcome == "served", str(cost)
    assert_bounded(cost)


def test_four_steep_strokes_in_one_request_stay_within_the_request_budget():
    assert_bounded(images_cost([hostile.slanted_stroke(64, 65536)] * 4))


@pytest.mark.parametrize("kind", ["1bit", "palette"])
def test_at_budget_bit_depths_and_palettes_are_served_within_budget(kind):
    cost = images_cost([bomb_png(2048, kind)] * 4)
    assert cost.outcome == "served" and cost.cpu_s <= SERVED_CPU_S and cost.peak_bytes <= SERVED_PEAK, str(cost)


def test_a_sixteen_bit_png_at_the_limit_is_served_within_budget():
    import io
    from PIL import Image
    rows = np.zeros((2048, 2048), np.uint16)
    rows[np.arange(2048), np.arange(2048)] = 65535
    buffer = io.BytesIO()
    Image.fromarray(rows).save(buffer, "PNG")
    assert_bounded(images_cost([buffer.getvalue()]))


# ---------------------------------------------------------------- progressive JPEG scans

@given(side=st.integers(64, 4096), extra=st.integers(0, 600))
@ORACLE
def test_a_progressive_jpeg_scan_flood_is_refused_or_within_budget(side, extra):
    assert_bounded(images_cost([hostile.progressive_jpeg(side, side, extra)]))


def test_progressive_jpegs_fill_a_request_budget_not_more():
    photo = hostile.progressive_jpeg(1400, 1400, 20)
    assert_bounded(images_cost([photo] * 64))


# ---------------------------------------------------------------- OIP v2 shapes and header numbers

def v2_cost(shape, header_length=None, data=b""):
    body, headers = hostile.oip_binary(shape, data=data, header_length=header_length)
    return measure(v2_decode, body, headers, refusals=(ApiError,))


@given(shape=st.lists(st.integers(0, 10**30), max_size=20) | st.just([10**18] * 20000))
@ORACLE
def test_any_shape_is_a_400_in_milliseconds(shape):
    assert_refused(v2_cost(shape, data=bytes(16)), "shape")


@given(header_length=st.text("0123456789", min_size=1, max_size=6000) | st.text(max_size=100))
@ORACLE
def test_any_header_number_is_a_400_or_served_cheaply(header_length):
    cost = v2_cost([1, 784], header_length=header_length.strip() or "x", data=bytes(784))
    assert_bounded(cost)


def test_a_json_shape_of_huge_dims_is_a_400_in_milliseconds():
    body = json.dumps({"inputs": [{"name": "x" * 10**5, "shape": [10**18] * 20000, "datatype": "FP32",
                                   "data": [0]}]}).encode()
    cost = measure(v2_decode, body, {"content-type": "application/json"}, refusals=(ApiError,))
    assert_refused(cost, "shape must be")
    assert len(cost.error) < 300  # the name and the shape are quoted back cut short


# ---------------------------------------------------------------- the sketchpad's files

def test_a_sketch_listing_one_upload_many_times_is_refused_before_decoding():
    sketch = hostile.sketch_layers(2000)  # what serving.ui.editor_sources checks, as its list of files
    files = [sketch["background"], *sketch["layers"], sketch["composite"]]
    assert_refused(measure(check_sketch_files, files, refusals=(BadImage,)), "over the limit of 4")


# ---------------------------------------------------------------- buffers

def test_the_retry_middleware_keeps_at_most_its_replay_limit_of_a_chunked_body():
    chunk = bytes(65536)
    total = 64 * MB

    def run():
        sent = [0]

        async def receive():
            sent[0] += len(chunk)
            return {"type": "http.request", "body": chunk, "more_body": sent[0] < total}

        async def app(scope, receive, send):
            while (await receive()).get("more_body"):
                pass
            await send({"type": "http.response.start", "status": 200, "headers": []})

        async def send(message):
            pass

        scope = {"type": "http", "method": "POST", "path": "/predict", "headers": []}
        asyncio.run(ingress.RetryLostIngressReplica(app)(scope, receive, send))

    cost = measure(run)
    assert cost.outcome == "served" and cost.peak_bytes <= 3 * ingress.MAX_REPLAY_BYTES, str(cost)


def test_a_forward_pass_of_thousands_of_images_is_split(tmp_path):
    import torch
    from serving.model_store import ModelStore
    from training.model import Net
    from tests.helpers import publish_model
    torch.set_num_threads(1)  # no thread pool in the parent: the forked child runs torch alone
    publish_model(tmp_path, "v1", Net().state_dict(), {"version": "v1"})
    store = ModelStore(tmp_path)
    store.refresh()
    images = np.zeros((16 * 256, 28, 28), np.uint8)  # 16 calls of 256 tensor images, batched together
    cost = measure(store.predict, images)
    # measured: 131 MB split (as for 2048 or 8192 images); unsplit 237 MB at 2048 images, 390 MB here
    assert cost.outcome == "served" and cost.peak_bytes <= 200 * MB, str(cost)


# ---------------------------------------------------------------- nothing else changes

def test_ordinary_drawings_give_the_same_tensors_as_before(test_digits):
    digest = hashlib.sha256()
    for _, data in redrawn_set(test_digits[0][:300], seed=26):
        digest.update(preprocess(decode_image(data)).tobytes())
    assert digest.hexdigest() == DRAWINGS_SHA256
