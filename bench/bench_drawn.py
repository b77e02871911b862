"""Drawn-digits benchmark: today's model (no augmentation) beside the augmented one, in one run.

    python -m bench.bench_drawn [--storage DIR] [--data-source DIR]
    python -m bench.bench_drawn --versions BEFORE AFTER      (evaluate two published models, no Ray)

1. trains both models with `ray job submit ... training/train.py` at the defaults (3 workers,
   2 epochs), `--no-augment` first, then with augmentation (the default), and times each job
2. evaluates each on MNIST's test set and on bench/drawn_digits.py's set of "people's drawings"
   (MNIST *test* digits redrawn with strong distortions, and digits rendered from the fonts on
   this machine, all through serving/preprocess.py), per class and per source
3. measures what augmentation costs per training step, beside the step itself, without Ray
4. compares preprocessing variants (stroke-width normalisation, slant limit, full deslant) on the drawn set

Writes bench/results/drawn.{json,md} and drawn_confusion.png.
"""
import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

from bench.machine import cpu_info
from training.data import fetch_mnist, load_mnist
from training.model import Net, network_for, to_input
from training.storage import metadata_path, model_path, models_dir, resolve_storage

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"


def train_pair(storage: Path, job_args: list[str]) -> dict:
    """Both jobs, one after the other on the same cluster: before (--no-augment) and after."""
    from bench.bench_training import ray_job
    from ray_cluster import local

    started_ray = local.up()
    try:
        before = ray_job(storage, *job_args, "--no-augment")
        after = ray_job(storage, *job_args)
    finally:
        if started_ray:
            local.down()
    return {"before": before, "after": after}


def newest_versions(storage: Path, count: int = 2) -> list[str]:
    folders = sorted((p for p in models_dir(storage).iterdir() if p.is_dir() and not p.name.startswith(".")),
                     key=lambda p: p.stat().st_mtime)
    return [p.name for p in folders[-count:]]


def load_model(storage: Path, version: str) -> tuple[torch.nn.Module, dict]:
    metadata = json.loads(metadata_path(storage, version).read_text())
    model = network_for(torch.load(model_path(storage, version), weights_only=True), metadata.get("architecture"))
    return model.eval(), metadata


@torch.inference_mode()
def predict(model: Net, images: torch.Tensor, batch_size: int = 500) -> np.ndarray:
    return torch.cat([model(to_input(images[i:i + batch_size])).argmax(1)
                      for i in range(0, len(images), batch_size)]).numpy()


def confusion(labels: np.ndarray, predicted: np.ndarray) -> np.ndarray:
    return np.bincount(labels * 10 + predicted, minlength=100).reshape(10, 10)


def scores(labels: np.ndarray, predicted: np.ndarray) -> dict:
    matrix = confusion(labels, predicted)
    per_class = matrix.diagonal() / np.maximum(matrix.sum(1), 1)
    return {"accuracy": float((labels == predicted).mean()), "n": int(len(labels)),
            "per_class": [round(float(a), 4) for a in per_class], "confusion": matrix.tolist()}


# ---------------------------------------------------------------- evaluation

def evaluate_all(storage: Path, runs: dict, per_class: int = 100) -> dict:
    from bench.drawn_digits import build_drawn_set

    torch.set_num_threads(os.cpu_count() or 1)
    test_images, test_labels = load_mnist(storage, train=False)
    drawn = build_drawn_set(test_images.numpy(), test_labels.numpy(), per_class=per_class)
    models = {name: load_model(storage, run["version"]) for name, run in runs.items()}
    results = {"machine": machine(), "runs": runs, "drawn_set": {
        "n": int(len(drawn.labels)), "per_source": {str(s): int((drawn.sources == s).sum()) for s in sorted(set(drawn.sources))}}}
    for name, (model, metadata) in models.items():
        test_pred, drawn_pred = predict(model, test_images), predict(model, torch.from_numpy(drawn.images))
        results[name] = {
            "version": runs[name]["version"], "augmentation": metadata.get("augmentation"),
            "mnist_test": scores(test_labels.numpy(), test_pred),
            "drawn": scores(drawn.labels, drawn_pred),
            "drawn_by_source": {s: scores(drawn.labels[drawn.sources == s], drawn_pred[drawn.sources == s])["accuracy"]
                                for s in sorted(set(drawn.sources))},
            "drawn_by_kind": {f"{s}/{k}": float((drawn_pred == drawn.labels)[(drawn.sources == s) & (drawn.kinds == k)].mean())
                              for s, k in sorted(set(zip(drawn.sources, drawn.kinds)))}}
    results["preprocessing"] = preprocessing_variants(models, test_images.numpy(), test_labels.numpy(), per_class)
    results["step_cost"] = augmentation_cost(storage)
    return results


# ---------------------------------------------------------------- preprocessing variants

def reader(stroke: bool = True, slant_limit: float | None = None):
    """serving/preprocess.py's steps (the defaults: exactly `preprocess`), with or without its
    stroke-width normalisation, and its slant limit (None: as served; inf: none; 0: full deslant)."""
    from serving.preprocess import (BBOX_INK, BOX, SLANT_LIMIT, centre_by_mass, even_stroke, fit_box, ink_box,
                                    ink_levels, limit_slant, stretch, to_gray)

    limit = SLANT_LIMIT if slant_limit is None else slant_limit

    def read(image: np.ndarray) -> np.ndarray:
        ink, background, peak = ink_levels(to_gray(image))
        top, left, bottom, right = ink_box(ink, background + BBOX_INK * (peak - background))
        crop = stretch(ink[top:bottom, left:right], background, peak)
        fitted = fit_box(crop if limit == float("inf") else limit_slant(crop, limit), BOX)
        return centre_by_mass(even_stroke(fitted) if stroke else fitted)
    return read


def preprocessing_variants(models: dict, test_images: np.ndarray, test_labels: np.ndarray, per_class: int) -> dict:
    """Accuracy of each model on the drawn set and on MNIST test, both read through each variant."""
    from bench.drawn_digits import build_drawn_set

    variants = {"MNIST's steps only (no stroke normalisation, no slant limit)": reader(stroke=False, slant_limit=float("inf")),
                "+ stroke normalisation (served before)": reader(slant_limit=float("inf")),
                "as served: + slant limited to ~11° (0.2)": reader(),
                "+ full deslant instead": reader(slant_limit=0.0)}
    canvases = build_drawn_set(test_images, test_labels, per_class=per_class, read=lambda canvas: canvas)
    out = {}
    for name, read in variants.items():
        drawn = torch.from_numpy(np.stack([read(canvas) for canvas in canvases.images]))
        mnist = torch.from_numpy(np.stack([read(image) for image in test_images]))
        out[name] = {model_name: {"drawn": float((predict(model, drawn) == canvases.labels).mean()),
                                  "mnist_test": float((predict(model, mnist) == test_labels).mean())}
                     for model_name, (model, _) in models.items()}
        print(f"preprocessing {name}: {out[name]}", flush=True)
    return out


# ---------------------------------------------------------------- cost per step

def augmentation_cost(storage: Path, steps: int = 60, batch: int = 100, precision: str = "fp32") -> dict:
    """One worker's training step (1 thread, `precision`: fp32 is what --precision auto keeps unless
    bf16 measures faster) beside augmenting its batch,
    interleaved so that both see the same load on the machine. No Ray."""
    from training.augment import augment_batch
    from training.worker import train_step

    torch.set_num_threads(1)
    images, labels = load_mnist(storage, train=True)
    model = Net()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    progress = {"loss_sum": 0.0, "correct": 0, "seen": 0}
    step_s, augment_s = [], []
    for i in range(steps + 5):
        x, y = images[i * batch:(i + 1) * batch], labels[i * batch:(i + 1) * batch]
        started = time.perf_counter()
        augmented = augment_batch(x, seed=i)
        middle = time.perf_counter()
        train_step(model, optimizer, schedule, augmented, y, progress, precision)
        if i >= 5:  # warm-up steps left out
            augment_s.append(middle - started)
            step_s.append(time.perf_counter() - middle)
    augment_ms, step_ms = 1000 * float(np.median(augment_s)), 1000 * float(np.median(step_s))
    torch.set_num_threads(os.cpu_count() or 1)
    return {"batch": batch, "precision": precision, "augment_ms": augment_ms, "step_ms": step_ms,
            "ratio": augment_ms / step_ms, "steps": steps}


def machine() -> str:
    return f"{cpu_info()[0]}, {os.cpu_count()} cores, torch {torch.__version__}"


def write_report(results: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "drawn.json").write_text(json.dumps(results, indent=2) + "\n")
    before, after = results["before"], results["after"]
    sources = ", ".join(f"{n} {s}" for s, n in results["drawn_set"]["per_source"].items())
    lines = [f"Drawn set: {results['drawn_set']['n']} images ({sources}), read by serving/preprocess.py; "
             f"models {before['version']} (no augmentation) and {after['version']} (augmented)\n",
             "| | MNIST test | drawn set | " + " | ".join(f"drawn {s}" for s in before["drawn_by_source"]) + " |",
             "|---|---|---|" + "---|" * len(before["drawn_by_source"])]
    for label, r in (("before: --no-augment", before), ("after: augmented", after)):
        lines.append(f"| {label} | {pct(r['mnist_test']['accuracy'])} | {pct(r['drawn']['accuracy'])} | "
                     + " | ".join(pct(a) for a in r["drawn_by_source"].values()) + " |")
    lines += ["", "Per class (drawn set / MNIST test):", "",
              "| class | " + " | ".join(str(c) for c in range(10)) + " |", "|---|" + "---|" * 10]
    for label, r in (("before", before), ("after", after)):
        lines.append(f"| {label} drawn | " + " | ".join(pct(a, 0) for a in r["drawn"]["per_class"]) + " |")
    for label, r in (("before", before), ("after", after)):
        lines.append(f"| {label} MNIST | " + " | ".join(pct(a, 1) for a in r["mnist_test"]["per_class"]) + " |")
    lines += ["", "Per distortion (drawn set):", "", "| source/kind | before | after |", "|---|---|---|"]
    lines += [f"| {k} | {pct(before['drawn_by_kind'][k])} | {pct(after['drawn_by_kind'][k])} |" for k in before["drawn_by_kind"]]
    lines += ["", "Preprocessing variants (accuracy, drawn set / MNIST test through the variant):", "",
              "| variant | before drawn | before MNIST | after drawn | after MNIST |", "|---|---|---|---|---|"]
    for variant, r in results["preprocessing"].items():
        lines.append(f"| {variant} | {pct(r['before']['drawn'])} | {pct(r['before']['mnist_test'])} "
                     f"| {pct(r['after']['drawn'])} | {pct(r['after']['mnist_test'])} |")
    cost = results["step_cost"]
    lines += ["", f"Augmentation cost per training step (batch {cost['batch']}, 1 thread, {cost['precision']}): "
              f"{cost['augment_ms']:.2f} ms beside a {cost['step_ms']:.1f} ms step = {100 * cost['ratio']:.1f}%"]
    runs = results["runs"]
    if "seconds" in runs["before"]:
        lines.append(f"Job wall time (ray job submit, defaults): before {runs['before']['seconds']:.1f} s, "
                     f"after {runs['after']['seconds']:.1f} s ({100 * (runs['after']['seconds'] / runs['before']['seconds'] - 1):+.1f}%)")
    lines.append(f"\nMachine: {results['machine']}")
    (out / "drawn.md").write_text("\n".join(lines) + "\n")
    plot(results, out)


def pct(value: float, digits: int = 2) -> str:
    return f"{100 * value:.{digits}f}%"


def plot(results: dict, out: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8), gridspec_kw={"width_ratios": [1.3, 1, 1]})
    classes = np.arange(10)
    for offset, (name, colour) in zip((-0.2, 0.2), (("before", "tab:gray"), ("after", "tab:blue"))):
        r = results[name]
        axes[0].bar(classes + offset, [100 * a for a in r["drawn"]["per_class"]], 0.4, color=colour,
                    label=f"{name}: drawn {pct(r['drawn']['accuracy'], 1)}, MNIST test {pct(r['mnist_test']['accuracy'])}")
    axes[0].set(xticks=classes, xlabel="class", ylabel="accuracy on the drawn set (%)", ylim=(80, 100),
                title="Per class, drawn set")
    axes[0].legend(loc="lower left", fontsize=8)
    for ax, name in zip(axes[1:], ("before", "after")):
        matrix = np.array(results[name]["drawn"]["confusion"], dtype=float)
        share = matrix / np.maximum(matrix.sum(1, keepdims=True), 1)
        ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
        for i in range(10):
            for j in range(10):
                if matrix[i, j]:
                    ax.text(j, i, int(matrix[i, j]), ha="center", va="center", fontsize=7,
                            color="white" if share[i, j] > 0.5 else "black")
        ax.set(xticks=classes, yticks=classes, xlabel="predicted", ylabel="true",
               title=f"{name} ({'augmented' if results[name]['augmentation'] else 'no augmentation'}): drawn set")
    fig.tight_layout()
    fig.savefig(out / "drawn_confusion.png", dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--storage", help="storage root (default: bench/results/storage)")
    parser.add_argument("--data-source", help="local folder with the MNIST files")
    parser.add_argument("--versions", nargs=2, metavar=("BEFORE", "AFTER"),
                        help="evaluate these published models instead of training two")
    parser.add_argument("--job-args", default="", help="extra arguments for both Ray jobs (e.g. '--subset 3000')")
    parser.add_argument("--train-only", action="store_true", help="train the two models, record them, stop")
    parser.add_argument("--out", type=Path, default=RESULTS, help="where results go (default bench/results)")
    args = parser.parse_args(argv)
    storage = resolve_storage(args.storage or args.out / "storage")
    fetch_mnist(storage, args.data_source)
    runs_file = args.out / "drawn_runs.json"
    if args.versions:
        runs = {"before": {"version": args.versions[0]}, "after": {"version": args.versions[1]}}
        recorded = json.loads(runs_file.read_text()) if runs_file.is_file() else {}
        if [recorded.get(k, {}).get("version") for k in ("before", "after")] == args.versions:
            runs = recorded  # the jobs that trained them, with their times
    else:
        runs = train_pair(storage, args.job_args.split())
        runs["before"]["version"], runs["after"]["version"] = newest_versions(storage)
        args.out.mkdir(parents=True, exist_ok=True)
        runs_file.write_text(json.dumps(runs, indent=2) + "\n")
    if args.train_only:
        print(json.dumps(runs, indent=2))
        return 0
    results = evaluate_all(storage, runs)
    write_report(results, args.out)
    print((args.out / "drawn.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
