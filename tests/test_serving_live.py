"""The API families through the real Serve deployment on 127.0.0.1:8000: what the in-process
contract tests (test_serving_api, test_serving_oip, test_serving_fuzz) check of create_api's app,
shown once each to hold behind Serve's proxy, ingress and model replicas."""
import json

import httpx
import numpy as np
import pytest
import tritonclient.http as triton
from tritonclient.utils import InferenceServerException

from tests.helpers import wait_for
from tests.test_serving_api import BAD_REQUESTS, check_prediction, drawing

pytestmark = pytest.mark.ray


def test_native_api_health_metadata_and_a_prediction(client, serve_app, test_digits):
    assert client.get("/healthz").json()["status"] == "ready"
    model = client.get("/model")
    assert model.json()["metadata"]["version"] == model.json()["model_version"]
    assert str(serve_app.storage) not in model.text
    assert "/predict" in client.get("/openapi.json").json()["paths"]
    response = client.post("/predict", json={"images": [drawing(test_digits, i) for i in range(3)]})
    assert response.status_code == 200, response.text
    assert [p["digit"] for p in response.json()["predictions"]] == test_digits[1][:3].tolist()
    for prediction in response.json()["predictions"]:
        check_prediction(prediction)


@pytest.mark.parametrize("case", ["invalid-json", "wrong-content-type", "bad-base64", "pixels-nan",
                                  "v2-wrong-shape", "unknown-path"])
def test_bad_input_gets_its_4xx_json_error_through_serve(client, case):
    path, body, content_type, status, words = BAD_REQUESTS[case]
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    response = client.post(path, content=data, headers={"content-type": content_type})
    assert response.status_code == status, response.text
    assert words.lower() in response.json()["error"].lower()


def test_the_body_limit_holds_behind_the_proxy(client, serve_app):
    body = b'{"image": "' + b"A" * serve_app.max_body_bytes + b'"}'
    declared = client.post("/predict", content=body, headers={"content-type": "application/json"})
    assert declared.status_code == 413 and "limit" in declared.json()["error"]

    def chunks():  # no Content-Length: counted as the body streams in through Serve's proxy
        for start in range(0, len(body), 1 << 20):
            yield body[start:start + (1 << 20)]
    streamed = client.post("/predict", content=chunks(), headers={"content-type": "application/json"})
    assert streamed.status_code == 413 and "limit" in streamed.json()["error"]


def test_tritonclient_through_serve(serve_app, test_digits):
    client = triton.InferenceServerClient(serve_app.url.removeprefix("http://"), network_timeout=120)
    try:
        # serve_app waited for /healthz once; the other model replica may still be loading v1
        wait_for(lambda: all(client.is_model_ready("mnist") for _ in range(6)), 60, "every model replica to load v1")
        version = client.get_model_metadata("mnist")["versions"][0]
        assert version == serve_app.model()["model_version"]
        with pytest.raises(InferenceServerException, match="not loaded"):
            client.get_model_metadata("mnist", model_version="v-none")
        images = test_digits[0][:16]
        tensor = triton.InferInput("input", [16, 784], "UINT8")
        tensor.set_data_from_numpy(images.reshape(16, 784))  # binary both ways: the client's default
        result = client.infer("mnist", [tensor])
        assert np.array_equal(result.as_numpy("digit"), test_digits[1][:16])
    finally:
        client.close()


def test_a_bad_binary_body_gets_a_400_through_serve(serve_app):
    header = json.dumps({"inputs": [{"name": "input", "shape": [2, 784], "datatype": "UINT8",
                                     "parameters": {"binary_data_size": 2 * 784}}]}).encode()
    response = httpx.post(f"{serve_app.url}/v2/models/mnist/infer", content=header + bytes(784), timeout=30,
                          headers={"inference-header-content-length": str(len(header)),
                                   "content-type": "application/octet-stream"})
    assert response.status_code == 400 and response.json()["error"]
