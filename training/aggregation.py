"""The run's aggregator (a Ray actor): each round's new global model, by the run's strategy.

The driver (training/train.py) starts one aggregator per run and hands it to the workers. After
each round every worker sends it its result (weights, sample count, training metrics) through
Ray's object store and waits. Once all have arrived, the aggregator drops workers whose weights
are non-finite or far out of range (strategies.screen_results; the round fails if fewer than half
remain), aggregates the rest by the run's strategy (training/strategies.py: FedAvg by default),
evaluates the result (the last round on the whole test set, earlier ones on a fixed sample of it:
every worker waits while it does), saves it once as the round's Ray Train checkpoint (what a
restart resumes from and the driver publishes) and puts it once into the object store, where
every worker takes it to start the next round.
"""
import asyncio
import os
import time
from pathlib import Path

import torch

from training.allocator import keep_freed_memory
from training.data import load_mnist
from training.model import Net, evaluate
from training.storage import (atomic_torch_save, atomic_write_bytes, checkpoint_dir, checkpoint_round_path, global_path,
                              init_path)
from training.strategies import StrategyError, WorkerResult, make_strategy, screen_results, weighted_mean


# Rounds before the last are scored on a fixed sample of this many test images: a progress reading
# (about +-0.3 points) at a fifth of the cost, paid while every worker waits. The last round, the
# model that is published, is scored on the whole test set.
PROGRESS_IMAGES = 2_000


def progress_sample(test_set: tuple[torch.Tensor, torch.Tensor], count: int = PROGRESS_IMAGES):
    """The same `count` test images and labels in every run (a seeded random sample: MNIST's test
    file is ordered by writer group, so its first images are not a fair sample)."""
    images, labels = test_set
    if len(labels) <= count:
        return test_set
    index = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))[:count]
    return images[index], labels[index]


class AggregationError(RuntimeError):
    """A round's worker results are inconsistent with the run, or too few are usable."""


class FedAvg:
    """The sample-weighted mean of (state dict, sample count) pairs (strategies.weighted_mean)."""

    def aggregate(self, results: list[tuple[dict, int]]) -> dict:
        try:
            return weighted_mean([WorkerResult(rank, state, count) for rank, (state, count) in enumerate(results)])
        except StrategyError as error:
            raise AggregationError(str(error)) from None


def check_results(results: list[dict], manifest: dict, round_index: int) -> None:
    """One result per shard, each of this round and with its shard's sample count."""
    for rank, shard in enumerate(manifest["shards"]):
        result = next((r for r in results if r["rank"] == rank), None)
        if result is None:
            raise AggregationError(f"round {round_index}: worker {rank} sent no result")
        expected = {"round": round_index, "num_samples": shard["count"]}
        actual = {key: result.get(key) for key in expected}
        if actual != expected:
            raise AggregationError(f"round {round_index}: worker {rank}'s result is not this round's: "
                                   f"expected {expected}, found {actual}")


def aggregate_round(start: dict, server_state: dict, results: list[dict], strategy: str, round_index: int,
                    test_set: tuple[torch.Tensor, torch.Tensor]) -> tuple[dict, dict, dict]:
    """The round's new global weights by `strategy` from the round's starting weights and the
    workers' results, the strategy's new server state, and the round's metrics (with the new
    weights' score on `test_set`). Reads and writes nothing."""
    rule = make_strategy(strategy)
    kept, dropped = screen_results([WorkerResult(r["rank"], r["state_dict"], r["num_samples"]) for r in results],
                                   rule.robust)
    for drop in dropped:
        print(f"[aggregator] round {round_index}: WARNING dropped worker {drop['rank']}: {drop['reason']}", flush=True)
    if 2 * len(kept) < len(results):
        raise AggregationError(f"round {round_index}: only {len(kept)} of {len(results)} workers sent usable weights "
                               f"(dropped: {dropped}); fewer than half remain, so the run stops here")
    try:
        averaged, server_state = rule.aggregate(start, kept, server_state)
    except StrategyError as error:
        raise AggregationError(f"round {round_index}: {error}") from None
    model = Net()
    model.load_state_dict(averaged)
    test = evaluate(model, *test_set)
    metrics = {"round": round_index, "test_accuracy": test["accuracy"], "test_loss": test["loss"],
               "test_images": len(test_set[1]),
               "workers": [{"rank": r["rank"], "train_loss": r["train_loss"],
                            "train_accuracy": r["train_accuracy"], "seconds": r["seconds"]} for r in results],
               "strategy": str(rule), "dropped": dropped}
    slowest = max(results, key=lambda r: r["seconds"])
    print(f"[aggregator] round {round_index}: test accuracy {test['accuracy']:.4f} ({len(test_set[1])} images), slowest worker "
          f"{slowest['rank']} {slowest['seconds']:.1f} s", flush=True)
    return averaged, server_state, metrics


def round_start(storage: Path, run_id: str, round_index: int) -> tuple[dict, dict]:
    """The global weights round `round_index` started from, and the strategy's state then, as saved."""
    if round_index == 0:
        return torch.load(init_path(storage, run_id), weights_only=True), {}
    previous = torch.load(global_path(storage, run_id, round_index - 1), weights_only=True)
    return previous["state_dict"], previous.get("server_state", {})


def save_checkpoint(storage: Path, run_id: str, round_index: int, averaged: dict, server_state: dict,
                    metrics: dict) -> None:
    """The round's average (with the strategy's state and the round's metrics) as a Ray Train
    checkpoint folder."""
    atomic_torch_save(global_path(storage, run_id, round_index),
                      {"run_id": run_id, "round": round_index, "state_dict": averaged, "server_state": server_state,
                       "metrics": metrics})
    atomic_write_bytes(checkpoint_round_path(storage, run_id, round_index), str(round_index).encode())


class Aggregator:
    """A run's aggregator as an async Ray actor: torch, the test images and the last average stay
    in memory between rounds, and each worker's submit() waits (without holding the actor) until
    the round's last result arrives; that call aggregates, and every call returns the same reply.

    Ray restarts a lost aggregator and retries the workers' pending calls: a round it had already
    saved is answered from its checkpoint, one it had not is aggregated when its results have
    arrived again, from the start read back from the last checkpoint. Aggregating is idempotent,
    so a round redone gives the same average."""

    def __init__(self, storage: str, run_id: str, manifest: dict, rounds: int, strategy: str = "fedavg",
                 threads: int = 0):
        keep_freed_memory()
        torch.set_num_threads(threads or min(4, os.cpu_count() or 1))
        self.storage, self.run_id, self.manifest, self.strategy = Path(storage), run_id, manifest, strategy
        self.rounds = rounds
        self.test_set = load_mnist(self.storage, train=False)
        self.progress_set = progress_sample(self.test_set)
        self.results: dict[int, dict[int, dict]] = {}  # round -> rank -> result, until the round is aggregated
        self.replies: dict[int, dict | Exception] = {}  # round -> what every worker of that round gets back
        self.done: dict[int, asyncio.Event] = {}
        self.last: tuple[int, dict, dict] | None = None  # (round, average, server state) of the last round aggregated

    async def submit(self, round_index: int, result: dict) -> dict:
        """Worker `result["rank"]`'s result of a round; returns once the round is aggregated:
        {"metrics", "weights" (an ObjectRef of the new global weights), "checkpoint" (its folder)}."""
        if round_index not in self.replies and global_path(self.storage, self.run_id, round_index).exists():
            self.replies[round_index] = self.reply(torch.load(global_path(self.storage, self.run_id, round_index),
                                                              weights_only=True))  # saved before a restart
        if round_index not in self.replies:
            self.results.setdefault(round_index, {})[result["rank"]] = result
            done = self.done.setdefault(round_index, asyncio.Event())
            if len(self.results[round_index]) == len(self.manifest["shards"]):
                try:
                    self.replies[round_index] = self.finish(round_index)
                except Exception as error:  # every waiting worker fails with it, rather than waiting forever
                    self.replies[round_index] = error
                done.set()
            else:
                await done.wait()
        reply = self.replies[round_index]
        if isinstance(reply, Exception):
            raise reply
        return reply

    def finish(self, round_index: int) -> dict:
        started = time.perf_counter()
        arrived = self.results.pop(round_index)
        results = [arrived[rank] for rank in sorted(arrived)]
        check_results(results, self.manifest, round_index)
        start, server_state = self.start_of(round_index)
        test_set = self.test_set if round_index == self.rounds - 1 else self.progress_set
        averaged, server_state, metrics = aggregate_round(start, server_state, results, self.strategy,
                                                          round_index, test_set)
        metrics["aggregate_seconds"] = time.perf_counter() - started
        save_checkpoint(self.storage, self.run_id, round_index, averaged, server_state, metrics)
        for old in (self.replies, self.done):
            old.pop(round_index - 2, None)  # no worker waits for a round two behind
        return self.reply({"round": round_index, "state_dict": averaged, "server_state": server_state,
                           "metrics": metrics})

    def reply(self, saved: dict) -> dict:
        """What every worker gets back for a round: its metrics, its average (put into the object
        store once) and its checkpoint folder."""
        import ray

        self.last = (saved["round"], saved["state_dict"], saved["server_state"])
        return {"metrics": saved["metrics"], "weights": ray.put(saved["state_dict"]),
                "checkpoint": str(checkpoint_dir(self.storage, self.run_id, saved["round"]))}

    def start_of(self, round_index: int) -> tuple[dict, dict]:
        if self.last and self.last[0] == round_index - 1:
            return self.last[1], self.last[2]
        return round_start(self.storage, self.run_id, round_index)  # a restarted aggregator


def start_aggregator(storage: Path, run_id: str, manifest: dict, rounds: int, strategy: str = "fedavg"):
    """The run's aggregator actor for `rounds` rounds, checking every round's worker results
    against `manifest`.

    It asks for no CPU: it works only while every worker waits for it, and so a second run on a
    full cluster can never leave it unscheduled. Ray may restart it (say, on another node)."""
    import ray

    actor = ray.remote(Aggregator).options(num_cpus=0, max_restarts=2, max_task_retries=2)
    return actor.remote(str(storage), run_id, manifest, rounds, strategy)
