"""The strategies' server side as the pure functions they are, their client hook, the registry,
and the screen that drops a faulty worker. No Ray, no files."""
import pytest
import torch

from training.model import Net
from training.strategies import (STRATEGIES, FedAdam, Strategy, StrategyError, WorkerResult, make_strategy,
                                 screen_results, weighted_mean)


def state(seed: int) -> dict:
    torch.manual_seed(seed)
    return Net().state_dict()


def results(*weights, counts=None) -> list[WorkerResult]:
    counts = counts or [100] * len(weights)
    return [WorkerResult(rank, w, c) for rank, (w, c) in enumerate(zip(weights, counts))]


def scaled(weights: dict, factor: float) -> dict:
    return {k: v * factor if v.is_floating_point() else v for k, v in weights.items()}


def test_fedavg_is_the_default_and_the_sample_weighted_mean():
    a, b = state(1), state(2)
    new, server = make_strategy("fedavg").aggregate(state(0), results(a, b, counts=[100, 300]), {})
    assert server == {}
    assert torch.allclose(new["fc2.weight"], (a["fc2.weight"] + 3 * b["fc2.weight"]) / 4, atol=1e-7)
    assert new["features.0.1.num_batches_tracked"].dtype == torch.long


def test_the_median_ignores_one_wild_worker_in_three():
    a, b = state(1), state(2)
    new, _ = make_strategy("median").aggregate(state(0), results(a, scaled(a, 100.0), b), {})
    low, high = torch.minimum(a["fc1.weight"], b["fc1.weight"]), torch.maximum(a["fc1.weight"], b["fc1.weight"])
    assert torch.all(new["fc1.weight"] >= low) and torch.all(new["fc1.weight"] <= high)
    even, _ = make_strategy("median").aggregate(state(0), results(a, b), {})
    assert torch.allclose(even["fc1.weight"], (a["fc1.weight"] + b["fc1.weight"]) / 2, atol=1e-7)


def test_the_trimmed_mean_drops_the_extremes_of_each_coordinate():
    a, b, c = state(1), state(2), state(3)
    new, _ = make_strategy("trimmed-mean:0.34").aggregate(state(0), results(a, b, c, scaled(a, -50.0), scaled(a, 50.0),
                                                                          counts=[1] * 5), {})
    ordered = torch.stack([w["fc2.bias"] for w in (a, b, c, scaled(a, -50.0), scaled(a, 50.0))]).sort(0).values
    assert torch.allclose(new["fc2.bias"], ordered[1:4].mean(0), atol=1e-6)
    untrimmed, _ = make_strategy("trimmed-mean:0").aggregate(state(0), results(a, b), {})
    assert torch.allclose(untrimmed["fc2.bias"], (a["fc2.bias"] + b["fc2.bias"]) / 2, atol=1e-7)


def test_fedadam_steps_the_global_model_along_the_averaged_update_and_keeps_its_moments():
    start, a = state(0), state(1)
    rule = make_strategy("fedadam:0.01")
    new, moments = rule.aggregate(start, results(a), {})
    delta = a["fc2.weight"].double() - start["fc2.weight"].double()
    m, v = 0.1 * delta, 0.01 * delta ** 2
    assert torch.allclose(new["fc2.weight"].double(), start["fc2.weight"].double() + 0.01 * m / (v.sqrt() + FedAdam.tau),
                          atol=1e-6)
    assert torch.equal(new["features.0.1.running_var"], a["features.0.1.running_var"])  # buffers: averaged
    again, _ = rule.aggregate(start, results(a), {})
    assert all(torch.equal(new[k], again[k]) for k in new)  # a pure function: the same inputs, the same output
    second, moments2 = rule.aggregate(new, results(a), moments)
    assert torch.allclose(moments2["m.fc2.weight"], 0.9 * moments["m.fc2.weight"]
                          + 0.1 * (a["fc2.weight"].double() - new["fc2.weight"].double()))


def test_fedprox_adds_the_proximal_term_on_the_worker_only():
    model = Net()
    anchor = {n: p.detach().clone() for n, p in model.named_parameters()}
    rule = make_strategy("fedprox:0.5")
    assert rule.client_term(model, anchor).item() == 0
    with torch.no_grad():
        model.fc2.bias.add_(2.0)
    assert rule.client_term(model, anchor).item() == pytest.approx(0.5 / 2 * 4 * 10)
    assert make_strategy("fedavg").client_term(model, anchor) is None
    a, b = state(1), state(2)
    prox, _ = rule.aggregate(state(0), results(a, b), {})
    assert all(torch.equal(prox[k], weighted_mean(results(a, b))[k]) for k in prox)


@pytest.mark.parametrize("spec, message", [("fedsgd", "unknown strategy 'fedsgd'"), ("fedprox", "needs a positive"),
                                           ("fedprox:-1", "needs a positive"), ("fedadam:x", "is not a number"),
                                           ("trimmed-mean:0.5", "0 <= BETA < 0.5"), ("median:2", "takes no parameter")])
def test_bad_specs_are_refused_clearly(spec, message):
    with pytest.raises(StrategyError, match=message):
        make_strategy(spec)


def test_a_new_strategy_is_one_class_and_one_registry_line(monkeypatch):
    class Newest(Strategy):  # the docs' example: the last worker's weights
        name = "newest"

        def aggregate(self, global_weights, results, state):
            return results[-1].weights, state

    monkeypatch.setitem(STRATEGIES, Newest.name, Newest)
    b = state(2)
    assert make_strategy("newest").aggregate(state(0), results(state(1), b), {})[0] is b


def test_the_screen_drops_nan_always_and_scaled_weights_unless_robust():
    a, b = state(1), state(2)
    nan = {k: torch.full_like(v, float("nan")) if v.is_floating_point() else v for k, v in a.items()}
    bad = results(a, nan, scaled(b, 100.0), state(3))
    kept, dropped = screen_results(bad, robust=False)
    assert [r.rank for r in kept] == [0, 3]
    assert dropped[0] == {"rank": 1, "reason": "non-finite weights"} and dropped[1]["rank"] == 2
    kept, dropped = screen_results(bad, robust=True)
    assert [r.rank for r in kept] == [0, 2, 3] and [d["rank"] for d in dropped] == [1]
    kept, dropped = screen_results(results(a, b), robust=False)  # two healthy workers: both kept
    assert [r.rank for r in kept] == [0, 1] and dropped == []
