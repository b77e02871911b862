"""The Open Inference Protocol v2 wire format of /v2/models/mnist/infer: which bodies are accepted,
and the binary tensor data extension, as pure functions over bytes (the route in serving/api.py
only calls them).

The extension (KServe "Binary Tensor Data Extension", Triton `binary_tensor_data`): the body is a
JSON header of `Inference-Header-Content-Length` bytes, followed by the raw data of every input
whose `parameters.binary_data_size` is set, in the order of `inputs`, little-endian, row-major, no
padding. Outputs asked for with `parameters.binary_data: true` (or all of them with the request's
`binary_data_output: true`) come back the same way: `binary_data_size` instead of `data`, their
bytes after the JSON header in the order of `outputs`, and the header's length in the response's
`Inference-Header-Content-Length`. tritonclient sends its binary form by default, and its JSON
form without a Content-Type header, so both are accepted as reference servers do.
"""
import json
import math
from dataclasses import dataclass

import numpy as np

HEADER_LENGTH = "inference-header-content-length"
EXTENSIONS = ["binary_tensor_data"]  # what GET /v2 reports: only what this module really implements
# Fixed-size datatypes of the protocol and their little-endian layout (BYTES has no fixed size:
# this model never takes it, and it is refused as an unknown datatype).
DTYPES = {"BOOL": "|b1", "UINT8": "|u1", "UINT16": "<u2", "UINT32": "<u4", "UINT64": "<u8",
          "INT8": "|i1", "INT16": "<i2", "INT32": "<i4", "INT64": "<i8",
          "FP16": "<f2", "FP32": "<f4", "FP64": "<f8"}
# A shape is checked against these before any arithmetic on it: a list of thousands of huge dims
# would otherwise take seconds to multiply (and its product seconds to print), and numpy refuses a
# dimension past 2**63.
MAX_RANK = 8
MAX_DIM = 2**31 - 1
MAX_HEADER_DIGITS = 10  # of Inference-Header-Content-Length: the body limit has 7
ECHO = 40  # characters of a client's text (a name, a datatype, a number) quoted back in an error


def echo(value) -> str:
    """A client's value for an error message: its repr, cut to ECHO characters."""
    text = repr(value)
    return text if len(text) <= ECHO else text[:ECHO] + "..."


class BadBody(ValueError):
    """A body this route cannot read: 415 for a content type it does not take, else 400."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status, self.message = status, message


@dataclass
class ParsedBody:
    header: dict                      # the JSON object, as sent (binary inputs without `data`)
    binary: dict[int, np.ndarray]     # index in `inputs` -> its binary tensor, shaped as declared


# ---------------------------------------------------------------- request

def media_type(content_type: str | None) -> str:
    return (content_type or "").split(";")[0].strip().lower()


def check_content_type(content_type: str | None, header_length: str | None) -> None:
    """JSON with or without a Content-Type (tritonclient's JSON form sends none); with the binary
    header also application/octet-stream. Anything else is refused with 415."""
    kind = media_type(content_type)
    is_json = kind == "application/json" or (kind.startswith("application/") and kind.endswith("+json"))
    if kind == "" or is_json or (kind == "application/octet-stream" and header_length is not None):
        return
    binary = " or application/octet-stream with an Inference-Header-Content-Length header"
    raise BadBody(f"send the body as JSON (`Content-Type: application/json`, or none){binary}, "
                  f"not {kind!r}", 415)


def parse_body(body: bytes, content_type: str | None, header_length: str | None) -> ParsedBody:
    """A request body -> its JSON header and its binary input tensors (checked against the header)."""
    check_content_type(content_type, header_length)
    header_bytes, rest = split_body(body, header_length)
    try:
        header = json.loads(header_bytes)
    except (ValueError, RecursionError):  # bad JSON or UTF-8, an over-long integer, nesting too deep
        where = "the JSON header (Inference-Header-Content-Length bytes)" if rest or header_length else "the body"
        raise BadBody(f"{where} is not valid JSON") from None
    if not isinstance(header, dict):
        raise BadBody("the inference request must be a JSON object")
    return ParsedBody(header, binary_inputs(header, rest))


def split_body(body: bytes, header_length: str | None) -> tuple[bytes, bytes]:
    """Without the header (or with 0, as Triton reads it) the whole body is JSON."""
    if header_length is None:
        return body, b""
    text = header_length.strip()
    if not (text.isascii() and text.isdigit() and len(text) <= MAX_HEADER_DIGITS):  # "²".isdigit() is true
        raise BadBody(f"Inference-Header-Content-Length must be a byte count of at most {MAX_HEADER_DIGITS} "
                      f"digits, not {echo(header_length)}")
    length = int(text)
    if length > len(body):
        raise BadBody(f"Inference-Header-Content-Length is {length} but the body has only {len(body)} bytes")
    return (body, b"") if length == 0 else (body[:length], body[length:])


def binary_inputs(header: dict, data: bytes) -> dict[int, np.ndarray]:
    """The binary tensors after the JSON header, in the order of `inputs`; every byte accounted for."""
    inputs = header.get("inputs")
    tensors, offset = {}, 0
    for index, tensor in enumerate(inputs if isinstance(inputs, list) else []):
        size = binary_size(tensor, f"inputs[{index}]")
        if size is None:
            continue
        name = f"input {echo(tensor.get('name'))}"
        if "data" in tensor:
            raise BadBody(f"{name} has both `data` and `binary_data_size`; send one")
        dtype, shape = tensor_layout(tensor, name)
        expected = math.prod(shape) * dtype.itemsize  # cheap: at most MAX_RANK dims of 31 bits
        if size != expected:
            raise BadBody(f"{name}: binary_data_size is {size} bytes, but shape {shape} of "
                          f"{tensor['datatype']} takes {expected}")
        if offset + size > len(data):
            raise BadBody(f"{name}: the body ends after {len(data) - offset} of its {size} binary bytes (truncated)")
        tensors[index] = np.frombuffer(data, dtype, math.prod(shape), offset).reshape(shape)
        offset += size
    if offset != len(data):
        raise BadBody(f"{len(data) - offset} bytes after the JSON header belong to no input's binary_data_size")
    return tensors


def binary_size(tensor, where: str) -> int | None:
    parameters = tensor.get("parameters") if isinstance(tensor, dict) else None
    size = parameters.get("binary_data_size") if isinstance(parameters, dict) else None
    if size is None:
        return None
    if type(size) is not int or size < 0:
        raise BadBody(f"{where}: binary_data_size must be a byte count, not {echo(size)}")
    return size


def tensor_layout(tensor: dict, name: str) -> tuple[np.dtype, list[int]]:
    datatype, shape = tensor.get("datatype"), tensor.get("shape")
    if not isinstance(datatype, str) or datatype not in DTYPES:
        raise BadBody(f"{name}: datatype {echo(datatype)} cannot be sent as binary data here "
                      f"(one of {', '.join(DTYPES)})")
    if not (isinstance(shape, list) and len(shape) <= MAX_RANK
            and all(type(d) is int and 0 <= d <= MAX_DIM for d in shape)):
        raise BadBody(f"{name}: shape must be a list of at most {MAX_RANK} integers 0..{MAX_DIM}")
    return np.dtype(DTYPES[datatype]), shape



# ---------------------------------------------------------------- response

def binary_outputs_wanted(header: dict, names: list[str]) -> list[bool]:
    """Per output (in response order): binary? `parameters.binary_data` of a requested output wins;
    otherwise the request's `binary_data_output` (default false: JSON)."""
    parameters = header.get("parameters")
    default = isinstance(parameters, dict) and parameters.get("binary_data_output") is True
    requested, outputs = {}, header.get("outputs")
    for output in outputs if isinstance(outputs, list) else []:
        output_parameters = output.get("parameters") if isinstance(output, dict) else None
        if isinstance(output_parameters, dict) and isinstance(output_parameters.get("binary_data"), bool) \
                and isinstance(output.get("name"), str):
            requested[output["name"]] = output_parameters["binary_data"]
    return [requested.get(name, default) for name in names]


def encode_response(body: dict, tensors: list[np.ndarray], binary: list[bool]) -> tuple[bytes, dict[str, str]]:
    """A response object whose `outputs` line up with `tensors` -> (body bytes, extra headers).

    JSON outputs carry `data` (flat, row-major); binary ones carry `parameters.binary_data_size`,
    and their bytes follow the JSON header in the order of `outputs`."""
    outputs, blobs = [], []
    for output, tensor, as_binary in zip(body["outputs"], tensors, binary):
        if as_binary:
            raw = np.ascontiguousarray(tensor, DTYPES[output["datatype"]]).tobytes()
            outputs.append({**output, "parameters": {"binary_data_size": len(raw)}})
            blobs.append(raw)
        else:
            outputs.append({**output, "data": tensor.ravel().tolist()})
    header = json.dumps({**body, "outputs": outputs}, separators=(",", ":")).encode()
    if not blobs:
        return header, {"content-type": "application/json"}
    return header + b"".join(blobs), {"content-type": "application/octet-stream",
                                      "inference-header-content-length": str(len(header))}


# ---------------------------------------------------------------- OpenAPI

def openapi_body(model) -> dict:
    """The request body of a route that reads its body itself, for /docs: the JSON form's schema
    (pydantic's $defs inlined, since OpenAPI resolves refs against its own components)."""
    schema = model.model_json_schema()
    defs = schema.pop("$defs", {})

    def inline(node):
        if isinstance(node, dict):
            if "$ref" in node:
                return inline(defs[node["$ref"].rsplit("/", 1)[1]])
            return {key: inline(value) for key, value in node.items()}
        return [inline(item) for item in node] if isinstance(node, list) else node

    return {"requestBody": {"required": True, "content": {
        "application/json": {"schema": inline(schema)},
        "application/octet-stream": {"schema": {"type": "string", "format": "binary",
                                                "description": "the JSON header (Inference-Header-Content-"
                                                               "Length bytes), then the binary tensors"}}}}}
