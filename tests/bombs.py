"""Decompression bombs for the hardening tests: small, complete, valid PNGs that decode to many
pixels (issue 11's attacks), each holding one thick diagonal stroke so that a server that did
decode them would find a "digit". Rows are streamed through zlib, so making one costs well under
a second and little memory even at 13000x13000."""
import struct
import zlib

import numpy as np


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def bomb_png(side: int, kind: str = "1bit", stroke: int = 64) -> bytes:
    """A `side` x `side` PNG: "1bit" (grey, 1 bit per pixel, white background, black stroke) or
    "palette" (8-bit palette with transparency: transparent background, opaque black stroke)."""
    if kind == "1bit":
        header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
        extra = b""
        row_bytes = (side + 7) // 8
    elif kind == "palette":
        header = struct.pack(">IIBBBBB", side, side, 8, 3, 0, 0, 0)
        extra = _chunk(b"PLTE", bytes([255, 255, 255, 0, 0, 0])) + _chunk(b"tRNS", bytes([0, 255]))
        row_bytes = side
    else:
        raise ValueError(kind)
    compressor = zlib.compressobj(9)
    parts = []
    blank = np.full(row_bytes, 0xFF if kind == "1bit" else 0, np.uint8)
    for y in range(side):
        row = blank.copy()
        start, stop = max(0, y - stroke // 2), min(side, y + stroke // 2)
        if kind == "1bit":  # black pixels are 0 bits
            bits = np.ones(row_bytes * 8, np.uint8)
            bits[start:stop] = 0
            row = np.packbits(bits)
        else:
            row[start:stop] = 1
        parts.append(compressor.compress(b"\0" + row.tobytes()))
    parts.append(compressor.flush())
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + extra + _chunk(b"IDAT", b"".join(parts))
            + _chunk(b"IEND", b""))
