"""The floor under every training job: what Ray costs a job that trains nothing.

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \\
        python bench/train_floor.py --storage DIR [--workers 3]

The default job's Ray Train run without its training: the driver connects and sizes its workers
the way training/train.py does, runs the same TorchTrainer (training/train.py's torch_trainer:
Ray Train's controller and helper actors, --workers worker processes, their gloo process group)
on a train_loop that returns at once, and leaves the way the job does. No training code can save
what this costs, from `ray job submit` to its return; `python -m bench.bench_training --floor`
sets it beside the `Net` plain anchor.
"""
import argparse
import sys
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root, wherever Ray put it

from training.train import (connect_ray, exit_without_teardown, free_cpus_per_node, positive_int,  # noqa: E402
                            size_workers, torch_trainer, writable_storage)

FLOOR_DIR = "train-floor"  # Ray Train's run state, under the storage root


def train_nothing(config: dict) -> None:
    """A Ray Train worker that returns at once: the run costs only Ray Train's start and end."""


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--storage", required=True, help="storage root (Ray Train's run state goes under it)")
    parser.add_argument("--workers", type=positive_int, default=3, help="Ray Train workers (default 3, as the job)")
    args = parser.parse_args(argv)
    import ray
    from ray.train import RunConfig

    storage = writable_storage(Path(args.storage).resolve())
    connect_ray(ray)
    worker_cpus, _ = size_workers(free_cpus_per_node(ray), args.workers)
    run_config = RunConfig(name=f"floor-{uuid.uuid4().hex[:8]}", storage_path=str(storage / FLOOR_DIR))
    started = time.perf_counter()
    torch_trainer(train_nothing, {}, args.workers, worker_cpus, run_config).fit()
    print(f"Ray Train ran {args.workers} workers x {worker_cpus:.2f} CPU that trained nothing: "
          f"fit() took {time.perf_counter() - started:.1f} s", flush=True)
    return 0


if __name__ == "__main__":
    exit_without_teardown(main())
