"""Request and response bodies of the HTTP API (pydantic: validation errors become 4xx JSON)."""
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictFloat, StrictInt, model_validator

from training.storage import MODEL_NAME  # noqa: F401  (re-exported: the API names the model by it)

MAX_IMAGES = 64  # per request, for `images`
# N of a v2 tensor: 28x28 arrays need no image decoding, so a batch may be larger (256 FP32 images
# are 803 KB binary, ~1.6 MB as JSON; the body limit still applies)
MAX_TENSOR_IMAGES = 256

Number = StrictInt | StrictFloat  # strict: "7" or true is not a pixel


class Limits(BaseModel):
    """Service limits; the Serve app args and the plain server take the same fields."""
    model_config = ConfigDict(extra="forbid")
    max_body_bytes: int = Field(4 * 1024 * 1024, gt=0, description="larger bodies get 413")
    request_timeout_s: float = Field(10.0, gt=0, description="API requests running longer get 503")


class PredictRequest(BaseModel):
    """Exactly one of `image`, `images`, `pixels`."""
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"image": "iVBORw0KGgo..."}]})
    image: str | None = Field(None, description="base64 PNG or JPEG (a data: URL is fine): any size, "
                                                "any colours, RGBA strokes in alpha")
    images: Annotated[list[str], Field(min_length=1, max_length=MAX_IMAGES)] | None = Field(
        None, description=f"up to {MAX_IMAGES} base64 images, answered in order")
    pixels: list[list[Number]] | None = Field(
        None, description="28x28 MNIST-format array, white digit on black: integers 0..255 or floats 0..1")

    @model_validator(mode="after")
    def exactly_one(self):
        given = [name for name in ("image", "images", "pixels") if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError(f"send exactly one of `image`, `images` or `pixels` (got {given or 'none'})")
        return self


class Prediction(BaseModel):
    digit: int
    probabilities: list[float] = Field(description="10 probabilities, digits 0..9, summing to 1")
    model_version: str


class Predictions(BaseModel):
    predictions: list[Prediction]
    model_version: str


class Error(BaseModel):
    error: str
    detail: Any = None


class Health(BaseModel):
    status: Literal["ready", "not ready"]
    model_version: str | None
    message: str | None = None


class ModelInfo(BaseModel):
    ready: bool
    model_version: str | None
    metadata: dict | None = Field(description="the published metadata.json: test_accuracy, run_id, created_at, ...")
    loaded_at: float | None
    reload_error: dict | None = Field(description="the last version that failed to load, and why (no server "
                                                  "paths or library text: those are in the replica's log); "
                                                  "the previous model keeps serving")
    message: str | None = None


# ---------------------------------------------------------------- Open Inference Protocol v2 (KServe)

class TensorInput(BaseModel):
    name: str
    shape: list[StrictInt]
    datatype: str
    parameters: dict | None = None
    data: list[Any] | None = Field(None, description="row-major flat list, or nested lists matching `shape`; "
                                                    "absent when `parameters.binary_data_size` is set")


class RequestedOutput(BaseModel):
    name: str
    parameters: dict | None = None


class InferenceRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: str | None = None
    parameters: dict | None = None
    inputs: Annotated[list[TensorInput], Field(min_length=1, max_length=1)]
    outputs: list[RequestedOutput] | None = None


class TensorOutput(BaseModel):
    name: str
    shape: list[int]
    datatype: str
    data: list[Any] | None = Field(None, description="absent for a binary output")
    parameters: dict | None = Field(None, description="`binary_data_size` of a binary output")


class InferenceResponse(BaseModel):
    model_name: str
    model_version: str
    id: str | None = None
    outputs: list[TensorOutput]
