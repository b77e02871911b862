"""Train MNIST on N shards with Ray Train and federated averaging, then publish the model.

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \\
        python training/train.py --workers 3 --epochs 2 --batch-size 100

Rounds and epochs: each worker makes --epochs passes over its own shard in all. Those
passes are cut into --rounds rounds of (nearly) equal numbers of steps; after every round
the aggregator averages the workers' weights (FedAvg), evaluates the average on the test
set, and every worker continues from it. --rounds 1 averages once, at the very end;
--rounds 2*epochs averages every half epoch.
"""
import argparse
import copy
import json
import math
import os
import socket
import sys
import tempfile
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root, wherever Ray put it

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from training.augment import DEFAULT as AUGMENTATION, training_batch  # noqa: E402
from training.aggregation import Aggregator, global_path, partial_path, round_dir, worker_path  # noqa: E402
from training.data import MnistUnavailable, fetch_mnist, load_shard, write_shards  # noqa: E402
from training.calibration import calibrate, candidates  # noqa: E402
from training.model import Net, initial_weights, to_input  # noqa: E402
from training.models import POLICIES, TOLERANCE, publish_run  # noqa: E402
from training.storage import (STORAGE_ENV, atomic_torch_save, given_storage,  # noqa: E402
                              run_dir, sha256_file)

TRAIN_IMAGES = 60_000
LABEL_SMOOTHING = 0.1  # worth +0.1 point of test accuracy in two epochs (bench/model_sweep.py)


# ---------------------------------------------------------------- command line

def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def positive_float(text: str) -> float:
    value = float(text)
    if not value > 0 or math.isinf(value):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def run_id_type(text: str) -> str:
    if not text or len(text) > 63 or not all(c.isalnum() or c in "-_." for c in text) or text[0] == ".":
        raise argparse.ArgumentTypeError("use 1-63 letters, digits, '-', '_' or '.' (not starting with '.')")
    return text


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=positive_int, default=3, help="Ray Train workers = shards (default 3)")
    parser.add_argument("--epochs", type=positive_int, default=2, help="passes of each worker over its shard (default 2)")
    parser.add_argument("--rounds", type=positive_int, default=None,
                        help="FedAvg rounds over the whole training (default 2 per epoch)")
    parser.add_argument("--batch-size", type=positive_int, default=100, help="examples per step per worker (default 100)")
    parser.add_argument("--lr", type=positive_float, default=5e-3, help="peak Adam learning rate of the one-cycle schedule (default 5e-3)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the split, initial weights and shuffling (default 0)")
    parser.add_argument("--storage", default=None,
                        help="storage root shared by every Ray node (default $MNIST_STORAGE, else ./storage; /mnt/shared on Kubernetes)")
    parser.add_argument("--run-id", type=run_id_type, default=None, help="name of this run (default: UTC time + random suffix)")
    parser.add_argument("--subset", type=positive_int, default=None,
                        help="train on this many random training images only (quick tests); default all 60,000")
    parser.add_argument("--data-source", default=None, help="local folder with the MNIST files (default $MNIST_SOURCE_DIR)")
    parser.add_argument("--checkpoint-steps", type=int, default=50,
                        help="each worker also saves its state every this many steps within a round, so a restart "
                             "loses less than that (default 50; 0 = only at the end of each round)")
    parser.add_argument("--precision", choices=("auto", "bf16", "fp32"), default="auto",
                        help="training arithmetic: bf16 mixed precision (weights, optimizer and evaluation stay fp32) "
                             "or plain fp32; auto = whichever trains faster on the worker's CPU, timed at start-up "
                             "(fp32 unless bf16 is faster beyond noise; default auto)")
    parser.add_argument("--augment", action=argparse.BooleanOptionalAction, default=True,
                        help="random rotation, shear, scale, shift and stroke width on every training batch, "
                             "seeded per shard and step (default on; --no-augment trains on the digits as they are)")
    parser.add_argument("--elastic", type=float, default=AUGMENTATION.elastic, metavar="PX",
                        help="add elastic distortion to the augmentation, displacing pixels by about PX (default 0: off)")
    parser.add_argument("--promote", choices=POLICIES, default="auto",
                        help="make the new version the served one (move `latest`): auto = only a full-data run "
                             f"(no --subset) at least as accurate as the serving version less {100 * TOLERANCE:.1f} "
                             "point, or when nothing serves yet; always; never (default auto). The version is "
                             "published in any case; `python -m training.models promote VERSION` serves it later")
    parser.add_argument("--max-failures", type=int, default=2, help="worker-group restarts Ray Train may make (default 2)")
    return parser


def parse_args(argv=None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    images = args.subset or TRAIN_IMAGES
    if args.subset and args.subset > TRAIN_IMAGES:
        parser.error(f"--subset {args.subset} is larger than the {TRAIN_IMAGES} training images")
    if args.workers > images:
        parser.error(f"--workers {args.workers} is more than the {images} training images")
    steps = args.epochs * steps_per_epoch(images // args.workers, args.batch_size)
    if args.rounds is None:
        args.rounds = min(2 * args.epochs, steps)
    elif args.rounds > steps:
        parser.error(f"--rounds {args.rounds} is more than the {steps} training steps each worker makes "
                     f"({args.epochs} epochs of {images // args.workers} images in batches of {args.batch_size})")
    if args.max_failures < 0:
        parser.error("--max-failures must be >= 0")
    if args.checkpoint_steps < 0:
        parser.error("--checkpoint-steps must be >= 0 (0 turns mid-round checkpoints off)")
    if not 0 <= args.elastic <= 4:
        parser.error("--elastic must be 0 (off) to 4 px")
    return args


def augmentation(args) -> dict | None:
    """The augmentation settings the workers apply (and the metadata shows), None with --no-augment."""
    return {**AUGMENTATION.to_metadata(), "elastic": args.elastic} if args.augment else None


def steps_per_epoch(examples: int, batch_size: int) -> int:
    return math.ceil(examples / batch_size)


# ---------------------------------------------------------------- one Ray Train worker

def train_func(config: dict) -> None:
    """Ray Train worker: train on shard `rank`, hand each round's weights to the aggregator."""
    import ray
    import ray.train
    from ray.train.collective import barrier, broadcast_from_rank_zero

    storage, run_id = Path(config["storage"]), config["run_id"]
    manifest = ray.get(config["manifest"])  # the splitter's result: it ran while this worker group started
    rank = ray.train.get_context().get_world_rank()
    images, labels = load_shard(storage, run_id, rank, manifest)  # verifies its sha256

    model = Net()
    # Precision and torch threads, timed on this worker's CPU (also sets the threads).
    calibration = calibrate_worker(model, images, labels, config)
    precision = calibration["precision"]
    print(f"worker {rank}: {precision}, {calibration['threads']} torch thread(s); calibration "
          f"{calibration['screen_ms']} {calibration['step_ms']} in {calibration['seconds']} s", flush=True)
    total_steps = config["epochs"] * steps_per_epoch(len(labels), config["batch_size"])
    optimizer = torch.optim.Adam(model.parameters(), lr=config["lr"])
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=config["lr"], total_steps=total_steps)
    first_round = resume_round(model, optimizer, storage, run_id, rank, config)
    progress = restore_progress(model, optimizer, storage, run_id, first_round, rank)
    batches = shuffled_batches(len(labels), config["batch_size"], seed=config["seed"] * 1000 + rank)
    for _ in range(round_bounds(total_steps, config["rounds"], first_round)[0] + progress["step"]):
        next(batches), schedule.step()  # replay the data order and LR schedule to where we stopped
    aggregator = start_aggregator(config, manifest) if rank == 0 else None

    for round_index in range(first_round, config["rounds"]):
        start, end = round_bounds(total_steps, config["rounds"], round_index)
        if round_index > first_round:
            progress = new_progress()
        started = time.perf_counter() - progress["seconds"]
        model.train()
        for step in range(progress["step"], end - start):
            index = next(batches)
            batch = training_batch(images[index], config.get("augment"), config["seed"], rank, start + step)
            train_step(model, optimizer, schedule, batch, labels[index], progress, precision)
            progress["step"] = step + 1
            if checkpoint_due(progress["step"], end - start, config["checkpoint_steps"]):
                progress["seconds"] = time.perf_counter() - started
                atomic_torch_save(partial_path(storage, run_id, round_index, rank),
                                  worker_state(run_id, round_index, rank, model, optimizer, progress))
        progress["seconds"] = time.perf_counter() - started
        atomic_torch_save(worker_path(storage, run_id, round_index, rank), {
            **worker_state(run_id, round_index, rank, model, optimizer, progress), "num_samples": len(labels),
            "node_id": ray.get_runtime_context().get_node_id(), "seconds": progress["seconds"], "precision": precision,
            "threads": calibration["threads"], "calibration": calibration,
            "train_loss": progress["loss_sum"] / max(progress["seen"], 1),
            "train_accuracy": progress["correct"] / max(progress["seen"], 1)})
        partial_path(storage, run_id, round_index, rank).unlink(missing_ok=True)
        barrier()
        metrics = None
        if rank == 0:
            metrics = ray.get(aggregator.aggregate.remote(round_index))
        metrics = broadcast_from_rank_zero(metrics)
        averaged = torch.load(global_path(storage, run_id, round_index), weights_only=True)
        model.load_state_dict(averaged["state_dict"])
        report_round(metrics, rank, storage, run_id, round_index)


def train_step(model, optimizer, schedule, images, labels, progress: dict, precision: str) -> None:
    x, y = to_input(images), labels
    optimizer.zero_grad(set_to_none=True)
    # bf16: convolutions and linear layers compute in bfloat16; weights, gradients, Adam and the loss stay fp32.
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
        logits = model(x).float()
    loss = F.cross_entropy(logits, y, label_smoothing=LABEL_SMOOTHING)
    loss.backward()
    optimizer.step()
    schedule.step()
    progress["loss_sum"] += loss.item() * len(y)
    progress["correct"] += (logits.argmax(1) == y).sum().item()
    progress["seen"] += len(y)


def calibrate_worker(model, images, labels, config: dict) -> dict:
    """Time the real training step (a copy of the model, a throwaway optimizer, this worker's own
    images) in each candidate precision and thread count; the model itself is left untouched."""
    trial = copy.deepcopy(model)
    optimizer = torch.optim.Adam(trial.parameters(), lr=config["lr"])
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=config["lr"], total_steps=1000)
    batch_size = min(config["batch_size"], len(labels))

    def step(precision: str, batch: int) -> None:
        train_step(trial, optimizer, schedule, images[:batch], labels[:batch], new_progress(), precision)

    return calibrate(step, candidates(config["precision"], config["threads"]), batch_size, torch.set_num_threads)


def checkpoint_due(step: int, round_steps: int, every: int) -> bool:
    """Save mid-round every `every` steps; the round's end writes the worker file anyway."""
    return every > 0 and step % every == 0 and step < round_steps


def start_aggregator(config: dict, manifest: dict):
    """The run's aggregator actor. It asks for no CPU: it works only while every worker waits
    for it, and so a second run on a full cluster can never leave it unscheduled. Averaging
    is idempotent, so Ray may restart it (say, on another node) and call it again."""
    import ray

    actor = ray.remote(Aggregator).options(num_cpus=0, max_restarts=2, max_task_retries=2)
    return actor.remote(config["storage"], config["run_id"], manifest)


def new_progress() -> dict:
    """A worker's progress through one round: steps done and the running training metrics."""
    return {"step": 0, "loss_sum": 0.0, "correct": 0, "seen": 0, "seconds": 0.0}


def worker_state(run_id: str, round_index: int, rank: int, model, optimizer, progress: dict) -> dict:
    return {"run_id": run_id, "round": round_index, "rank": rank, "state_dict": model.state_dict(),
            "optimizer": optimizer.state_dict(), "progress": dict(progress)}


def restore_progress(model, optimizer, storage: Path, run_id: str, round_index: int, rank: int) -> dict:
    """After a restart, pick up this worker's own work inside the round: its finished model of
    the round if it got that far, else its last mid-round checkpoint, else a fresh round."""
    for path in (worker_path(storage, run_id, round_index, rank), partial_path(storage, run_id, round_index, rank)):
        if not path.exists():
            continue
        saved = torch.load(path, weights_only=True)
        if (saved.get("run_id"), saved.get("round"), saved.get("rank")) != (run_id, round_index, rank):
            raise RuntimeError(f"{path} is not worker {rank}'s file of round {round_index} of run {run_id}")
        model.load_state_dict(saved["state_dict"])
        optimizer.load_state_dict(saved["optimizer"])
        print(f"worker {rank}: resuming round {round_index} at step {saved['progress']['step']} from {path.name}", flush=True)
        return dict(saved["progress"])
    return new_progress()


def shuffled_batches(examples: int, batch_size: int, seed: int):
    """Endless index batches, a fresh seeded permutation every epoch."""
    generator = torch.Generator().manual_seed(seed)
    while True:
        yield from torch.randperm(examples, generator=generator).split(batch_size)


def round_bounds(total_steps: int, rounds: int, round_index: int) -> tuple[int, int]:
    """[first, last) step of a round: the steps split as evenly as possible."""
    return total_steps * round_index // rounds, total_steps * (round_index + 1) // rounds


def report_round(metrics: dict, rank: int, storage: Path, run_id: str, round_index: int) -> None:
    """Show the round in the Ray dashboard; rank 0 attaches the averaged model as a checkpoint."""
    import ray.train

    flat = {"round": round_index, "test_accuracy": metrics["test_accuracy"], "test_loss": metrics["test_loss"],
            "train_loss": sum(w["train_loss"] for w in metrics["workers"]) / len(metrics["workers"])}
    if rank != 0:
        ray.train.report(flat)
        return
    with tempfile.TemporaryDirectory() as tmp:
        Path(tmp, "global.pt").write_bytes(global_path(storage, run_id, round_index).read_bytes())
        Path(tmp, "round.txt").write_text(str(round_index))
        ray.train.report(flat, checkpoint=ray.train.Checkpoint.from_directory(tmp))


def resume_round(model, optimizer, storage: Path, run_id: str, rank: int, config: dict) -> int:
    """Start from the run's initial weights or, after a restart, from Ray Train's last checkpoint
    (the averaged model of round r) and this worker's own optimizer state of that round."""
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        model.load_state_dict(torch.load(Path(config["init_path"]), weights_only=True))
        return 0
    with checkpoint.as_directory() as folder:
        model.load_state_dict(torch.load(Path(folder) / "global.pt", weights_only=True)["state_dict"])
        done = int(Path(folder, "round.txt").read_text())
    own = torch.load(worker_path(storage, run_id, done, rank), weights_only=True)
    optimizer.load_state_dict(own["optimizer"])
    print(f"worker {rank}: resuming after round {done} from {checkpoint.path}", flush=True)
    return done + 1


# ---------------------------------------------------------------- the driver

def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        return run(args)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


class UserError(RuntimeError):
    """A problem the user can fix; printed as one line, no traceback."""


def run(args) -> int:
    import ray
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    started = time.perf_counter()
    storage = writable_storage(storage_outside_job_copy(args.storage))
    run_id = args.run_id or new_run_id()
    folder = run_dir(storage, run_id)
    if folder.exists():
        raise UserError(f"run {run_id} already exists at {folder}; pick another --run-id")
    connect_ray(ray)
    try:
        fetch_mnist(storage, args.data_source)
    except MnistUnavailable as error:
        raise UserError(str(error)) from None

    # Sized before the splitter runs: Ray's resource view lags, and right after the splitter it
    # could still count the splitter's CPU as taken.
    worker_cpus, threads = size_workers(free_cpus_per_node(ray), args.workers)
    from training.storage import claim_run_dir
    try:  # the check above is for a quick answer; this one is atomic (two jobs, one --run-id)
        claim_run_dir(storage, run_id)
    except FileExistsError:
        raise UserError(f"run {run_id} already exists at {folder}; pick another --run-id") from None
    # The split runs while Ray Train starts its controller and workers (~10 s); they wait for it.
    splitter = ray.remote(write_shards).options(num_cpus=0.5)
    manifest = splitter.remote(storage, run_id, args.workers, args.seed, args.subset)
    atomic_torch_save(folder / "init.pt", initial_weights(args.seed))
    print(f"run {run_id}: {args.workers} workers x {worker_cpus:.2f} CPU and up to {threads} torch thread(s), "
          f"{args.epochs} epochs in {args.rounds} rounds, precision {args.precision}", flush=True)

    # Ray Train's controller polls its workers every 2 s by default: up to 2 s lost noticing the
    # end of training (and each start). Ray passes this on from the driver to the controller.
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
    trainer = TorchTrainer(
        train_func,
        train_loop_config={"storage": str(storage), "run_id": run_id, "manifest": manifest,
                           "init_path": str(folder / "init.pt"), "epochs": args.epochs, "rounds": args.rounds,
                           "batch_size": args.batch_size, "lr": args.lr, "seed": args.seed,
                           "threads": threads, "checkpoint_steps": args.checkpoint_steps,
                           "precision": args.precision,
                           "augment": augmentation(args)},
        # SPREAD: one worker per node where the cluster allows, so every node's CPUs train.
        scaling_config=ScalingConfig(num_workers=args.workers, resources_per_worker={"CPU": worker_cpus},
                                     placement_strategy="SPREAD"),
        run_config=RunConfig(name=run_id, storage_path=str(folder / "ray"),
                             failure_config=FailureConfig(max_failures=args.max_failures)),
    )
    try:
        trainer.fit()  # raises on failure: nothing is published
    except Exception:
        ray.get(manifest)  # a failed split is the cause: raise the splitter's own error
        raise
    print(f"shards {[s['count'] for s in ray.get(manifest)['shards']]}", flush=True)

    rounds = [round_metrics(storage, run_id, r) for r in range(args.rounds)]
    final = torch.load(global_path(storage, run_id, args.rounds - 1), weights_only=True)["state_dict"]
    train_seconds = time.perf_counter() - started
    metadata = {"version": run_id, "run_id": run_id, "workers": args.workers, "epochs": args.epochs,
                "rounds": args.rounds, "batch_size": args.batch_size, "lr": args.lr, "seed": args.seed,
                "subset": args.subset, "test_accuracy": rounds[-1]["test_accuracy"], "round_metrics": rounds,
                "precision": "+".join(sorted({w["precision"] for r in rounds for w in r["workers"]})),
                "calibration": worker_calibrations(rounds),
                "train_seconds": round(train_seconds, 2),
                "augmentation": augmentation(args),
                "shards_manifest_sha256": sha256_file(folder / "shards" / "manifest.json"),
                "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    path, decision = publish_run(storage, run_id, final, metadata, args.promote)
    print_table(rounds)
    print(f"test accuracy {metadata['test_accuracy']:.4f}  model {path}  ({train_seconds:.1f} s)", flush=True)
    hint = "" if decision.promote else f"; to serve it: python -m training.models promote {run_id}"
    print(f"{run_id}: {decision.summary}{hint}", flush=True)  # the last line says what serves now
    return 0


def worker_calibrations(rounds: list[dict]) -> list[dict]:
    """Each worker's timed choice of precision and threads (the last round's: a restarted worker
    times again)."""
    return [{"rank": w["rank"], **(w.get("calibration") or {})} for w in rounds[-1]["workers"]]


def size_workers(free_per_node: list[float], workers: int) -> tuple[float, int]:
    """CPUs per worker and the most torch threads a worker may use: the largest share (in hundredths
    of a CPU) for which all `workers` fit into the nodes' free CPUs, each worker inside one node.
    Ray's workers all ask for the same resources, so a node of c free CPUs takes c // share of them,
    in any placement. The aggregator asks for no CPU."""
    hundredths = [int(100 * free + 1e-6) for free in free_per_node if free > 0]
    for share in range(max(hundredths, default=0), 4, -1):  # at least 0.05 CPU per worker
        if sum(free // share for free in hundredths) >= workers:
            return share / 100, max(1, share // 100)
    raise UserError(f"the Ray cluster has {sum(hundredths) / 100:g} free CPUs (per node: "
                    f"{[h / 100 for h in hundredths]}), too few for {workers} workers; "
                    "free some (stop other jobs) or add nodes")


def free_cpus_per_node(ray) -> list[float]:
    """Free CPUs of each alive node (Ray's per-node view; the cluster total if that is unavailable)."""
    try:
        from ray._private.state import available_resources_per_node
        return [resources.get("CPU", 0.0) for resources in available_resources_per_node().values()]
    except Exception:  # a private API: fall back to the total, shared evenly by the nodes with CPUs
        nodes = [n for n in ray.nodes() if n.get("Alive") and n.get("Resources", {}).get("CPU")] or [None]
        return [ray.available_resources().get("CPU", 0.0) / len(nodes)] * len(nodes)


def storage_outside_job_copy(requested: str | None) -> Path:
    """The storage root, refused if relative inside Ray's temporary copy of a job's working dir:
    the model would be published there and deleted with the copy."""
    given = given_storage(requested)
    if not given.is_absolute() and "working_dir_files" in Path.cwd().parts:
        raise UserError(f"storage root '{given}' is relative, and this job runs in Ray's temporary copy of its "
                        f"working dir ({Path.cwd()}), which Ray deletes; pass an absolute --storage, or set "
                        f"{STORAGE_ENV} on the cluster (`python -m ray_cluster up` sets it to ./storage)")
    return given.resolve()


def writable_storage(storage: Path) -> Path:
    try:
        storage.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=storage, prefix=".write-check-"):
            pass
    except OSError as error:
        raise UserError(f"storage root {storage} is not writable ({error.strerror}); pass a writable --storage") from None
    return storage


def connect_ray(ray) -> None:
    """Join the cluster in $RAY_ADDRESS (set by `ray job submit`) or the local one; fail fast if none."""
    from ray._private.services import canonicalize_bootstrap_address

    requested = os.environ.get("RAY_ADDRESS", "auto")
    try:
        address = canonicalize_bootstrap_address(requested)
    except Exception:  # Ray raises several types when nothing is found
        address = None
    if not address or not reachable(address):
        raise UserError(f"no Ray cluster at {requested}. Start one with `python -m ray_cluster up`, then submit "
                        "with `ray job submit --address http://127.0.0.1:8265 --working-dir . -- python training/train.py`")
    ray.init(address=address)


def reachable(address: str, timeout: float = 3.0) -> bool:
    host, _, port = address.rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
        return True
    except (OSError, ValueError):
        return False


def new_run_id() -> str:
    return datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:4]


def round_metrics(storage: Path, run_id: str, round_index: int) -> dict:
    return json.loads((round_dir(storage, run_id, round_index) / "metrics.json").read_text())


def print_table(rounds: list[dict]) -> None:
    print(f"{'round':>5}  {'test acc':>8}  {'test loss':>9}  {'worker train loss':<30}  {'seconds':>7}")
    for r in rounds:
        losses = " ".join(f"{w['train_loss']:.3f}" for w in r["workers"])
        seconds = max(w["seconds"] for w in r["workers"]) + r["aggregate_seconds"]
        print(f"{r['round']:>5}  {r['test_accuracy']:>8.4f}  {r['test_loss']:>9.4f}  {losses:<30}  {seconds:>7.1f}")


if __name__ == "__main__":
    sys.exit(main())
