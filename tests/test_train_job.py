"""Integration: `ray job submit` training/train.py to a real local Ray cluster on 127.0.0.1."""
import json

import pytest
import torch

from ray_cluster import local
from training.augment import DEFAULT as DEFAULT_AUGMENTATION
from training.data import load_mnist
from training.model import Net, evaluate
from training.storage import models_dir

pytestmark = [pytest.mark.ray, pytest.mark.slow]


@pytest.fixture(scope="module")
def trained(reference_run):
    """The session's reference job (tests/conftest.py): a --subset run under --promote auto."""
    return reference_run["storage"], reference_run["run_id"], reference_run["output"]


def test_job_publishes_the_model_and_auto_keeps_the_serving_one_for_a_subset_run(trained, reference_run):
    storage, run_id, output = trained
    serving = reference_run["serving"]
    assert reference_run["latest_after"] == serving
    folder = models_dir(storage) / run_id
    assert sorted(p.name for p in folder.iterdir()) == ["metadata.json", "model.pt"]
    assert f"model {folder}" in output
    assert output.count("job setting: ") == 1  # rank 0's one decision, shown once (training.worker.say)
    lines = output.splitlines()
    last = lines[next(i for i, line in enumerate(lines) if f"model {folder}" in line) + 1]  # the driver's last
    assert last.startswith(f"{run_id}: kept {serving} (99.34%) because this run trained on --subset 9000"), last
    promotion = json.loads((folder / "metadata.json").read_text())["promotion"]
    assert promotion["promoted"] is False and promotion["policy"] == "auto" and promotion["serving_before"] == serving


def test_the_local_cluster_starts_no_preemption_watcher(trained):
    """A workstation is not preempted: the local cluster turns Ray Train's watcher off, one
    process fewer starting beside the workers."""
    from ray.util.state import list_actors

    classes = {actor.class_name for actor in list_actors(address=local.DASHBOARD_URL, limit=10_000)}
    assert "TrainController" in classes  # the query sees the job's Ray Train actors
    assert "PreemptionWatcher" not in classes


def test_metadata_describes_the_run(trained):
    storage, run_id, _ = trained
    meta = json.loads((models_dir(storage) / run_id / "metadata.json").read_text())
    for key in ("version", "run_id", "workers", "epochs", "rounds", "batch_size", "test_accuracy", "round_metrics",
                "train_seconds", "shards_manifest_sha256", "created_at", "precision", "architecture"):
        assert key in meta, key
    assert meta["architecture"] == Net.architecture  # what serving builds to load the weights
    # --precision auto: one decision for the whole job (timed by rank 0, or this CPU's cached one)
    assert meta["precision"] in ("fp32", "bf16") and meta["threads"] == 1  # 3 workers share 2 cores
    setting = meta["calibration"]
    assert (setting["precision"], setting["threads"]) == (meta["precision"], meta["threads"])
    assert setting["source"] == "measured" or setting["source"].startswith("cache ")
    assert set(setting["screen_ms"]) == {"fp32x1", "bf16x1"} and all(ms > 0 for ms in setting["screen_ms"].values())
    assert all(ms > 0 for samples in setting["step_ms"].values() for ms in samples)
    assert f"--precision {meta['precision']} --threads 1" in meta["reproduce"]
    assert all("calibration" not in w for r in meta["round_metrics"] for w in r["workers"])  # not per round
    assert meta["augmentation"] == DEFAULT_AUGMENTATION.to_metadata()  # on by default, shown on the page
    assert (meta["workers"], meta["epochs"], meta["rounds"], meta["batch_size"]) == (3, 2, 2, 100)
    assert len(meta["round_metrics"]) == 2
    assert all(len(r["workers"]) == 3 for r in meta["round_metrics"])
    assert meta["test_accuracy"] == meta["round_metrics"][-1]["test_accuracy"]


def test_published_weights_score_what_the_metadata_says(trained):
    storage, run_id, _ = trained
    model = Net()
    model.load_state_dict(torch.load(models_dir(storage) / run_id / "model.pt", weights_only=True))
    measured = evaluate(model, *load_mnist(storage, train=False))["accuracy"]
    meta = json.loads((models_dir(storage) / run_id / "metadata.json").read_text())
    assert measured == pytest.approx(meta["test_accuracy"], abs=1e-9)
    assert measured > 0.5  # far above chance after 2 epochs of 3000 images per worker


def test_workers_trained_on_their_own_shards_from_the_same_start(trained):
    storage, run_id, _ = trained
    shards = json.loads((storage / "runs" / run_id / "shards" / "manifest.json").read_text())["shards"]
    assert [s["count"] for s in shards] == [3000, 3000, 3000]
    first = storage / "runs" / run_id / "rounds" / "round-000"
    records = [torch.load(first / f"worker-{r:03d}.pt", weights_only=True) for r in range(3)]
    assert [r["rank"] for r in records] == [0, 1, 2]
    assert not torch.equal(records[0]["state_dict"]["fc2.weight"], records[1]["state_dict"]["fc2.weight"])

