"""The HTTP contract of the mnist application: create_api's app, with serve_config.yaml's limits,
served in-process (the `local_api` fixture). tests/test_serving_live.py checks it through Serve."""
import base64
import io
import json
import math

import numpy as np
import pytest
from PIL import Image

from bench.drawings import encode, redraw, redrawn_set
from serving.preprocess import MAX_PIXELS
from serving.schemas import MAX_IMAGES, MAX_TENSOR_IMAGES


@pytest.fixture(scope="module")
def client(local_api):
    with local_api.client() as client:
        yield client


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def drawing(test_digits, index: int, style: str = "black_on_white") -> str:
    image = redraw(test_digits[0][index], style, np.random.default_rng(index))
    return b64(encode(image, style))


def check_prediction(body: dict, digit: int | None = None) -> None:
    assert set(body) >= {"digit", "probabilities", "model_version"}
    assert len(body["probabilities"]) == 10 and math.isclose(sum(body["probabilities"]), 1.0, abs_tol=1e-5)
    assert body["digit"] == int(np.argmax(body["probabilities"]))
    if digit is not None:
        assert body["digit"] == digit


# ---------------------------------------------------------------- health and metadata

def test_healthz_is_ready_with_a_model(client):
    response = client.get("/healthz")
    assert response.status_code == 200
    assert response.json()["status"] == "ready" and response.json()["model_version"]


def test_model_shows_the_published_metadata(client, local_api):
    body = client.get("/model").json()
    assert body["ready"] and "storage" not in body
    assert str(local_api.storage) not in client.get("/model").text  # no server paths in public bodies
    assert {"test_accuracy", "run_id", "created_at", "version"} <= set(body["metadata"])
    assert body["metadata"]["version"] == body["model_version"]


def test_openapi_describes_the_api(client):
    paths = client.get("/openapi.json").json()["paths"]
    assert {"/predict", "/healthz", "/model", "/v2/health/ready", "/v2/models/{model_name}",
            "/v2/models/{model_name}/infer"} <= set(paths)
    assert client.get("/docs").status_code == 200


# ---------------------------------------------------------------- POST /predict

@pytest.mark.parametrize("style", ["black_on_white", "alpha_stroke", "white_on_black_jpeg", "blue_on_paper_jpeg"])
def test_predict_one_image(client, test_digits, style):
    response = client.post("/predict", json={"image": drawing(test_digits, 0, style)})
    assert response.status_code == 200, response.text
    check_prediction(response.json(), int(test_digits[1][0]))


def test_predict_accepts_a_canvas_data_url_and_wrapped_base64(client, test_digits):
    url = "data:image/png;base64," + drawing(test_digits, 1)
    check_prediction(client.post("/predict", json={"image": url}).json(), int(test_digits[1][1]))
    text = drawing(test_digits, 1)
    wrapped = "\n".join(text[i:i + 76] for i in range(0, len(text), 76))  # as `base64 FILE` prints it
    check_prediction(client.post("/predict", json={"image": wrapped}).json(), int(test_digits[1][1]))


def test_predict_many_images_in_order(client, test_digits):
    images = [drawing(test_digits, i) for i in range(5)]
    body = client.post("/predict", json={"images": images}).json()
    assert [p["digit"] for p in body["predictions"]] == test_digits[1][:5].tolist()
    for prediction in body["predictions"]:
        check_prediction(prediction)


def test_predict_pixels_integers_and_floats(client, test_digits):
    digit, label = test_digits[0][2], int(test_digits[1][2])
    as_int = client.post("/predict", json={"pixels": digit.tolist()}).json()
    as_float = client.post("/predict", json={"pixels": (digit / 255.0).tolist()}).json()
    check_prediction(as_int, label)
    assert np.allclose(as_int["probabilities"], as_float["probabilities"], atol=1e-6)


def test_redrawn_test_digits_are_recognised(client, test_digits, served_models):
    """MNIST test digits drawn as people draw on a canvas (enlarged, thick, off-centre, four
    colour schemes): at least 97% come back right through /predict."""
    count = 640
    drawn = redrawn_set(test_digits[0][:count], seed=7)
    predicted = []
    for start in range(0, count, MAX_IMAGES):
        batch = [b64(data) for _, data in drawn[start:start + MAX_IMAGES]]
        response = client.post("/predict", json={"images": batch})
        assert response.status_code == 200, response.text
        predicted += [p["digit"] for p in response.json()["predictions"]]
    accuracy = float(np.mean(np.array(predicted) == test_digits[1][:count]))
    assert accuracy >= 0.97, f"{accuracy:.3f} of redrawn digits right (model: {served_models['accuracy']:.4f})"


# ---------------------------------------------------------------- Open Inference Protocol v2

def v2_request(images: np.ndarray, shape: list[int], **extra) -> dict:
    data = (images.astype(np.float32) / 255.0).ravel().tolist()
    return {"inputs": [{"name": "input", "shape": shape, "datatype": "FP32", "data": data}], **extra}


def test_v2_health_and_metadata(client):
    assert client.get("/v2/health/live").json() == {"live": True}
    assert client.get("/v2/health/ready").status_code == 200
    assert client.get("/v2/models/mnist/ready").json()["ready"] is True
    metadata = client.get("/v2/models/mnist").json()
    assert metadata["name"] == "mnist" and metadata["versions"]
    assert [o["name"] for o in metadata["outputs"]] == ["probabilities", "digit"]


@pytest.mark.parametrize("shape", [[3, 1, 28, 28], [3, 784]])
def test_v2_infer(client, test_digits, shape):
    images, labels = test_digits[0][:3], test_digits[1][:3]
    response = client.post("/v2/models/mnist/infer", json=v2_request(images, shape, id="req-1"))
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model_name"] == "mnist" and body["id"] == "req-1" and body["model_version"]
    outputs = {o["name"]: o for o in body["outputs"]}
    assert outputs["probabilities"]["shape"] == [3, 10] and outputs["probabilities"]["datatype"] == "FP32"
    assert outputs["digit"]["shape"] == [3] and outputs["digit"]["datatype"] == "INT64"
    assert outputs["digit"]["data"] == labels.tolist()
    probs = np.array(outputs["probabilities"]["data"]).reshape(3, 10)
    assert np.allclose(probs.sum(1), 1.0, atol=1e-5)


def test_v2_nested_data_and_requested_outputs(client, test_digits):
    images = test_digits[0][:2]
    request = {"inputs": [{"name": "x", "shape": [2, 1, 28, 28], "datatype": "FP32",
                           "data": (images[:, None] / 255.0).tolist()}], "outputs": [{"name": "digit"}]}
    body = client.post("/v2/models/mnist/infer", json=request).json()
    assert [o["name"] for o in body["outputs"]] == ["digit"]
    assert body["outputs"][0]["data"] == test_digits[1][:2].tolist()


# ---------------------------------------------------------------- bad input: 4xx JSON, never 5xx

def png_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, "PNG")
    return buffer.getvalue()


def huge_png() -> bytes:
    """A small file that decodes to more pixels than the limit (all white compresses well)."""
    side = int(MAX_PIXELS ** 0.5) + 16
    buffer = io.BytesIO()
    Image.new("1", (side, side), 1).save(buffer, "PNG")
    return buffer.getvalue()


GOOD_V2 = {"name": "input", "shape": [1, 784], "datatype": "FP32", "data": [0.5] * 784}
BAD_REQUESTS = {
    # id: (path, raw body or JSON, content type, expected status, words in the error)
    "invalid-json": ("/predict", b'{"image": ', "application/json", 400, "not valid JSON"),
    "wrong-content-type": ("/predict", b'{"image": "x"}', "text/plain", 415, "application/json"),
    "no-content-type": ("/predict", b'{"image": "x"}', None, 415, "application/json"),
    "form-encoded": ("/predict", b"image=abc", "application/x-www-form-urlencoded", 415, "JSON"),
    "empty-body": ("/predict", b"", "application/json", 422, "required"),
    "not-an-object": ("/predict", [1, 2], "application/json", 422, "dictionary"),
    "missing-fields": ("/predict", {}, "application/json", 422, "exactly one of"),
    "two-fields": ("/predict", {"image": "aaaa", "pixels": [[0]]}, "application/json", 422, "exactly one of"),
    "unknown-field": ("/predict", {"image": "aaaa", "colour": "red"}, "application/json", 422, "colour"),
    "image-not-a-string": ("/predict", {"image": 42}, "application/json", 422, "image"),
    "bad-base64": ("/predict", {"image": "not*base64!"}, "application/json", 422, "not valid base64"),
    "not-an-image": ("/predict", {"image": b64(b"just some bytes")}, "application/json", 422, "not a PNG or JPEG"),
    "truncated-png": ("/predict", {"image": b64(png_bytes(np.full((64, 64), 90, np.uint8))[:60])},
                      "application/json", 422, "image"),
    "huge-image": ("/predict", {"image": b64(huge_png())}, "application/json", 422, "over the limit"),
    "blank-drawing": ("/predict", {"image": b64(png_bytes(np.full((280, 280), 255, np.uint8)))},
                      "application/json", 422, "blank"),
    "blank-in-a-batch": ("/predict", {"images": [b64(png_bytes(np.zeros((28, 28), np.uint8)))]},
                         "application/json", 422, "images[0]"),
    "too-many-images": ("/predict", {"images": ["aaaa"] * (MAX_IMAGES + 1)}, "application/json", 422,
                        f"at most {MAX_IMAGES}"),
    "no-images": ("/predict", {"images": []}, "application/json", 422, "at least 1"),
    "pixels-wrong-shape": ("/predict", {"pixels": [[0] * 28] * 27}, "application/json", 422, "28x28"),
    "pixels-ragged": ("/predict", {"pixels": [[0] * 28] * 27 + [[0] * 5]}, "application/json", 422, "regular shape"),
    "pixels-nan": ("/predict", b'{"pixels": [[NaN]]}', "application/json", 422, "finite"),
    "pixels-infinity": ("/predict", b'{"pixels": [[Infinity, 1]]}', "application/json", 422, "finite"),
    "pixels-over-255": ("/predict", {"pixels": [[300] * 28] * 28}, "application/json", 422, "0..255"),
    "pixels-negative": ("/predict", {"pixels": [[-1] * 28] * 28}, "application/json", 422, "0..255"),
    "float-pixels-over-1": ("/predict", {"pixels": [[2.5] * 28] * 28}, "application/json", 422, "0..1"),
    "pixels-strings": ("/predict", {"pixels": [["1"] * 28] * 28}, "application/json", 422, "pixels"),
    "v2-wrong-datatype": ("/v2/models/mnist/infer", {"inputs": [{**GOOD_V2, "datatype": "INT8"}]},
                          "application/json", 400, "FP32"),
    "v2-wrong-shape": ("/v2/models/mnist/infer", {"inputs": [{**GOOD_V2, "shape": [1, 28, 28]}]},
                       "application/json", 400, "shape"),
    "v2-count-mismatch": ("/v2/models/mnist/infer", {"inputs": [{**GOOD_V2, "shape": [2, 784]}]},
                          "application/json", 400, "values for shape"),
    "v2-out-of-range": ("/v2/models/mnist/infer", {"inputs": [{**GOOD_V2, "data": [255.0] * 784}]},
                        "application/json", 400, "0..1"),
    "v2-nan": ("/v2/models/mnist/infer",
               b'{"inputs": [{"name": "i", "shape": [1, 784], "datatype": "FP32", "data": [NaN]}]}',
               "application/json", 400, "finite"),
    "v2-too-large-batch": ("/v2/models/mnist/infer", {"inputs": [{**GOOD_V2, "shape": [MAX_TENSOR_IMAGES + 1, 784]}]},
                           "application/json", 400, f"1..{MAX_TENSOR_IMAGES}"),
    "v2-no-inputs": ("/v2/models/mnist/infer", {"inputs": []}, "application/json", 400, "inputs"),
    "v2-unknown-output": ("/v2/models/mnist/infer", {"inputs": [GOOD_V2], "outputs": [{"name": "logits"}]},
                          "application/json", 400, "unknown outputs"),
    "v2-unknown-model": ("/v2/models/cifar/infer", {"inputs": [GOOD_V2]}, "application/json", 404, "unknown model"),
    "unknown-path": ("/nothing-here", {}, "application/json", 404, "Not Found"),
}


@pytest.mark.parametrize("case", BAD_REQUESTS.values(), ids=BAD_REQUESTS.keys())
def test_bad_input_gets_a_4xx_json_error(client, case):
    path, body, content_type, status, words = case
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = {"content-type": content_type} if content_type else {}
    response = client.post(path, content=data, headers=headers)
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    assert words.lower() in response.json()["error"].lower()


def test_wrong_method_is_a_json_405(client):
    response = client.get("/predict")
    assert response.status_code == 405 and "error" in response.json()


def test_body_over_the_limit_is_refused(client, local_api):
    limit = local_api.max_body_bytes
    body = b'{"image": "' + b"A" * limit + b'"}'
    declared = client.post("/predict", content=body, headers={"content-type": "application/json"})
    assert declared.status_code == 413 and "limit" in declared.json()["error"]

    def chunks():  # no Content-Length: the limit is counted as the body streams in
        for start in range(0, len(body), 1 << 20):
            yield body[start:start + (1 << 20)]
    streamed = client.post("/predict", content=chunks(), headers={"content-type": "application/json"})
    assert streamed.status_code == 413 and "limit" in streamed.json()["error"]


def test_service_still_healthy_after_bad_input(client, test_digits):
    assert client.get("/healthz").status_code == 200
    check_prediction(client.post("/predict", json={"image": drawing(test_digits, 3)}).json(), int(test_digits[1][3]))
