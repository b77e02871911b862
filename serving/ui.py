"""The Gradio page: draw a digit, see what the model reads and what it saw.

Mounted on the API's FastAPI app at /ui inside the Serve ingress replica (see NOTES: Serve's own
Gradio integration is broken with Gradio 6). It calls the same backend and the same
preprocessing as POST /predict.
"""
import os
import tempfile
from pathlib import Path

import numpy as np

from serving.preprocess import BadImage, preprocess

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no network here, and no tracking anyway
os.environ.setdefault("GRADIO_TEMP_DIR", str(Path(tempfile.gettempdir()) / "mnist-gradio"))

import gradio as gr  # noqa: E402  (after the environment above)

EXAMPLES = Path(__file__).resolve().parent / "examples"
CANVAS = (280, 280)   # ten canvas pixels per MNIST pixel
BRUSH_RADIUS = 12     # a 24 px stroke: about 2.4 px after scaling to MNIST's 20 px box, like MNIST
ZOOM = 8              # the 28x28 input is shown at 224x224, pixels kept square


def blank_outputs(message: str):
    return None, None, message


def make_recognise(backend):
    async def recognise(sketch):
        """Sketchpad value -> top probabilities, the 28x28 image the model saw, the model version."""
        composite = sketch.get("composite") if isinstance(sketch, dict) else sketch
        if composite is None:
            return blank_outputs("Draw a digit, then press Recognise.")
        try:
            seen = preprocess(composite)
        except BadImage as error:
            return blank_outputs(f"{error}".capitalize() + ".")
        try:
            probs, version = await backend.infer(seen[None])
        except Exception as error:  # e.g. no model published yet: say so on the page
            return blank_outputs(str(error))
        label = {str(digit): float(p) for digit, p in enumerate(probs[0])}
        big = np.kron(seen, np.ones((ZOOM, ZOOM), dtype=np.uint8))
        return label, big, f"Model version **{version}**"
    return recognise


def make_version_text(backend):
    async def version_text():
        status = await backend.status()
        if not status["ready"]:
            return status["message"]
        accuracy = (status["metadata"] or {}).get("test_accuracy")
        extra = f" (test accuracy {accuracy:.2%})" if isinstance(accuracy, (int, float)) else ""
        return f"Model version **{status['model_version']}**{extra}"
    return version_text


def build_ui(backend) -> gr.Blocks:
    recognise = make_recognise(backend)
    with gr.Blocks(title="MNIST digit recogniser") as demo:
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
                                height=224, width=224)
                version = gr.Markdown(elem_id="version")
        examples = sorted(str(p) for p in EXAMPLES.glob("*.png"))
        if examples:
            gr.Examples(examples, inputs=pad, label="Examples")
        clear.add([pad, label, seen])
        submit.click(recognise, pad, [label, seen, version], api_name="predict", concurrency_limit=None)
        pad.change(recognise, pad, [label, seen, version], api_name=False, concurrency_limit=None,
                   trigger_mode="always_last", show_progress="hidden")
        demo.load(make_version_text(backend), None, version, api_name=False)
    return demo


def mount_ui(app, backend, path: str = "/ui"):
    """`app` (FastAPI) with the sketchpad mounted at `path`."""
    return gr.mount_gradio_app(app, build_ui(backend), path=path)


def ui_app(backend):
    """An ASGI app that is only the sketchpad, at its root (Serve mounts it at the route prefix)."""
    from fastapi import FastAPI
    return mount_ui(FastAPI(docs_url=None, redoc_url=None, openapi_url=None), backend, path="")
