"""Train MNIST on N shards with Ray Train and federated averaging, then publish the model.

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \\
        python training/train.py --workers 3 --epochs 2 --batch-size 100

This is the CLI and the driver: it checks the flags, the storage root and the cluster, fetches
MNIST, claims runs/<run_id>/, writes the shards, starts the run's aggregator actor, runs
training/worker.py's train_func on --workers Ray Train workers, reads each round's metrics back
from Ray Train's result, kills the aggregator, and publishes the last average. `ray job stop`
aborts the Ray Train run the way Ctrl-C does.

Rounds and epochs: each worker makes --epochs passes over its own shard in all. Those
passes are cut into --rounds rounds of (nearly) equal numbers of steps; after every round
the aggregator averages the workers' weights (FedAvg), evaluates the average (the last
round's on the whole test set, earlier ones' on a fixed sample of it), and every
worker continues from it. --rounds 1 averages once, at the very end;
--rounds 2*epochs averages every half epoch.
"""
import argparse
import json
import logging
import math
import os
import signal
import socket
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root, wherever Ray put it

import torch  # noqa: E402

from training import defaults  # noqa: E402
from training.augment import DEFAULT as AUGMENTATION  # noqa: E402
from training.aggregation import start_aggregator  # noqa: E402
from training.data import MnistUnavailable, check_partition, fetch_mnist, write_shards  # noqa: E402
from training.model import Net, initial_weights  # noqa: E402
from training.versions import POLICIES, TOLERANCE, publish_run  # noqa: E402
from training.storage import (RUN_ID_RULE, STORAGE_ENV, atomic_torch_save, claim_run_dir,  # noqa: E402
                              given_storage, global_path, init_path, is_run_id, manifest_path, new_run_id,
                              ray_dir, run_dir, sha256_file)
from training.strategies import make_strategy  # noqa: E402
from training.worker import decision_path, steps_per_epoch, train_func  # noqa: E402

TRAIN_IMAGES = 60_000


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
    if not is_run_id(text):
        raise argparse.ArgumentTypeError(RUN_ID_RULE)
    return text


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=positive_int, default=defaults.WORKERS,
                        help=f"Ray Train workers = shards (default {defaults.WORKERS})")
    parser.add_argument("--epochs", type=positive_int, default=defaults.EPOCHS,
                        help=f"passes of each worker over its shard (default {defaults.EPOCHS})")
    parser.add_argument("--rounds", type=positive_int, default=None,
                        help="FedAvg rounds over the whole training (default 2 per epoch)")
    parser.add_argument("--batch-size", type=positive_int, default=defaults.BATCH_SIZE,
                        help=f"examples per step per worker (default {defaults.BATCH_SIZE})")
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
                             "or plain fp32; auto = whichever trains faster on the workers' CPU: rank 0 times both "
                             "once and every worker trains in that one precision (fp32 unless bf16 is faster by "
                             "more than 10%%); the decision is cached in <storage>/calibration per CPU, torch "
                             "version, batch size and threads (default auto)")
    parser.add_argument("--threads", type=positive_int, default=None,
                        help="torch threads per worker (default: timed, 1 or the worker's whole CPUs)")
    parser.add_argument("--recalibrate", action="store_true",
                        help="time the precision again instead of taking the cached decision (which it replaces)")
    parser.add_argument("--strategy", default="fedavg", metavar="NAME[:VALUE]",
                        help="how a round's worker models become the global one: fedavg (default), fedprox:MU, "
                             "fedadam:LR, median, trimmed-mean:BETA (docs/TRAINING.md)")
    parser.add_argument("--partition", default="iid", metavar="iid|dirichlet:ALPHA|classes:K",
                        help="how the training images are split among the workers: iid (stratified, the default), "
                             "dirichlet:ALPHA (label skew, smaller is more skewed) or classes:K (about K classes each)")
    parser.add_argument("--inject-fault", default=None, metavar="nan:RANK|scale:RANK:FACTOR",
                        help="(for tests and demonstrations) worker RANK sends NaNs, or its weights times FACTOR, "
                             "at every round; the aggregator drops or absorbs it")
    parser.add_argument("--augment", action=argparse.BooleanOptionalAction, default=True,
                        help="random rotation, shear, scale, shift and stroke width on every training batch, "
                             "seeded per shard and step (default on; --no-augment trains on the digits as they are)")
    parser.add_argument("--elastic", type=float, default=AUGMENTATION.elastic, metavar="PX",
                        help="add elastic distortion to the augmentation, displacing pixels by about PX (default 0: off)")
    parser.add_argument("--promote", choices=POLICIES, default="auto",
                        help="make the new version the served one (move `latest`): auto = only a full-data run "
                             f"(no --subset) at least as accurate as the serving version less {100 * TOLERANCE:.1f} "
                             "point, or when nothing serves yet; always; never (default auto). The version is "
                             "published in any case; `python -m training.versions promote VERSION` serves it later")
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
    try:
        make_strategy(args.strategy)
        check_partition(args.partition)
        args.inject_fault = parse_fault(args.inject_fault, args.workers)
    except ValueError as error:
        parser.error(str(error))
    return args


def parse_fault(spec: str | None, workers: int) -> dict | None:
    """--inject-fault nan:RANK or scale:RANK:FACTOR, as the workers take it."""
    if spec is None:
        return None
    kind, *rest = spec.split(":")
    try:
        if kind == "nan" and len(rest) == 1:
            fault = {"kind": "nan", "rank": int(rest[0])}
        elif kind == "scale" and len(rest) == 2:
            fault = {"kind": "scale", "rank": int(rest[0]), "factor": float(rest[1])}
        else:
            raise ValueError
    except ValueError:
        raise ValueError(f"--inject-fault {spec}: use nan:RANK or scale:RANK:FACTOR") from None
    if not 0 <= fault["rank"] < workers:
        raise ValueError(f"--inject-fault {spec}: rank {fault['rank']} is not one of the {workers} workers")
    return fault


def augmentation(args) -> dict | None:
    """The augmentation settings the workers apply (and the metadata shows), None with --no-augment."""
    return {**AUGMENTATION.to_metadata(), "elastic": args.elastic} if args.augment else None


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

    started = time.perf_counter()
    storage = writable_storage(storage_outside_job_copy(args.storage))
    run_id = args.run_id or new_run_id()
    if run_dir(storage, run_id).exists():
        raise UserError(f"run {run_id} already exists at {run_dir(storage, run_id)}; pick another --run-id")
    connect_ray(ray)
    try:
        fetch_mnist(storage, args.data_source)
    except MnistUnavailable as error:
        raise UserError(str(error)) from None

    worker_cpus, threads = size_workers(free_cpus_per_node(ray), args.workers)
    try:  # the check above is for a quick answer; this one is atomic (two jobs, one --run-id)
        claim_run_dir(storage, run_id)
    except FileExistsError:
        raise UserError(f"run {run_id} already exists at {run_dir(storage, run_id)}; pick another --run-id") from None
    # The driver splits: a splitter task would start a process and import torch while Ray
    # Train's start-up needs the cores (docs/TRAINING.md has the timings).
    manifest = write_shards(storage, run_id, args.workers, args.seed, args.subset, args.partition)
    atomic_torch_save(init_path(storage, run_id), initial_weights(args.seed))
    aggregator = start_aggregator(storage, run_id, manifest, args.rounds, args.strategy)  # lives as long as this run
    print(f"run {run_id}: {args.workers} workers x {worker_cpus:.2f} CPU and up to {threads} torch thread(s), "
          f"{args.epochs} epochs in {args.rounds} rounds, precision {args.precision}, strategy {args.strategy}, "
          f"partition {args.partition}", flush=True)
    for rank, shard in enumerate(manifest["shards"]):
        print(f"  shard {rank}: {shard['count']} images, per class {shard['class_histogram']}", flush=True)
    round_metrics = fit(args, storage, run_id, manifest, aggregator, worker_cpus, threads)
    # Not in a `finally`: killed while workers wait for it, it would fail them, and Ray Train would
    # start a new worker group as the job ends. A failed job's actors end with the job anyway.
    ray.kill(aggregator)
    publish(args, storage, run_id, round_metrics, time.perf_counter() - started)
    return 0


def fit(args, storage: Path, run_id: str, manifest: dict, aggregator, worker_cpus: float, threads: int) -> list[dict]:
    """Run train_func on --workers Ray Train workers; the metrics of every round, as reported.
    Raises if training fails (then nothing is published)."""
    from ray.train import FailureConfig, RunConfig

    config = {"storage": str(storage), "run_id": run_id, "manifest": manifest, "aggregator": aggregator,
              "epochs": args.epochs, "rounds": args.rounds, "batch_size": args.batch_size, "lr": args.lr,
              "seed": args.seed, "threads": threads, "checkpoint_steps": args.checkpoint_steps,
              "precision": args.precision, "pin_threads": args.threads, "recalibrate": args.recalibrate,
              "strategy": args.strategy, "inject_fault": args.inject_fault,
              "augment": augmentation(args)}
    trainer = torch_trainer(train_func, config, args.workers, worker_cpus,
                            RunConfig(name=run_id, storage_path=str(ray_dir(storage, run_id)),
                                      failure_config=FailureConfig(max_failures=args.max_failures)))
    abort_training_on_sigterm()
    result = trainer.fit()
    # One checkpoint per averaged round, with rank 0's report of that round's metrics.
    reported = {metrics["round"]: metrics for _, metrics in result.best_checkpoints}
    if sorted(reported) != list(range(args.rounds)):
        raise RuntimeError(f"Ray Train reported rounds {sorted(reported)}, expected 0-{args.rounds - 1}")
    return [reported[r] for r in range(args.rounds)]


def torch_trainer(train_loop, config: dict, workers: int, worker_cpus: float, run_config):
    """A TorchTrainer that runs `train_loop(config)` on `workers` workers of `worker_cpus` CPUs each.
    (bench/train_floor.py times the same trainer with a train_loop that returns at once.)"""
    from ray.train import ScalingConfig
    from ray.train.torch import TorchTrainer

    # Ray Train's controller polls its workers every 2 s by default: up to 2 s lost noticing the
    # end of training (and each start). Ray passes this on from the driver to the controller.
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
    # SPREAD: one worker per node where the cluster allows, so every node's CPUs train.
    return TorchTrainer(train_loop, train_loop_config=config, run_config=run_config,
                        scaling_config=ScalingConfig(num_workers=workers, resources_per_worker={"CPU": worker_cpus},
                                                     placement_strategy="SPREAD"))


def publish(args, storage: Path, run_id: str, round_metrics: list[dict], train_seconds: float) -> None:
    """Publish the last round's average as version `run_id`; promote it by --promote."""
    final = torch.load(global_path(storage, run_id, args.rounds - 1), weights_only=True)["state_dict"]
    setting = json.loads(decision_path(storage, run_id).read_text())
    manifest = json.loads(manifest_path(storage, run_id).read_text())
    metadata = {"version": run_id, "run_id": run_id, "workers": args.workers, "epochs": args.epochs,
                "rounds": args.rounds, "batch_size": args.batch_size, "lr": args.lr, "seed": args.seed,
                "subset": args.subset, "architecture": Net.architecture,
                "test_accuracy": round_metrics[-1]["test_accuracy"], "round_metrics": round_metrics,
                "precision": setting["precision"], "threads": setting["threads"], "calibration": setting,
                "reproduce": reproduce_command(args, setting),
                "strategy": args.strategy, "partition": args.partition, "inject_fault": args.inject_fault,
                "shards": [{"count": s["count"], "class_histogram": s["class_histogram"]} for s in manifest["shards"]],
                "train_seconds": round(train_seconds, 2),
                "augmentation": augmentation(args),
                "shards_manifest_sha256": sha256_file(manifest_path(storage, run_id)),
                "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    path, decision = publish_run(storage, run_id, final, metadata, args.promote)
    print_table(round_metrics)
    print(f"test accuracy {metadata['test_accuracy']:.4f}  model {path}  ({train_seconds:.1f} s)", flush=True)
    hint = "" if decision.promote else f"; to serve it: python -m training.versions promote {run_id}"
    print(f"{run_id}: {decision.summary}{hint}", flush=True)  # the last line says what serves now


def abort_training_on_sigterm() -> None:
    """Stop the run the way Ctrl-C does when `ray job stop` (or a deleted pod) sends SIGTERM.

    Ray's own SIGTERM handler only raises SystemExit in the driver, and leaves the workers to Ray
    Train's failure handling while the job ends: a worker group it restarted then could outlive the
    job, its placement group holding the cluster's CPUs (seen on the local cluster, one stop in two).
    Ray Train's SIGINT handler, set by fit(), asks the controller to abort instead: it stops the
    workers and removes their placement group. Then exit, as Ray's handler would."""
    def abort_then_exit(signum, frame):
        print("SIGTERM: aborting the Ray Train run, as for Ctrl-C", file=sys.stderr, flush=True)
        abort = signal.getsignal(signal.SIGINT)
        if callable(abort) and abort is not signal.default_int_handler:
            abort(signum, frame)
        sys.exit(128 + signum)

    signal.signal(signal.SIGTERM, abort_then_exit)


def reproduce_command(args, setting: dict) -> str:
    """The command that trains these weights again: the same flags with the recorded precision and
    threads pinned (bit-identical on the same machine and torch; same accuracy elsewhere)."""
    flags = ["--workers", args.workers, "--epochs", args.epochs, "--rounds", args.rounds, "--batch-size", args.batch_size,
             "--lr", args.lr, "--seed", args.seed, "--precision", setting["precision"], "--threads", setting["threads"],
             "--checkpoint-steps", args.checkpoint_steps, "--elastic", args.elastic,
             "--strategy", args.strategy, "--partition", args.partition]
    flags += ["--subset", args.subset] if args.subset else []
    flags += [] if args.augment else ["--no-augment"]
    fault = args.inject_fault
    flags += [f"--inject-fault {fault['kind']}:{fault['rank']}" + (f":{fault['factor']:g}" if "factor" in fault else "")] \
        if fault else []
    return "python training/train.py " + " ".join(str(flag) for flag in flags)


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


def print_table(round_metrics: list[dict]) -> None:
    print(f"{'round':>5}  {'test acc':>8}  {'test loss':>9}  {'on images':>9}  {'worker train loss':<30}  {'seconds':>7}")
    for r in round_metrics:
        losses = " ".join(f"{w['train_loss']:.3f}" for w in r["workers"])
        seconds = max(w["seconds"] for w in r["workers"]) + r["aggregate_seconds"]
        print(f"{r['round']:>5}  {r['test_accuracy']:>8.4f}  {r['test_loss']:>9.4f}  {r.get('test_images', ''):>9}  "
              f"{losses:<30}  {seconds:>7.1f}")


def exit_without_teardown(code: int) -> None:
    """Leave at once: disconnect from Ray and flush, but skip Python's teardown of torch's and
    Ray's modules, which took 1.5-2.5 s after the last line on 2 cores (`ray job submit` waits for
    this process to end). Every file of the run is already written, each one atomically."""
    ray = sys.modules.get("ray")
    if ray is not None:
        ray.shutdown()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    exit_without_teardown(main())
