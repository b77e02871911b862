"""Property-based fuzzing of the HTTP API with hypothesis, against create_api's app served
in-process (the `local_api` fixture; the routes, validation and errors are the Serve deployment's):
thousands of generated bodies and image files, never a 5xx, always a JSON error, and the service
still answers."""
import base64
import io
import json

import numpy as np
from PIL import Image

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.bombs import bomb_png

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def client(local_api):
    with local_api.client() as client:
        yield client


FUZZ = settings(max_examples=800, deadline=None, database=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])

scalars = (st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=True, allow_infinity=True)
           | st.text(max_size=40))
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=6) | st.dictionaries(st.text(max_size=8), inner, max_size=5),
                      max_leaves=40)
keys = st.sampled_from(["image", "images", "pixels", "inputs", "outputs", "id", "parameters", "data"]) | st.text(max_size=8)
b64_blobs = st.binary(max_size=300).map(lambda b: base64.b64encode(b).decode())
pixel_rows = st.lists(st.integers(-300, 600) | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=2),
                      min_size=0, max_size=30)

predict_bodies = st.one_of(
    st.dictionaries(keys, values, max_size=4),
    st.builds(lambda v: {"image": v}, st.text(max_size=200) | b64_blobs | values),
    st.builds(lambda v: {"image": "data:image/png;base64," + v}, b64_blobs),
    st.builds(lambda v: {"images": v}, st.lists(b64_blobs | st.text(max_size=20) | values, max_size=70)),
    st.builds(lambda v: {"pixels": v}, st.lists(pixel_rows, max_size=30) | values),
    values,
)
tensors = st.fixed_dictionaries(
    {"name": st.text(max_size=6),
     "shape": st.lists(st.integers(-3, 100), max_size=5) | st.just([1, 784]) | st.just([2, 1, 28, 28]),
     "datatype": st.sampled_from(["FP32", "FP64", "INT64", "BYTES", "fp32", ""]) | st.text(max_size=5),
     "data": st.lists(st.floats(-2, 300) | st.just(float("nan")) | st.integers(-1, 300) | st.text(max_size=3), max_size=900)
     | values},
    optional={"parameters": values})
v2_bodies = st.one_of(
    st.fixed_dictionaries({"inputs": st.lists(tensors, max_size=2)},
                          optional={"outputs": st.lists(st.fixed_dictionaries({"name": st.text(max_size=14)}), max_size=3)
                                    | values, "id": st.text(max_size=10) | values, "parameters": values}),
    st.dictionaries(keys, values, max_size=4),
)
content_types = st.sampled_from(["application/json", "text/plain", "application/x-www-form-urlencoded",
                                 "multipart/form-data; boundary=x", "application/json; charset=latin-1",
                                 "application/merge-patch+json", ""])


MODES = ["1", "L", "LA", "P", "PA", "RGB", "RGBA", "RGBX", "I", "I;16", "F", "CMYK", "YCbCr", "HSV"]
FORMATS = ["PNG"] * 3 + ["JPEG"] * 2 + ["GIF", "WEBP", "BMP", "TIFF"]  # mostly what the API takes
sides = st.sampled_from([1, 2, 3, 27, 28, 29, 280]) | st.integers(1, 400)


def saved(image: Image.Image, fmt: str, **options) -> bytes:
    """`image` in `fmt`, converted to a mode the format can hold when it cannot hold this one."""
    for mode in (image.mode, "RGBA" if "A" in image.mode else "RGB", "L"):
        buffer = io.BytesIO()
        try:
            frames = [frame.convert(mode) for frame in options.get("append_images", [])]
            (image if mode == image.mode else image.convert(mode)).save(
                buffer, fmt, **{**options, **({"append_images": frames} if frames else {})})
            return buffer.getvalue()
        except (OSError, ValueError, KeyError, TypeError):
            continue
    raise AssertionError(f"cannot save {image.mode} as {fmt}")


@st.composite
def image_files(draw) -> bytes:
    """An image file: any PIL mode, 1x1 to 400x400 (or a bomb past the budget), noise or a stroke,
    maybe animated (GIF, APNG), maybe with an EXIF rotation, maybe truncated or corrupted."""
    if draw(st.integers(0, 19)) == 0:  # past the per-image budget: must be refused from the header
        data = bomb_png(draw(st.sampled_from([2049, 3000])), draw(st.sampled_from(["1bit", "palette"])))
    else:
        width, height = draw(sides), draw(sides)
        rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
        pixels = np.full((height, width, 3), 255, np.uint8)
        if draw(st.booleans()):
            pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        else:
            pixels[height // 4: 3 * height // 4 + 1, width // 3: width // 3 + max(1, width // 8)] = 0
        image = Image.fromarray(pixels).convert(draw(st.sampled_from(MODES)))
        fmt = draw(st.sampled_from(FORMATS))
        options = {}
        if fmt in ("PNG", "JPEG") and draw(st.booleans()):
            exif = Image.Exif()
            exif[0x0112] = draw(st.integers(0, 9))  # orientation, with invalid values too
            options["exif"] = exif.tobytes()
        if fmt in ("PNG", "GIF") and draw(st.booleans()):  # animated: a GIF, or an APNG
            options.update(save_all=True, append_images=[image.rotate(90)], duration=50, loop=0)
        data = saved(image, fmt, **options)
    damage = draw(st.sampled_from(["none", "none", "truncate", "flip"]))
    if damage == "truncate":
        data = data[:draw(st.integers(0, max(0, len(data) - 1)))]
    elif damage == "flip":
        mutable = bytearray(data)
        for at in draw(st.lists(st.integers(0, len(data) - 1), min_size=1, max_size=8)):
            mutable[at] ^= 0xFF
        data = bytes(mutable)
    return data


binary_tensors = st.fixed_dictionaries(
    {"name": st.just("input"),
     "shape": st.sampled_from([[1, 784], [2, 1, 28, 28], [1, 28, 28], [0, 784], [300, 784]])
     | st.lists(st.integers(-2, 3000), max_size=4),
     "datatype": st.sampled_from(["FP32", "UINT8", "INT64", "FP16", "BOOL", "BYTES", "fp32"]) | st.text(max_size=4)
     | values,
     "parameters": st.fixed_dictionaries({"binary_data_size": st.sampled_from([784, 1568, 3136, 0, -1])
                                          | st.integers(-10, 10_000) | values})},
    optional={"data": values})


@st.composite
def binary_bodies(draw):
    """The binary tensor extension: a JSON header, raw bytes, and a header length that is right,
    off, past the body, or not a number."""
    header = draw(st.fixed_dictionaries({"inputs": st.lists(binary_tensors, min_size=1, max_size=2)},
                                        optional={"outputs": st.lists(st.fixed_dictionaries(
                                            {"name": st.sampled_from(["digit", "probabilities", "x"]),
                                             "parameters": st.fixed_dictionaries({"binary_data": values})}),
                                            max_size=3),
                                            "parameters": st.fixed_dictionaries({"binary_data_output": values})}))
    encoded = draw(st.sampled_from([json.dumps(header).encode(), json.dumps(header).encode()[:-1], b"not json"]))
    sizes = [t["parameters"]["binary_data_size"] for t in header["inputs"]]
    exact = sum(s for s in sizes if type(s) is int and 0 <= s <= 10_000)
    data = draw(st.sampled_from([bytes(exact), bytes(exact)[:-1], bytes(exact) + b"x"]) | st.binary(max_size=4000))
    length = draw(st.sampled_from([str(len(encoded))] * 3 + [str(len(encoded) + len(data) + 1), "0", "-1", "x"])
                  | st.integers(0, 6000).map(str))
    return encoded + data, length


def check(response) -> None:
    assert response.status_code < 500, (response.status_code, response.text[:500])
    if response.status_code >= 400:
        assert "error" in response.json()


@FUZZ
@given(body=predict_bodies)
def test_fuzz_predict(client, body):
    check(client.post("/predict", content=json.dumps(body).encode(), headers={"content-type": "application/json"}))


@FUZZ
@given(body=v2_bodies, model=st.sampled_from(["mnist", "mnist", "other"]))
def test_fuzz_v2_infer(client, body, model):
    check(client.post(f"/v2/models/{model}/infer", content=json.dumps(body).encode(),
                      headers={"content-type": "application/json"}))


@settings(FUZZ, max_examples=400)
@given(case=binary_bodies(), content_type=st.sampled_from(["application/octet-stream", "", "application/json"]))
def test_fuzz_v2_binary_bodies(client, case, content_type):
    body, length = case
    headers = {"inference-header-content-length": length, **({"content-type": content_type} if content_type else {})}
    check(client.post("/v2/models/mnist/infer", content=body, headers=headers))


@settings(FUZZ, max_examples=400)
@given(data=st.binary(max_size=2000), content_type=content_types,
       path=st.sampled_from(["/predict", "/v2/models/mnist/infer", "/model", "/healthz"]))
def test_fuzz_raw_bytes(client, data, content_type, path):
    headers = {"content-type": content_type} if content_type else {}
    check(client.post(path, content=data, headers=headers))


@settings(FUZZ, max_examples=150)
@given(files=st.lists(image_files(), min_size=1, max_size=2), batch=st.booleans())
def test_fuzz_image_files(client, files, batch):
    body = {"images": [base64.b64encode(f).decode() for f in files]} if batch or len(files) > 1 \
        else {"image": base64.b64encode(files[0]).decode()}
    response = client.post("/predict", json=body)
    check(response)
    assert response.status_code in (200, 413, 422), (response.status_code, response.text[:300])


def test_still_serving_after_the_fuzzing(client, test_digits):
    assert client.get("/healthz").status_code == 200
    body = client.post("/predict", json={"pixels": test_digits[0][0].tolist()}).json()
    assert body["digit"] == int(test_digits[1][0])
