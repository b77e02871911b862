"""FedAvg is the exact sample-weighted mean, and the aggregator averages only this round's models."""
import uuid

import pytest
import torch

from training.aggregation import AggregationError, FedAvg, aggregate_round, load_worker_results
from training.data import write_shards
from training.model import Net
from training.storage import global_path, init_path, worker_path


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


def save_worker(storage, run_id, round_index, rank, num_samples, **overrides):
    record = {"run_id": run_id, "round": round_index, "rank": rank, "num_samples": num_samples,
              "state_dict": random_state(rank), "train_loss": 0.5, "train_accuracy": 0.9, "seconds": 1.0}
    path = worker_path(storage, run_id, round_index, rank)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({**record, **overrides}, path)


@pytest.fixture
def run(mnist_storage):
    run_id = f"unit-agg-{uuid.uuid4().hex[:8]}"
    manifest = write_shards(mnist_storage, run_id, num_shards=2, seed=0, subset=200)
    torch.save(random_state(9), init_path(mnist_storage, run_id))  # the weights round 0 started from
    return mnist_storage, run_id, manifest


def test_aggregator_averages_evaluates_and_saves(run):
    storage, run_id, manifest = run
    for rank, shard in enumerate(manifest["shards"]):
        save_worker(storage, run_id, 0, rank, shard["count"])
    metrics = aggregate_round(str(storage), run_id, 0, manifest, threads=1)
    saved = torch.load(global_path(storage, run_id, 0), weights_only=True)
    expected = FedAvg().aggregate([(random_state(r), s["count"]) for r, s in enumerate(manifest["shards"])])
    assert saved["run_id"] == run_id and saved["round"] == 0
    assert all(torch.equal(saved["state_dict"][k], expected[k]) for k in expected)
    assert 0 <= metrics["test_accuracy"] <= 1 and len(metrics["workers"]) == 2


@pytest.mark.parametrize("problem", ["missing", "stale run", "stale round", "wrong count", "corrupt"])
def test_aggregator_fails_loudly_on_the_wrong_models(run, problem):
    storage, run_id, manifest = run
    save_worker(storage, run_id, 1, 0, manifest["shards"][0]["count"])
    count = manifest["shards"][1]["count"]
    if problem == "stale run":
        save_worker(storage, "an-earlier-run", 1, 1, count)  # a leftover file from another run
        worker_path(storage, "an-earlier-run", 1, 1).rename(worker_path(storage, run_id, 1, 1))
    elif problem == "stale round":
        save_worker(storage, run_id, 1, 1, count, round=0)
    elif problem == "wrong count":
        save_worker(storage, run_id, 1, 1, count + 1)
    elif problem == "corrupt":
        worker_path(storage, run_id, 1, 1).write_bytes(b"not a torch file")
    with pytest.raises(AggregationError):
        load_worker_results(storage, run_id, 1, manifest)
    with pytest.raises(AggregationError):
        aggregate_round(str(storage), run_id, 1, manifest, threads=1)
    assert not global_path(storage, run_id, 1).exists()


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


def test_a_nan_worker_is_dropped_with_a_warning_and_the_rest_averaged(mnist_storage, capsys):
    run_id = f"unit-agg-{uuid.uuid4().hex[:8]}"
    manifest = write_shards(mnist_storage, run_id, num_shards=3, seed=0, subset=300)
    torch.save(random_state(9), init_path(mnist_storage, run_id))
    poisoned = {k: v.float().fill_(float("nan")) if v.is_floating_point() else v for k, v in random_state(1).items()}
    for rank, shard in enumerate(manifest["shards"]):
        save_worker(mnist_storage, run_id, 0, rank, shard["count"], **({"state_dict": poisoned} if rank == 1 else {}))
    metrics = aggregate_round(str(mnist_storage), run_id, 0, manifest, threads=1)
    assert metrics["dropped"] == [{"rank": 1, "reason": "non-finite weights"}]
    assert "WARNING dropped worker 1" in capsys.readouterr().out
    saved = torch.load(global_path(mnist_storage, run_id, 0), weights_only=True)["state_dict"]
    expected = FedAvg().aggregate([(random_state(r), manifest["shards"][r]["count"]) for r in (0, 2)])
    assert all(torch.equal(saved[k], expected[k]) for k in expected)


def test_the_round_fails_clearly_when_fewer_than_half_remain(run):
    storage, run_id, manifest = run
    nan = {k: v.float().fill_(float("nan")) if v.is_floating_point() else v for k, v in random_state(1).items()}
    for rank, shard in enumerate(manifest["shards"]):
        save_worker(storage, run_id, 0, rank, shard["count"], state_dict=nan)
    with pytest.raises(AggregationError, match="only 0 of 2 workers sent usable weights"):
        aggregate_round(str(storage), run_id, 0, manifest, threads=1)
    assert not global_path(storage, run_id, 0).exists()
