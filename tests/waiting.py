"""Waiting for something that happens in another process (a Ray job, a Serve replica, a node)."""
import time


def wait_for(predicate, timeout: float, what: str, interval: float = 0.25):
    """Poll `predicate` until it returns something truthy, and return that; fail after `timeout` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def wait_for_job(client, job_id: str, timeout: float = 420):
    """The terminal status of a Ray job (JobSubmissionClient), once it has one."""
    from ray.job_submission import JobStatus

    terminal = {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}
    return wait_for(lambda: (s := client.get_job_status(job_id)) in terminal and s, timeout, f"job {job_id}")
