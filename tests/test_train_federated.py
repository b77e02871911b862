"""Integration: two federated jobs submitted together to a real local Ray cluster, on one storage
root. With FedAvg a worker sending NaNs is dropped every round (a warning in the metrics) and the
model is still good; the median absorbs a worker sending weights scaled by 100, on a
Dirichlet-skewed split that the metadata records; and the two runs, at once, keep to their own
files. (One pair of jobs where there were four: their fixed costs overlap.)"""
import json
import uuid

import pytest
import torch
from ray.job_submission import JobStatus, JobSubmissionClient

from ray_cluster import local
from tests.helpers import submit_training, wait_for_job
from training.data import fetch_mnist
from training.storage import global_path, metadata_path, models_dir
from training.versions import read_latest

pytestmark = [pytest.mark.ray, pytest.mark.slow]
SMALL = ["--subset", "6000", "--workers", "3", "--epochs", "2", "--rounds", "2", "--precision", "fp32"]
FLAGS = {"nan": ["--inject-fault", "nan:1"],
         "median": ["--strategy", "median", "--partition", "dirichlet:0.5", "--inject-fault", "scale:2:100"]}


@pytest.fixture(scope="module")
def two_runs(ray_head, mnist_source, tmp_path_factory) -> dict:
    """Both jobs, submitted together on a fresh storage root: {name: (metadata, job log)}, and
    the storage root, the run ids and the jobs' infos."""
    storage = tmp_path_factory.mktemp("federated")
    fetch_mnist(storage, mnist_source)
    client = JobSubmissionClient(local.DASHBOARD_URL)
    run_ids = {name: f"fed-{name}-{uuid.uuid4().hex[:6]}" for name in FLAGS}
    jobs = {name: submit_training(client, storage, *SMALL, *FLAGS[name], "--run-id", run_ids[name]) for name in FLAGS}
    for job in jobs.values():
        assert wait_for_job(client, job) == JobStatus.SUCCEEDED, client.get_job_logs(job)[-3000:]
    return {"storage": storage, "run_ids": run_ids, "infos": [client.get_job_info(job) for job in jobs.values()],
            **{name: (json.loads(metadata_path(storage, run_ids[name]).read_text()), client.get_job_logs(jobs[name]))
               for name in FLAGS}}


def test_fedavg_drops_a_worker_that_sends_nans(two_runs):
    meta, output = two_runs["nan"]
    assert all(r["dropped"] == [{"rank": 1, "reason": "non-finite weights"}] for r in meta["round_metrics"])
    assert "WARNING dropped worker 1: non-finite weights" in output
    assert meta["strategy"] == "fedavg" and meta["inject_fault"] == {"kind": "nan", "rank": 1}
    assert meta["test_accuracy"] > 0.9  # 2 of 3 workers on 2,000 images each: far from a NaN model


def test_the_median_absorbs_scaled_weights_on_a_skewed_split(two_runs):
    meta, output = two_runs["median"]
    assert all(r["dropped"] == [] and r["strategy"] == "median" for r in meta["round_metrics"])
    assert meta["partition"] == "dirichlet:0.5" and "partition dirichlet:0.5" in output
    counts = [s["count"] for s in meta["shards"]]
    assert sum(counts) == 6000 and len(set(counts)) == 3  # skewed: three different shard sizes
    assert meta["test_accuracy"] > 0.85


def test_two_runs_at_once_keep_to_their_own_files(two_runs):
    """Both finished, each run's folder holds only its own files, and each published model is
    exactly its own run's final average."""
    storage, runs = two_runs["storage"], two_runs["run_ids"].values()
    first, second = two_runs["infos"]
    assert first.start_time < second.end_time and second.start_time < first.end_time  # they really overlapped
    for run_id in runs:
        folder = storage / "runs" / run_id
        assert json.loads((folder / "shards" / "manifest.json").read_text())["run_id"] == run_id
        saved = [torch.load(path, weights_only=True) for path in (folder / "rounds").rglob("*.pt")]
        assert len(saved) == 2 * 3  # two rounds of three workers' states, nothing else
        saved += [torch.load(global_path(storage, run_id, r), weights_only=True) for r in (0, 1)]  # the averages
        assert {record["run_id"] for record in saved} == {run_id}
        published = torch.load(models_dir(storage) / run_id / "model.pt", weights_only=True)
        final = torch.load(global_path(storage, run_id, 1), weights_only=True)["state_dict"]
        assert all(torch.equal(published[key], final[key]) for key in final)
    assert read_latest(storage) in runs  # the first to finish serves (nothing did); a subset run after it does not
