"""A/B of augmentation settings without Ray: the project's Net trained in one process per setting.

    python -m bench.augment_ab --runs none:0 default:0 default,elastic=1.5:0 [--threads 1] [--cache DIR]
    python -m bench.augment_ab --report          (bench/results/drawn_ab.{json,md} from every cached run)

A run is SETTINGS:SEED. SETTINGS is `none` (no augmentation) or `default` (training/augment.py's
DEFAULT), optionally followed by `,field=value` overrides of AugmentSettings. Each run trains the
job's model, optimiser, one-cycle schedule and loss (training/train.py's train_step) for 2 epochs of
batch 100 on all 60,000 digits, fp32, as one worker would (the Ray job averages 3 such workers, so
absolute accuracies differ a little from bench_drawn's), augmenting each batch with
`training_batch(..., rank=0, step)`. It times augmentation and the step separately, step by step,
so both see the same load, then evaluates on MNIST test and bench/drawn_digits.py's drawn set, per
class. Runs are cached (model + results) so that two can run side by side in two processes.
"""
import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

from bench.bench_drawn import machine, predict, scores
from training.augment import DEFAULT, AugmentSettings, training_batch
from training.data import fetch_mnist, load_mnist
from training.model import Net

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
SHARED_MNIST = ROOT.parent / "shared" / "data" / "mnist"


def parse_settings(text: str) -> dict | None:
    """`none`, `default`, or `default,elastic=1.5,shear=20` -> AugmentSettings as a dict (None: off)."""
    base, *overrides = text.split(",")
    if base == "none" and not overrides:
        return None
    if base != "default":
        raise ValueError(f"settings start with `none` or `default`, not {base!r}")
    fields = {f.name: f.type for f in dataclasses.fields(AugmentSettings)}
    changes = {}
    for item in overrides:
        name, _, value = item.partition("=")
        if name not in fields:
            raise ValueError(f"unknown setting {name!r}; one of {sorted(fields)}")
        changes[name] = float(value)
    return dataclasses.replace(DEFAULT, **changes).to_metadata()


def train_one(images: torch.Tensor, labels: torch.Tensor, settings: dict | None, seed: int,
              epochs: int = 2, batch_size: int = 100, lr: float = 5e-3) -> tuple[Net, dict]:
    from training.worker import new_progress, train_step

    torch.manual_seed(seed)
    model = Net()
    steps = epochs * -(-len(labels) // batch_size)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps)
    generator = torch.Generator().manual_seed(seed)
    augment_s, step_s, step = [], [], 0
    started = time.perf_counter()
    model.train()
    for _ in range(epochs):
        for index in torch.randperm(len(labels), generator=generator).split(batch_size):
            t0 = time.perf_counter()
            batch = training_batch(images[index], settings, seed, 0, step)
            t1 = time.perf_counter()
            train_step(model, optimizer, schedule, batch, labels[index], new_progress(), "fp32")
            augment_s.append(t1 - t0)
            step_s.append(time.perf_counter() - t1)
            step += 1
    return model.eval(), {"seconds": time.perf_counter() - started, "steps": step,
                          "augment_ms": 1000 * float(np.median(augment_s)), "step_ms": 1000 * float(np.median(step_s))}


def drawn_set(storage: Path, cache: Path):
    """bench/drawn_digits.py's set (as served), built once per cache folder."""
    from bench.drawn_digits import build_drawn_set

    path = cache / "drawn_set.npz"
    if not path.is_file():
        images, labels = load_mnist(storage, train=False)
        built = build_drawn_set(images.numpy(), labels.numpy())
        partial = path.with_name(f".{path.stem}.{os.getpid()}.npz")  # two runs may build it at once
        np.savez_compressed(partial, **dataclasses.asdict(built))
        partial.replace(path)
    return dict(np.load(path))


def evaluate(model: Net, test: tuple, drawn: dict) -> dict:
    test_pred = predict(model, test[0])
    drawn_pred = predict(model, torch.from_numpy(drawn["images"]))
    right = drawn_pred == drawn["labels"]
    keys = sorted(set(zip(drawn["sources"], drawn["kinds"])))
    return {"mnist_test": scores(test[1].numpy(), test_pred), "drawn": scores(drawn["labels"], drawn_pred),
            "drawn_by_kind": {f"{s}/{k}": float(right[(drawn["sources"] == s) & (drawn["kinds"] == k)].mean()) for s, k in keys},
            "drawn_wrong": np.flatnonzero(~right).tolist(), "drawn_predicted": drawn_pred.tolist()}


def run(spec: str, storage: Path, cache: Path, threads: int) -> dict:
    settings_text, _, seed = spec.rpartition(":")
    settings = parse_settings(settings_text)
    torch.set_num_threads(threads)
    images, labels = load_mnist(storage, train=True)
    model, timing = train_one(images, labels, settings, int(seed))
    result = {"spec": spec, "settings": settings, "seed": int(seed), "threads": threads, "machine": machine(), **timing,
              **evaluate(model, load_mnist(storage, train=False), drawn_set(storage, cache))}
    name = spec.replace(",", "+").replace(":", "-s").replace("=", "")
    torch.save(model.state_dict(), cache / f"{name}.pt")
    (cache / f"{name}.json").write_text(json.dumps(result) + "\n")
    print(f"{spec}: MNIST {result['mnist_test']['accuracy']:.4f}, drawn {result['drawn']['accuracy']:.4f}, "
          f"augment {timing['augment_ms']:.2f} ms / step {timing['step_ms']:.1f} ms", flush=True)
    return result


def reevaluate(storage: Path, cache: Path) -> None:
    """Rebuild the drawn set with today's preprocessing and evaluate every cached model on it again."""
    (cache / "drawn_set.npz").unlink(missing_ok=True)
    drawn, test = drawn_set(storage, cache), load_mnist(storage, train=False)
    for path in sorted(cache.glob("*.json")):
        result = json.loads(path.read_text())
        model = Net()
        model.load_state_dict(torch.load(path.with_suffix(".pt"), weights_only=True))
        result.update(evaluate(model.eval(), test, drawn))
        path.write_text(json.dumps(result) + "\n")


def report(cache: Path, out: Path) -> None:
    runs = [json.loads(p.read_text()) for p in sorted(cache.glob("*.json"))]
    n = len(runs[0]["drawn"]["confusion"]) and int(np.sum(runs[0]["drawn"]["confusion"]))
    lines = [f"One-process A/B (bench/augment_ab.py): Net, 2 epochs, batch 100, fp32, {runs[0]['threads']} thread(s); "
             f"drawn set {n} images. {runs[0]['machine']}, shared with other work.", "",
             "| settings:seed | MNIST test | drawn | " + " | ".join(f"drawn {c}" for c in range(10))
             + " | augment ms/step | step ms |", "|---|---|---|" + "---|" * 12]
    for r in runs:
        lines.append(f"| {r['spec']} | {100 * r['mnist_test']['accuracy']:.2f}% | {100 * r['drawn']['accuracy']:.2f}% | "
                     + " | ".join(f"{100 * a:.0f}" for a in r["drawn"]["per_class"])
                     + f" | {r['augment_ms']:.2f} | {r['step_ms']:.1f} |")
    out.mkdir(parents=True, exist_ok=True)
    slim = [{k: v for k, v in r.items() if k not in ("drawn_predicted",)} for r in runs]
    (out / "drawn_ab.json").write_text(json.dumps(slim, indent=1) + "\n")
    (out / "drawn_ab.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", nargs="*", default=[], help="SETTINGS:SEED, e.g. none:0 default,elastic=1.5:0")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run (default 1, as a job's worker)")
    parser.add_argument("--cache", type=Path, default=RESULTS / "storage" / "augment_ab", help="models and results of runs")
    parser.add_argument("--report", action="store_true", help="write bench/results/drawn_ab.{json,md} from the cache")
    parser.add_argument("--reevaluate", action="store_true",
                        help="rebuild the drawn set (after a preprocessing change) and evaluate every cached model again")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    for spec in args.runs:  # fail before any training on a bad spec
        parse_settings(spec.rpartition(":")[0])
    storage = args.cache.parent
    args.cache.mkdir(parents=True, exist_ok=True)
    fetch_mnist(storage, str(SHARED_MNIST) if SHARED_MNIST.is_dir() else None)
    drawn_set(storage, args.cache)
    if args.reevaluate:
        reevaluate(storage, args.cache)
    for spec in args.runs:
        run(spec, storage, args.cache, args.threads)
    if args.report:
        report(args.cache, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
