"""Plain helpers for the tests (the fixtures are in tests/conftest.py): waiting on other processes,
reading Serve's running replicas, publishing and training a test model. Training jobs are
submitted by ray_cluster/jobs.py, re-exported here."""
import contextlib
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import torch
import uvicorn
import torch.nn.functional as F

from ray_cluster.jobs import ray_job_submit, submit_training, train_command  # noqa: F401  (re-exported)
from serving import deploy
from serving.deploy import running_replicas  # noqa: F401  (the tests import it from here)
from training.model import Net, to_input
from training.storage import models_dir
from training.versions import promote_version, publish_version



# ---------------------------------------------------------------- waiting on another process

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


def wait_on_every_replica(predicate, timeout: float, what: str, in_a_row: int = 20):
    """Like `wait_for`, but `predicate` (one request) must hold `in_a_row` times running. Serve
    routes each request to one of several replicas, and each replica loads a publication on its own
    poll: one success shows only that some replica is ready (20 in a row over 2 replicas: all ready,
    but for a chance of one in a million)."""
    return wait_for(lambda: all(predicate() for _ in range(in_a_row)), timeout, what)


def wait_while_job_runs(client, job_id: str, predicate, timeout: float, what: str):
    """Like `wait_for`, while Ray job `job_id` runs. Fails at once if the job ends first, and on a
    timeout stops the job: either way the message carries the job's status, its Ray Train actors
    and the tail of its logs, so a failure in CI says where the job stood."""
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        status = client.get_job_status(job_id)
        if status.is_terminal():
            raise AssertionError(f"job {job_id} ended ({status}) before {what}\n{job_report(client, job_id)}")
        if time.monotonic() > deadline:
            report = job_report(client, job_id)
            client.stop_job(job_id)
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what} (job stopped)\n{report}")
        time.sleep(0.25)
    return value


def job_report(client, job_id: str) -> str:
    """A Ray job's status, its live actors with their states, and the tail of its logs."""
    from ray.util.state import list_actors

    info = client.get_job_info(job_id)
    actors = list_actors(address=client.get_address(), filters=[("job_id", "=", info.job_id)], limit=100) \
        if info.job_id else []
    return (f"status {info.status}: {info.message}\n"
            f"actors: {sorted((a.class_name, a.state) for a in actors)}\n"
            f"logs (tail):\n{client.get_job_logs(job_id)[-3000:]}")


def stop_unfinished_jobs(client, timeout: float = 60) -> list[str]:
    """Stop every job on the cluster that has not ended (a failed test's job would otherwise hold
    the CPUs every later test needs); the ids of those stopped."""
    running = [job.submission_id for job in client.list_jobs()
               if job.submission_id and not job.status.is_terminal()]
    for job_id in running:
        client.stop_job(job_id)
    for job_id in running:
        wait_for_job(client, job_id, timeout)
    return running


def wait_for_job(client, job_id: str, timeout: float = 420):
    """The terminal status of a Ray job (JobSubmissionClient), once it has one."""
    return wait_for(lambda: (s := client.get_job_status(job_id)).is_terminal() and s, timeout, f"job {job_id}")


# ---------------------------------------------------------------- Serve

class ApiClient:
    """Calls to the API at `self.url`, the same for a Serve app and an in-process one."""

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=60)

    def model(self) -> dict:
        return httpx.get(f"{self.url}/model", timeout=30).json()


@dataclass
class ServeApp(ApiClient):
    name: str
    prefix: str
    storage: Path
    config: dict

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:8000{self.prefix}"

    @property
    def ui_url(self) -> str:
        return f"{self.url}/ui/"

    @property
    def names(self) -> list[str]:
        return [app["name"] for app in self.config["applications"]]

    @property
    def max_body_bytes(self) -> int:
        return self.config["applications"][0]["args"]["max_body_bytes"]


@dataclass
class LocalApi(ApiClient):
    """The API app (serving.api.create_api over the model in this process) served by uvicorn."""
    url: str
    storage: Path
    max_body_bytes: int


@contextlib.contextmanager
def served_in_a_thread(app, timeout: float = 30):
    """`app` served by uvicorn on 127.0.0.1 (a free port) in a thread of this process; its URL."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        wait_for(lambda: server.started or not thread.is_alive(), timeout, "uvicorn to start")
        assert server.started, "uvicorn stopped while starting"
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout)
        sock.close()


def make_app(name: str, storage: Path, with_ui: bool = True, model_replicas: int | None = None,
             api_replicas: int | None = None, split: bool = True) -> ServeApp:
    """The config's applications under test names, as `python -m serving deploy` builds them
    (`*_replicas`: a fixed count instead of the config's autoscaling). Split by default: the
    failover tests kill an ingress (MnistApi) or a model (MnistModel) replica, each on its own."""
    config = deploy.local_config(str(storage), name=name, route_prefix=f"/{name}", model_replicas=model_replicas,
                                 api_replicas=api_replicas, split=split)
    if not with_ui:
        config["applications"] = [deploy.app_pair(config)[0]]
    return ServeApp(name, f"/{name}", storage, config)


# ---------------------------------------------------------------- a test model

RECIPE = {"seed": 0, "steps": 300, "batch_size": 64, "max_lr": 4e-3, "finetune_steps": 40}


def train_net(images: torch.Tensor, labels: torch.Tensor, steps: int, seed: int,
              start: dict | None = None, max_lr: float = RECIPE["max_lr"]) -> dict:
    """Adam with a one-cycle schedule on random batches: about 98.7% test accuracy in 300 steps
    of 64 (20 s on one core)."""
    torch.manual_seed(seed)
    net = Net()
    if start:
        net.load_state_dict(start)
    optimiser = torch.optim.Adam(net.parameters(), max_lr)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, max_lr, total_steps=steps, pct_start=0.25)
    inputs = to_input(images)
    generator = torch.Generator().manual_seed(seed)
    net.train()
    for _ in range(steps):
        batch = torch.randint(0, len(labels), (RECIPE["batch_size"],), generator=generator)
        optimiser.zero_grad()
        F.cross_entropy(net(inputs[batch]), labels[batch]).backward()
        optimiser.step()
        schedule.step()
    return net.state_dict()


def publish_model(storage: Path, version: str, state_dict: dict, metadata: dict) -> Path:
    """Publish <version>/ and point `latest` at it (a training run decides by its policy instead:
    training.versions.publish_run)."""
    final = publish_version(storage, version, state_dict, metadata)
    promote_version(storage, version, note="published")
    return final


def publish(storage: Path, version: str, state: dict, accuracy: float) -> None:
    publish_model(storage, version, state, {
        "version": version, "run_id": f"test-{version}", "workers": 1, "epochs": 0, "rounds": 1,
        "batch_size": RECIPE["batch_size"], "test_accuracy": accuracy, "round_metrics": [],
        "train_seconds": 0.0, "shards_manifest_sha256": "", "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ")})


def point_latest(storage: Path, version: str) -> None:
    """Make `latest` name a version directly (to simulate broken or missing publications)."""
    (models_dir(storage) / "latest").write_text(f"{version}\n")
