"""Training benchmark: this project's Ray job beside its baselines, in one run on one machine.

    python -m bench.bench_training [--sweeps] [--storage DIR] [--data-source DIR]

1. baseline   plain single-process PyTorch: the seed's network, Adam 1e-3, batch 100, 2 epochs
              (1, 1b and 2 each run in a fresh Python process, as the seed ran each trainer in its own)
1b. net plain this project's Net, trained the plain way in one process on all 60,000 images:
              2 epochs, the job's Adam + one-cycle schedule and label smoothing, batch 100,
              2 threads, in the precision that times faster on this CPU, with the job's
              allocator setting (what a user would run instead of the Ray job on one machine)
2. seed       the seed's scheme: 3 workers from independent random weights, contiguous
              unshuffled shards, one unweighted mean at the end
3. ray job    training/train.py at the seed's defaults, submitted with `ray job submit` to the
              local cluster and timed from submission until the command returns (the model is
              published by then); also with --precision fp32, the baseline's arithmetic
3b. DDP       Ray Train's own recipe as the job's peer (bench/ddp_recipe.py: TorchTrainer, prepare_model
              DDP, prepare_data_loader, the job's workers, CPU share, Net, schedule, epochs and precision),
              submitted the same way right after the default job (--no-ddp leaves it out)
4. --sweeps   the Ray job over rounds (1, 2, 4, 8) and workers (1, 2, 3, 4) at 2 epochs
--epochs 2,4,8  also the job at each epoch count beside Net plain at the same epochs in the job's
              precision (and the DDP recipe at --ddp-epochs): fixed cost and cost per epoch from a
              line fit, job growth / Net plain growth (bench/results/training_epochs.{json,md,png});
              with the DDP row, a model of wall time against the RTT between nodes, fitted to the
              measured walls (bench/results/training_rtt.{json,md,png})
--profile-job  only one job: when each step of it shows in its log (fixed costs)
--floor       only the fixed costs beside the anchor: bench/train_floor.py (Ray Train's run with
              workers that train nothing), the job on 300 images, and Net plain
--peers       only the default job and Ray Train's DDP recipe, in turn, --repeats pairs: job / DDP per
              pair and their median (bench/results/training_peers.{json,md}); the alternation spreads
              a shared machine's drift over both
--repeats N   N pairs in turn (baseline, Net plain, the default job, the job --no-augment), reported as
              medians of the per-pair ratios; the seed scheme and the fp32 job run once

Writes bench/results/training.{json,md} and PNG plots, and prints the ratio job/baseline.

"""
import argparse
import json
import multiprocessing
import os
import statistics
import sys
import time
import uuid
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from ray_cluster import local
from ray_cluster.jobs import TRAIN_SCRIPT, ray_job_submit
from training.aggregation import FedAvg
from training.allocator import keep_freed_memory
from training.data import fetch_mnist, load_mnist
from training.calibration import calibrate
from bench.machine import cpu_info
from bench.seed_net import SeedNet
from training.model import Net, evaluate, to_input
from bench import training_cost
from bench.ddp_recipe import result_path as ddp_result_path
from training.storage import metadata_path, resolve_storage

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"


def native_bf16() -> bool:
    """True where the CPU reports native bfloat16 (AVX512_BF16 or AMX). Informational only: the
    flag does not predict speed (training/calibration.py times the step instead)."""
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


def train_plain(model, images, labels, epochs: int, batch_size: int, lr: float, shuffle: bool, seed: int,
                desc: str) -> None:
    """Single-process Adam training, as the seed's trainers did it."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    for epoch in range(epochs):
        model.train()
        order = torch.randperm(len(labels), generator=generator) if shuffle else torch.arange(len(labels))
        for index in tqdm(order.split(batch_size), desc=f"{desc} epoch {epoch + 1}", leave=False):
            optimizer.zero_grad(set_to_none=True)
            F.cross_entropy(model(to_input(images[index])), labels[index]).backward()
            optimizer.step()


def in_fresh_process(function, *args) -> dict:
    """Run a one-process reference in a fresh Python process, as the seed ran each trainer and as
    the job runs each worker: nothing this process did before (its malloc's history, the job's
    allocator setting in Net plain, thread pools) carries over from one reference to the next.
    Each reference sets its own torch threads; this process only loads data and submits jobs."""
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as child:
        return child.submit(function, *args).result()


def baseline(train, test) -> dict:
    return in_fresh_process(train_baseline, train, test)


def train_baseline(train, test) -> dict:
    """The seed's network, trained as the seed trained it (default allocator, all cores' threads)."""
    torch.set_num_threads(os.cpu_count() or 1)
    torch.manual_seed(0)
    model = SeedNet()
    started = time.perf_counter()
    train_plain(model, *train, epochs=2, batch_size=100, lr=1e-3, shuffle=True, seed=0, desc="baseline")
    seconds = time.perf_counter() - started  # training only; the test evaluation is not timed
    return {"scheme": "baseline: seed network, 1 process", "seconds": seconds,
            "test_accuracy": evaluate(model, *test)["accuracy"]}


def net_plain(train, test, epochs: int = 2, precision: str | None = None) -> dict:
    return in_fresh_process(train_net_plain, train, test, epochs, precision)


def train_net_plain(train, test, epochs: int = 2, precision: str | None = None, batch_size: int = 100,
                    lr: float = 5e-3, threads: int = 2) -> dict:
    """This project's Net, one process, the job's optimiser, schedule and loss, and the job's
    allocator setting; in `precision`, else in the one that times faster here."""
    from training.worker import new_progress, train_step

    images, labels = train
    keep_freed_memory()  # as the job's workers do (training/allocator.py)
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = Net()
    trial = Net()  # the precision is timed on a throwaway copy, as the job's workers do
    trial_optimizer = torch.optim.Adam(trial.parameters(), lr=lr)
    trial_schedule = torch.optim.lr_scheduler.OneCycleLR(trial_optimizer, max_lr=lr, total_steps=1000)
    settings = [(precision, threads)] if precision else [("fp32", threads), ("bf16", threads)]
    calibration = calibrate(lambda precision, batch: train_step(trial, trial_optimizer, trial_schedule, images[:batch],
                                                                labels[:batch], new_progress(), precision),
                            settings, batch_size, torch.set_num_threads)
    precision = calibration["precision"]
    steps = epochs * -(-len(labels) // batch_size)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps)
    generator = torch.Generator().manual_seed(0)
    started = time.perf_counter()
    model.train()
    for epoch in range(epochs):
        order = torch.randperm(len(labels), generator=generator)
        for index in tqdm(order.split(batch_size), desc=f"Net plain epoch {epoch + 1}", leave=False):
            train_step(model, optimizer, schedule, images[index], labels[index], new_progress(), precision)
    seconds = time.perf_counter() - started  # training only, as for the baseline
    return {"scheme": f"this project's Net, 1 process, {threads} threads, {precision}", "seconds": seconds,
            "test_accuracy": evaluate(model, *test)["accuracy"], "precision": precision, "calibration": calibration,
            "epochs": epochs}


def seed_scheme(train, test) -> dict:
    return in_fresh_process(train_seed_scheme, train, test)


def train_seed_scheme(train, test, workers: int = 3) -> dict:
    """The seed project: independent random inits, contiguous shards, one unweighted mean."""
    torch.set_num_threads(os.cpu_count() or 1)
    images, labels = train
    bounds = [len(labels) * i // workers for i in range(workers + 1)]
    started = time.perf_counter()
    states, worker_acc = [], []
    for rank in range(workers):
        torch.manual_seed(1000 + rank)  # every trainer its own random weights, as in the seed
        model = SeedNet()
        shard = slice(bounds[rank], bounds[rank + 1])
        train_plain(model, images[shard], labels[shard], epochs=2, batch_size=100, lr=1e-3, shuffle=True,
                    seed=rank, desc=f"seed worker {rank}")
        worker_acc.append(evaluate(model, *test)["accuracy"])
        states.append((model.state_dict(), 1))  # unweighted
    averaged = SeedNet()
    averaged.load_state_dict(FedAvg().aggregate(states))
    return {"scheme": "seed: 3 independent workers, one mean", "seconds": time.perf_counter() - started,
            "test_accuracy": evaluate(averaged, *test)["accuracy"], "worker_test_accuracy": worker_acc}


def submitted(storage: Path, *args: str, script: str = TRAIN_SCRIPT) -> tuple[str, dict]:
    """One `ray job submit` of `script` to the local cluster; its submission id and its times:
    `seconds` until `ray job submit` returns, `job_end_seconds` until Ray recorded the job's end
    (the CLI's log tail closes a few s later). The training job's run id is its submission id."""
    from ray.job_submission import JobSubmissionClient

    submission_id = f"bench-{uuid.uuid4().hex[:12]}"
    run_id = ["--run-id", submission_id] if script in (TRAIN_SCRIPT, DDP_SCRIPT) else []
    started_at, started = time.time(), time.perf_counter()
    result = ray_job_submit(storage, *run_id, *args, submission_id=submission_id, script=script)
    seconds = time.perf_counter() - started
    if result.returncode:
        raise RuntimeError(f"the job failed:\n{result.stdout[-3000:]}{result.stderr[-3000:]}")
    info = finished_job(JobSubmissionClient(local.DASHBOARD_URL), submission_id)
    if info.status != "SUCCEEDED":
        raise RuntimeError(f"the job ended {info.status}: {info.message}")
    ended_at = info.end_time / 1000
    return submission_id, {"seconds": seconds, "job_end_seconds": ended_at - started_at}


def finished_job(client, submission_id: str, timeout: float = 300):
    """The job's info once Ray records its end: on a loaded machine the CLI's log stream can close
    (and `ray job submit` return 0) while the job is still writing its model."""
    deadline = time.monotonic() + timeout
    while not (info := client.get_job_info(submission_id)).status.is_terminal():
        if time.monotonic() > deadline:
            raise RuntimeError(f"the job {submission_id} has not ended after {timeout:.0f} s")
        time.sleep(0.5)
    return info


def ray_job(storage: Path, *train_args: str) -> dict:
    """Submit training/train.py to the local cluster, timed as `submitted` times it."""
    version, times = submitted(storage, *train_args)  # published whether or not --promote moved `latest`
    if not metadata_path(storage, version).is_file():
        raise RuntimeError("the job did not publish a model")
    metadata = json.loads(metadata_path(storage, version).read_text())
    return {"scheme": f"ray job {' '.join(train_args) or '(defaults)'}, {metadata['precision']}", **times,
            "test_accuracy": metadata["test_accuracy"],
            "workers": metadata["workers"], "rounds": metadata["rounds"], "epochs": metadata["epochs"],
            "precision": metadata["precision"], "threads": metadata.get("threads"),
            "round_accuracy": [r["test_accuracy"] for r in metadata["round_metrics"]],
            "aggregate_seconds": [r.get("aggregate_seconds") for r in metadata["round_metrics"]],
            "job_internal_seconds": metadata["train_seconds"]}


FLOOR_SCRIPT = "bench/train_floor.py"
DDP_SCRIPT = "bench/ddp_recipe.py"


def job_config(job_args: list[str]):
    """The job's flags as training/train.py reads them (its defaults filled in)."""
    from training.train import parse_args

    return parse_args(list(job_args))


def ddp_args(job_args: list[str], epochs: int, precision: str, threads: int | None) -> list[str]:
    """bench/ddp_recipe.py's flags for the job's workers, batch, schedule, seed, data and
    augmentation, at `epochs`, in the job's precision and threads."""
    if precision not in ("fp32", "bf16"):
        raise RuntimeError(f"the job recorded precision {precision!r}; the DDP recipe needs one of fp32, bf16")
    job = job_config(job_args)
    args = ["--workers", job.workers, "--epochs", epochs, "--batch-size", job.batch_size, "--lr", job.lr,
            "--seed", job.seed, "--precision", precision]
    args += ["--threads", threads] if threads else []
    args += ["--subset", job.subset] if job.subset else []
    args += [] if job.augment else ["--no-augment"]
    return [str(a) for a in args]


def ddp_job(storage: Path, job_args: list[str], epochs: int, precision: str, threads: int | None = None) -> dict:
    """Ray Train's DDP recipe (bench/ddp_recipe.py) with the job's settings, submitted and timed
    as `submitted` times the job."""
    run_id, times = submitted(storage, *ddp_args(job_args, epochs, precision, threads), script=DDP_SCRIPT)
    result = json.loads(ddp_result_path(storage, run_id).read_text())
    return {"scheme": f"Ray Train DDP recipe, {result['workers']} workers x {result['worker_cpus']:.2f} CPU, "
                      f"{epochs} epochs, {precision}", **times,
            "test_accuracy": result["accuracy"], "epochs": epochs, "precision": precision,
            "workers": result["workers"], "steps": result["steps"], "train_seconds": result["train_seconds"],
            "gradient_bytes": result["gradient_bytes"], "buffer_bytes": result["buffer_bytes"],
            "allreduce_ms_median": result.get("allreduce_ms_median")}


def ddp_beside(storage: Path, job_args: list[str], job: dict, epochs: int | None = None) -> dict:
    """The DDP recipe as the peer of `job` (a ray_job row): its settings, at `epochs` (default the
    job's), in the precision and threads the job recorded."""
    return ddp_job(storage, job_args, epochs or job["epochs"], job["precision"], job.get("threads"))


TINY_JOB = ("--subset", "300", "--promote", "never")  # 100 images per worker: 2 steps each, 2 rounds


def floor_set(storage: Path, train, test) -> dict:
    """One set, in turn: Ray Train's floor (a job of 3 workers that train nothing), the real job on
    300 images (its fixed costs, 2 steps per worker and 2 evaluations), and the `Net` plain anchor."""
    _, floor = submitted(storage, script=FLOOR_SCRIPT)
    return {"floor": {"scheme": f"Ray Train floor: {FLOOR_SCRIPT}, 3 workers that train nothing", **floor},
            "job_tiny": ray_job(storage, *TINY_JOB), "net_plain": net_plain(train, test)}


def floor_ratios(floor_run: dict) -> dict:
    """Each fixed cost against the anchor, and the least job / Net plain ratio they leave: the job
    trained exactly as fast as Net plain (the same steps on the same cores), plus its fixed costs."""
    plain = floor_run["net_plain"]["seconds"]
    return {"Ray floor / Net plain": floor_run["floor"]["seconds"] / plain,
            "job on 300 images / Net plain": floor_run["job_tiny"]["seconds"] / plain,
            "least job / Net plain (1 + job on 300 images / Net plain)": 1 + floor_run["job_tiny"]["seconds"] / plain}


def own_share(floor_run: dict) -> float:
    """Seconds the job on 300 images took beyond Ray Train's floor: the job's own fixed cost."""
    return floor_run["job_tiny"]["seconds"] - floor_run["floor"]["seconds"]


def peer_pair(storage: Path, job_args: list[str]) -> dict:
    """The default job, then Ray Train's DDP recipe in the precision and threads the job recorded."""
    job = ray_job(storage, *job_args)
    return {"job": job, "ddp": ddp_beside(storage, job_args, job)}


def write_peers_report(results: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "training_peers.json").write_text(json.dumps(results, indent=2) + "\n")
    lines = ["| pair | job (s) | job accuracy | job's aggregator, per round (s) | DDP recipe (s) | DDP accuracy "
             "| job / DDP |", "|---" * 7 + "|"]
    for i, pair in enumerate(results["pairs"], 1):
        job, ddp = pair["job"], pair["ddp"]
        rounds = " ".join(f"{s:.2f}" for s in job["aggregate_seconds"])
        lines.append(f"| {i} | {job['seconds']:.1f} | {100 * job['test_accuracy']:.2f}% | {rounds} | {ddp['seconds']:.1f} "
                     f"| {100 * ddp['test_accuracy']:.2f}% | {job['seconds'] / ddp['seconds']:.2f}x |")
    ratios = [pair["job"]["seconds"] / pair["ddp"]["seconds"] for pair in results["pairs"]]
    lines.append(f"| **median** | | | | | | **{statistics.median(ratios):.2f}x** |")
    lines.append("\nEach pair in turn: the default job, then the DDP recipe in the precision and threads it recorded "
                 "(issue 31's target: job / DDP <= 1.0x).")
    lines.append(f"\nMachine: {results['machine']}")
    (out / "training_peers.md").write_text("\n".join(lines) + "\n")


def write_peers_rtt(peers: dict, job_args: list[str], bandwidth_bit_s: float, out: Path) -> None:
    """The RTT model from the pair whose job / DDP ratio is the (upper) median."""
    pairs = sorted(peers["pairs"], key=lambda pair: pair["job"]["seconds"] / pair["ddp"]["seconds"])
    pair = pairs[len(pairs) // 2]
    rtt = rtt_results(pair["job"], pair["ddp"], job_args, bandwidth_bit_s)
    write_rtt_report({"machine": peers["machine"], **rtt}, out)
    print((out / "training_rtt.md").read_text())


def write_floor_report(results: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "training_floor.json").write_text(json.dumps(results, indent=2) + "\n")
    sets = results["sets"]
    names = list(floor_ratios(sets[0]))
    lines = ["| set | Ray floor (s) | Ray marked it done (s) | job on 300 images (s) | job's own share (s) | Net plain (s) | "
             + " | ".join(names) + " |", "|---" * (6 + len(names)) + "|"]
    for i, run in enumerate(sets, 1):
        lines.append(f"| {i} | {run['floor']['seconds']:.1f} | {run['floor']['job_end_seconds']:.1f} "
                     f"| {run['job_tiny']['seconds']:.1f} | {own_share(run):.1f} | {run['net_plain']['seconds']:.1f} | "
                     + " | ".join(f"{r:.2f}x" for r in floor_ratios(run).values()) + " |")
    medians = {key: statistics.median(floor_ratios(run)[key] for run in sets) for key in names}
    lines.append(f"| **median** | | | | **{statistics.median(map(own_share, sets)):.1f}** | | "
                 + " | ".join(f"**{r:.2f}x**" for r in medians.values()) + " |")
    lines.append("\nThe job's own share of the fixed cost is the job on 300 images minus the Ray floor of the same "
                 "set (issue 31's target: <= 3 s); the sets run in turn.")
    lines.append(f"\nMachine: {results['machine']}")
    (out / "training_floor.md").write_text("\n".join(lines) + "\n")


PROFILE_MARKS = (("driver's first line", ""), ("split done, workers asked for", "workers x"),
                 ("job setting decided", "torch thread(s) per worker"),
                 ("round 0 averaged", "] round 0:"), ("last round averaged", "[aggregator] round"),
                 ("published (driver's last line)", "  model /"))


def profile_job(storage: Path, *train_args: str) -> dict:
    """Submit one job and stamp each line of its log as it arrives (seconds since submission),
    to see where a job's fixed costs go; Ray records the job's start and end times."""
    import asyncio

    from ray.job_submission import JobSubmissionClient

    from ray_cluster.jobs import submit_training

    client = JobSubmissionClient(local.DASHBOARD_URL)
    submitted = time.time()
    job = submit_training(client, storage, *train_args)
    lines = []

    async def tail():
        async for chunk in client.tail_job_logs(job):
            lines.extend((time.time() - submitted, line) for line in chunk.splitlines() if line.strip())

    asyncio.run(tail())
    info = client.get_job_info(job)
    marks = {"job end (Ray)": info.end_time / 1000 - submitted}
    for name, needle in PROFILE_MARKS:
        hits = [t for t, line in lines if needle in line]
        if hits:
            marks[name] = hits[-1] if name.startswith(("last", "published")) else hits[0]
    marks = {k: round(v, 1) for k, v in marks.items() if v is not None}
    return {"args": list(train_args), "marks": marks, "status": str(info.status),
            "log": [(round(t, 1), line) for t, line in lines]}


def sweeps(storage: Path) -> list[dict]:
    runs = [ray_job(storage, "--rounds", str(r)) for r in (1, 2, 4, 8)]
    runs += [ray_job(storage, "--workers", str(w)) for w in (1, 2, 4)]
    return runs


def write_report(results: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "training.json").write_text(json.dumps(results, indent=2) + "\n")
    base = results["baseline"]["seconds"]
    lines = ["| scheme | test accuracy | wall time (s) | time / baseline | until Ray marked the job done (s) |",
             "|---|---|---|---|---|"]
    for run in [results["baseline"], results["net_plain"], results["seed"], results["job"],
                *([results["ddp"]] if "ddp" in results else []),
                *([results["job_no_augment"]] if "job_no_augment" in results else []),
                *([results["job_fp32"]] if results["job_fp32"] != results["job"] else []),
                *results.get("sweeps", [])]:
        accuracy, job_end = run.get("test_accuracy"), run.get("job_end_seconds")
        lines.append(f"| {run['scheme']} | {'' if accuracy is None else f'{100 * accuracy:.2f}%'} "
                     f"| {run['seconds']:.1f} | {run['seconds'] / base:.2f}x | {'' if job_end is None else f'{job_end:.1f}'} |")
    plain = results["net_plain"]["seconds"]
    lines.append(f"\nDefault job / Net plain: {results['job']['seconds'] / plain:.2f}x "
                 f"(fp32 job: {results['job_fp32']['seconds'] / plain:.2f}x)")
    if "ddp" in results:
        lines.append(f"\nDefault job / Ray Train DDP recipe: {results['job']['seconds'] / results['ddp']['seconds']:.2f}x "
                     "(issue 31's target: <= 1.0x)")
    repeats = results.get("repeats", [])
    if repeats:
        lines.append(f"\n{len(repeats)} pairs, taken in turn (the rows above are pair 1); ratios per pair and their median:\n")
        lines.append("| pair | baseline (s) | Net plain (s) | job (s) | job --no-augment (s) | job / baseline "
                     "| job / Net plain | job / job --no-augment |")
        lines.append("|---|---|---|---|---|---|---|---|")
        for i, pair in enumerate(repeats, 1):
            lines.append(f"| {i} | {pair['baseline']['seconds']:.1f} | {pair['net_plain']['seconds']:.1f} "
                         f"| {pair['job']['seconds']:.1f} | {pair['job_no_augment']['seconds']:.1f} | "
                         + " | ".join(f"{r:.2f}x" for r in pair_ratios(pair).values()) + " |")
        medians = median_ratios(repeats)
        lines.append("| **median** | | | | | " + " | ".join(f"**{r:.2f}x**" for r in medians.values()) + " |")
        accuracies = [100 * pair["job"]["test_accuracy"] for pair in repeats]
        lines.append(f"\nDefault job test accuracy over the pairs: {min(accuracies):.2f}-{max(accuracies):.2f}%")
    lines.append(f"\nMachine: {results['machine']}")
    (out / "training.md").write_text("\n".join(lines) + "\n")
    plot(results, out)


def pair_ratios(pair: dict) -> dict:
    job = pair["job"]["seconds"]
    return {"job / baseline": job / pair["baseline"]["seconds"], "job / Net plain": job / pair["net_plain"]["seconds"],
            "job / job --no-augment": job / pair["job_no_augment"]["seconds"]}


def median_ratios(repeats: list[dict]) -> dict:
    ratios = [pair_ratios(pair) for pair in repeats]
    return {key: statistics.median(r[key] for r in ratios) for key in ratios[0]}


def run_pair(storage: Path, train, test, job_args: list[str]) -> dict:
    """One pair, side by side: both baselines, then the default job with and without augmentation."""
    pair = {"baseline": baseline(train, test), "net_plain": net_plain(train, test)}
    pair["job"] = ray_job(storage, *job_args)
    pair["job_no_augment"] = ray_job(storage, *job_args, "--no-augment")
    return pair


def plot(results: dict, out: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    job = results["job"]
    for run, style in ((job, "o-"), *([(results["job_fp32"], "s--")] if results["job_fp32"] != job else [])):
        ax.plot(range(1, len(run["round_accuracy"]) + 1), [100 * a for a in run["round_accuracy"]], style,
                label=f"this project (FedAvg, {run['rounds']} rounds, {run['precision']})")
    ax.axhline(100 * results["seed"]["test_accuracy"], color="tab:red", ls="--", label="seed's averaged model")
    ax.axhline(100 * results["baseline"]["test_accuracy"], color="tab:gray", ls=":", label="1-process baseline")
    ax.set(xlabel="FedAvg round", ylabel="test accuracy (%)", title="MNIST test accuracy, 3 workers x 2 epochs",
           xticks=range(1, len(job["round_accuracy"]) + 1))
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(out / "training_accuracy.png", dpi=120)
    plt.close(fig)

    runs = results.get("sweeps", [])
    if runs:
        fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
        by_rounds = sorted((r["rounds"], r) for r in runs if r["workers"] == 3)
        by_workers = sorted({r["workers"]: r for r in runs + [job] if r["rounds"] == 4}.items())
        for ax, sweep, label in ((left, by_rounds, "FedAvg rounds (3 workers, 2 epochs)"),
                                 (right, by_workers, "workers (2 epochs, 4 rounds)")):
            ax.plot([k for k, _ in sweep], [r["seconds"] for _, r in sweep], "o-", label="job wall time (s)")
            ax.axhline(results["baseline"]["seconds"], color="tab:gray", ls=":", label="baseline wall time")
            ax.set(xlabel=label, ylabel="seconds", xticks=[k for k, _ in sweep])
            twin = ax.twinx()
            twin.plot([k for k, _ in sweep], [100 * r["test_accuracy"] for _, r in sweep], "s--", color="tab:green")
            twin.set_ylabel("test accuracy (%)", color="tab:green")
            ax.legend(loc="upper center")
        fig.tight_layout()
        fig.savefig(out / "training_sweeps.png", dpi=120)
        plt.close(fig)


# ---------------------------------------------------------------- --epochs: fixed cost and cost per epoch

def epoch_sweep(storage: Path, train, test, job_args: list[str], epochs_list: list[int], ddp_epochs: list[int],
                results: dict) -> list[dict]:
    """At each epoch count, in turn: the job, the DDP recipe (at `ddp_epochs`), and Net plain in the
    precision the job recorded. Runs the default rows already made are reused, not repeated."""
    runs = []
    for epochs in epochs_list:
        job = results["job"] if results["job"]["epochs"] == epochs else ray_job(storage, *job_args, "--epochs", str(epochs))
        run = {"epochs": epochs, "job": job}
        if epochs in ddp_epochs:
            same = results.get("ddp")
            run["ddp"] = same if same and same["epochs"] == epochs and same["precision"] == job["precision"] else \
                ddp_beside(storage, job_args, job, epochs)
        plain = results["net_plain"]
        run["net_plain"] = plain if (plain.get("epochs"), plain["precision"]) == (epochs, job["precision"]) else \
            net_plain(train, test, epochs, job["precision"])
        runs.append(run)
    return runs


def sweep_points(runs: list[dict]) -> dict[str, dict[int, float]]:
    points = {"job": {}, "net_plain": {}, "ddp": {}}
    for run in runs:
        for scheme in points:
            if scheme in run:
                points[scheme][run["epochs"]] = run[scheme]["seconds"]
    return {scheme: by_epochs for scheme, by_epochs in points.items() if by_epochs}


SCHEME_NAMES = {"job": "the job (ray job submit)", "ddp": "Ray Train DDP recipe (ray job submit)",
                "net_plain": "Net plain (1 process, training loop only)"}


def write_epoch_report(sweep: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "training_epochs.json").write_text(json.dumps(sweep, indent=2) + "\n")
    lines = ["| epochs | job (s) | job accuracy | DDP recipe (s) | DDP accuracy | Net plain (s) | Net plain accuracy "
             "| precision | job / DDP | job / Net plain |", "|---" * 10 + "|"]
    for run in sweep["runs"]:
        job, plain, ddp = run["job"], run["net_plain"], run.get("ddp")
        ddp_cells = [f"{ddp['seconds']:.1f}", f"{100 * ddp['test_accuracy']:.2f}%",
                     f"{job['seconds'] / ddp['seconds']:.2f}x"] if ddp else ["", "", ""]
        lines.append(f"| {run['epochs']} | {job['seconds']:.1f} | {100 * job['test_accuracy']:.2f}% "
                     f"| {ddp_cells[0]} | {ddp_cells[1]} | {plain['seconds']:.1f} | {100 * plain['test_accuracy']:.2f}% "
                     f"| {job['precision']} | {ddp_cells[2]} | {job['seconds'] / plain['seconds']:.2f}x |")
    costs = sweep["costs"]
    lines += ["", "Line fits of wall time against epochs (intercept: the fixed cost; slope: the cost of one more epoch):", "",
              "| scheme | fixed cost (s) | per epoch (s) |", "|---|---|---|"]
    lines += [f"| {SCHEME_NAMES.get(scheme, scheme)} | {fit['intercept']:.1f} | {fit['slope']:.1f} |"
              for scheme, fit in costs["fits"].items()]
    growth = costs.get("growth_ratio")
    if growth:
        lines.append(f"\nJob growth / Net plain growth, {growth['from_epochs']} -> {growth['to_epochs']} epochs: "
                     f"{growth['job_seconds']:.1f} s / {growth['plain_seconds']:.1f} s = **{growth['ratio']:.2f}x** "
                     f"(issue 31's target: <= 1.15x from 2 to 8 epochs)")
    lines.append("\nNet plain's time is its training loop (as the anchor's everywhere in this benchmark); the job's "
                 "and the DDP recipe's are from `ray job submit` until it returns.")
    lines.append(f"\nMachine: {sweep['machine']}")
    (out / "training_epochs.md").write_text("\n".join(lines) + "\n")
    plot_epochs(sweep, out / "training_epochs.png")


def plot_epochs(sweep: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points, fits = sweep_points(sweep["runs"]), sweep["costs"]["fits"]
    fig, ax = plt.subplots(figsize=(6, 4))
    for scheme, style in (("job", "o"), ("ddp", "s"), ("net_plain", "^")):
        if scheme not in points:
            continue
        xs = sorted(points[scheme])
        dots = ax.plot(xs, [points[scheme][x] for x in xs], style, label=SCHEME_NAMES[scheme])[0]
        if scheme in fits:
            fit = fits[scheme]
            ax.plot([0, xs[-1]], [fit["intercept"], fit["intercept"] + fit["slope"] * xs[-1]], "--",
                    color=dots.get_color(), label=f"  fit: {fit['intercept']:.0f} s + {fit['slope']:.1f} s/epoch")
    ax.set(xlabel="epochs", ylabel="wall time (s)", title="Training time against epochs", xlim=(0, None), ylim=(0, None))
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------- where federated averaging pays

RTTS_MS = [0, 1, 2, 5, 10, 20, 30, 40, 50]


def state_bytes() -> int:
    """Bytes of `Net`'s weights as a worker sends them (parameters and BatchNorm buffers)."""
    return sum(t.numel() * t.element_size() for t in Net().state_dict().values())


def worker_state_bytes() -> int:
    """Bytes of a worker's saved state, near enough: the weights and Adam's two moments per parameter."""
    return state_bytes() + 2 * sum(p.numel() * p.element_size() for p in Net().parameters())


def rtt_results(job: dict, ddp: dict, job_args: list[str], bandwidth_bit_s: float) -> dict:
    """The wall-time-against-RTT model (bench/training_cost.py) from the measured job and DDP rows."""
    config = job_config(job_args)
    images = config.subset or 60_000
    round_steps = job["epochs"] * -(-(images // job["workers"]) // config.batch_size) // job["rounds"]
    partial_saves = (round_steps - 1) // config.checkpoint_steps if config.checkpoint_steps else 0
    job_sync = training_cost.job_sync(job["rounds"], job["workers"], state_bytes(), worker_state_bytes(),
                                      partial_saves)
    ddp_sync = training_cost.ddp_sync(ddp["steps"], ddp["epochs"], ddp["workers"], ddp["gradient_bytes"],
                                      ddp["buffer_bytes"])
    model = training_cost.rtt_model(job["seconds"], job_sync, ddp["seconds"], ddp_sync, bandwidth_bit_s, RTTS_MS)
    aggregate = [s for s in job.get("aggregate_seconds", []) if s is not None]
    model["measured"] = {
        "job_seconds": job["seconds"], "ddp_seconds": ddp["seconds"],
        "job_rounds": job["rounds"], "ddp_steps": ddp["steps"], "workers": job["workers"],
        "job_aggregate_seconds_per_round": statistics.mean(aggregate) if aggregate else None,
        "ddp_allreduce_ms": ddp.get("allreduce_ms_median"),
        "weight_bytes": state_bytes(), "worker_state_bytes": worker_state_bytes(), "gradient_bytes": ddp["gradient_bytes"], "partial_saves_per_round": partial_saves}
    return model


def write_rtt_report(rtt: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "training_rtt.json").write_text(json.dumps(rtt, indent=2) + "\n")
    measured, crossing = rtt["measured"], rtt["job_faster_from_rtt_ms"]
    gbit = rtt["bandwidth_bit_s"] / 1e9
    lines = ["**A model, not a measurement between nodes**: wall(RTT) = the wall measured here (one machine, "
             "loopback) + synchronisations x (one-way hops x RTT/2 + bytes over the busiest link / bandwidth), "
             f"at {gbit:g} Gbit/s (bench/training_cost.py states each count).", "",
             "| | job (federated averaging) | Ray Train DDP recipe |", "|---|---|---|",
             f"| wall measured here (s) | {measured['job_seconds']:.1f} | {measured['ddp_seconds']:.1f} |",
             f"| synchronisations | {rtt['job_sync']['count']} rounds | {rtt['ddp_sync']['count']} all-reduces (one per step) |",
             f"| one-way hops each | {rtt['job_sync']['hops']:g} (every storage operation and call a round trip) "
             f"| {rtt['ddp_sync']['hops']:g} (ring: 2(n-1), + the buffers' broadcast: ceil(log2 n)) |",
             f"| bytes each, busiest link | {rtt['job_sync']['bytes_per_sync'] / 1e6:.2f} MB "
             f"| {rtt['ddp_sync']['bytes_per_sync'] / 1e6:.2f} MB |",
             f"| measured here per synchronisation | {fmt(measured['job_aggregate_seconds_per_round'], 1000, ' ms aggregation + evaluation')} "
             f"| {fmt(measured['ddp_allreduce_ms'], 1, ' ms all-reduce')} |", "",
             "| RTT (ms) | " + " | ".join(f"{r:g}" for r in rtt["rtt_ms"]) + " |", "|---" * (len(rtt["rtt_ms"]) + 1) + "|",
             "| job (s) | " + " | ".join(f"{s:.1f}" for s in rtt["job_seconds"]) + " |",
             "| DDP recipe (s) | " + " | ".join(f"{s:.1f}" for s in rtt["ddp_seconds"]) + " |", "",
             "The job is faster already on one machine." if crossing == 0 else
             "In this model the job is never faster: its wall grows at least as fast with the RTT as DDP's."
             if crossing is None else f"The job is faster from an RTT of **{crossing:.1f} ms**.",
             f"\nMachine: {rtt['machine']}"]
    (out / "training_rtt.md").write_text("\n".join(lines) + "\n")
    plot_rtt(rtt, out / "training_rtt.png")


def fmt(value, scale: float, unit: str) -> str:
    return "" if value is None else f"{value * scale:.1f}{unit}"


def plot_rtt(rtt: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(rtt["rtt_ms"], rtt["job_seconds"], "o-", label=f"this project's job ({rtt['job_sync']['count']} rounds)")
    ax.plot(rtt["rtt_ms"], rtt["ddp_seconds"], "s-", label=f"Ray Train DDP recipe ({rtt['ddp_sync']['count']} all-reduces)")
    crossing = rtt["job_faster_from_rtt_ms"]
    if crossing:
        ax.axvline(crossing, color="tab:gray", ls=":", label=f"the job pulls ahead at {crossing:.1f} ms")
    ax.set(xlabel="round-trip time between nodes (ms)", ylabel="wall time (s)", ylim=(0, None),
           title=f"Model from measured walls, {rtt['bandwidth_bit_s'] / 1e9:g} Gbit/s links")
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def epoch_list(text: str) -> list[int]:
    """'2,4,8' -> [2, 4, 8]: distinct positive epoch counts, in order."""
    try:
        values = sorted({int(part) for part in text.split(",") if part.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected epoch counts like 2,4,8, got {text!r}") from None
    if not values or values[0] < 1:
        raise argparse.ArgumentTypeError(f"expected positive epoch counts like 2,4,8, got {text!r}")
    return values


def machine() -> str:
    """The CPU model and the flags that decide training speed, with the core count and torch."""
    model, flags = cpu_info()
    relevant = [f for f in ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile", "amx_bf16") if f in flags]
    return (f"{model}, {os.cpu_count()} cores, flags {' '.join(relevant) or 'unknown'} "
            f"(torch: capability {torch.backends.cpu.get_cpu_capability()}, native bf16 {native_bf16()}), "
            f"torch {torch.__version__}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--storage", help="storage root (default: bench/results/storage)")
    parser.add_argument("--data-source", help="local folder with the MNIST files")
    parser.add_argument("--sweeps", action="store_true", help="also sweep rounds and workers (slow)")
    parser.add_argument("--job-args", default="", help="extra arguments for the Ray job (e.g. '--subset 3000')")
    parser.add_argument("--baseline-subset", type=int, default=None, help="baselines on fewer images (smoke tests)")
    parser.add_argument("--test-subset", type=int, default=None,
                        help="baselines evaluated on the first N test images (smoke tests; the jobs use all)")
    parser.add_argument("--profile-job", action="store_true",
                        help="only submit one job (--job-args) and print when each step of it showed in its log")
    parser.add_argument("--floor", action="store_true",
                        help=f"only the fixed costs: {FLOOR_SCRIPT} (Ray Train, no training), the job on 300 images and "
                             "Net plain, --repeats sets in turn (writes training_floor.{json,md})")
    parser.add_argument("--peers", action="store_true",
                        help="only the default job and the DDP recipe, in turn, --repeats pairs "
                             "(writes training_peers.{json,md})")
    parser.add_argument("--out", type=Path, default=RESULTS, help="where results go (default bench/results)")
    parser.add_argument("--repeats", type=int, default=1,
                        help="pairs to take in turn; ratios are reported as medians over them (default 1)")
    parser.add_argument("--ddp", action=argparse.BooleanOptionalAction, default=True,
                        help=f"Ray Train's DDP recipe ({DDP_SCRIPT}) beside the default job (default on)")
    parser.add_argument("--epochs", type=epoch_list, default=None, metavar="E1,E2,...",
                        help="also the job and Net plain at each epoch count (e.g. 2,4,8): fixed cost and cost per "
                             "epoch; writes training_epochs.{json,md,png}")
    parser.add_argument("--ddp-epochs", type=epoch_list, default=None, metavar="E1,E2,...",
                        help="epoch counts of the sweep at which the DDP recipe runs too (default: the default job's)")
    parser.add_argument("--rtt-bandwidth", type=float, default=1.0, metavar="GBIT",
                        help="link bandwidth of the RTT model, Gbit/s (default 1)")
    args = parser.parse_args(argv)
    job_args = args.job_args.split()
    job_config(job_args)  # bad job flags fail here, before anything runs
    storage = resolve_storage(args.storage or args.out / "storage")
    fetch_mnist(storage, args.data_source)
    train, test = load_mnist(storage, train=True), load_mnist(storage, train=False)
    if args.baseline_subset:
        train = (train[0][:args.baseline_subset], train[1][:args.baseline_subset])
    if args.test_subset:  # evaluating the seed's network on 10,000 images takes most of a smoke test
        test = (test[0][:args.test_subset], test[1][:args.test_subset])
    started_ray = local.up()
    if args.profile_job:
        try:
            profile = profile_job(storage, *job_args)
        finally:
            if started_ray:
                local.down()
        print(json.dumps(profile["marks"], indent=1), profile["status"])
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "job_profile.json").write_text(json.dumps(profile, indent=1) + "\n")
        return 0
    if args.peers:
        try:
            peers = {"machine": machine(), "pairs": [peer_pair(storage, job_args) for _ in range(args.repeats)]}
        finally:
            if started_ray:
                local.down()
        write_peers_report(peers, args.out)
        print((args.out / "training_peers.md").read_text())
        write_peers_rtt(peers, job_args, 1e9 * args.rtt_bandwidth, args.out)
        return 0
    if args.floor:
        try:
            floor = {"machine": machine(), "sets": [floor_set(storage, train, test) for _ in range(args.repeats)]}
        finally:
            if started_ray:
                local.down()
        write_floor_report(floor, args.out)
        print((args.out / "training_floor.md").read_text())
        return 0
    try:
        results = {"machine": machine()}
        if args.repeats > 1:
            results["repeats"] = [run_pair(storage, train, test, job_args) for _ in range(args.repeats)]
            results.update(results["repeats"][0])
        else:
            results["baseline"] = baseline(train, test)
            results["net_plain"] = net_plain(train, test)
            results["job"] = ray_job(storage, *job_args)
        results["seed"] = seed_scheme(train, test)
        # Where --precision auto already chose fp32, the fp32 job is the same job: it is not run twice.
        results["job_fp32"] = results["job"] if results["job"]["precision"] == "fp32" else \
            ray_job(storage, *job_args, "--precision", "fp32")
        if args.ddp:
            results["ddp"] = ddp_beside(storage, job_args, results["job"])
        if args.epochs:
            ddp_epochs = args.ddp_epochs or ([results["job"]["epochs"]] if args.ddp else [])
            runs = epoch_sweep(storage, train, test, job_args, args.epochs, ddp_epochs, results)
            results["epoch_sweep"] = {"machine": results["machine"], "runs": runs,
                                      "costs": training_cost.epoch_costs(sweep_points(runs))}
        if args.sweeps:
            results["sweeps"] = sweeps(storage)
    finally:
        if started_ray:  # leave a cluster someone else started running
            local.down()
    write_report(results, args.out)
    print((args.out / "training.md").read_text())
    if "epoch_sweep" in results:
        write_epoch_report(results["epoch_sweep"], args.out)
        print((args.out / "training_epochs.md").read_text())
    if "ddp" in results:
        rtt = rtt_results(results["job"], results["ddp"], job_args, 1e9 * args.rtt_bandwidth)
        write_rtt_report({"machine": results["machine"], **rtt}, args.out)
        print((args.out / "training_rtt.md").read_text())
    for key in ("job", "job_fp32")[:1 if results["job_fp32"] == results["job"] else 2]:
        job = results[key]
        print(f"{job['scheme']}: job / baseline wall time {job['seconds'] / results['baseline']['seconds']:.2f}x, "
              f"/ Net plain {job['seconds'] / results['net_plain']['seconds']:.2f}x, accuracy {100 * job['test_accuracy']:.2f}%")
    if results.get("repeats"):
        print("medians over", len(results["repeats"]), "pairs:", {k: round(v, 2) for k, v in median_ratios(results["repeats"]).items()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
