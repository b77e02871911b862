"""Fault injection on a real local Ray cluster: a Train worker is SIGKILLed in the middle of a
round, a job is stopped mid-run, and another's driver is killed. Work resumes from the last
round's checkpoint plus each worker's mid-round checkpoint; nothing is half-published."""
import json
import os
import signal
import uuid

import pytest
import torch
from ray.job_submission import JobStatus, JobSubmissionClient
from ray.util.state import list_actors, list_placement_groups

from ray_cluster import local
from tests.helpers import job_report, submit_training, wait_for, wait_for_job, wait_while_job_runs
from training.storage import global_path, metadata_path, model_path, models_dir, partial_path
from training.versions import read_latest

pytestmark = [pytest.mark.ray, pytest.mark.slow]
# Eight short rounds: a stop after round 0 lands while training is still going.
STOP_ARGS = ["--subset", "3000", "--workers", "3", "--epochs", "4", "--rounds", "8", "--seed", "3"]


@pytest.fixture(scope="module")
def client(ray_head):
    return JobSubmissionClient(local.DASHBOARD_URL)


def train_worker_pids(client, submission_id: str) -> list[int]:
    """Process ids of the job's live Ray Train workers."""
    job_id = client.get_job_info(submission_id).job_id
    actors = list_actors(address=local.DASHBOARD_URL, detail=True,
                         filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")])
    return [a.pid for a in actors if a.job_id == job_id]


def placement_groups_held(client, submission_id: str) -> list[str]:
    """Ids of the job's placement groups that still hold resources."""
    job_id = client.get_job_info(submission_id).job_id
    groups = list_placement_groups(address=local.DASHBOARD_URL, filters=[("creator_job_id", "=", job_id)])
    return [g.placement_group_id for g in groups if g.state != "REMOVED"]


def test_the_metadatas_command_reproduces_the_run_bit_for_bit_through_a_worker_kill(client, reference_run):
    """The reference job's own `reproduce` line (its metadata: seed and the decided precision and
    threads), run again under a new run id with one Train worker SIGKILLed inside round 1. The job
    resumes from round 0's average and each worker's own mid-round checkpoint, and publishes the
    reference's weights exactly: the command reproduces the run, and a resume loses nothing."""
    storage, calm, hurt = reference_run["storage"], reference_run["run_id"], f"kill-{uuid.uuid4().hex[:6]}"
    meta = json.loads(metadata_path(storage, calm).read_text())
    flags = meta["reproduce"].split()[2:]  # after "python training/train.py"
    job = submit_training(client, storage, *flags, "--run-id", hurt, "--promote", "always")
    pids = wait_while_job_runs(client, job, lambda: len(p := train_worker_pids(client, job)) == 3 and p, 300,
                               "the Train workers' pids")
    wait_while_job_runs(client, job, lambda: global_path(storage, hurt, 0).exists()
                        and all(partial_path(storage, hurt, 1, rank).exists() for rank in range(3)),
                        300, "round 0's average and every worker's first checkpoint in round 1")
    os.kill(pids[-1], signal.SIGKILL)
    assert wait_for_job(client, job) == JobStatus.SUCCEEDED, client.get_job_logs(job)[-3000:]

    logs = client.get_job_logs(job)
    assert "resuming after round 0" in logs  # the averaged model of round 0, from Ray Train's checkpoint
    assert "resuming round 1 at step" in logs  # then the worker's own progress inside round 1
    assert read_latest(storage) == hurt
    first, second = (torch.load(model_path(storage, v), weights_only=True) for v in (calm, hurt))
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    redone = json.loads(metadata_path(storage, hurt).read_text())
    assert redone["test_accuracy"] == meta["test_accuracy"] and redone["calibration"]["source"] == "requested"
    assert not list((storage / "runs" / hurt).rglob("*.partial.pt"))  # cleaned up at each round's end


@pytest.fixture(scope="module")
def two_faults(client, mnist_storage) -> dict:
    """Two jobs submitted together, so that their start-ups overlap: one is stopped (`ray job
    stop`), the other's driver SIGKILLed, each as soon as its round 0 average exists (a round takes
    about half a second, so both are watched at once). {name: (job, run id, final status)}, and
    `latest` from before."""
    def kill_driver(job: str) -> None:
        driver = wait_for(lambda: client.get_job_info(job).driver_info, 30, "the driver's pid")
        os.kill(int(driver.pid), signal.SIGKILL)

    faults = {"stop": client.stop_job, "crash": kill_driver}
    before = read_latest(mnist_storage)
    run_ids = {name: f"{name}-{uuid.uuid4().hex[:6]}" for name in faults}
    jobs = {name: submit_training(client, mnist_storage, "--run-id", run_id, *STOP_ARGS)
            for name, run_id in run_ids.items()}
    pending = set(jobs)

    def fault_each_job_once_in_training() -> bool:
        for name in [n for n in pending if global_path(mnist_storage, run_ids[n], 0).exists()]:
            faults[name](jobs[name])
            pending.remove(name)
        ended = [n for n in pending if client.get_job_status(jobs[n]).is_terminal()]
        assert not ended, "\n".join(f"{n} ended before its round 0 average: {job_report(client, jobs[n])}" for n in ended)
        return not pending

    wait_for(fault_each_job_once_in_training, 300, "each job's round 0 average", interval=0.1)
    # Both end here: each test's clean-up stops any job still running, which would be the other's.
    return {"before": before, **{name: (jobs[name], run_ids[name], wait_for_job(client, jobs[name], timeout=120))
                                 for name in jobs}}


def test_stopped_job_publishes_nothing_and_latest_stays(client, mnist_storage, two_faults):
    job, run_id, status = two_faults["stop"]
    assert status == JobStatus.STOPPED
    # Aborted as for Ctrl-C, so no new worker group starts while the job ends, and the CPUs are
    # free again: a placement group left behind would hold them for good.
    assert "SIGTERM: aborting the Ray Train run" in client.get_job_logs(job)
    wait_for(lambda: not placement_groups_held(client, job), 30, "the stopped job's placement groups to go")
    assert read_latest(mnist_storage) == two_faults["before"]
    assert not (models_dir(mnist_storage) / run_id).exists()
    assert not [p for p in models_dir(mnist_storage).glob(f".{run_id}*")]  # no half-published staging dir


def test_killed_driver_publishes_nothing_and_its_run_id_is_refused_after(client, mnist_storage, two_faults):
    """A crash of the driver (SIGKILL) mid-run: the job fails, nothing is published, `latest`
    stays, and submitting the same --run-id again is refused with a clear message."""
    job, run_id, status = two_faults["crash"]
    assert status == JobStatus.FAILED
    wait_for(lambda: not placement_groups_held(client, job), 30, "the killed job's placement groups to go")
    assert read_latest(mnist_storage) == two_faults["before"]
    assert not (models_dir(mnist_storage) / run_id).exists()
    assert not [p for p in models_dir(mnist_storage).glob(f".{run_id}*")]

    again = submit_training(client, mnist_storage, "--run-id", run_id, *STOP_ARGS)  # the run id is taken
    assert wait_for_job(client, again, timeout=120) == JobStatus.FAILED
    assert f"run {run_id} already exists" in client.get_job_logs(again)
    assert read_latest(mnist_storage) == two_faults["before"]
