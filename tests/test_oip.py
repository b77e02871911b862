"""The OIP v2 wire format (serving/oip.py) as pure functions, checked against tritonclient's own
encoder and decoder; and why gRPC is not offered through Serve (a check on Serve's gRPC routing).
No Ray cluster: the Serve tests are in test_serving_oip.py."""
import json

import numpy as np
import pytest
import tritonclient.http as triton
from tritonclient.http._utils import _get_inference_request

from serving import oip


def client_body(array: np.ndarray, datatype: str, binary: bool, outputs=None) -> tuple[bytes, str | None]:
    """The exact body and header tritonclient.http sends for one input."""
    tensor = triton.InferInput("input", list(array.shape), datatype)
    tensor.set_data_from_numpy(array, binary_data=binary)
    body, header_length = _get_inference_request([tensor], "", outputs, 0, False, False, 0, None, None)
    return body, None if header_length is None else str(header_length)


def images(n: int = 3) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (n, 1, 28, 28)).astype(np.uint8)


# ---------------------------------------------------------------- requests

@pytest.mark.parametrize("datatype", ["FP32", "UINT8"])
def test_binary_input_from_tritonclient_is_read_back_exactly(datatype):
    array = images() if datatype == "UINT8" else images() / np.float32(255)
    body, header_length = client_body(array, datatype, binary=True)
    parsed = oip.parse_body(body, None, header_length)
    assert "data" not in parsed.header["inputs"][0]
    assert parsed.binary[0].dtype == array.dtype and np.array_equal(parsed.binary[0], array)


def test_json_body_without_content_type_is_accepted():
    body, header_length = client_body(images(), "UINT8", binary=False)
    assert header_length is None
    parsed = oip.parse_body(body, None, None)
    assert parsed.binary == {} and len(parsed.header["inputs"][0]["data"]) == 3 * 784


@pytest.mark.parametrize("content_type, header_length, accepted", [
    (None, None, True), ("application/json", None, True), ("application/json; charset=utf-8", "2", True),
    ("application/octet-stream", "2", True), ("application/octet-stream", None, False),
    ("text/plain", None, False), ("multipart/form-data; boundary=x", "2", False)])
def test_content_types(content_type, header_length, accepted):
    if accepted:
        oip.check_content_type(content_type, header_length)
    else:
        with pytest.raises(oip.BadBody) as error:
            oip.check_content_type(content_type, header_length)
        assert error.value.status == 415


def header_and(tensor: dict, data: bytes, header_length: int | str | None = "auto") -> tuple[bytes, str | None]:
    header = json.dumps({"inputs": [tensor]}).encode()
    length = str(len(header)) if header_length == "auto" else header_length
    return header + data, None if length is None else str(length)


BINARY = {"name": "input", "shape": [1, 784], "datatype": "FP32", "parameters": {"binary_data_size": 784 * 4}}
PIXELS = np.zeros(784, np.float32).tobytes()
BAD_BODIES = {
    # id: (body, Inference-Header-Content-Length, words in the error)
    "header-length-past-body": (*header_and(BINARY, PIXELS, 10_000)[:1], "10000", "only"),
    "header-length-not-a-number": (*header_and(BINARY, PIXELS, "12a")[:1], "12a", "byte count"),
    "header-length-negative": (*header_and(BINARY, PIXELS, "-5")[:1], "-5", "byte count"),
    "size-disagrees-with-shape": (*header_and({**BINARY, "parameters": {"binary_data_size": 100}}, PIXELS[:100]),
                                  "takes 3136"),
    "truncated-tensor": (*header_and(BINARY, PIXELS[:-1]), "truncated"),
    "bytes-left-over": (*header_and(BINARY, PIXELS + b"xx"), "2 bytes"),
    "binary-without-size": (*header_and({**BINARY, "parameters": {}, "data": None}, PIXELS), "no input"),
    "unknown-datatype": (*header_and({**BINARY, "datatype": "FP8"}, PIXELS), "cannot be sent as binary"),
    "bytes-datatype": (*header_and({**BINARY, "datatype": "BYTES"}, PIXELS), "cannot be sent as binary"),
    "size-not-an-integer": (*header_and({**BINARY, "parameters": {"binary_data_size": "3136"}}, PIXELS),
                            "byte count"),
    "size-negative": (*header_and({**BINARY, "parameters": {"binary_data_size": -1}}, PIXELS), "byte count"),
    "shape-not-integers": (*header_and({**BINARY, "shape": [1, "784"]}, PIXELS), "shape"),
    "data-and-binary": (*header_and({**BINARY, "data": [0]}, PIXELS), "both"),
    "header-not-json": (b"{inputs: oops}" + PIXELS, "14", "not valid JSON"),
    "header-not-utf8": (b"\xff\xfe{}" + PIXELS, "4", "not valid JSON"),
    "header-not-an-object": (b"[1, 2]" + PIXELS, "6", "JSON object"),
    "header-nested-too-deep": (b"[" * 100_000 + PIXELS, "100000", "not valid JSON"),
    "header-length-unicode-digit": (*header_and(BINARY, PIXELS, "\u00b2")[:1], "\u00b2", "byte count"),
    "datatype-not-a-string": (*header_and({**BINARY, "datatype": ["FP32"]}, PIXELS), "cannot be sent as binary"),
}


@pytest.mark.parametrize("case", BAD_BODIES.values(), ids=BAD_BODIES.keys())
def test_bad_binary_bodies_are_400_with_a_reason(case):
    body, header_length, words = case
    with pytest.raises(oip.BadBody) as error:
        oip.parse_body(body, "application/octet-stream", header_length)
    assert error.value.status == 400 and words.lower() in error.value.message.lower()


def test_header_length_zero_means_the_whole_body_is_json():
    body = json.dumps({"inputs": []}).encode()
    assert oip.parse_body(body, None, "0").header == {"inputs": []}


# ---------------------------------------------------------------- responses

def response_body(binary: list[bool]) -> tuple[bytes, dict, np.ndarray, np.ndarray]:
    probs = np.random.default_rng(1).dirichlet(np.ones(10), 4).astype(np.float32)
    digits = probs.argmax(1)
    body = {"model_name": "mnist", "model_version": "v1", "id": "x", "outputs": [
        {"name": "digit", "shape": [4], "datatype": "INT64"},
        {"name": "probabilities", "shape": [4, 10], "datatype": "FP32"}]}
    content, headers = oip.encode_response(body, [digits, probs], binary)
    return content, headers, digits, probs


@pytest.mark.parametrize("binary", [[True, True], [False, True], [True, False], [False, False]])
def test_responses_decode_with_tritonclient(binary):
    content, headers, digits, probs = response_body(binary)
    length = headers.get("inference-header-content-length")
    result = triton.InferResult.from_response_body(content, header_length=None if length is None else int(length))
    assert np.array_equal(result.as_numpy("digit"), digits)
    assert np.array_equal(result.as_numpy("probabilities"), probs)  # JSON floats of float32 round-trip exactly
    for output, as_binary in zip(result.get_response()["outputs"], binary):
        assert ("data" in output) != as_binary
        assert (output.get("parameters", {}).get("binary_data_size") is not None) == as_binary
    assert (length is None) == (not any(binary))


def test_binary_outputs_follow_the_header_in_output_order():
    content, headers, digits, probs = response_body([True, True])
    start = int(headers["inference-header-content-length"])
    header = json.loads(content[:start])
    assert [o["parameters"]["binary_data_size"] for o in header["outputs"]] == [4 * 8, 4 * 10 * 4]
    assert content[start:] == digits.astype("<i8").tobytes() + probs.astype("<f4").tobytes()
    assert headers["content-type"] == "application/octet-stream"


@pytest.mark.parametrize("parameters, outputs, expected", [
    (None, {"not": "a list"}, [False, False]),
    (None, [{"name": ["x"], "parameters": {"binary_data": True}}, "digit"], [False, False]),
    (None, None, [False, False]),
    ({"binary_data_output": True}, None, [True, True]),
    ({"binary_data_output": True}, [{"name": "digit", "parameters": {"binary_data": False}}], [False, True]),
    (None, [{"name": "probabilities", "parameters": {"binary_data": True}}, {"name": "digit"}], [False, True]),
])
def test_which_outputs_are_binary(parameters, outputs, expected):
    header = {"inputs": [], "parameters": parameters, "outputs": outputs}
    assert oip.binary_outputs_wanted(header, ["digit", "probabilities"]) == expected


# ---------------------------------------------------------------- gRPC: why it is left out

def test_serve_grpc_proxy_cannot_route_a_standard_client_between_two_applications():
    """Serve's gRPC proxy picks the application from the `application` metadata key of each call
    (gRPCProxyRequest.route_path); without it, it answers only when exactly one application is
    deployed. tritonclient.grpc sends no such key, and this service deploys two (API and page):
    every call would be NOT_FOUND "Application metadata not set". If this test fails, Serve's
    routing changed: revisit docs/SERVING.md ("gRPC")."""
    from ray.serve._private.common import DeploymentID, EndpointInfo
    from ray.serve._private.proxy_request_response import gRPCProxyRequest
    from ray.serve._private.proxy_router import ProxyRouter

    router = ProxyRouter(lambda deployment, info: f"handle of {deployment.app_name}")
    api, page = DeploymentID("MnistApi", "mnist"), DeploymentID("Page", "mnist-ui")
    router.update_routes({api: EndpointInfo(route="/")})
    assert router.get_handle_for_endpoint("") is not None  # one application: any call reaches it
    router.update_routes({api: EndpointInfo(route="/"), page: EndpointInfo(route="/ui")})
    assert router.get_handle_for_endpoint("") is None  # two: a call without metadata reaches none
    assert router.get_handle_for_endpoint("mnist") is not None  # only Serve-specific metadata routes it

    class Context:  # stands in for grpc's ServicerContext of a tritonclient.grpc call (no Serve metadata)
        def invocation_metadata(self):
            return [("user-agent", "grpc-python/1.85")]

        auth_context = code = details = peer_identities = peer_identity_key = lambda self: None
        peer = lambda self: "ipv4:127.0.0.1:50000"  # noqa: E731
        trailing_metadata = lambda self: []  # noqa: E731

    request = gRPCProxyRequest(None, Context(), "/inference.GRPCInferenceService/ModelInfer", False)
    assert request.route_path == ""


# ---------------------------------------------------------------- hostile headers (issue 26)

@pytest.mark.parametrize("shape, header_length, words", [
    ([10**18] * 20000, None, "at most 8 integers"),     # seconds to multiply, unbounded to print
    ([0, 10**30], None, "integers 0..2147483647"),       # numpy cannot shape it: was a 500
    ([2**31 - 1] * 8, None, "takes"),                    # the largest checked shape: a product, refused
    ([1, 784], "9" * 5000, "at most 10 digits"),         # int() refuses 4300+ digits: was a 500
    ([1, 784], "99999999999", "at most 10 digits"),
])
def test_hostile_shapes_and_header_numbers_are_400_naming_the_field(shape, header_length, words):
    from tests.hostile import oip_binary
    body, headers = oip_binary(shape, data=bytes(784), header_length=header_length)
    with pytest.raises(oip.BadBody) as error:
        oip.parse_body(body, headers["content-type"], headers["inference-header-content-length"])
    assert error.value.status == 400 and words in error.value.message
    assert len(error.value.message) < 300  # client text is quoted back cut short


def test_an_empty_shape_with_a_huge_dim_is_400_not_a_500():
    from tests.hostile import oip_binary
    body, headers = oip_binary([0, 2**31 - 1], data=b"")
    parsed = oip.parse_body(body, headers["content-type"], headers["inference-header-content-length"])
    assert parsed.binary[0].shape == (0, 2**31 - 1)  # empty: the API then refuses N = 0 with a 400
