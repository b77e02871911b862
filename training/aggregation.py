"""Federated averaging: a small strategy class and the run's aggregator (a Ray actor).

FedAvg (McMahan et al., 2017): the new global model is the mean of the workers' models,
each weighted by the number of examples it trained on. The driver (training/train.py) starts
one aggregator per run and hands it to the workers; after each round every worker asks it for
that round's average, which it computes once, saves as global.pt and returns with the round's
metrics (the workers report those to Ray Train).
"""
import os
import time
from pathlib import Path

import torch

from training.allocator import keep_freed_memory
from training.data import load_mnist
from training.model import Net, evaluate
from training.storage import atomic_torch_save, global_path, worker_path


class AggregationError(RuntimeError):
    """A round's worker models are missing, stale, corrupt or inconsistent with the run."""


class FedAvg:
    """Average state dicts weighted by sample count (floating tensors and BatchNorm counters alike)."""

    def aggregate(self, results: list[tuple[dict, int]]) -> dict:
        if not results:
            raise AggregationError("nothing to average")
        total = sum(count for _, count in results)
        if total <= 0:
            raise AggregationError("workers report no training examples")
        keys = results[0][0].keys()
        for state, _ in results:
            if state.keys() != keys:
                raise AggregationError("workers' models have different parameters")
        return {key: self._weighted_mean([(state[key], count) for state, count in results], total)
                for key in keys}

    @staticmethod
    def _weighted_mean(tensors: list[tuple[torch.Tensor, int]], total: int) -> torch.Tensor:
        # Sum in float64 so the mean is exact to the parameters' own precision.
        mean = sum(t.to(torch.float64) * (count / total) for t, count in tensors)
        like = tensors[0][0]
        return mean.round().to(like.dtype) if not like.is_floating_point() else mean.to(like.dtype)


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


def aggregate_round(storage: str, run_id: str, round_index: int, manifest: dict, threads: int = 0,
                    test_set: tuple[torch.Tensor, torch.Tensor] | None = None) -> dict:
    """Average this round's worker models, evaluate on the 10,000 test images, save global.pt."""
    started = time.perf_counter()
    torch.set_num_threads(threads or min(4, os.cpu_count() or 1))
    storage = Path(storage)
    results = load_worker_results(storage, run_id, round_index, manifest)
    averaged = FedAvg().aggregate([(r["state_dict"], r["num_samples"]) for r in results])
    model = Net()
    model.load_state_dict(averaged)
    test = evaluate(model, *(test_set or load_mnist(storage, train=False)))
    atomic_torch_save(global_path(storage, run_id, round_index),
                      {"run_id": run_id, "round": round_index, "state_dict": averaged})
    metrics = {"round": round_index, "test_accuracy": test["accuracy"], "test_loss": test["loss"],
               "workers": [{"rank": r["rank"], "train_loss": r["train_loss"],
                            "train_accuracy": r["train_accuracy"], "seconds": r["seconds"],
                            "precision": r.get("precision", "fp32"), "threads": r.get("threads", 1),
                            "calibration": r.get("calibration")}
                           for r in results],
               "aggregate_seconds": time.perf_counter() - started}
    print(f"[aggregator] round {round_index}: test accuracy {test['accuracy']:.4f}", flush=True)
    return metrics


class Aggregator:
    """A run's aggregator as a Ray actor: the process, torch and the test images stay loaded
    between rounds, so a round pays only for averaging and evaluation (a fresh task per round
    spent ~2.5 s more starting a process and reading the test set).

    Every worker calls aggregate(r) once round r's worker files are all written; the first call
    averages, the others get the same metrics back. Averaging is idempotent, so a restarted
    actor (its memory lost) simply averages again."""

    def __init__(self, storage: str, run_id: str, manifest: dict):
        keep_freed_memory()
        self.storage, self.run_id, self.manifest = storage, run_id, manifest
        self.test_set = load_mnist(Path(storage), train=False)
        self.rounds: dict[int, dict] = {}

    def aggregate(self, round_index: int) -> dict:
        if round_index not in self.rounds:
            self.rounds[round_index] = aggregate_round(self.storage, self.run_id, round_index, self.manifest,
                                                       test_set=self.test_set)
        return self.rounds[round_index]


def start_aggregator(storage: Path, run_id: str, manifest: dict):
    """The run's aggregator actor, checking every round's worker models against `manifest`.

    It asks for no CPU: it works only while every worker waits for it, and so a second run on a
    full cluster can never leave it unscheduled. Ray may restart it (say, on another node)."""
    import ray

    actor = ray.remote(Aggregator).options(num_cpus=0, max_restarts=2, max_task_retries=2)
    return actor.remote(str(storage), run_id, manifest)
