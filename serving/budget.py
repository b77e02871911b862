"""The work budget of a request, checked on image headers before anything is decoded, and the
bounded pool that does the decoding off the event loop.

    images = await decode_within_budget(blobs, names)   # -> uint8 [N, 28, 28], or raises

Per image: `serving.preprocess.open_image` (the file's structure first, serving/structure.py;
then MAX_PIXELS decoded, MAX_PHOTO_PIXELS for a JPEG that decodes smaller). Per request:
MAX_REQUEST_PIXELS decoded pixels in all (a progressive JPEG's scans counted in), so a batch of 64
images cannot add up to 64 times the per-image cost. Over either: a 4xx that names the limit, after
reading only headers (milliseconds of CPU, in the `cpu` entry of Server-Timing).

Decoding and preprocessing run in a pool of as many threads as the replica has CPUs, so that
health and metadata routes (and small requests) keep answering while large images decode, and
that a flood of large images queues for the CPUs instead of oversubscribing them. Headers are
read there too, unless the request's bytes are a canvas's few (INLINE_BYTES).
"""
import asyncio
import io
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from serving.preprocess import FORMATS, MAX_PIXELS, BadImage, decode_cost, load_image, open_image, preprocess
from serving.structure import BadStructure, check_structure

MAX_REQUEST_PIXELS = 4 * MAX_PIXELS  # decoded pixels per request: 4 images at the per-image limit
                                     # (~0.36 s of CPU at worst), or 64 canvases of 512x512
# At most this much decoding stays on the event loop (<= ~9 ms at worst, ~3 ms for a drawing): a
# canvas. The thread hop costs ~0.3 ms of CPU, 10-20% of an ordinary request (measured in-process).
INLINE_PIXELS = 640 * 640
INLINE_BYTES = 64 * 1024  # ... and its headers are read there only if the files are this small in all
MAX_SKETCH_FILES = 4      # a Sketchpad value: background, one layer, composite (and one spare)


class OverBudget(BadImage):
    """The request as a whole asks for more decoding than one request may (served as 413)."""


def replica_cpus() -> int:
    """CPUs this process may use: its affinity, capped by a cgroup v2 quota (a Kubernetes limit)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            cpus = min(cpus, max(1, int(int(quota) // int(period))))
    except (OSError, ValueError):
        pass
    return max(1, cpus)


_pool: ThreadPoolExecutor | None = None


def pool() -> ThreadPoolExecutor:
    global _pool
    if _pool is None:  # made on first use, in the replica (an executor does not pickle)
        _pool = ThreadPoolExecutor(max_workers=replica_cpus(), thread_name_prefix="decode")
    return _pool


async def run_bounded(function, *args):
    """`function(*args)` in the decode pool. Work still queued when the request is cancelled
    (timeout, client gone) is dropped without running."""
    return await asyncio.get_running_loop().run_in_executor(pool(), function, *args)


class CpuMeter:
    """CPU seconds spent on a request's images, in whichever thread did the work."""

    def __init__(self):
        self.seconds = 0.0

    def timed(self, function):
        def run(*args):
            started = time.thread_time()
            try:
                return function(*args)
            finally:
                self.seconds += time.thread_time() - started
        return run


def open_all(blobs: list[bytes], names: list[str]):
    """Every image's header, checked against the per-image and the per-request budget."""
    images, total = [], 0
    for blob, name in zip(blobs, names):
        try:
            image = open_image(blob)
        except BadImage as error:
            raise BadImage(f"{name}: {error}") from None
        total += decode_cost(image)
        images.append(image)
    if total > MAX_REQUEST_PIXELS:
        raise OverBudget(f"the images add up to {total} pixels, over the limit of {MAX_REQUEST_PIXELS} "
                         f"decoded pixels per request; send fewer or smaller images")
    return images, total


def check_sources(sources: list) -> None:
    """For images that another library decodes at full size (Gradio's components): PNG or JPEG,
    each header within MAX_PIXELS (no JPEG draft there), all within MAX_REQUEST_PIXELS."""
    total = 0
    for source in sources:
        data = source if isinstance(source, bytes) else Path(source).read_bytes()  # Gradio's 4 MB cap
        try:
            check_structure(data)
            with Image.open(io.BytesIO(data), formats=FORMATS) as image:
                width, height = image.size
        except BadStructure as error:
            raise BadImage(str(error)) from None
        except Image.DecompressionBombError:
            raise BadImage(f"the image is over the limit of {MAX_PIXELS} pixels") from None
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError):
            raise BadImage("the file is not a PNG or JPEG image") from None
        if width * height > MAX_PIXELS:
            raise BadImage(f"the image is {width}x{height} pixels, over the limit of {MAX_PIXELS} "
                           f"pixels (2048x2048) per image")
        total += width * height
    if total > MAX_REQUEST_PIXELS:
        raise OverBudget(f"the images add up to {total} pixels, over the limit of {MAX_REQUEST_PIXELS} per request")


def check_sketch_files(files: list) -> None:
    """Gradio decodes each file a Sketchpad value lists, repeats too: more than MAX_SKETCH_FILES
    (background, layers, composite) are refused before any is read."""
    if len(files) > MAX_SKETCH_FILES:
        raise BadImage(f"the sketch has {len(files)} images (background, layers, composite), over the "
                       f"limit of {MAX_SKETCH_FILES}")


def preprocess_all(images, names: list[str]) -> np.ndarray:
    results = []
    for image, name in zip(images, names):
        try:
            results.append(preprocess(load_image(image)))
        except BadImage as error:
            raise BadImage(f"{name}: {error}") from None
    return np.stack(results)


def decode_all(blobs: list[bytes], names: list[str]) -> np.ndarray:
    return preprocess_all(open_all(blobs, names)[0], names)


async def decode_within_budget(blobs: list[bytes], names: list[str], meter: CpuMeter) -> np.ndarray:
    """Encoded images -> MNIST-format uint8 [N, 28, 28]; BadImage (or OverBudget) with the reason."""
    if sum(map(len, blobs)) > INLINE_BYTES:  # even the headers' walk is work for the pool
        return await run_bounded(meter.timed(decode_all), blobs, names)
    images, total = meter.timed(open_all)(blobs, names)
    if total <= INLINE_PIXELS:  # a canvas or two: a thread hop would cost more than the work
        return meter.timed(preprocess_all)(images, names)
    return await run_bounded(meter.timed(preprocess_all), images, names)
