"""The Open Inference Protocol v2 with the reference client, tritonclient.http, unchanged, against
create_api's app served in-process (the `local_api` fixture); tests/test_serving_live.py calls
the Serve deployment with it."""
import json

import httpx
import numpy as np
import pytest
import tritonclient.http as triton
from tritonclient.utils import InferenceServerException

from serving.schemas import MAX_TENSOR_IMAGES

COUNT = 500  # MNIST test images
BATCH = 250  # per infer call (N of the tensor)


@pytest.fixture(scope="module")
def client(local_api):
    url = local_api.url.removeprefix("http://")  # tritonclient takes host:port/prefix
    client = triton.InferenceServerClient(url, network_timeout=120, connection_timeout=60)
    yield client
    client.close()


@pytest.fixture(scope="module")
def digits(test_digits) -> np.ndarray:
    return test_digits[0][:COUNT]


@pytest.fixture(scope="module")
def predicted(local_api, digits) -> dict:
    """What /predict answers for each image sent as `pixels` (integers 0..255)."""
    with local_api.client() as http:
        bodies = [http.post("/predict", json={"pixels": image.tolist()}).json() for image in digits]
    return {"digits": np.array([b["digit"] for b in bodies]),
            "probabilities": np.array([b["probabilities"] for b in bodies], np.float32)}


def tensor(images: np.ndarray, datatype: str, flat: bool) -> np.ndarray:
    array = images if datatype == "UINT8" else images.astype(np.float32) / np.float32(255)
    return array.reshape(len(images), 784) if flat else array[:, None]


def infer(client, array: np.ndarray, datatype: str, binary: bool | None, outputs=None):
    """binary None: the client's defaults throughout (binary input, binary outputs)."""
    tensor_input = triton.InferInput("input", list(array.shape), datatype)
    if binary is None:
        tensor_input.set_data_from_numpy(array)
    else:
        tensor_input.set_data_from_numpy(array, binary_data=binary)
    return client.infer("mnist", [tensor_input], outputs=outputs)


def test_server_and_model_metadata(client, local_api):
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready("mnist")
    server = client.get_server_metadata()
    assert server["extensions"] == ["binary_tensor_data"] and server["name"] and server["version"]
    model = client.get_model_metadata("mnist")
    version = model["versions"][0]
    assert version == local_api.model()["model_version"]
    assert client.get_model_metadata("mnist", model_version=version)["name"] == "mnist"
    assert client.is_model_ready("mnist", model_version=version)
    with pytest.raises(InferenceServerException, match="not loaded"):
        client.get_model_metadata("mnist", model_version="v-none")


@pytest.mark.parametrize("flat", [False, True], ids=["N,1,28,28", "N,784"])
@pytest.mark.parametrize("datatype", ["FP32", "UINT8"])
@pytest.mark.parametrize("binary", [None, False], ids=["client-defaults", "binary_data=False"])
def test_tritonclient_predicts_as_predict_does(client, digits, predicted, datatype, flat, binary):
    """500 MNIST test images through the standard client: the same digits and probabilities as
    /predict with `pixels`. Defaults: binary tensors both ways. binary_data=False: JSON both ways
    (outputs asked for with binary_data=False: the client otherwise asks for binary outputs)."""
    outputs = None if binary is None else [triton.InferRequestedOutput(name, binary_data=False)
                                           for name in ("probabilities", "digit")]
    probabilities, labels = [], []
    for start in range(0, COUNT, BATCH):
        result = infer(client, tensor(digits[start:start + BATCH], datatype, flat), datatype, binary, outputs)
        returned = result.get_response()["outputs"]
        assert all(("data" in o) == (binary is False) for o in returned), returned[0].keys()
        probabilities.append(result.as_numpy("probabilities"))
        labels.append(result.as_numpy("digit"))
    assert np.array_equal(np.concatenate(labels), predicted["digits"])
    assert np.allclose(np.concatenate(probabilities), predicted["probabilities"], atol=1e-5)


def test_outputs_come_back_in_the_form_asked_for(client, digits):
    """Per output: digit as JSON, probabilities binary; the answer follows the requested order."""
    outputs = [triton.InferRequestedOutput("digit", binary_data=False),
               triton.InferRequestedOutput("probabilities", binary_data=True)]
    result = infer(client, tensor(digits[:8], "UINT8", False), "UINT8", True, outputs)
    digit, probabilities = result.get_response()["outputs"]
    assert digit["name"] == "digit" and len(digit["data"]) == 8 and "parameters" not in digit
    assert probabilities["parameters"]["binary_data_size"] == 8 * 10 * 4 and "data" not in probabilities
    assert result.as_numpy("probabilities").shape == (8, 10)


def test_the_largest_batch_fits_the_body_limit_as_json(client, digits):
    """N = MAX_TENSOR_IMAGES FP32 images as the client's JSON stays under the body limit."""
    images = np.resize(digits, (MAX_TENSOR_IMAGES, 28, 28))
    result = infer(client, tensor(images, "FP32", True), "FP32", False,
                   [triton.InferRequestedOutput("digit", binary_data=False)])
    assert result.as_numpy("digit").shape == (MAX_TENSOR_IMAGES,)


# ---------------------------------------------------------------- bad binary bodies over HTTP

def binary_body(header: dict, data: bytes, length: int | None = None) -> tuple[bytes, dict]:
    encoded = json.dumps(header).encode()
    return encoded + data, {"inference-header-content-length": str(len(encoded) if length is None else length)}


GOOD = {"name": "input", "shape": [2, 784], "datatype": "UINT8", "parameters": {"binary_data_size": 2 * 784}}
PIXELS = bytes(2 * 784)
BAD = {
    "header-length-past-body": binary_body({"inputs": [GOOD]}, PIXELS, 10_000),
    "size-disagrees-with-shape": binary_body({"inputs": [{**GOOD, "parameters": {"binary_data_size": 784}}]},
                                             PIXELS[:784]),
    "truncated-tensor": binary_body({"inputs": [GOOD]}, PIXELS[:-10]),
    "wrong-datatype": binary_body({"inputs": [{**GOOD, "datatype": "INT64",
                                               "parameters": {"binary_data_size": 2 * 784 * 8}}]}, bytes(2 * 784 * 8)),
    "header-not-json": (b"{'inputs': []}" + PIXELS, {"inference-header-content-length": "14"}),
    "fp32-nan": binary_body({"inputs": [{**GOOD, "datatype": "FP32", "parameters": {"binary_data_size": 2 * 784 * 4}}]},
                            np.full(2 * 784, np.nan, np.float32).tobytes()),
    "fp32-out-of-range": binary_body({"inputs": [{**GOOD, "datatype": "FP32",
                                                  "parameters": {"binary_data_size": 2 * 784 * 4}}]},
                                     np.full(2 * 784, 7, np.float32).tobytes()),
}


@pytest.mark.parametrize("case", BAD.values(), ids=BAD.keys())
def test_bad_binary_bodies_get_a_400_json_error(local_api, case):
    body, headers = case
    response = httpx.post(f"{local_api.url}/v2/models/mnist/infer", content=body,
                          headers={**headers, "content-type": "application/octet-stream"}, timeout=30)
    assert response.status_code == 400, response.text
    assert response.json()["error"]


def test_binary_bodies_obey_the_body_limit_and_other_content_types_are_refused(local_api):
    limit = local_api.max_body_bytes
    n = limit // 784 + 1
    body, headers = binary_body({"inputs": [{**GOOD, "shape": [n, 784], "parameters": {"binary_data_size": n * 784}}]},
                                bytes(n * 784))
    url = f"{local_api.url}/v2/models/mnist/infer"
    assert httpx.post(url, content=body, headers=headers, timeout=30).status_code == 413
    body, headers = binary_body({"inputs": [GOOD]}, PIXELS)
    refused = httpx.post(url, content=body, headers={**headers, "content-type": "text/plain"}, timeout=30)
    assert refused.status_code == 415 and "octet-stream" in refused.json()["error"]
    octet_without_header = httpx.post(url, content=body, headers={"content-type": "application/octet-stream"})
    assert octet_without_header.status_code == 415
