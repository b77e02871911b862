"""The sketchpad's function through the Serve proxy, with gradio_client (as a program would)."""
import numpy as np
import pytest
from gradio_client import Client, handle_file
from PIL import Image

from bench.drawings import redraw

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def ui_client(serve_app, tmp_path_factory):
    return Client(serve_app.ui_url, verbose=False, download_files=str(tmp_path_factory.mktemp("gradio")))


def sketch(path) -> dict:
    """A Sketchpad value as the page sends it: background, layers and their composite."""
    return {"background": handle_file(path), "layers": [], "composite": handle_file(path)}


def test_the_page_exposes_one_predict_endpoint(ui_client):
    assert list(ui_client.view_api(print_info=False, return_format="dict")["named_endpoints"]) == ["/predict"]


@pytest.mark.parametrize("index", [0, 1, 2])
def test_sketchpad_predicts_a_drawn_digit(ui_client, serve_app, test_digits, tmp_path, index):
    # The Sketchpad's own format (image_mode L): grey, white background, black stroke.
    drawing = redraw(test_digits[0][index], "black_on_white", np.random.default_rng(index))
    path = tmp_path / "drawing.png"
    drawing.save(path)
    label, seen, version = ui_client.predict(sketch(str(path)), api_name="/predict")
    assert label["label"] == str(test_digits[1][index])
    assert abs(sum(c["confidence"] for c in label["confidences"]) - 1) < 0.05  # the top 3 hold nearly all
    assert Image.open(seen).size == (224, 224)  # the 28x28 input, shown 8x
    assert serve_app.model()["model_version"] in version


def test_blank_sketch_says_so(ui_client, tmp_path):
    path = tmp_path / "blank.png"
    Image.new("L", (280, 280), 255).save(path)
    label, seen, message = ui_client.predict(sketch(str(path)), api_name="/predict")
    assert not label and seen is None and "blank" in message.lower()
