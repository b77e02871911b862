"""Integration: a faulty worker on a real local Ray cluster. With FedAvg a worker sending NaNs is
dropped every round (a warning in the metrics) and the model is still good; the median absorbs a
worker sending weights scaled by 100, on a Dirichlet-skewed split that the metadata records."""
import json
import uuid

import pytest

from tests.helpers import ray_job_submit
from training.storage import models_dir

pytestmark = [pytest.mark.ray, pytest.mark.slow]
SMALL = ["--subset", "6000", "--workers", "3", "--epochs", "2", "--rounds", "2", "--promote", "never",
         "--precision", "fp32"]


def job(storage, *flags) -> tuple[dict, str]:
    run_id = f"fed-{uuid.uuid4().hex[:6]}"
    result = ray_job_submit(storage, *SMALL, *flags, "--run-id", run_id, timeout=420)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return json.loads((models_dir(storage) / run_id / "metadata.json").read_text()), result.stdout


def test_fedavg_drops_a_worker_that_sends_nans(ray_head, mnist_storage):
    meta, output = job(mnist_storage, "--inject-fault", "nan:1")
    assert all(r["dropped"] == [{"rank": 1, "reason": "non-finite weights"}] for r in meta["round_metrics"])
    assert "WARNING dropped worker 1: non-finite weights" in output
    assert meta["strategy"] == "fedavg" and meta["inject_fault"] == {"kind": "nan", "rank": 1}
    assert meta["test_accuracy"] > 0.9  # 2 of 3 workers on 2,000 images each: far from a NaN model


def test_the_median_absorbs_scaled_weights_on_a_skewed_split(ray_head, mnist_storage):
    meta, output = job(mnist_storage, "--strategy", "median", "--partition", "dirichlet:0.5",
                       "--inject-fault", "scale:2:100")
    assert all(r["dropped"] == [] and r["strategy"] == "median" for r in meta["round_metrics"])
    assert meta["partition"] == "dirichlet:0.5" and "partition dirichlet:0.5" in output
    counts = [s["count"] for s in meta["shards"]]
    assert sum(counts) == 6000 and len(set(counts)) == 3  # skewed: three different shard sizes
    assert meta["test_accuracy"] > 0.85
