"""The run's aggregator (a Ray actor): each round's new global model, by the run's strategy.

The driver (training/train.py) starts one aggregator per run and hands it to the workers; after
each round every worker asks it for that round's global model, which it computes once from the
workers' files (training/strategies.py: FedAvg by default, the sample-weighted mean), saves as
global.pt and returns with the round's metrics (the workers report those to Ray Train). Workers
whose weights are non-finite or far out of range are dropped from the round first (see
strategies.screen_results); the round fails if fewer than half remain.
"""
import os
import time
from pathlib import Path

import torch

from training.allocator import keep_freed_memory
from training.data import load_mnist
from training.model import Net, evaluate
from training.storage import atomic_torch_save, global_path, init_path, worker_path
from training.strategies import StrategyError, WorkerResult, make_strategy, screen_results, weighted_mean


class AggregationError(RuntimeError):
    """A round's worker models are missing, stale, corrupt or inconsistent with the run."""


class FedAvg:
    """The sample-weighted mean of (state dict, sample count) pairs (strategies.weighted_mean)."""

    def aggregate(self, results: list[tuple[dict, int]]) -> dict:
        try:
            return weighted_mean([WorkerResult(rank, state, count) for rank, (state, count) in enumerate(results)])
        except StrategyError as error:
            raise AggregationError(str(error)) from None


def load_worker_results(storage: Path, run_id: str, round_index: int, manifest: dict) -> list[dict]:
    """The N worker models of exactly this run and round, checked against the shard manifest."""
    results = []
    for rank, shard in enumerate(manifest["shards"]):
        path = worker_path(storage, run_id, round_index, rank)
        try:
            result = torch.load(path, weights_only=True)
        except FileNotFoundError:
            raise AggregationError(f"round {round_index}: worker {rank}'s model {path} is missing") from None
        except Exception as error:
            raise AggregationError(f"round {round_index}: worker {rank}'s model {path} is unreadable: {error}") from None
        expected = {"run_id": run_id, "round": round_index, "rank": rank, "num_samples": shard["count"]}
        actual = {key: result.get(key) for key in expected}
        if actual != expected:
            raise AggregationError(f"{path} is not this round's model: expected {expected}, found {actual}")
        results.append(result)
    return results


def round_start(storage: Path, run_id: str, round_index: int) -> tuple[dict, dict]:
    """The global weights the workers started round `round_index` from, and the strategy's state then."""
    if round_index == 0:
        return torch.load(init_path(storage, run_id), weights_only=True), {}
    previous = torch.load(global_path(storage, run_id, round_index - 1), weights_only=True)
    return previous["state_dict"], previous.get("server_state", {})


def aggregate_round(storage: str, run_id: str, round_index: int, manifest: dict, threads: int = 0,
                    test_set: tuple[torch.Tensor, torch.Tensor] | None = None, strategy: str = "fedavg") -> dict:
    """This round's new global model by `strategy`, evaluated on the 10,000 test images, saved as global.pt."""
    started = time.perf_counter()
    torch.set_num_threads(threads or min(4, os.cpu_count() or 1))
    storage, rule = Path(storage), make_strategy(strategy)
    results = load_worker_results(storage, run_id, round_index, manifest)
    kept, dropped = screen_results([WorkerResult(r["rank"], r["state_dict"], r["num_samples"]) for r in results],
                                   rule.robust)
    for drop in dropped:
        print(f"[aggregator] round {round_index}: WARNING dropped worker {drop['rank']}: {drop['reason']}", flush=True)
    if 2 * len(kept) < len(results):
        raise AggregationError(f"round {round_index}: only {len(kept)} of {len(results)} workers sent usable weights "
                               f"(dropped: {dropped}); fewer than half remain, so the run stops here")
    start, state = round_start(storage, run_id, round_index)
    try:
        averaged, state = rule.aggregate(start, kept, state)
    except StrategyError as error:
        raise AggregationError(f"round {round_index}: {error}") from None
    model = Net()
    model.load_state_dict(averaged)
    test = evaluate(model, *(test_set or load_mnist(storage, train=False)))
    atomic_torch_save(global_path(storage, run_id, round_index),
                      {"run_id": run_id, "round": round_index, "state_dict": averaged, "server_state": state})
    metrics = {"round": round_index, "test_accuracy": test["accuracy"], "test_loss": test["loss"],
               "workers": [{"rank": r["rank"], "train_loss": r["train_loss"],
                            "train_accuracy": r["train_accuracy"], "seconds": r["seconds"]} for r in results],
               "strategy": str(rule), "dropped": dropped,
               "aggregate_seconds": time.perf_counter() - started}
    slowest = max(results, key=lambda r: r["seconds"])
    print(f"[aggregator] round {round_index}: test accuracy {test['accuracy']:.4f}, slowest worker "
          f"{slowest['rank']} {slowest['seconds']:.1f} s", flush=True)
    return metrics


class Aggregator:
    """A run's aggregator as a Ray actor: the process, torch and the test images stay loaded
    between rounds, so a round pays only for averaging and evaluation, not for starting a process
    and reading the test set again (docs/BENCHMARKS.md has the gap it closed).

    Every worker calls aggregate(r) once round r's worker files are all written; the first call
    averages, the others get the same metrics back. Averaging is idempotent, so a restarted
    actor (its memory lost) simply averages again."""

    def __init__(self, storage: str, run_id: str, manifest: dict, strategy: str = "fedavg"):
        keep_freed_memory()
        self.storage, self.run_id, self.manifest, self.strategy = storage, run_id, manifest, strategy
        self.test_set = load_mnist(Path(storage), train=False)
        self.metrics_by_round: dict[int, dict] = {}  # each round's result, for the workers that call after the first

    def aggregate(self, round_index: int) -> dict:
        if round_index not in self.metrics_by_round:
            self.metrics_by_round[round_index] = aggregate_round(self.storage, self.run_id, round_index, self.manifest,
                                                                 test_set=self.test_set, strategy=self.strategy)
        return self.metrics_by_round[round_index]


def start_aggregator(storage: Path, run_id: str, manifest: dict, strategy: str = "fedavg"):
    """The run's aggregator actor, checking every round's worker models against `manifest`.

    It asks for no CPU: it works only while every worker waits for it, and so a second run on a
    full cluster can never leave it unscheduled. Ray may restart it (say, on another node)."""
    import ray

    actor = ray.remote(Aggregator).options(num_cpus=0, max_restarts=2, max_task_retries=2)
    return actor.remote(str(storage), run_id, manifest, strategy)
