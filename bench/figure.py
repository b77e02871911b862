"""Draw docs/preprocessing.png (each preprocessing stage of one drawing) and the page's example
drawings in serving/examples/, from MNIST test digits.

    python -m bench.figure [--storage DIR]
"""
import argparse
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from bench.drawings import redraw
from serving.preprocess import SLANT_LIMIT, preprocess_steps
from training.data import fetch_mnist, load_mnist
from training.model import to_input
from training.storage import resolve_storage

ROOT = Path(__file__).resolve().parents[1]
FIGURE = ROOT / "docs" / "preprocessing.png"
EXAMPLES = ROOT / "serving" / "examples"  # the page's example drawings
EXAMPLE_INDICES = (0, 1, 2, 3)  # MNIST test digits 7, 2, 1, 0
LEAN = 0.6  # the figure's digit leans ~31°, like the most slanted of the drawn set


def lean(digit: np.ndarray, shear: float) -> np.ndarray:
    """The digit slanted like a quick italic hand (top to the right), so that the slant step shows."""
    image = Image.fromarray(digit)
    return np.asarray(image.transform(image.size, Image.Transform.AFFINE, (1, shear, -shear * 14, 0, 1, 0),
                                      Image.Resampling.BILINEAR))


def checkerboard(height: int, width: int, cell: int = 16) -> np.ndarray:
    rows, cols = np.indices((height, width)) // cell
    return np.where((rows + cols) % 2, 200, 245).astype(np.uint8)


def figure(digit: np.ndarray, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    drawing = redraw(lean(digit, LEAN), "alpha_stroke", np.random.default_rng(11))  # what a canvas exports
    steps = preprocess_steps(drawing, keep_full=True)
    alpha = np.asarray(drawing)[..., 3] / 255.0
    shown_input = checkerboard(*alpha.shape) * (1 - alpha)  # black stroke over "transparent"
    tensor = to_input(torch.from_numpy(steps.result[None]))[0, 0]
    row, col = steps.box[:2]  # where the crop starts

    panels = [
        ("1. input: RGBA canvas export\n(stroke only in alpha), slanted", shown_input, "gray", (0, 255)),
        ("2. alpha composited on the\nbackground that contrasts", steps.gray, "gray", (0, 255)),
        ("3. ink: light background\ninverted, contrast stretched", steps.ink, "gray", (0, 1)),
        (f"4. cropped to the ink\n{steps.crop.shape[1]}x{steps.crop.shape[0]} px", steps.crop, "gray", (0, 1)),
        (f"5. slant beyond {SLANT_LIMIT:g}\nsheared off: {steps.upright.shape[1]}x{steps.upright.shape[0]} px",
         steps.upright, "gray", (0, 1)),
        (f"6. longest side 20 px, aspect\nkept, stroke evened: {steps.fitted.shape[1]}x{steps.fitted.shape[0]}",
         steps.fitted, "gray", (0, 1)),
        ("7. 28x28, centre of mass\nat (14, 14), as MNIST", steps.result, "gray", (0, 255)),
        ("8. normalised as in training\n(x/255 - 0.1307) / 0.3081", tensor.numpy(), "viridis", None),
    ]
    fig, axes = plt.subplots(1, len(panels), figsize=(2.6 * len(panels), 3.3))
    for ax, (title, image, cmap, limits) in zip(axes, panels):
        ax.imshow(image, cmap=cmap, vmin=limits[0] if limits else None, vmax=limits[1] if limits else None,
                  interpolation="nearest")
        ax.set_title(title, fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    height, width = steps.crop.shape
    axes[2].add_patch(Rectangle((col - 0.5, row - 0.5), width, height, fill=False, edgecolor="red", linewidth=1))
    weights = steps.result.astype(float)
    rows, cols = np.indices(weights.shape)
    axes[6].plot((cols * weights).sum() / weights.sum(), (rows * weights).sum() / weights.sum(), "r+", markersize=12)
    fig.suptitle("serving/preprocess.py: one function for /predict images, the sketchpad and the tests", fontsize=11)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def examples(images: np.ndarray, folder: Path) -> list[Path]:
    """Black-on-white drawings that fit the page's 280x280 canvas."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index in EXAMPLE_INDICES:
        drawn = redraw(images[index], "black_on_white", np.random.default_rng(index))
        left, top, right, bottom = Image.eval(drawn, lambda v: 255 - v).getbbox()
        margin = (bottom - top) // 6
        drawn = ImageOps.expand(drawn, border=margin, fill=255)  # white, wherever the margin falls
        drawn = drawn.crop((left, top, right + 2 * margin, bottom + 2 * margin))
        canvas = Image.new("L", (280, 280), 255)
        drawn.thumbnail((250, 250))
        canvas.paste(drawn, ((280 - drawn.width) // 2, (280 - drawn.height) // 2))
        path = folder / f"digit-{index}.png"
        canvas.save(path, optimize=True)
        paths.append(path)
    return paths


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--storage", help="storage root holding (or to fetch) MNIST")
    parser.add_argument("--data-source", help="local folder with the MNIST files")
    args = parser.parse_args(argv)
    storage = resolve_storage(args.storage)
    fetch_mnist(storage, args.data_source)
    images = load_mnist(storage, train=False)[0].numpy()
    figure(images[0], FIGURE)
    print(f"wrote {FIGURE}")
    for path in examples(images, EXAMPLES):
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
