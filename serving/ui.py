"""The Gradio page: draw a digit, see what the model reads and the 28x28 image it saw.

In Ray Serve it is the mnist-ui application's ASGI app, built on the replica (Serve's own Gradio
integration is broken with Gradio 6); the plain server mounts it at /ui. Either way it calls the
same backend and the same preprocessing as POST /predict.
"""
import logging
import os
import tempfile
from pathlib import Path

import numpy as np

from serving.api import ApiError
from serving.model_store import NoModel
from serving.preprocess import BadImage, preprocess

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no network here, and no tracking anyway
os.environ.setdefault("GRADIO_TEMP_DIR", str(Path(tempfile.gettempdir()) / "mnist-gradio"))

import gradio as gr  # noqa: E402  (after the environment above)

log = logging.getLogger("ray.serve")
# Shown when the backend call fails for a reason the page cannot explain (a replica lost mid-call):
# Serve replaces the replica by itself, so the next stroke or click is answered again.
UNAVAILABLE = "The model service is busy or restarting; try again in a moment."
EXAMPLES = Path(__file__).resolve().parent / "examples"
CANVAS = (280, 280)   # ten canvas pixels per MNIST pixel
BRUSH_RADIUS = 12     # a 24 px stroke: about 2.4 px after scaling to MNIST's 20 px box, like MNIST
ZOOM = 8              # the 28x28 input is shown at 224x224, pixels kept square
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
            seen = preprocess(composite)
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


def build_ui(backend) -> gr.Blocks:
    page = Page(backend)
    # delete_cache: uploaded sketches older than an hour are removed every hour
    with gr.Blocks(title="MNIST digit recogniser", delete_cache=(3600, 3600)) as demo:
        gr.Markdown("# Draw a digit\nOne digit, 0 to 9, as large as you like. "
                    "The model reads it as it draws; **Recognise** asks again.")
        with gr.Row():
            with gr.Column():
                pad = gr.Sketchpad(
                    label="Sketchpad", image_mode="L", type="numpy", format="png", canvas_size=CANVAS,
                    fixed_canvas=True, layers=False, transforms=(), elem_id="sketchpad",
                    brush=gr.Brush(default_size=BRUSH_RADIUS, colors=["#000000"], color_mode="fixed"))
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
            example = gr.Image(visible=False, type="numpy", image_mode="L")
            gr.Examples(examples, inputs=example, outputs=[label, seen, version], fn=page.recognise,
                        run_on_click=True, cache_examples=False, label="Examples", api_name=False)
        clear.add([pad, label, seen])
        submit.click(page.recognise, pad, [label, seen, version], api_name="predict", concurrency_limit=None)
        pad.change(page.recognise, pad, [label, seen, version], api_name=False, concurrency_limit=None,
                   trigger_mode="always_last", show_progress="hidden")
        demo.load(page.version_text, None, version, api_name=False)
    return demo


def mount_ui(app, backend, path: str = "/ui"):
    """`app` (FastAPI) with the sketchpad mounted at `path`."""
    return gr.mount_gradio_app(app, build_ui(backend), path=path, js=SELECT_BRUSH, max_file_size="4mb",
                               footer_links=["api", "settings"])


def ui_app(backend):
    """An ASGI app that is only the sketchpad, at its root (Serve mounts it at the route prefix)."""
    from fastapi import FastAPI
    return mount_ui(FastAPI(docs_url=None, redoc_url=None, openapi_url=None), backend, path="")
