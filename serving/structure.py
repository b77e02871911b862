"""The structure of a PNG or JPEG file, walked before Pillow reads it, so that the work its
header and entropy decoding cost is bounded by limits, not by what the file asks for.

    work = check_structure(data)   # raises BadStructure naming the limit; cheap: it skips over pixel data

PNG: Pillow inflates every iCCP chunk (up to 1 MiB each) and every compressed text chunk while it
reads the header, and follows any number of chunks; a few KB of zlib per chunk make a 4 MB body
cost seconds. Here: at most MAX_PNG_CHUNKS chunks, one iCCP of at most MAX_ICCP_BYTES, at most
MAX_TEXT_CHUNKS text chunks of MAX_TEXT_BYTES in all, other ancillary chunks small.

JPEG: the pixel budget bounds what the IDCT writes, but entropy decoding walks every scan at full
resolution, and a progressive (or multi-scan) file keeps a coefficient buffer of the whole image
(2 bytes per sample, whatever `draft` asks). Here: one frame, at most MAX_JPEG_SCANS scans, a
multi-scan file's coefficient buffer at most MAX_COEFFICIENT_BYTES, at most MAX_JPEG_SEGMENTS
marker segments; and the entropy decoding of a multi-scan file, in decoded-pixel equivalents
(`work`, BLOCK_SCAN_PIXELS per 8x8 block per scan that covers it), goes into the request's budget.
"""
import re
import struct

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
MAX_PNG_CHUNKS = 4096              # a 4 MB PNG of 8 KiB IDATs (libpng's) has ~500
MAX_ICCP_BYTES = 64 * 1024         # compressed; an sRGB or Display P3 profile is 0.5-4 KB
MAX_TEXT_CHUNKS = 16               # tEXt, zTXt, iTXt
MAX_TEXT_BYTES = 64 * 1024         # their compressed bytes in all
MAX_OTHER_CHUNK_BYTES = 64 * 1024  # any other ancillary chunk (eXIf, sPLT, ...)
TEXT_CHUNKS = {b"tEXt", b"zTXt", b"iTXt"}
CRITICAL = {b"IHDR", b"PLTE", b"tRNS", b"IDAT", b"fdAT"}  # counted, not sized: image data

MAX_JPEG_SCANS = 32                # libjpeg's progressive colour mode writes 10, mozjpeg's up to ~20
MAX_JPEG_SEGMENTS = 256            # tables, APPn, COM, scans
MAX_COEFFICIENT_BYTES = 48 * 1024 * 1024  # a 16 Mpx 4:2:0 progressive photo
# One block of one scan costs up to ~300 ns to entropy-decode (a flood of refinement scans, measured
# with libjpeg-turbo through Pillow 12); 16 pixels per block-scan lets a request's budget (16.8 Mpx,
# ~0.36 s of PNG decoding at worst) hold ~1M block-scans, ~0.3 s: a 9 Mpx progressive photo's ten
# scans fit, a flood of scans over a large image does not.
BLOCK_SCAN_PIXELS = 16
SOF_MARKERS = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
PROGRESSIVE_SOF = {0xC2, 0xC6, 0xCA, 0xCE}
STANDALONE = {0x01, *range(0xD0, 0xD8)}  # TEM, RSTn: no length
# The next marker after entropy-coded data: 0xFF not followed by 0x00 (a stuffed byte), RSTn or
# 0xFF (fill). One byte of lookahead, so the search is linear in the data.
NEXT_MARKER = re.compile(rb"\xff[^\x00\xd0-\xd7\xff]")


class BadStructure(ValueError):
    """The file's structure is over a limit, or broken; the message says which."""


def check_structure(data: bytes) -> int:
    """Refuses a file over a structural limit; returns the work, in decoded-pixel equivalents,
    that decoding costs beyond its pixels (a multi-scan JPEG's scans; 0 otherwise)."""
    if data.startswith(PNG_SIGNATURE):
        check_png(data)
    elif data.startswith(b"\xff\xd8"):
        return check_jpeg(data)
    return 0  # anything else: Pillow refuses it as neither PNG nor JPEG


def check_png(data: bytes) -> None:
    offset, chunks, text_chunks, text_bytes, iccp = len(PNG_SIGNATURE), 0, 0, 0, 0
    while offset + 8 <= len(data):
        length, kind = struct.unpack_from(">I4s", data, offset)
        offset += 12 + length
        chunks += 1
        if chunks > MAX_PNG_CHUNKS:
            raise BadStructure(f"the PNG has more than {MAX_PNG_CHUNKS} chunks")
        if kind == b"IEND":
            return
        if kind in CRITICAL:
            continue
        if kind == b"iCCP":
            iccp += 1
            if iccp > 1 or length > MAX_ICCP_BYTES:
                raise BadStructure(f"the PNG's colour profile is over the limit of one iCCP chunk of "
                                   f"{MAX_ICCP_BYTES} bytes")
        elif kind in TEXT_CHUNKS:
            text_chunks, text_bytes = text_chunks + 1, text_bytes + length
            if text_chunks > MAX_TEXT_CHUNKS or text_bytes > MAX_TEXT_BYTES:
                raise BadStructure(f"the PNG's text is over the limit of {MAX_TEXT_CHUNKS} chunks and "
                                   f"{MAX_TEXT_BYTES} bytes")
        elif length > MAX_OTHER_CHUNK_BYTES:
            raise BadStructure(f"the PNG's {kind.decode('latin-1')!r} chunk is over the limit of "
                               f"{MAX_OTHER_CHUNK_BYTES} bytes for an ancillary chunk")


def check_jpeg(data: bytes) -> int:
    offset, segments, scans, frame, scan_components = 2, 0, 0, None, []
    while True:
        found = NEXT_MARKER.search(data, offset)
        if found is None:
            break
        marker, offset = data[found.start() + 1], found.end()
        if marker == 0xD9:  # EOI
            break
        if marker in STANDALONE:
            continue
        if offset + 2 > len(data):
            break
        length = struct.unpack_from(">H", data, offset)[0]
        segments += 1
        if segments > MAX_JPEG_SEGMENTS:
            raise BadStructure(f"the JPEG has more than {MAX_JPEG_SEGMENTS} marker segments")
        if marker in SOF_MARKERS:
            if frame is not None:
                raise BadStructure("the JPEG has more than one frame")
            frame = (marker, data[offset + 2:offset + length])
        elif marker == 0xDA:
            scans += 1
            if scans > MAX_JPEG_SCANS:
                raise BadStructure(f"the JPEG has more than {MAX_JPEG_SCANS} scans")
            count = data[offset + 2] if offset + 2 < len(data) else 0
            scan_components.append(data[offset + 3:offset + 3 + 2 * count:2])
        offset += length  # past the segment; entropy-coded data after an SOS is skipped by the search
    if frame is None or (frame[0] not in PROGRESSIVE_SOF and scans <= 1):
        return 0  # baseline: one pass, no whole-image buffer; its pixels are its cost
    blocks = component_blocks(frame[1])
    coefficients = sum(blocks.values()) * 64 * 2
    if coefficients > MAX_COEFFICIENT_BYTES:
        raise BadStructure(f"the progressive JPEG needs {coefficients >> 20} MiB of coefficients, over the "
                           f"limit of {MAX_COEFFICIENT_BYTES >> 20} MiB; send it smaller or baseline")
    return BLOCK_SCAN_PIXELS * sum(blocks.get(c, 0) for components in scan_components for c in components)


def component_blocks(frame: bytes) -> dict[int, int]:
    """8x8 blocks of each component (by id) at its own resolution, from an SOF segment's body."""
    if len(frame) < 6:
        return {}  # Pillow refuses the broken frame
    height, width, count = struct.unpack_from(">HHB", frame, 1)
    components = {frame[6 + 3 * i]: frame[7 + 3 * i] for i in range(count) if 8 + 3 * i <= len(frame)}
    if not components:
        return {}
    h_max = max(s >> 4 for s in components.values()) or 1
    v_max = max(s & 15 for s in components.values()) or 1
    blocks = {}
    for component, sampling in components.items():
        h, v = (sampling >> 4) or 1, (sampling & 15) or 1
        blocks[component] = -(-width * h // (h_max * 8)) * -(-height * v // (v_max * 8))
    return blocks
