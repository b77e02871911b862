"""One Ray Train worker of a run: train_func, which TorchTrainer runs once per worker (see train.py).

    set up   verify and load shard `rank`; take the job's one precision and thread count (rank 0
             decides, from the run's decision, the cache or by timing the step; the others wait)
    resume   from Ray Train's last checkpoint (the last averaged round, else init.pt) and this
             worker's own newest saved state: a WorkerState
    rounds   train the round's steps (saving the state every --checkpoint-steps and at the end),
             send the weights to the aggregator the driver started and wait for the run's average
             (both through Ray's object store), and report the round's metrics to Ray Train
             (rank 0 with the aggregator's saved average as the checkpoint)

The batches, their augmentation and the learning-rate schedule follow from the seed, the rank and
the step, and the state carries the optimizer and the schedule, so a restarted worker continues
exactly where it stopped, without replaying anything.
"""
import copy
import json
import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from training.allocator import keep_freed_memory
from training.augment import training_batch
from training.calibration import calibrate, candidates, decide
from training.data import load_shard
from training.model import Net, to_input
from training.strategies import make_strategy
from training.storage import (CHECKPOINT_MODEL, CHECKPOINT_ROUND, atomic_torch_save, init_path, partial_path, run_dir,
                              worker_path)

LABEL_SMOOTHING = 0.1  # worth +0.1 point of test accuracy in two epochs (bench/model_sweep.py)


def say(line: str) -> None:
    """One line in the job's log. In its workers Ray Train patches print() to log through the root
    logger and also echo to Ray's redirected stdout, so a plain print shows twice; the process's own
    stdout, which Ray forwards to the driver, shows it once."""
    print(line, file=sys.__stdout__, flush=True)


def train_func(config: dict) -> None:
    """Ray Train worker: train on shard `rank`, average with the other workers after every round."""
    import ray
    import ray.train
    from ray.train.collective import barrier

    # Set up: this worker's shard, its precision and threads, the optimizer and its schedule.
    keep_freed_memory()  # steps ~20% faster: no page faults for buffers freed and allocated again
    quiet_reports()
    storage, run_id, rounds = Path(config["storage"]), config["run_id"], config["rounds"]
    rank = ray.train.get_context().get_world_rank()
    images, labels = load_shard(storage, run_id, rank, config["manifest"])  # verifies its sha256
    model = Net()
    setting = job_setting(rank, model, images, labels, config, barrier)
    torch.set_num_threads(setting["threads"])
    order = ShardOrder(len(labels), config["batch_size"], seed=config["seed"] * 1000 + rank)
    total_steps = config["epochs"] * order.steps_per_epoch
    state = WorkerState.fresh(run_id, rank, model, config["lr"], total_steps)
    strategy = make_strategy(config.get("strategy", "fedavg"))  # its client hook (FedProx's term), if any

    # Resume: after the last averaged round, from this worker's own newest saved state.
    state.resume(storage, ray.train.get_checkpoint())

    for round_index in range(state.round, rounds):
        # Train: the rest of the round, then save the state a restart resumes from.
        first, last = round_bounds(total_steps, rounds, round_index)
        train_round(state, storage, order, images, labels, first, last, setting["precision"], config, strategy)
        state.save(worker_path(storage, run_id, round_index, rank), num_samples=len(labels),
                   node_id=ray.get_runtime_context().get_node_id(),
                   precision=setting["precision"], threads=setting["threads"], **state.round_metrics())
        partial_path(storage, run_id, round_index, rank).unlink(missing_ok=True)

        # Average: the aggregator answers once every worker's weights have reached it.
        weights = state.model.state_dict()
        result = {"rank": rank, "round": round_index, "num_samples": len(labels), "state_dict": weights,
                  **injected_fault(config.get("inject_fault"), rank, weights), **state.round_metrics()}
        reply = ray.get(config["aggregator"].submit.remote(round_index, result))
        state.next_round(ray.get(reply["weights"]))

        # Report: the round's metrics, and (rank 0) the average's folder as the checkpoint a restart resumes from.
        report_round(reply["metrics"], rank, reply["checkpoint"])


def quiet_reports() -> None:
    """Ray Train logs every worker's whole metrics dict at every report (its logger is named after
    its file); the aggregator prints a line per round instead."""
    try:
        from ray.train.v2._internal.execution import context
    except ImportError:  # a private module: another Ray version logs as it likes
        return
    logging.getLogger(context.__file__).setLevel(logging.WARNING)


# ---------------------------------------------------------------- a worker's state

def new_progress() -> dict:
    """A worker's progress through one round: steps done and the running training metrics."""
    return {"step": 0, "loss_sum": 0.0, "correct": 0, "seen": 0, "seconds": 0.0}


@dataclass
class WorkerState:
    """Where one worker stands: the round it is in, its progress through that round, and the
    model, optimizer and learning-rate schedule. Saved in the round's folder (mid-round and at the
    round's end); after a restart, restored from the newest of those files."""
    run_id: str
    rank: int
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    schedule: torch.optim.lr_scheduler.LRScheduler
    round: int = 0
    progress: dict = field(default_factory=new_progress)
    anchor: dict = field(default_factory=dict)  # the round's global parameters (FedProx's term pulls towards them)

    @classmethod
    def fresh(cls, run_id: str, rank: int, model: torch.nn.Module, lr: float, total_steps: int) -> "WorkerState":
        """Adam under a one-cycle schedule over all of this worker's steps."""
        optimizer = torch.optim.Adam(model.parameters(), lr=lr)
        schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=total_steps)
        return cls(run_id, rank, model, optimizer, schedule)

    def save(self, path: Path, **extra) -> None:
        atomic_torch_save(path, {"run_id": self.run_id, "round": self.round, "rank": self.rank,
                                 "state_dict": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                                 "schedule": self.schedule.state_dict(), "progress": dict(self.progress), **extra})

    def resume(self, storage: Path, checkpoint) -> None:
        """Start from Ray Train's last checkpoint (the average of round r: go on with round r+1)
        or, before the first, from the run's initial weights; then restore this worker's newest
        saved state: inside the next round (its finished file, else its mid-round one), else
        the end of round r, whose optimizer and schedule go on with the average."""
        if checkpoint is None:
            self.model.load_state_dict(torch.load(init_path(storage, self.run_id), weights_only=True))
        else:
            with checkpoint.as_directory() as folder:
                self.model.load_state_dict(torch.load(Path(folder, CHECKPOINT_MODEL), weights_only=True)["state_dict"])
                self.round = int(Path(folder, CHECKPOINT_ROUND).read_text()) + 1
            say(f"worker {self.rank}: resuming after round {self.round - 1} from {checkpoint.path}")
        self.set_anchor()
        newest_first = [(self.round, worker_path), (self.round, partial_path), (self.round - 1, worker_path)]
        own = [(r, path_of(storage, self.run_id, r, self.rank)) for r, path_of in newest_first if r >= 0]
        found = next(((r, path) for r, path in own if path.exists()), None)
        if found:
            self.restore(*found)
        elif self.round:  # the optimizer and schedule must go on from where round r left them
            raise RuntimeError(f"worker {self.rank} cannot resume after round {self.round - 1}: {own[-1][1]} is missing")

    def restore(self, round_index: int, path: Path) -> None:
        saved = torch.load(path, weights_only=True)
        if (saved.get("run_id"), saved.get("round"), saved.get("rank")) != (self.run_id, round_index, self.rank):
            raise RuntimeError(f"{path} is not worker {self.rank}'s file of round {round_index} of run {self.run_id}")
        self.optimizer.load_state_dict(saved["optimizer"])
        self.schedule.load_state_dict(saved["schedule"])
        if round_index == self.round:  # inside the round: its own model and progress too
            self.model.load_state_dict(saved["state_dict"])
            self.progress = dict(saved["progress"])
            say(f"worker {self.rank}: resuming round {self.round} at step {self.progress['step']} from {path.name}")

    def next_round(self, averaged: dict) -> None:
        self.model.load_state_dict(averaged)
        self.round, self.progress = self.round + 1, new_progress()
        self.set_anchor()

    def set_anchor(self) -> None:
        self.anchor = {name: p.detach().clone() for name, p in self.model.named_parameters()}

    def round_metrics(self) -> dict:
        seen = max(self.progress["seen"], 1)
        return {"seconds": self.progress["seconds"], "train_loss": self.progress["loss_sum"] / seen,
                "train_accuracy": self.progress["correct"] / seen}


# ---------------------------------------------------------------- training

def steps_per_epoch(examples: int, batch_size: int) -> int:
    return -(-examples // batch_size)


def round_bounds(total_steps: int, rounds: int, round_index: int) -> tuple[int, int]:
    """[first, last) step of a round: the steps split as evenly as possible."""
    return total_steps * round_index // rounds, total_steps * (round_index + 1) // rounds


class ShardOrder:
    """The batches of a shard by step: a fresh seeded permutation every epoch (the e-th draw of one
    seeded generator), addressable by step, so a restarted worker needs no replay."""

    def __init__(self, examples: int, batch_size: int, seed: int):
        self.examples, self.batch_size, self.seed = examples, batch_size, seed
        self.steps_per_epoch = steps_per_epoch(examples, batch_size)
        self._epoch, self._order = -1, torch.empty(0, dtype=torch.long)

    def batch(self, step: int) -> torch.Tensor:
        epoch, position = divmod(step, self.steps_per_epoch)
        if epoch != self._epoch:
            generator = torch.Generator().manual_seed(self.seed)
            for _ in range(epoch + 1):
                self._order = torch.randperm(self.examples, generator=generator)
            self._epoch = epoch
        return self._order[position * self.batch_size:(position + 1) * self.batch_size]


def train_round(state: WorkerState, storage: Path, order: ShardOrder, images, labels, first: int, last: int,
                precision: str, config: dict, strategy=None) -> None:
    """Train steps [first, last) from where the state stands, saving it every --checkpoint-steps."""
    started = time.perf_counter() - state.progress["seconds"]
    state.model.train()
    term = strategy and (lambda model: strategy.client_term(model, state.anchor))
    for step in range(first + state.progress["step"], last):
        index = order.batch(step)
        batch = training_batch(images[index], config.get("augment"), config["seed"], state.rank, step)
        train_step(state.model, state.optimizer, state.schedule, batch, labels[index], state.progress, precision, term)
        state.progress["step"] = step + 1 - first
        if checkpoint_due(state.progress["step"], last - first, config["checkpoint_steps"]):
            state.progress["seconds"] = time.perf_counter() - started
            state.save(partial_path(storage, state.run_id, state.round, state.rank))
    state.progress["seconds"] = time.perf_counter() - started


def train_step(model, optimizer, schedule, images, labels, progress: dict, precision: str, client_term=None) -> None:
    """One step. `client_term(model)`: a strategy's addition to the loss (None: nothing added)."""
    x, y = to_input(images), labels
    optimizer.zero_grad(set_to_none=True)
    # bf16: convolutions and linear layers compute in bfloat16; weights, gradients, Adam and the loss stay fp32.
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
        logits = model(x).float()
    loss = F.cross_entropy(logits, y, label_smoothing=LABEL_SMOOTHING)
    extra = client_term(model) if client_term else None
    (loss if extra is None else loss + extra).backward()
    optimizer.step()
    schedule.step()
    progress["loss_sum"] += loss.item() * len(y)
    progress["correct"] += (logits.argmax(1) == y).sum().item()
    progress["seen"] += len(y)


def checkpoint_due(step: int, round_steps: int, every: int) -> bool:
    """Save mid-round every `every` steps; the round's end writes the worker file anyway."""
    return every > 0 and step % every == 0 and step < round_steps


def decision_path(storage: Path, run_id: str) -> Path:
    """The run's one precision and thread count, as rank 0 decided them."""
    return run_dir(storage, run_id) / "precision.json"


def job_setting(rank: int, model, images, labels, config: dict, barrier) -> dict:
    """The job's one training setting. Rank 0 decides (training.calibration.decide) and saves it
    in the run's folder while the others wait at `barrier` (idle, so the timing runs without their
    contention); then every worker reads the same file."""
    storage, path = Path(config["storage"]), decision_path(Path(config["storage"]), config["run_id"])
    if rank == 0:
        setting = decide(storage, path, config["precision"], min(config["batch_size"], len(labels)),
                         config["threads"], config.get("pin_threads"), config.get("recalibrate", False),
                         lambda settings: calibrate_worker(model, images, labels, config, settings))
        timed = f"; calibration {setting.get('screen_ms', {})} {setting.get('step_ms', {})}" if "step_ms" in setting else ""
        say(f"job setting: {setting['precision']}, {setting['threads']} torch thread(s) per worker "
            f"({setting['source']}){timed}")
    barrier()
    return json.loads(path.read_text())


def calibrate_worker(model, images, labels, config: dict, settings: list[tuple[str, int]] | None = None) -> dict:
    """Time the real training step (a copy of the model, a throwaway optimizer, this worker's own
    images) in each candidate precision and thread count; the model itself is left untouched."""
    trial = copy.deepcopy(model)
    optimizer = torch.optim.Adam(trial.parameters(), lr=config["lr"])
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=config["lr"], total_steps=1000)
    batch_size = min(config["batch_size"], len(labels))

    def step(precision: str, batch: int) -> None:
        train_step(trial, optimizer, schedule, images[:batch], labels[:batch], new_progress(), precision)

    settings = settings or candidates(config["precision"], config["threads"])
    return calibrate(step, settings, batch_size, torch.set_num_threads)


def injected_fault(fault: dict | None, rank: int, weights: dict) -> dict:
    """--inject-fault: the weights this worker sends instead of its own (NaNs, or scaled by a
    factor), to show the aggregator's screen at work; {} when this worker is healthy."""
    if not fault or fault["rank"] != rank:
        return {}
    if fault["kind"] == "nan":
        broken = {k: torch.full_like(v, float("nan")) if v.is_floating_point() else v for k, v in weights.items()}
    else:
        broken = {k: v * fault["factor"] if v.is_floating_point() else v for k, v in weights.items()}
    say(f"worker {rank}: sending {fault['kind']} weights (--inject-fault)")
    return {"state_dict": broken}


def report_round(metrics: dict, rank: int, checkpoint: str) -> None:
    """The round's metrics to Ray Train (the dashboard shows them; the driver reads them from the
    result); rank 0 names the aggregator's saved average as the checkpoint a restarted worker group
    resumes from (already in the run's Ray Train folder: nothing to copy)."""
    import ray.train

    if rank != 0:
        ray.train.report(metrics)  # every worker reports (a barrier); rank 0's report is the one kept
        return
    ray.train.report(metrics, checkpoint=ray.train.Checkpoint(checkpoint),
                     checkpoint_upload_mode=ray.train.CheckpointUploadMode.NO_UPLOAD)
