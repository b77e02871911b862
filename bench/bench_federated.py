"""Partition x strategy: how the federated job fares on skewed shards and with a faulty worker.

    python -m bench.bench_federated                      # the full grid at the default job size (long)
    python -m bench.bench_federated --job-args "--subset 600 --epochs 1 --rounds 2" \\
        --partitions iid --strategies fedavg --out /tmp/fed   # a smoke run
    python -m bench.bench_federated --partitions dirichlet:0.1 --strategies fedavg,fedprox:0.01 \
        --rounds 4,16 --no-faults --out bench/results/federated-rounds   # rounds as a third axis

Every cell is one `ray job submit` of training/train.py (3 workers, 2 epochs, batch 100 unless
--job-args says otherwise) on the local Ray cluster, in one precision (--precision, default fp32,
so cells differ only in partition, strategy and rounds). Writes bench/results/federated.{json,md} with
accuracy per round, final accuracy and wall time per cell, federated_rounds.png (accuracy per
round) and federated_shards.png (each partition's class mix per shard), and the CPU it ran on.
"""
import argparse
import json
import sys
from pathlib import Path

from bench.bench_training import RESULTS, machine, ray_job
from ray_cluster import local
from training.data import fetch_mnist, load_mnist, partition_shards
from training.storage import resolve_storage

PARTITIONS = ("iid", "dirichlet:0.5", "dirichlet:0.1", "classes:3")
STRATEGIES = ("fedavg", "fedprox:0.01", "fedadam:0.01", "median", "trimmed-mean:0.34")
FAULTS = (("fedavg", "nan:1"), ("median", "scale:1:100"))  # on iid: the two faulty workers


def cells(partitions, strategies, faults, rounds=(None,)) -> list[dict]:
    """Partition x strategy x rounds (None: the job's default), then the faulty-worker cells."""
    grid = [{"partition": p, "strategy": s, "fault": None, "rounds": r}
            for p in partitions for s in strategies for r in rounds]
    return grid + [{"partition": "iid", "strategy": s, "fault": f, "rounds": None} for s, f in faults]


def run_cell(storage: Path, cell: dict, job_args: list[str], precision: str) -> dict:
    flags = [*job_args, "--precision", precision, "--promote", "never", "--partition", cell["partition"],
             "--strategy", cell["strategy"], *(["--inject-fault", cell["fault"]] if cell["fault"] else []),
             *(["--rounds", str(cell["rounds"])] if cell.get("rounds") else [])]
    try:
        return {**cell, **ray_job(storage, *flags)}
    except RuntimeError as error:  # a cell that fails (fewer than half the workers usable) is a result too
        return {**cell, "error": str(error)[-500:]}


def write_report(results: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "federated.json").write_text(json.dumps(results, indent=2) + "\n")
    lines = ["| partition | strategy | fault | rounds | final accuracy | accuracy per round | wall time (s) |",
             "|---" * 7 + "|"]
    for r in results["cells"]:
        if "error" in r:
            lines.append(f"| {r['partition']} | {r['strategy']} | {r['fault'] or ''} | {r.get('rounds') or ''} "
                         f"| failed | | |")
            continue
        rounds = " ".join(f"{100 * a:.2f}" for a in r["round_accuracy"])
        lines.append(f"| {r['partition']} | {r['strategy']} | {r['fault'] or ''} | {len(r['round_accuracy'])} "
                     f"| {100 * r['test_accuracy']:.2f}% | {rounds} | {r['seconds']:.1f} |")
    lines += ["", f"Job flags: {results['job_args'] or '(defaults)'} --precision {results['precision']}",
              f"Machine: {results['machine']}"]
    (out / "federated.md").write_text("\n".join(lines) + "\n")
    plot_rounds(results["cells"], out / "federated_rounds.png")


def plot_rounds(rows: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    partitions = sorted({r["partition"] for r in rows}, key=lambda p: PARTITIONS.index(p) if p in PARTITIONS else 99)
    figure, axes = plt.subplots(1, len(partitions), figsize=(4.5 * len(partitions), 3.6), squeeze=False)
    for axis, partition in zip(axes[0], partitions):
        for r in rows:
            if r["partition"] == partition and "round_accuracy" in r:
                n = len(r["round_accuracy"])
                label = f"{r['strategy']}, {n} rounds" + (f" ({r['fault']})" if r["fault"] else "")
                axis.plot([(i + 1) / n for i in range(n)], [100 * a for a in r["round_accuracy"]],
                          marker="o", label=label)
        axis.set(title=partition, xlabel="fraction of the training done", ylabel="test accuracy (%)")
        axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def plot_shards(labels, partitions, workers: int, seed: int, path: Path) -> None:
    """Each partition's class mix per shard, as the job draws it (the same seed, the whole training set)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    figure, axes = plt.subplots(1, len(partitions), figsize=(3.6 * len(partitions), 3.2), squeeze=False)
    for axis, partition in zip(axes[0], partitions):
        shards = partition_shards(labels, workers, seed, partition)
        bottom = np.zeros(workers)
        for c in range(10):
            counts = np.array([np.sum(labels[s] == c) for s in shards])
            axis.bar(range(workers), counts, bottom=bottom, label=str(c))
            bottom += counts
        axis.set(title=partition, xlabel="shard (worker)", ylabel="images")
    axes[0][-1].legend(title="class", fontsize=6, ncol=2)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--storage", default=None, help="storage root (default <out>/storage)")
    parser.add_argument("--data-source", default=None, help="local folder with the MNIST files")
    parser.add_argument("--out", type=Path, default=RESULTS, help="where results go (default bench/results)")
    parser.add_argument("--job-args", default="", help="extra arguments for every job (e.g. '--rounds 8')")
    parser.add_argument("--precision", default="fp32", choices=("fp32", "bf16"), help="every cell's precision")
    parser.add_argument("--partitions", default=",".join(PARTITIONS), help="comma-separated --partition values")
    parser.add_argument("--strategies", default=",".join(STRATEGIES), help="comma-separated --strategy values")
    parser.add_argument("--rounds", default="", help="comma-separated --rounds values, each a cell of its own "
                        "(default: the job's own)")
    parser.add_argument("--no-faults", action="store_true", help="skip the two faulty-worker cells")
    args = parser.parse_args(argv)
    storage = resolve_storage(args.storage or args.out / "storage")
    fetch_mnist(storage, args.data_source)
    partitions, strategies = args.partitions.split(","), args.strategies.split(",")
    rounds = [int(r) for r in args.rounds.split(",")] if args.rounds else [None]
    args.out.mkdir(parents=True, exist_ok=True)
    plot_shards(load_mnist(storage, train=True)[1].numpy(), partitions, 3, 0, args.out / "federated_shards.png")
    started_ray = local.up()
    try:
        results = {"machine": machine(), "job_args": args.job_args, "precision": args.precision,
                   "cells": [run_cell(storage, cell, args.job_args.split(), args.precision)
                             for cell in cells(partitions, strategies, () if args.no_faults else FAULTS, rounds)]}
    finally:
        if started_ray:  # leave a cluster someone else started running
            local.down()
    write_report(results, args.out)
    print((args.out / "federated.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
