"""FedAvg is the exact sample-weighted mean; the aggregator answers every worker of a round with
the one average of exactly that round's results, saved once as the round's checkpoint."""
import asyncio
import uuid

import pytest
import ray
import torch

from training.aggregation import (PROGRESS_IMAGES, AggregationError, Aggregator, FedAvg, aggregate_round, check_results,
                                  progress_sample)
from training.data import load_mnist, write_shards
from training.model import Net
from training.storage import checkpoint_round_path, global_path, init_path


def random_state(seed: int) -> dict:
    torch.manual_seed(seed)
    model = Net()
    for module in model.modules():  # give BatchNorm buffers distinct values too
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-1, 1)
            module.running_var.uniform_(0.5, 2)
            module.num_batches_tracked.fill_(seed * 10)
    return model.state_dict()


def test_fedavg_is_the_sample_weighted_mean_of_every_tensor():
    states, counts = [random_state(s) for s in (1, 2, 3)], [100, 300, 600]
    averaged = FedAvg().aggregate(list(zip(states, counts)))
    for key, value in averaged.items():
        expected = sum(s[key].double() * c for s, c in zip(states, counts)) / sum(counts)
        if value.is_floating_point():
            assert torch.allclose(value.double(), expected, atol=1e-6), key
        else:  # BatchNorm's num_batches_tracked: rounded weighted mean, same dtype
            assert value.dtype == states[0][key].dtype and value.item() == round(expected.item()), key
    assert any(k.endswith("running_var") for k in averaged) and any(k.endswith("num_batches_tracked") for k in averaged)


def test_fedavg_of_identical_models_is_that_model():
    state = random_state(7)
    averaged = FedAvg().aggregate([(state, 5), (state, 9)])
    assert all(torch.equal(averaged[k], state[k]) for k in state)


def test_fedavg_refuses_mismatched_models():
    bad = dict(random_state(1))
    bad.pop("fc2.bias")
    with pytest.raises(AggregationError, match="different parameters"):
        FedAvg().aggregate([(random_state(1), 1), (bad, 1)])


def worker_result(rank: int, num_samples: int, round_index: int = 0, **overrides) -> dict:
    return {"rank": rank, "round": round_index, "num_samples": num_samples, "state_dict": random_state(rank),
            "train_loss": 0.5, "train_accuracy": 0.9, "seconds": 1.0, **overrides}


def nan_state(seed: int) -> dict:
    return {k: v.float().fill_(float("nan")) if v.is_floating_point() else v for k, v in random_state(seed).items()}


@pytest.fixture(scope="module")
def test_set(mnist_storage):
    images, labels = load_mnist(mnist_storage, train=False)
    return images[:500], labels[:500]


def test_a_round_is_the_strategys_aggregate_scored_on_the_test_set(test_set):
    results = [worker_result(0, 100), worker_result(1, 300)]
    averaged, server_state, metrics = aggregate_round(random_state(9), {}, results, "fedavg", 0, test_set)
    expected = FedAvg().aggregate([(random_state(0), 100), (random_state(1), 300)])
    assert all(torch.equal(averaged[k], expected[k]) for k in expected) and server_state == {}
    model = Net()
    model.load_state_dict(expected)
    from training.model import evaluate
    assert metrics["test_accuracy"] == evaluate(model, *test_set)["accuracy"]
    assert [w["rank"] for w in metrics["workers"]] == [0, 1] and metrics["dropped"] == []


@pytest.mark.parametrize("problem", ["missing", "stale round", "wrong count"])
def test_results_that_are_not_this_rounds_are_refused(problem):
    shards = {"shards": [{"count": 100}, {"count": 300}]}
    results = [worker_result(0, 100, round_index=1), worker_result(1, 300, round_index=1)]
    if problem == "missing":
        results.pop()
    elif problem == "stale round":
        results[1]["round"] = 0
    else:
        results[1]["num_samples"] = 301
    with pytest.raises(AggregationError, match="worker 1"):
        check_results(results, shards, 1)


def test_a_nan_worker_is_dropped_with_a_warning_and_the_rest_averaged(test_set, capsys):
    results = [worker_result(r, 100 * (r + 1)) for r in range(3)]
    results[1]["state_dict"] = nan_state(1)
    averaged, _, metrics = aggregate_round(random_state(9), {}, results, "fedavg", 0, test_set)
    assert metrics["dropped"] == [{"rank": 1, "reason": "non-finite weights"}]
    assert "WARNING dropped worker 1" in capsys.readouterr().out
    expected = FedAvg().aggregate([(random_state(r), 100 * (r + 1)) for r in (0, 2)])
    assert all(torch.equal(averaged[k], expected[k]) for k in expected)


def test_the_round_fails_clearly_when_fewer_than_half_remain(test_set):
    results = [worker_result(r, 100, state_dict=nan_state(r)) for r in range(2)]
    with pytest.raises(AggregationError, match="only 0 of 2 workers sent usable weights"):
        aggregate_round(random_state(9), {}, results, "fedavg", 0, test_set)


@pytest.fixture
def aggregator(mnist_storage, monkeypatch):
    """The actor's class in this process (no Ray: ray.put hands the object back as it is)."""
    monkeypatch.setattr(ray, "put", lambda value: value)
    run_id = f"unit-agg-{uuid.uuid4().hex[:8]}"
    manifest = write_shards(mnist_storage, run_id, num_shards=2, seed=0, subset=200)
    torch.save(random_state(9), init_path(mnist_storage, run_id))  # the weights round 0 started from
    return lambda: Aggregator(str(mnist_storage), run_id, manifest, rounds=2, threads=1), mnist_storage, run_id, manifest


def submit_all(actor, round_index: int, results: list[dict]) -> list:
    async def all_of_them():
        return await asyncio.gather(*(actor.submit(round_index, r) for r in results), return_exceptions=True)
    return asyncio.run(all_of_them())


def test_every_worker_waits_for_the_last_result_and_gets_the_one_saved_average(aggregator):
    make, storage, run_id, manifest = aggregator
    actor = make()
    counts = [s["count"] for s in manifest["shards"]]
    replies = submit_all(actor, 0, [worker_result(r, counts[r]) for r in (1, 0)])  # in any order
    assert replies[0] is replies[1]
    expected = FedAvg().aggregate([(random_state(r), counts[r]) for r in (0, 1)])
    assert all(torch.equal(replies[0]["weights"][k], expected[k]) for k in expected)
    saved = torch.load(global_path(storage, run_id, 0), weights_only=True)
    assert saved["round"] == 0 and all(torch.equal(saved["state_dict"][k], expected[k]) for k in expected)
    assert saved["metrics"] == replies[0]["metrics"] and checkpoint_round_path(storage, run_id, 0).read_text() == "0"
    assert replies[0]["checkpoint"] == str(global_path(storage, run_id, 0).parent)

    # A restarted aggregator (its memory lost) answers a saved round from its checkpoint, alone,
    # and starts the next round from that checkpoint.
    again = make()
    late = submit_all(again, 0, [worker_result(0, counts[0])])[0]
    assert late["metrics"] == replies[0]["metrics"] and all(torch.equal(late["weights"][k], expected[k]) for k in expected)
    fresh = make()
    next_round = submit_all(fresh, 1, [worker_result(r, counts[r], round_index=1) for r in (0, 1)])[0]
    assert next_round["metrics"]["round"] == 1 and global_path(storage, run_id, 1).exists()
    # Round 0 was scored on the progress sample, the last round (the published model) on every test image
    assert (replies[0]["metrics"]["test_images"], next_round["metrics"]["test_images"]) == (PROGRESS_IMAGES, 10_000)


def test_the_progress_sample_is_fixed_and_fair(mnist_storage):
    images, labels = load_mnist(mnist_storage, train=False)
    sample, sample_labels = progress_sample((images, labels))
    again, _ = progress_sample((images, labels))
    assert len(sample_labels) == PROGRESS_IMAGES and torch.equal(sample, again)
    counts = torch.bincount(sample_labels, minlength=10).float() / PROGRESS_IMAGES
    assert torch.allclose(counts, torch.bincount(labels, minlength=10).float() / len(labels), atol=0.02)
    assert progress_sample((images[:100], labels[:100]))[1].equal(labels[:100])  # fewer images: all of them


def test_a_failed_round_fails_every_worker_and_saves_nothing(aggregator):
    make, storage, run_id, manifest = aggregator
    results = [worker_result(r, s["count"], state_dict=nan_state(r)) for r, s in enumerate(manifest["shards"])]
    replies = submit_all(make(), 0, results)
    assert all(isinstance(r, AggregationError) and "fewer than half" in str(r) for r in replies)
    assert not global_path(storage, run_id, 0).exists()


def test_evaluation_folds_batchnorm_without_changing_the_model_or_its_scores():
    """evaluate() runs a copy with BatchNorm folded into the convolutions: the scores match the
    model run as it is, and the model itself keeps its BatchNorm layers and their statistics."""
    from training.model import evaluate, to_input

    model = Net()
    model.load_state_dict(random_state(4))
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (300, 28, 28), dtype=torch.uint8, generator=generator)
    model.eval()
    with torch.inference_mode():
        logits = model(to_input(images))
    labels = logits.argmax(1)
    labels[::3] = (labels[::3] + 1) % 10  # a third wrong: accuracy 2/3 exactly
    expected_loss = torch.nn.functional.cross_entropy(logits, labels).item()

    scores = evaluate(model, images, labels, batch_size=128)
    assert scores["accuracy"] == pytest.approx(2 / 3)
    assert scores["loss"] == pytest.approx(expected_loss, rel=1e-4)
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    assert model.state_dict()["features.0.1.running_var"].equal(random_state(4)["features.0.1.running_var"])
