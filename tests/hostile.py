"""Hostile inputs for the cost tests, one generator per class of attack (issue 26): each takes
its size as arguments, so the tests sweep a class instead of one example. Every file is valid
enough for Pillow to read its header; each costs well under a second to make."""
import io
import json
import struct
import zlib

import numpy as np
from PIL import Image, ImageDraw

from serving.structure import NEXT_MARKER

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def png(width: int, height: int, rows: np.ndarray | None = None, extra: bytes = b"", after: bytes = b"") -> bytes:
    """An 8-bit grey PNG (`rows`: uint8 [height, width], default white), `extra` chunks before
    IDAT and `after` chunks after it."""
    if rows is None:
        rows = np.full((height, width), 255, np.uint8)
    raw = np.concatenate([np.zeros((height, 1), np.uint8), rows], axis=1).tobytes()
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (PNG_SIGNATURE + chunk(b"IHDR", header) + extra + chunk(b"IDAT", zlib.compress(raw, 9))
            + after + chunk(b"IEND", b""))


def iccp_chunk(inflated: int = 1024 * 1024) -> bytes:
    """An iCCP chunk of ~1 KB of zlib that Pillow inflates to `inflated` bytes."""
    return chunk(b"iCCP", b"profile\0\0" + zlib.compress(bytes(inflated), 9))


def iccp_flood(count: int, inflated: int = 1024 * 1024) -> bytes:
    """A small PNG with `count` iCCP chunks before its IDAT."""
    return png(8, 8, extra=iccp_chunk(inflated) * count)


def text_flood(count: int, kind: bytes = b"zTXt", inflated: int = 64 * 1024, after_idat: bool = False) -> bytes:
    """`count` compressed text chunks, before the image data or after it (read by load())."""
    body = {b"zTXt": b"key\0\0" + zlib.compress(bytes(inflated), 9),
            b"iTXt": b"key\0\1\0\0\0" + zlib.compress(bytes(inflated), 9),
            b"tEXt": b"key\0" + b"x" * min(inflated, 1000)}[kind]
    chunks = chunk(kind, body) * count
    return png(8, 8, after=chunks) if after_idat else png(8, 8, extra=chunks)


def empty_chunk_flood(count: int, kind: bytes = b"IDAT") -> bytes:
    """A PNG split into `count` chunks (empty IDATs, or unknown ancillary ones): per-chunk overhead."""
    raw = zlib.compress(b"\0" + b"\xff" * 8, 9)
    filler = chunk(kind, b"") * count
    idats = chunk(b"IDAT", raw) + filler if kind == b"IDAT" else filler + chunk(b"IDAT", raw)
    return (PNG_SIGNATURE + chunk(b"IHDR", struct.pack(">IIBBBBB", 8, 1, 8, 0, 0, 0, 0)) + idats
            + chunk(b"IEND", b""))


def slanted_stroke(width: int, height: int, stroke: int = 6) -> bytes:
    """A `width` x `height` PNG (a tall thin one: 1:1 to 1:100 within MAX_PIXELS) holding one stroke
    as steep as the image allows, corner to corner: the deslant's worst case."""
    rows = np.full((height, width), 255, np.uint8)
    xs = np.linspace(0, width - 1, height).astype(int)
    for y, x in enumerate(xs):
        rows[y, max(0, x - stroke // 2):x + stroke // 2 + 1] = 0
    return png(width, height, rows)


def _scans(data: bytes) -> list[tuple[int, int]]:
    """(start, end) of every SOS segment with its entropy-coded data."""
    found, offset = [], 2
    while (marker := NEXT_MARKER.search(data, offset)) is not None:
        kind, offset = data[marker.start() + 1], marker.end()
        if kind == 0xD9:
            break
        if 0xD0 <= kind <= 0xD7 or kind == 0x01:
            continue
        length = struct.unpack_from(">H", data, offset)[0]
        if kind == 0xDA:
            end = NEXT_MARKER.search(data, offset + length).start()
            found.append((marker.start(), end))
            offset = end
        else:
            offset += length
    return found


def progressive_jpeg(width: int, height: int, extra_scans: int = 0) -> bytes:
    """A grey progressive JPEG with one dark stroke (small: most of its scans are end-of-band runs)
    with its last refinement scan repeated `extra_scans` times: each repeat makes the decoder walk
    the image's blocks again."""
    image = Image.new("RGB", (width, height), (160, 160, 160))
    ImageDraw.Draw(image).line((width // 4, height // 8, width // 2, height * 7 // 8), fill=(0, 0, 0),
                               width=max(2, width // 12))
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", progressive=True)
    data = buffer.getvalue()
    start, end = _scans(data)[-1]
    return data[:end] + data[start:end] * extra_scans + data[end:]


def oip_binary(shape: list, datatype: str = "UINT8", data: bytes = b"", header_length: str | None = None):
    """A binary-extension v2 body: (body, headers) with a declared `shape` and `len(data)` bytes."""
    header = json.dumps({"inputs": [{"name": "input", "shape": shape, "datatype": datatype,
                                     "parameters": {"binary_data_size": len(data)}}]}).encode()
    return header + data, {"content-type": "application/octet-stream",
                           "inference-header-content-length": header_length or str(len(header))}


def sketch_layers(count: int) -> dict:
    """A Sketchpad value whose `layers` list the same upload `count` times."""
    upload = {"path": "/nonexistent/sketch.png", "meta": {"_type": "gradio.FileData"}}
    return {"background": upload, "layers": [upload] * count, "composite": upload}


def chunked(body: bytes, size: int = 4096) -> list[dict]:
    """A body as the ASGI messages of a chunked upload (no Content-Length)."""
    parts = [body[i:i + size] for i in range(0, len(body), size)] or [b""]
    return [{"type": "http.request", "body": part, "more_body": i < len(parts) - 1} for i, part in enumerate(parts)]
