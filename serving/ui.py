"""The Gradio page: draw a digit, see what the model reads and the 28x28 image it saw.

In Ray Serve it is the mnist-ui application's ASGI app, built on the replica (Serve's own Gradio
integration is broken with Gradio 6); the plain server mounts it at /ui. Either way it calls the
same backend and the same preprocessing as POST /predict.
"""
import base64
import binascii
import logging
import os
from pathlib import Path

import numpy as np

from serving.api import ApiError
from serving.budget import check_sketch_files, check_sources, replica_cpus, run_bounded
from serving.model_store import NoModel
from serving.preprocess import BadImage, preprocess
from training.private_dirs import private_dir, private_state_dir

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no network here, and no tracking anyway
if "GRADIO_TEMP_DIR" not in os.environ:  # uploads land here: private to this user, not a shared /tmp name
    os.environ["GRADIO_TEMP_DIR"] = str(private_dir(private_state_dir("mnist-gradio")))

import gradio as gr  # noqa: E402  (after the environment above)

log = logging.getLogger("ray.serve")
# Shown when the backend call fails for a reason the page cannot explain (a replica lost mid-call):
# Serve replaces the replica by itself, so the next stroke or click is answered again.
UNAVAILABLE = "The model service is busy or restarting; try again in a moment."
EXAMPLES = Path(__file__).resolve().parent / "examples"
CANVAS = (280, 280)   # ten canvas pixels per MNIST pixel
BRUSH_RADIUS = 12     # a 24 px stroke: about 2.4 px after scaling to MNIST's 20 px box, like MNIST
ZOOM = 8              # the 28x28 input is shown at 224x224, pixels kept square
CONCURRENCY = replica_cpus()  # recognitions running at once (their decoding is CPU work) ...
QUEUE_SIZE = 64               # ... and waiting; more get Gradio's "queue is full" (HTTP 503)
# Gradio's event streams (queue/data, heartbeat) stay open while a client wants, so a few hundred
# idle ones would hold every `max_ongoing_requests` slot of the page's replica. A recognition's
# stream lasts well under a second, and a full queue drains in far less than this (64 waiting,
# under a second each, CONCURRENCY at a time), so the bound only ever ends idle streams.
STREAM_LIFETIME_S = 120
# What an ended stream says last: the page's client shows the error on any recognition still
# pending and, told "close_stream", opens a new stream for the next one (it does not reopen one
# that just ends: it would wait on it for ever).
STREAM_END = (b'data: {"msg": "unexpected_error", "message": "The event stream was open too long; '
              b'try again.", "success": false}\n\ndata: {"msg": "close_stream"}\n\n')
# Gradio's Sketchpad starts with no tool selected ("select the draw tool to start"): pick the brush.
SELECT_BRUSH = """() => {
  const started = Date.now();
  const pick = () => {
    const brush = document.querySelector('#sketchpad button[aria-label="Brush"]');
    if (brush) { brush.click(); } else if (Date.now() - started < 20000) { setTimeout(pick, 100); }
  };
  pick();
}"""


class Page:
    """The page's callbacks over a backend (Serve handle or in-process model)."""

    def __init__(self, backend):
        self.backend = backend
        self.accuracy: dict[str, float | None] = {}  # test accuracy by version, from /model's metadata
        self.augmentation: dict[str, str] = {}  # how each version was trained, as a phrase

    async def version_text(self, version: str | None = None) -> str:
        if version is None or version not in self.accuracy:
            try:
                status = await self.backend.status()
            except Exception:  # the page still loads; the next answer shows the version
                log.warning("the page's model status call failed", exc_info=True)
                return UNAVAILABLE
            if not status["ready"]:
                return status["message"]
            version = version or status["model_version"]
            accuracy = (status["metadata"] or {}).get("test_accuracy")
            self.accuracy[status["model_version"]] = accuracy if isinstance(accuracy, (int, float)) else None
            self.augmentation[status["model_version"]] = augmentation_text(status["metadata"] or {})
        accuracy = self.accuracy.get(version)
        return (f"Model version **{version}**" + (f" (test accuracy {accuracy:.2%})" if accuracy else "")
                + self.augmentation.get(version, ""))

    async def recognise(self, sketch):
        """Sketchpad value -> top probabilities, the 28x28 image the model saw, the model version."""
        composite = sketch.get("composite") if isinstance(sketch, dict) else sketch
        if composite is None:
            return None, None, "Draw a digit, then press Recognise."
        try:
            seen = await run_bounded(preprocess, composite)  # CPU work: off Gradio's event loop
        except BadImage as error:
            return None, None, f"{error}".capitalize() + "."
        try:
            probs, version = await self.backend.infer(seen[None])
        except (ApiError, NoModel) as error:  # no model published yet, no replica answered: says what to do
            return None, None, str(error)
        except Exception:  # anything else (a Ray error carries a remote traceback): a message, not a trace
            log.warning("the page's model call failed", exc_info=True)
            return None, None, UNAVAILABLE
        label = {str(digit): float(p) for digit, p in enumerate(probs[0])}
        big = np.kron(seen, np.ones((ZOOM, ZOOM), dtype=np.uint8))
        return label, big, await self.version_text(version)


def augmentation_text(metadata: dict) -> str:
    """training/augment.py's settings from the model's metadata, as a line under the version."""
    if "augmentation" not in metadata:  # published before augmentation existed
        return ""
    settings = metadata["augmentation"]
    if not isinstance(settings, dict):
        return "  \nTrained without augmentation"
    from training.augment import AugmentSettings
    try:
        return "  \nTrained with augmentation: " + AugmentSettings(**settings).describe()
    except TypeError:  # settings of another version of augment.py
        return "  \nTrained with augmentation: " + ", ".join(f"{k} {v}" for k, v in settings.items())


def within_budget(component, sources):
    """Gradio decodes an image input itself, at full size, in any format PIL knows: check the
    headers against the work budget (serving/budget.py) first, and refuse with the limit."""
    decode = component.preprocess

    def preprocess_checked(payload):
        if payload is not None:
            try:
                check_sources(sources(component, payload))
            except BadImage as error:
                raise gr.Error(f"{error}".capitalize() + ".") from None
        return decode(payload)

    component.preprocess = preprocess_checked
    return component


def editor_sources(component, payload) -> list:
    """The files of a Sketchpad value: background, layers, composite (uploaded, or sent as blobs),
    at most MAX_SKETCH_FILES of them."""
    data = component.blob_storage.get(payload.id) if payload.id is not None else payload
    if data is None:
        return []
    files = [data.background, *(data.layers or []), data.composite]
    check_sketch_files(files)
    return [bytes(f) if isinstance(f, (bytes, bytearray, memoryview)) else f.path for f in files if f is not None]


def image_sources(component, payload) -> list:
    """The file of a gr.Image value: an uploaded path, or a data: URL."""
    if payload.url and payload.url.startswith("data:"):
        try:
            return [base64.b64decode(payload.url.partition(",")[2], validate=True)]
        except (binascii.Error, ValueError):
            raise BadImage("the data: URL is not valid base64") from None
    return [payload.path] if payload.path else []


def sketchpad_blocks(backend) -> gr.Blocks:
    """The page's Gradio Blocks: sketchpad, prediction, what the model saw; each stroke calls `backend`."""
    page = Page(backend)
    # delete_cache: uploaded sketches older than an hour are removed every hour
    with gr.Blocks(title="MNIST digit recogniser", delete_cache=(3600, 3600)) as demo:
        gr.Markdown("# Draw a digit\nOne digit, 0 to 9, as large as you like. "
                    "The model reads it as it draws; **Recognise** asks again.")
        with gr.Row():
            with gr.Column():
                pad = within_budget(gr.Sketchpad(
                    label="Sketchpad", image_mode="L", type="numpy", format="png", canvas_size=CANVAS,
                    fixed_canvas=True, layers=False, transforms=(), elem_id="sketchpad",
                    brush=gr.Brush(default_size=BRUSH_RADIUS, colors=["#000000"], color_mode="fixed")), editor_sources)
                with gr.Row():
                    clear = gr.ClearButton(value="Clear", elem_id="clear")
                    submit = gr.Button("Recognise", variant="primary", elem_id="submit")
            with gr.Column():
                label = gr.Label(num_top_classes=3, label="Prediction", elem_id="prediction")
                seen = gr.Image(label="What the model saw (28x28)", interactive=False, elem_id="seen",
                                height=224, width=224, buttons=["download"])
                version = gr.Markdown(elem_id="version", label="Model")
        examples = sorted(str(p) for p in EXAMPLES.glob("*.png"))
        if examples:  # shown and recognised on click (Gradio 6 does not load them into a Sketchpad)
            example = within_budget(gr.Image(visible=False, type="numpy", image_mode="L"), image_sources)
            gr.Examples(examples, inputs=example, outputs=[label, seen, version], fn=page.recognise,
                        run_on_click=True, cache_examples=False, label="Examples", api_name=False)
        clear.add([pad, label, seen])
        recognising = {"concurrency_limit": CONCURRENCY, "concurrency_id": "recognise"}  # one pool for both
        submit.click(page.recognise, pad, [label, seen, version], api_name="predict", **recognising)
        pad.change(page.recognise, pad, [label, seen, version], api_name=False, **recognising,
                   trigger_mode="always_last", show_progress="hidden")
        demo.load(page.version_text, None, version, api_name=False)
    demo.queue(max_size=QUEUE_SIZE, default_concurrency_limit=CONCURRENCY)
    return demo


def mount_ui(app, backend, path: str = "/ui"):
    """`app` (FastAPI) with the sketchpad mounted at `path`, its event streams bounded in time."""
    from serving.limits import StreamLifetimeMiddleware
    app = gr.mount_gradio_app(app, sketchpad_blocks(backend), path=path, js=SELECT_BRUSH, max_file_size="4mb",
                              footer_links=["api", "settings"])
    app.add_middleware(StreamLifetimeMiddleware, max_lifetime_s=STREAM_LIFETIME_S, farewell=STREAM_END)
    return app


def ui_app(backend):
    """An ASGI app that is only the sketchpad, at its root (Serve mounts it at the route prefix),
    inside the API's body limit (no request time limit: Gradio keeps event streams open; they have
    their own, STREAM_LIFETIME_S)."""
    from fastapi import FastAPI

    from serving.limits import LimitsMiddleware
    from serving.schemas import Limits
    app = mount_ui(FastAPI(docs_url=None, redoc_url=None, openapi_url=None), backend, path="")
    app.add_middleware(LimitsMiddleware, max_body_bytes=Limits().max_body_bytes,
                       timeout_s=Limits().request_timeout_s, untimed_prefixes=("",))
    return app
