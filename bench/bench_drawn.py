"""Drawn-digits benchmark: today's model (no augmentation) beside the augmented one, in one run.

    /work/bin/raylock python -m bench.bench_drawn [--storage DIR] [--data-source DIR]
    python -m bench.bench_drawn --versions BEFORE AFTER      (evaluate two published models, no Ray)

1. trains both models with `ray job submit ... training/train.py` at the defaults (3 workers,
   2 epochs), `--no-augment` first, then with augmentation (the default), and times each job
2. evaluates each on MNIST's test set and on bench/drawn_digits.py's set of "people's drawings"
   (MNIST *test* digits redrawn with strong distortions, and digits rendered from the fonts on
   this machine, all through serving/preprocess.py), per class and per source
3. measures what augmentation costs per training step, beside the step itself, without Ray
4. compares preprocessing variants (stroke-width normalisation, deslanting) on the drawn set

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

from training.data import fetch_mnist, load_mnist
from training.model import Net, to_input
from training.storage import models_dir, resolve_storage

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


def load_model(storage: Path, version: str) -> tuple[Net, dict]:
    folder = models_dir(storage) / version
    model = Net()
    model.load_state_dict(torch.load(folder / "model.pt", weights_only=True))
    return model.eval(), json.loads((folder / "metadata.json").read_text())


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
