"""Model and optimiser sweep for the FedAvg job, simulated in one process (GPU if there is one).

    python -m bench.model_sweep [--storage DIR] [--data-source DIR] [--seeds 3] [--out bench/results]
    GRID='[["d4_24", "adam", 5e-3, 0.1, 4]]' python -m bench.model_sweep    # a grid of your own

Reproduces the job's schedule exactly (3 stratified shards, one seeded start, batch 100, 2 epochs,
one-cycle LR, FedAvg every 1/rounds of the steps) for each candidate, three seeds each, and
prints final test accuracy and multiply-adds per image. It chose the shape of training/model.py's
NetV1 (`d4_24` here), Adam 5e-3 and label smoothing 0.1; results in bench/results/model_sweep.json
(run on an NVIDIA H200: the whole grid takes ~5 minutes there, hours on 2 CPU cores). Net, its
successor with a 5x5 stride-2 first layer (`net`), was chosen later on the real job's speed and
accuracy (README), without a sweep.

A grid row is [model, optimiser ("adam" | "sgd"), learning rate, label smoothing, rounds].
"""
import argparse
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from training.aggregation import FedAvg
from training.data import fetch_mnist, load_mnist, stratified_shards
from training.model import Net, NetV1, to_input
from training.storage import resolve_storage

WORKERS, BATCH, EPOCHS = 3, 100, 2
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def conv_block(channels_in: int, channels_out: int) -> list[nn.Module]:
    return [nn.Conv2d(channels_in, channels_out, 3, padding=1, bias=False), nn.BatchNorm2d(channels_out), nn.ReLU()]


class Deep(nn.Module):
    """Three conv blocks, each followed by 2x2 pooling, then a hidden dense layer."""

    def __init__(self, channels=(32, 64, 128), hidden=128, dropout=0.25):
        super().__init__()
        c1, c2, c3 = channels
        self.features = nn.Sequential(*conv_block(1, c1), nn.MaxPool2d(2), *conv_block(c1, c2), nn.MaxPool2d(2),
                                      *conv_block(c2, c3), nn.MaxPool2d(2))
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(c3 * 9, hidden), nn.ReLU(), nn.Dropout(dropout),
                                  nn.Linear(hidden, 10))

    def forward(self, x):
        return self.head(self.features(x))


class Deep4(nn.Module):
    """Like Deep, with two conv blocks at 14x14 (the shape training/model.py's Net took)."""

    def __init__(self, channels=(32, 64, 128), dropout=0.25):
        super().__init__()
        c1, c2, c3 = channels
        self.features = nn.Sequential(*conv_block(1, c1), nn.MaxPool2d(2), *conv_block(c1, c2), *conv_block(c2, c2),
                                      nn.MaxPool2d(2), *conv_block(c2, c3), nn.MaxPool2d(2))
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(c3 * 9, 128), nn.ReLU(), nn.Dropout(dropout),
                                  nn.Linear(128, 10))

    def forward(self, x):
        return self.head(self.features(x))


class GlobalPool(nn.Module):
    """A global-average-pool head instead of dense layers."""

    def __init__(self, channels=(32, 64, 128)):
        super().__init__()
        c1, c2, c3 = channels
        self.features = nn.Sequential(*conv_block(1, c1), nn.MaxPool2d(2), *conv_block(c1, c2), nn.MaxPool2d(2),
                                      *conv_block(c2, c3))
        self.head = nn.Linear(c3, 10)

    def forward(self, x):
        return self.head(self.features(x).mean((2, 3)))


MODELS = {
    "d4_16": lambda: Deep4(channels=(16, 48, 96), dropout=0.0),
    "d4_24": lambda: Deep4(channels=(24, 48, 96), dropout=0.0),
    "d4_nodrop": lambda: Deep4(dropout=0.0),
    "deep_nodrop_fc256": lambda: Deep(dropout=0.0, hidden=256),
    "net": Net,
    "net_v1": NetV1,
    "deep": Deep,
    "deep_nodrop": lambda: Deep(dropout=0.0),
    "deep_wide": lambda: Deep(channels=(32, 64, 192), hidden=256),
    "deep4": Deep4,
    "gap": GlobalPool,
    "deep_c48": lambda: Deep(channels=(32, 48, 96)),
}


def default_grid() -> list[tuple]:
    grid = []
    for model in MODELS:
        grid += [(model, "adam", 3e-3, 0.0, 4), (model, "adam", 3e-3, 0.1, 4), (model, "sgd", 0.1, 0.1, 4)]
    return grid + [("deep", "adam", 5e-3, 0.1, 4), ("deep", "adam", 3e-3, 0.1, 8), ("deep", "sgd", 0.2, 0.1, 4),
                   ("deep", "sgd", 0.05, 0.0, 4), ("deep4", "adam", 5e-3, 0.1, 4), ("gap", "adam", 1e-2, 0.1, 4),
                   ("net", "sgd", 0.1, 0.0, 4), ("deep_wide", "adam", 3e-3, 0.1, 8)]


@dataclass
class Mnist:
    """MNIST on the device: network inputs, labels, and the training indices of each worker's shard."""
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    shards: list[torch.Tensor]

    @classmethod
    def load(cls, storage: Path, data_source: str | None) -> "Mnist":
        fetch_mnist(storage, data_source)
        (images, labels), (test_images, test_labels) = load_mnist(storage, train=True), load_mnist(storage, train=False)
        shards = stratified_shards(labels.numpy(), WORKERS, 0)
        return cls(to_input(images).to(DEVICE), labels.to(DEVICE), to_input(test_images).to(DEVICE),
                   test_labels.to(DEVICE), [torch.from_numpy(shard).to(DEVICE) for shard in shards])


def multiply_adds(model: nn.Module) -> int:
    """Multiply-adds of one image's forward pass, counted over the conv and dense layers."""
    total = 0

    def count(layer, _inputs, output):
        nonlocal total
        if isinstance(layer, nn.Conv2d):
            total += output.numel() * layer.in_channels * layer.kernel_size[0] * layer.kernel_size[1]
        elif isinstance(layer, nn.Linear):
            total += layer.in_features * layer.out_features

    hooks = [layer.register_forward_hook(count) for layer in model.modules() if isinstance(layer, (nn.Conv2d, nn.Linear))]
    model(torch.zeros(1, 1, 28, 28, device=DEVICE))
    for hook in hooks:
        hook.remove()
    return total


def make_optimiser(name: str, model: nn.Module, lr: float) -> torch.optim.Optimizer:
    if name == "adam":
        return torch.optim.Adam(model.parameters(), lr=lr)
    return torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=5e-4)


def simulate_job(data: Mnist, model_name: str, optimiser: str, lr: float, label_smoothing: float, rounds: int,
                 seed: int) -> list[float]:
    """Train WORKERS copies from one seeded start, FedAvg after each round; test accuracy per round."""
    torch.manual_seed(seed)
    start = MODELS[model_name]().to(DEVICE).state_dict()
    workers = []
    for rank, shard in enumerate(data.shards):
        model = MODELS[model_name]().to(DEVICE)
        model.load_state_dict(start)
        optim = make_optimiser(optimiser, model, lr)
        schedule = torch.optim.lr_scheduler.OneCycleLR(optim, max_lr=lr, total_steps=EPOCHS * len(shard) // BATCH)
        generator = torch.Generator(device="cpu").manual_seed(seed * 1000 + rank)
        order = torch.cat([torch.randperm(len(shard), generator=generator) for _ in range(EPOCHS)]).to(DEVICE)
        workers.append((model, optim, schedule, shard[order].split(BATCH)))

    steps = len(workers[0][3])
    accuracies = []
    for round_index in range(rounds):
        first, last = steps * round_index // rounds, steps * (round_index + 1) // rounds
        states = []
        for model, optim, schedule, batches in workers:
            model.train()
            for batch in batches[first:last]:
                optim.zero_grad()
                F.cross_entropy(model(data.train_x[batch]), data.train_y[batch],
                                label_smoothing=label_smoothing).backward()
                optim.step()
                schedule.step()
            states.append((model.state_dict(), len(data.shards[0])))
        average = FedAvg().aggregate(states)
        for model, *_ in workers:
            model.load_state_dict(average)
        model = workers[0][0].eval()
        with torch.no_grad():
            accuracies.append((model(data.test_x).argmax(1) == data.test_y).float().mean().item())
    return accuracies


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--storage", help="storage root holding (or receiving) MNIST")
    parser.add_argument("--data-source", help="a folder with MNIST's IDX files")
    parser.add_argument("--seeds", type=int, default=3, help="seeds per candidate (default 3)")
    parser.add_argument("--out", default=os.environ.get("OUT", "bench/results"), help="where model_sweep.json goes")
    args = parser.parse_args(argv)

    data = Mnist.load(resolve_storage(args.storage), args.data_source)
    grid = [tuple(row) for row in json.loads(os.environ["GRID"])] if os.environ.get("GRID") else default_grid()
    results, started = [], time.time()
    for candidate in grid:
        finals = [simulate_job(data, *candidate, seed=seed)[-1] for seed in range(args.seeds)]
        row = {"cfg": candidate, "macs": multiply_adds(MODELS[candidate[0]]().to(DEVICE)), "acc": finals,
               "mean": sum(finals) / len(finals)}
        results.append(row)
        print(json.dumps(row), f"{time.time() - started:.0f}s", flush=True)
        Path(args.out, "model_sweep.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
