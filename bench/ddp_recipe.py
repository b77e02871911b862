"""Ray Train's own recipe for the same training: the peer of this project's federated job.

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \\
        python bench/ddp_recipe.py --storage DIR [--workers 3] [--epochs 2] [--precision fp32|bf16]

The Ray Train way, as its PyTorch guide writes it: a TorchTrainer (training/train.py's
torch_trainer, with the job's worker count and CPU share from its size_workers), `Net` wrapped by
`ray.train.torch.prepare_model` (DistributedDataParallel over gloo: the gradients all-reduced at
every step) and a DataLoader over the 60,000 training images given a DistributedSampler by
`prepare_data_loader` (each worker 1/n of them per epoch, reshuffled every epoch). Each worker
trains as the job's workers do: the same initial weights, batch size per worker, Adam under the
one-cycle schedule, label smoothing, augmentation and precision (training/worker.py's train_step),
the job's allocator setting and torch threads. Rank 0 evaluates the result on the 10,000 test
images; after training the workers time the all-reduce alone (the per-step synchronisation).
`python -m bench.bench_training` submits it beside the job and reads its result from
<storage>/ddp-recipe/<run id>.json.
"""
import argparse
import json
import sys
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root, wherever Ray put it

from training.train import (connect_ray, exit_without_teardown, free_cpus_per_node, positive_float,  # noqa: E402
                            positive_int, run_id_type, size_workers, torch_trainer, writable_storage)

DDP_DIR = "ddp-recipe"  # Ray Train's run state and each run's result, under the storage root
SYNC_SAMPLES = 20  # all-reduces timed after training


def result_path(storage: Path, run_id: str) -> Path:
    return storage / DDP_DIR / f"{run_id}.json"


def training_images(storage: Path, subset: int | None, seed: int):
    """All training images, or a seeded random `subset` of them (as the job's --subset)."""
    import torch

    from training.data import load_mnist

    images, labels = load_mnist(storage, train=True)
    if subset:
        keep = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))[:subset]
        images, labels = images[keep], labels[keep]
    return images, labels


def ddp_train_loop(config: dict) -> None:
    """One Ray Train worker of the recipe."""
    import torch
    import ray.train
    import ray.train.torch
    from torch.utils.data import DataLoader, TensorDataset

    from training.allocator import keep_freed_memory
    from training.augment import training_batch
    from training.data import load_mnist
    from training.model import Net, evaluate, initial_weights
    from training.storage import atomic_write_json
    from training.worker import new_progress, train_step

    keep_freed_memory()  # as the job's workers do (training/allocator.py)
    torch.set_num_threads(config["threads"])
    storage, seed, epochs = Path(config["storage"]), config["seed"], config["epochs"]
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    images, labels = training_images(storage, config["subset"], seed)
    loader = ray.train.torch.prepare_data_loader(
        DataLoader(TensorDataset(images, labels), batch_size=config["batch_size"], shuffle=True))
    model = Net()
    model.load_state_dict(initial_weights(seed))  # the job's initial weights
    model = ray.train.torch.prepare_model(model)
    optimizer = torch.optim.Adam(model.parameters(), lr=config["lr"])
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=config["lr"], total_steps=epochs * len(loader))

    started = time.perf_counter()
    for epoch in range(epochs):
        if world > 1:
            loader.sampler.set_epoch(epoch)  # a fresh shuffle every epoch
        model.train()
        progress = new_progress()
        for step, (x, y) in enumerate(loader):
            x = training_batch(x, config["augment"], seed, rank, epoch * len(loader) + step)
            train_step(model, optimizer, schedule, x, y, progress, config["precision"])
        ray.train.report({"epoch": epoch, "train_loss": progress["loss_sum"] / max(progress["seen"], 1)})
    train_seconds = time.perf_counter() - started

    metrics = {"epoch": epochs, "train_seconds": train_seconds, "steps": epochs * len(loader),
               "world_size": world, **sync_cost(model)}
    if rank == 0:  # the others wait in the report below
        metrics.update(evaluate(getattr(model, "module", model), *load_mnist(storage, train=False)))  # DDP wraps it
        # Ray Train's result keeps only metrics reported with a checkpoint: the driver reads this file
        atomic_write_json(Path(config["metrics_path"]), metrics)
    ray.train.report(metrics)


def sync_cost(model) -> dict:
    """The per-step synchronisation measured alone: an all-reduce of a tensor the size of the
    gradients (DDP's one bucket), timed after training on the same process group; and the bytes
    of the gradients and of the buffers DDP broadcasts before every forward."""
    import torch
    import torch.distributed as dist

    gradient_bytes = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    buffer_bytes = sum(b.numel() * b.element_size() for b in model.buffers())
    result = {"gradient_bytes": gradient_bytes, "buffer_bytes": buffer_bytes}
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return result
    flat = torch.zeros(gradient_bytes // 4)
    for _ in range(3):
        dist.all_reduce(flat)  # warm-up
    samples = []
    for _ in range(SYNC_SAMPLES):
        dist.barrier()  # each sample starts together: a late worker is not counted as sync
        begin = time.perf_counter()
        dist.all_reduce(flat)
        samples.append(time.perf_counter() - begin)
    samples.sort()
    return {**result, "allreduce_ms_median": 1000 * samples[len(samples) // 2]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--storage", required=True, help="storage root holding MNIST (Ray Train's state goes under it)")
    parser.add_argument("--workers", type=positive_int, default=3, help="Ray Train workers (default 3, as the job)")
    parser.add_argument("--epochs", type=positive_int, default=2, help="passes over the training images (default 2)")
    parser.add_argument("--batch-size", type=positive_int, default=100, help="examples per step per worker (default 100)")
    parser.add_argument("--lr", type=positive_float, default=5e-3, help="peak Adam learning rate (default 5e-3)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the initial weights and the subset (default 0)")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32", help="training arithmetic (default fp32)")
    parser.add_argument("--threads", type=positive_int, default=None,
                        help="torch threads per worker (default: the worker's whole CPUs, at least 1)")
    parser.add_argument("--subset", type=positive_int, default=None, help="train on this many random images")
    parser.add_argument("--augment", action=argparse.BooleanOptionalAction, default=True,
                        help="the job's augmentation of every batch (default on)")
    parser.add_argument("--run-id", type=run_id_type, default=None, help="name of this run (default: random)")
    args = parser.parse_args(argv)
    import ray
    from ray.train import RunConfig

    from training.augment import DEFAULT as AUGMENTATION
    from training.data import fetch_mnist
    from training.storage import atomic_write_json

    started = time.perf_counter()
    storage = writable_storage(Path(args.storage).resolve())
    run_id = args.run_id or f"ddp-{uuid.uuid4().hex[:8]}"
    connect_ray(ray)
    fetch_mnist(storage)  # verified, as the job does
    worker_cpus, threads = size_workers(free_cpus_per_node(ray), args.workers)
    config = {"storage": str(storage), "epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr,
              "seed": args.seed, "precision": args.precision, "threads": args.threads or threads,
              "subset": args.subset, "augment": AUGMENTATION.to_metadata() if args.augment else None,
              "metrics_path": str(result_path(storage, run_id).with_suffix(".rank0.json"))}
    print(f"DDP recipe {run_id}: {args.workers} workers x {worker_cpus:.2f} CPU, {config['threads']} torch "
          f"thread(s), {args.epochs} epochs, batch {args.batch_size} per worker, {args.precision}", flush=True)
    run_config = RunConfig(name=run_id, storage_path=str(storage / DDP_DIR / "ray"))
    torch_trainer(ddp_train_loop, config, args.workers, worker_cpus, run_config).fit()
    metrics = json.loads(Path(config["metrics_path"]).read_text())
    result = {**metrics, "workers": args.workers, "worker_cpus": worker_cpus, "threads": config["threads"],
              "epochs": args.epochs, "batch_size": args.batch_size, "precision": args.precision,
              "subset": args.subset, "augment": args.augment, "driver_seconds": time.perf_counter() - started}
    atomic_write_json(result_path(storage, run_id), result)
    print(f"DDP recipe: test accuracy {result['accuracy']:.4f}, training {result['train_seconds']:.1f} s, "
          f"all-reduce {result.get('allreduce_ms_median', 0):.2f} ms, driver {result['driver_seconds']:.1f} s", flush=True)
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    exit_without_teardown(main())
