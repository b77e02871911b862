"""Federated strategies, one small class each, in the shape of Flower's `Strategy`.

The server side is a pure function: `aggregate(global_weights, results, state)` takes the round's
starting global weights, the workers' results and the strategy's own server state (FedAdam's
moments; {} for the others) and returns the new global weights and the new state. Nothing else is
read or written, so the aggregator can redo a round after a restart and tests can call it directly.
The client side is one hook, `client_term(model, anchor)`: a term added to the worker's loss (FedProx's
proximal term), None for strategies that add nothing.

Adding a strategy is one class and one line in STRATEGIES (docs/TRAINING.md shows an example).

    fedavg             McMahan et al. 2017: the sample-weighted mean (the default)
    fedprox:MU         Li et al. 2020: FedAvg, and each worker adds MU/2 * ||w - w_global||^2 to its loss
    fedadam:LR         Reddi et al. 2021: Adam on the server over the averaged update (pseudo-gradient)
    median             Yin et al. 2018: the coordinate-wise median of the workers' weights
    trimmed-mean:BETA  Yin et al. 2018: per coordinate, drop the BETA fraction highest and lowest, mean the rest
"""
from dataclasses import dataclass

import torch


class StrategyError(ValueError):
    """A --strategy that names no strategy or gives it a bad parameter."""


@dataclass(eq=False)
class WorkerResult:
    """What one worker sends back from a round: its weights and the examples it trained on."""
    rank: int
    weights: dict
    num_samples: int


def is_buffer(key: str) -> bool:
    """BatchNorm's running statistics and counter: averaged, never stepped by a server optimizer."""
    return key.rsplit(".", 1)[-1] in ("running_mean", "running_var", "num_batches_tracked")


def same_keys(results: list[WorkerResult]) -> list[str]:
    if not results:
        raise StrategyError("nothing to aggregate")
    keys = list(results[0].weights)
    if any(list(r.weights) != keys for r in results):
        raise StrategyError("workers' models have different parameters")
    return keys


def like(value: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """`value` (float64) in the reference's dtype; integer counters rounded."""
    return value.to(reference.dtype) if reference.is_floating_point() else value.round().to(reference.dtype)


def weighted_mean(results: list[WorkerResult]) -> dict:
    """The sample-weighted mean of every tensor, summed in float64 (exact to the weights' precision)."""
    keys = same_keys(results)
    total = sum(r.num_samples for r in results)
    if total <= 0:
        raise StrategyError("workers report no training examples")
    return {key: like(sum(r.weights[key].to(torch.float64) * (r.num_samples / total) for r in results),
                      results[0].weights[key]) for key in keys}


def sorted_stack(results: list[WorkerResult], key: str) -> torch.Tensor:
    return torch.stack([r.weights[key].to(torch.float64) for r in results]).sort(dim=0).values


class Strategy:
    """FedAvg: the sample-weighted mean. The base of the others."""
    name = "fedavg"
    robust = False  # True: absorbs a worker with out-of-range weights itself (it is not dropped)

    def __init__(self, parameter: float | None = None):
        if parameter is not None:
            raise StrategyError(f"{self.name} takes no parameter")

    def __str__(self) -> str:
        return self.name

    def client_term(self, model: torch.nn.Module, anchor: dict) -> torch.Tensor | None:
        return None

    def aggregate(self, global_weights: dict, results: list[WorkerResult], state: dict) -> tuple[dict, dict]:
        return weighted_mean(results), state


FedAvg = Strategy


class ParameterStrategy(Strategy):
    """A strategy with one number after the colon, checked by `valid`."""
    rule = "a positive number"

    def __init__(self, parameter: float | None = None):
        if parameter is None or not self.valid(parameter):
            raise StrategyError(f"{self.name} needs {self.rule}: --strategy {self.name}:VALUE")
        self.parameter = parameter

    @staticmethod
    def valid(value: float) -> bool:
        return 0 < value < float("inf")

    def __str__(self) -> str:
        return f"{self.name}:{self.parameter:g}"


class FedProx(ParameterStrategy):
    """FedAvg on the server; each worker's loss gains MU/2 * ||w - w_global||^2, which keeps a
    worker on a skewed shard near the round's global model."""
    name = "fedprox"

    def client_term(self, model, anchor):
        return self.parameter / 2 * sum(((p - anchor[n]) ** 2).sum() for n, p in model.named_parameters())


class FedAdam(ParameterStrategy):
    """The averaged update (mean - global) as a pseudo-gradient for Adam on the server, step LR.
    BatchNorm's buffers take the plain average. tau = 1e-3 as in Reddi et al.'s experiments."""
    name = "fedadam"
    beta1, beta2, tau = 0.9, 0.99, 1e-3

    def aggregate(self, global_weights, results, state):
        averaged = weighted_mean(results)
        moments, new_weights = {}, {}
        for key, mean in averaged.items():
            if is_buffer(key) or not mean.is_floating_point():
                new_weights[key] = mean
                continue
            delta = mean.to(torch.float64) - global_weights[key].to(torch.float64)
            m = self.beta1 * state.get(f"m.{key}", torch.zeros_like(delta)) + (1 - self.beta1) * delta
            v = self.beta2 * state.get(f"v.{key}", torch.zeros_like(delta)) + (1 - self.beta2) * delta ** 2
            moments[f"m.{key}"], moments[f"v.{key}"] = m, v
            new_weights[key] = like(global_weights[key].to(torch.float64) + self.parameter * m / (v.sqrt() + self.tau),
                                    mean)
        return new_weights, moments


class Median(Strategy):
    """The coordinate-wise median of the workers' tensors (unweighted; the mean of the two middle
    values for an even count): one worker in three can send anything without moving it far."""
    name = "median"
    robust = True

    def aggregate(self, global_weights, results, state):
        n = len(results)
        out = {}
        for key in same_keys(results):
            ordered = sorted_stack(results, key)
            out[key] = like((ordered[(n - 1) // 2] + ordered[n // 2]) / 2, results[0].weights[key])
        return out, state


class TrimmedMean(ParameterStrategy):
    """Per coordinate, drop the floor(BETA * n) highest and lowest values and average the rest
    (unweighted). With 3 workers BETA must be >= 1/3 to trim anything."""
    name = "trimmed-mean"
    robust = True
    rule = "a fraction 0 <= BETA < 0.5"

    @staticmethod
    def valid(value):
        return 0 <= value < 0.5

    def aggregate(self, global_weights, results, state):
        n = len(results)
        cut = int(self.parameter * n)
        return {key: like(sorted_stack(results, key)[cut:n - cut].mean(dim=0), results[0].weights[key])
                for key in same_keys(results)}, state


STRATEGIES = {cls.name: cls for cls in (FedAvg, FedProx, FedAdam, Median, TrimmedMean)}


def make_strategy(spec: str) -> Strategy:
    """A strategy from its --strategy spelling: NAME or NAME:VALUE."""
    name, _, value = spec.partition(":")
    if name not in STRATEGIES:
        raise StrategyError(f"unknown strategy '{name}'; choose from {', '.join(STRATEGIES)}")
    try:
        parameter = float(value) if value else None
    except ValueError:
        raise StrategyError(f"{name}: '{value}' is not a number") from None
    return STRATEGIES[name](parameter)


# ---------------------------------------------------------------- faulty workers

OUT_OF_RANGE = 10.0  # a worker whose weights' norm is this many times off the round's median norm is faulty


def weights_norm(weights: dict) -> float:
    return float(sum(t.to(torch.float64).pow(2).sum() for k, t in weights.items()
                     if t.is_floating_point() and not is_buffer(k)) ** 0.5)


def screen_results(results: list[WorkerResult], robust: bool) -> tuple[list[WorkerResult], list[dict]]:
    """Split the round's results into those to aggregate and those dropped, with the reason.
    Non-finite weights are always dropped; weights whose norm is OUT_OF_RANGE times off the round's
    median are dropped unless the strategy is robust (it absorbs them)."""
    finite = [r for r in results if all(torch.isfinite(t).all() for t in r.weights.values() if t.is_floating_point())]
    kept_ranks = {r.rank for r in finite}
    dropped = [{"rank": r.rank, "reason": "non-finite weights"} for r in results if r.rank not in kept_ranks]
    if robust or not finite:
        return finite, dropped
    norms = {r.rank: weights_norm(r.weights) for r in finite}
    median = sorted(norms.values())[(len(norms) - 1) // 2]
    kept = []
    for r in finite:
        ratio = norms[r.rank] / median if median > 0 else 1.0
        if ratio > OUT_OF_RANGE or ratio < 1 / OUT_OF_RANGE:
            dropped.append({"rank": r.rank, "reason": f"weights' norm {ratio:.3g}x the round's median"})
        else:
            kept.append(r)
    return kept, dropped
