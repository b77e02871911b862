"""The HTTP API as a FastAPI app over any `Backend` (Ray Serve's model deployment, or the plain
in-process model of the uvicorn baseline): the same routes, validation and errors for both.

Every malformed request is answered with a 4xx JSON body `{"error": "<what is wrong>"}` (plus
`detail` for schema errors); 5xx only means the service cannot answer now (503: no model yet, a
request over the time limit, no model replica).
"""
import base64
import binascii
import logging
import math
import time
from typing import Protocol

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from serving import oip
from serving.budget import CpuMeter, OverBudget, decode_within_budget
from serving.limits import RETRY_AFTER, LimitsMiddleware
from serving.model_store import NoModel
from serving.preprocess import BadImage, from_pixels
from serving.schemas import (MAX_TENSOR_IMAGES, MODEL_NAME, Error, Health, InferenceRequest, InferenceResponse,
                             Limits, ModelInfo, Prediction, PredictRequest, Predictions)

log = logging.getLogger("ray.serve")
V2_INLINE_BYTES = 64 * 1024  # larger tensor bodies are parsed in a worker thread, off the event loop
ERRORS = {400: {"model": Error}, 413: {"model": Error}, 415: {"model": Error},
          422: {"model": Error}, 503: {"model": Error}}


class Backend(Protocol):
    async def infer(self, images: np.ndarray) -> tuple[np.ndarray, str]:
        """MNIST-format images [N, 28, 28] (0..255) -> probabilities [N, 10], model version.
        Raises NoModel when nothing is loaded."""

    async def status(self) -> dict:
        """ModelStore.status() of the model that answers."""


class ApiError(Exception):
    def __init__(self, status: int, message: str, detail=None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.detail, self.headers = status, message, detail, headers


# ---------------------------------------------------------------- inputs -> MNIST-format arrays

def decode_base64(text: str, where: str) -> bytes:
    if text.startswith("data:"):  # a canvas's toDataURL(): data:image/png;base64,....
        text = text.partition(",")[2]
    text = "".join(text.split())  # `base64 FILE` wraps lines at 76 characters
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(422, f"{where} is not valid base64") from None


async def images_to_mnist(texts: list[str], names: list[str], meter: CpuMeter) -> np.ndarray:
    """Base64 images -> MNIST-format [N, 28, 28], within the work budget (serving/budget.py):
    every header is checked before any image is decoded; refusals carry their CPU time."""
    blobs = meter.timed(lambda: [decode_base64(text, name) for text, name in zip(texts, names)])()
    try:
        return await decode_within_budget(blobs, names, meter)
    except BadImage as error:
        raise ApiError(413 if isinstance(error, OverBudget) else 422, str(error),
                       headers=server_timing(cpu=meter.seconds)) from None


def numeric_array(data, where: str, status: int) -> np.ndarray:
    """Nested JSON lists -> an array of numbers, or an error that says what is wrong."""
    try:
        array = np.array(data)
    except (ValueError, TypeError, OverflowError):
        raise ApiError(status, f"{where} must be nested lists of numbers with a regular shape") from None
    if array.dtype.kind not in "iuf" or array.size == 0:
        raise ApiError(status, f"{where} must contain numbers only")
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        raise ApiError(status, f"{where} must be finite (no NaN or Infinity)")
    return array


def pixels_to_mnist(pixels) -> np.ndarray:
    array = numeric_array(pixels, "pixels", 422)
    if array.shape != (28, 28):
        raise ApiError(422, f"pixels must be a 28x28 array, not {'x'.join(map(str, array.shape))}")
    full = 1.0 if array.dtype.kind == "f" else 255
    if array.min() < 0 or array.max() > full:
        kind = "float pixels must be in 0..1" if full == 1.0 else "integer pixels must be in 0..255"
        raise ApiError(422, f"{kind} (got {array.min():g}..{array.max():g})")
    return from_pixels(array, full)[None]


V2_FULL_INK = {"FP32": 1.0, "UINT8": 255}  # input datatypes and the value of full ink


def v2_tensor(request: InferenceRequest, binary: dict[int, np.ndarray] | None = None) -> np.ndarray:
    """The one input of a v2 request (FP32 0..1 or UINT8 0..255, as JSON `data` or a binary
    tensor) as MNIST-format [N, 28, 28] 0..255."""
    tensor = request.inputs[0]
    name = f"input {oip.echo(tensor.name)}"  # client text quoted back: cut short
    if tensor.datatype not in V2_FULL_INK:
        raise ApiError(400, f"{name}: datatype must be FP32 (0..1) or UINT8 (0..255), "
                            f"not {oip.echo(tensor.datatype)}")
    shape = tensor.shape
    if not (shape[1:] in ([1, 28, 28], [784]) and len(shape) in (2, 4)):
        raise ApiError(400, f"{name}: shape must be [N, 1, 28, 28] or [N, 784], not {oip.echo(shape)}")
    if not 1 <= shape[0] <= MAX_TENSOR_IMAGES:
        raise ApiError(400, f"{name}: N must be 1..{MAX_TENSOR_IMAGES}, not {oip.echo(shape[0])}")
    if binary and 0 in binary:  # already checked against shape and datatype by oip.binary_inputs
        data = binary[0]
        if data.dtype.kind == "f" and not np.isfinite(data).all():
            raise ApiError(400, f"{name} data must be finite (no NaN or Infinity)")
    elif tensor.data is None:
        raise ApiError(400, f"{name} has neither `data` nor `parameters.binary_data_size`")
    else:
        data = numeric_array(tensor.data, f"{name} data", 400)
    if data.ndim > 1 and list(data.shape) != shape:
        raise ApiError(400, f"{name}: nested data has shape {list(data.shape)}, not {shape}")
    if data.size != math.prod(shape):
        raise ApiError(400, f"{name}: {data.size} values for shape {shape} "
                            f"({math.prod(shape)} expected)")
    full = V2_FULL_INK[tensor.datatype]
    if full == 255 and data.dtype.kind == "f":
        raise ApiError(400, f"{name}: UINT8 data must be integers 0..255")
    if data.min() < 0 or data.max() > full:
        raise ApiError(400, f"{name}: values must be in 0..{full:g} "
                            f"({'MNIST pixels / 255' if full == 1.0 else 'MNIST pixels'})")
    # MNIST bytes, as /predict makes them of `pixels`: the same image gets the same answer on both routes
    return from_pixels_batch(data, full)


def from_pixels_batch(data: np.ndarray, full: float) -> np.ndarray:
    if full == 255:
        return data.astype(np.uint8).reshape(-1, 28, 28)
    return np.rint(data.astype(np.float32).reshape(-1, 28, 28) * np.float32(255.0 / full)).astype(np.uint8)


def v2_decode(body: bytes, headers) -> tuple[InferenceRequest, dict, np.ndarray]:
    """A v2 infer body (JSON, or the binary tensor extension) -> the request, its JSON header, images."""
    try:
        parsed = oip.parse_body(body, headers.get("content-type"), headers.get(oip.HEADER_LENGTH))
    except oip.BadBody as error:
        raise ApiError(error.status, error.message) from None
    try:
        request = InferenceRequest.model_validate(parsed.header)
    except ValidationError as error:
        raise ApiError(400, *describe(error.errors())) from None
    return request, parsed.header, v2_tensor(request, parsed.binary)


# ---------------------------------------------------------------- responses

def prediction(probs: np.ndarray, version: str) -> dict:
    return {"digit": int(probs.argmax()), "probabilities": probs.tolist(), "model_version": version}


V2_OUTPUTS = ("probabilities", "digit")


def v2_output_names(request: InferenceRequest) -> list[str]:
    names = [o.name for o in request.outputs] if request.outputs else list(V2_OUTPUTS)
    unknown = sorted(set(names) - set(V2_OUTPUTS))
    if unknown:
        raise ApiError(400, f"unknown outputs {unknown}; this model has {list(V2_OUTPUTS)}")
    return names


def v2_outputs(names: list[str], probs: np.ndarray) -> list[tuple[dict, np.ndarray]]:
    """(output object without its data, the tensor) per requested output, in request order."""
    available = {
        "probabilities": ({"name": "probabilities", "shape": list(probs.shape), "datatype": "FP32"},
                          probs.astype(np.float32)),
        "digit": ({"name": "digit", "shape": [len(probs)], "datatype": "INT64"}, probs.argmax(axis=1)),
    }
    return [available[name] for name in names]


def v2_metadata(version: str | None) -> dict:
    """`versions`: the one version that can be asked for by name (/v2/models/mnist/versions/<v>),
    the one loaded now. Inputs: FP32 0..1 here; UINT8 0..255 is taken too."""
    return {"name": MODEL_NAME, "versions": [version] if version else [], "platform": "pytorch",
            "inputs": [{"name": "input", "datatype": "FP32", "shape": [-1, 1, 28, 28]}],
            "outputs": [{"name": "probabilities", "datatype": "FP32", "shape": [-1, 10]},
                        {"name": "digit", "datatype": "INT64", "shape": [-1]}]}


def server_timing(**seconds: float) -> dict:
    """A Server-Timing header (ms): where a request's time went inside the app. `cpu` is the CPU
    time spent on the request's images (header checks, decoding, preprocessing), in any thread."""
    return {"server-timing": ", ".join(f"{name};dur={value * 1000:.2f}" for name, value in seconds.items())}


# ---------------------------------------------------------------- errors

def describe(errors) -> tuple[str, list[dict]]:
    """Pydantic errors -> one readable line and a short structured list (inputs are not echoed)."""
    detail = [{"loc": [str(p) for p in e["loc"]], "msg": e["msg"].removeprefix("Value error, "), "type": e["type"]}
              for e in errors[:10]]
    parts = []
    for e in detail[:3]:
        loc = ".".join(p for p in e["loc"] if p != "body")
        parts.append(f"{loc}: {e['msg']}" if loc else e["msg"])
    more = f" (and {len(errors) - 3} more)" if len(errors) > 3 else ""
    return "; ".join(parts) + more, detail


def is_json(content_type: str | None) -> bool:
    kind = (content_type or "").split(";")[0].strip().lower()
    return kind == "application/json" or (kind.startswith("application/") and kind.endswith("+json"))


def app_path(request: Request) -> str:
    """The path inside this app, without the route prefix Serve (or a proxy) mounts it under."""
    path, root = request.scope.get("path", ""), request.scope.get("root_path", "")
    return path[len(root):] if root and path.startswith(root) else path


def error_response(status: int, message: str, detail=None, headers: dict | None = None) -> JSONResponse:
    body = {"error": message} if detail is None else {"error": message, "detail": detail}
    return JSONResponse(body, status_code=status, headers=headers)


def add_error_handlers(api: FastAPI) -> None:
    @api.exception_handler(ApiError)
    async def api_error(request: Request, error: ApiError):
        return error_response(error.status, error.message, error.detail, headers=error.headers)

    @api.exception_handler(NoModel)
    async def no_model(request: Request, error: NoModel):
        return error_response(503, str(error), headers=RETRY_AFTER)

    @api.exception_handler(RequestValidationError)
    async def invalid(request: Request, error: RequestValidationError):
        errors = error.errors()
        if request.method == "POST" and not is_json(request.headers.get("content-type")):
            return error_response(415, "send the body as JSON with `Content-Type: application/json`")
        if any(e["type"] == "json_invalid" for e in errors):
            return error_response(400, "the body is not valid JSON")
        message, detail = describe(errors)
        status = 400 if app_path(request).startswith("/v2/") else 422  # the v2 protocol's code
        return error_response(status, message, detail)

    @api.exception_handler(HTTPException)
    async def http_error(request: Request, error: HTTPException):
        return error_response(error.status_code, str(error.detail), None, getattr(error, "headers", None))

    @api.exception_handler(Exception)
    async def unexpected(request: Request, error: Exception):  # the cause goes to the log, not the client
        log.exception("%s %s failed", request.method, app_path(request))
        return error_response(500, "internal error; it is logged on the server")


# ---------------------------------------------------------------- the app

def create_api(backend: Backend, limits: Limits | None = None, title: str = "MNIST digits") -> FastAPI:
    limits = limits or Limits()
    api = FastAPI(title=title, version="1.0",
                  description="Handwritten digit recognition (a CNN trained on MNIST with Ray Train). "
                              "Native JSON API, the Open Inference Protocol v2, and a sketchpad at /ui/.")
    add_error_handlers(api)
    api.add_middleware(LimitsMiddleware, max_body_bytes=limits.max_body_bytes,
                       timeout_s=limits.request_timeout_s)

    @api.get("/", include_in_schema=False)
    async def index(request: Request):
        root = request.scope.get("root_path", "")
        return {"ui": f"{root}/ui/", "docs": f"{root}/docs", "openapi": f"{root}/openapi.json",
                "predict": f"{root}/predict", "v2": f"{root}/v2/models/{MODEL_NAME}"}

    @api.post("/predict", response_model=Prediction | Predictions, responses=ERRORS,
              summary="Recognise digits in images or an MNIST pixel array")
    async def predict(body: PredictRequest):
        started, meter = time.perf_counter(), CpuMeter()
        if body.pixels is not None:
            images = pixels_to_mnist(body.pixels)
        else:
            texts = [body.image] if body.image is not None else body.images
            names = ["image"] if body.image is not None else [f"images[{i}]" for i in range(len(texts))]
            images = await images_to_mnist(texts, names, meter)
        prepared = time.perf_counter()
        probs, version = await backend.infer(images)
        timing = server_timing(preprocess=prepared - started, model=time.perf_counter() - prepared,
                               cpu=meter.seconds)
        if body.images is None:
            return JSONResponse(prediction(probs[0], version), headers=timing)
        return JSONResponse({"predictions": [prediction(p, version) for p in probs], "model_version": version},
                            headers=timing)

    @api.get("/healthz", response_model=Health, responses={503: {"model": Health}},
             summary="Ready (200) only once a model is loaded")
    async def healthz():
        status = await backend.status()
        body = {"status": "ready" if status["ready"] else "not ready",
                "model_version": status["model_version"], "message": status["message"]}
        return JSONResponse(body, status_code=200 if status["ready"] else 503)

    @api.get("/model", response_model=ModelInfo, summary="The loaded model, its metadata, the last reload error")
    async def model():
        return await backend.status()

    add_v2_routes(api, backend)
    return api


def add_v2_routes(api: FastAPI, backend: Backend) -> None:
    """Open Inference Protocol v2 (KServe v2 REST). Readiness: 200 true, 400 false (as the spec says)."""

    def known(name: str) -> None:
        if name != MODEL_NAME:
            raise ApiError(404, f"unknown model '{name}'; this server serves '{MODEL_NAME}'")

    @api.get("/v2", tags=["v2"], summary="Server metadata")
    async def server_metadata():
        return {"name": "mnist-ray-serve", "version": "1.0", "extensions": oip.EXTENSIONS}

    @api.get("/v2/health/live", tags=["v2"])
    async def live():
        return {"live": True}

    @api.get("/v2/health/ready", tags=["v2"])
    async def ready():
        status = await backend.status()
        return JSONResponse({"ready": status["ready"]}, status_code=200 if status["ready"] else 400)

    def loaded(version: str | None, model_version: str | None) -> None:
        """A version asked for by name must be the one loaded (the `versions` of the metadata)."""
        if model_version is not None and model_version != version:
            raise ApiError(404, f"version '{model_version}' of '{MODEL_NAME}' is not loaded (serving {version})")

    @api.get("/v2/models/{model_name}", tags=["v2"], summary="Model metadata")
    @api.get("/v2/models/{model_name}/versions/{model_version}", tags=["v2"], include_in_schema=False)
    async def model_metadata(model_name: str, model_version: str | None = None):
        known(model_name)
        version = (await backend.status())["model_version"]
        loaded(version, model_version)
        return v2_metadata(version)

    @api.get("/v2/models/{model_name}/ready", tags=["v2"])
    @api.get("/v2/models/{model_name}/versions/{model_version}/ready", tags=["v2"], include_in_schema=False)
    async def model_ready(model_name: str, model_version: str | None = None):
        known(model_name)
        status = await backend.status()
        loaded(status["model_version"], model_version)
        return JSONResponse({"name": MODEL_NAME, "ready": status["ready"]},
                            status_code=200 if status["ready"] else 400)

    @api.post("/v2/models/{model_name}/infer", tags=["v2"], response_model=InferenceResponse,
              responses=ERRORS, openapi_extra=oip.openapi_body(InferenceRequest),
              summary="Inference on a tensor [N, 1, 28, 28] or [N, 784]: FP32 0..1 or UINT8 0..255, "
                      "as JSON or binary (the binary tensor data extension)")
    @api.post("/v2/models/{model_name}/versions/{model_version}/infer", tags=["v2"], include_in_schema=False)
    async def v2_infer(model_name: str, request: Request, model_version: str | None = None):
        known(model_name)
        body = await request.body()
        if len(body) > V2_INLINE_BYTES:  # parsing a large batch would hold up the event loop
            parsed, header, images = await run_in_threadpool(v2_decode, body, request.headers)
        else:
            parsed, header, images = v2_decode(body, request.headers)
        names = v2_output_names(parsed)
        probs, version = await backend.infer(images)
        loaded(version, model_version)
        outputs = v2_outputs(names, probs)
        content, headers = oip.encode_response(
            {"model_name": MODEL_NAME, "model_version": version, "id": parsed.id,
             "outputs": [output for output, _ in outputs]},
            [tensor for _, tensor in outputs], oip.binary_outputs_wanted(header, names))
        return Response(content, headers=headers)
