"""Serving over time, against a real Ray Serve: no model yet, hot reload under load, and bad
publications (replica kills: tests/test_serving_failover.py)."""
import json
import os
import threading
import time
from collections import Counter

import httpx
import pytest

from bench.loadgen import load
from bench.seed_net import SeedNet
from serving import deploy
from tests.helpers import make_app, point_latest, publish, running_replicas, wait_for, wait_on_every_replica
from training.storage import models_dir

pytestmark = pytest.mark.ray


def pixels_body(test_digits, index: int = 0) -> bytes:
    return json.dumps({"pixels": test_digits[0][index].tolist()}).encode()


def run_in_background(fn):
    result = {}
    thread = threading.Thread(target=lambda: result.setdefault("value", fn()), daemon=True)
    thread.start()
    return thread, result


def test_no_model_yet_then_the_first_one_is_picked_up(ray_head, tmp_path, served_models, test_digits):
    """Before training: not ready, 503 saying to train first, no crash loop; then it serves."""
    app = make_app(f"mnist-empty-{os.getpid()}", tmp_path, with_ui=False)
    try:
        deploy.deploy(app.config, timeout=240)
        with app.client() as client:
            health = client.get("/healthz")
            assert health.status_code == 503 and health.json()["status"] == "not ready"
            predict = client.post("/predict", json={"pixels": test_digits[0][0].tolist()})
            assert predict.status_code == 503 and "train first" in predict.json()["error"]
            assert client.get("/v2/health/ready").status_code == 400
            assert client.get("/model").json()["ready"] is False
            first = running_replicas(app.name)["MnistModel"]
            time.sleep(3)  # health checks run every 5 s: the replica must stay up, not restart
            assert [r["replica_id"] for r in running_replicas(app.name)["MnistModel"]] == [r["replica_id"] for r in first]

            publish(tmp_path, "first", served_models["v1"], served_models["accuracy"])
            wait_for(lambda: client.get("/healthz").status_code == 200, 15, "the first model to load")
            # Each model replica picks the publication up on its own poll, so /predict may lag /healthz.
            body = wait_for(lambda: (r := client.post("/predict", json={"pixels": test_digits[0][0].tolist()}))
                            .status_code == 200 and r.json(), 15, "every model replica to serve it")
            assert body["model_version"] == "first" and body["digit"] == int(test_digits[1][0])
    finally:
        deploy.delete(app.names)


def test_hot_reload_under_load_drops_nothing(serve_app, served_models, test_digits):
    """Publish a new version while requests run: every request succeeds, /model switches."""
    before = serve_app.model()["model_version"]
    new = f"reload-{time.time_ns()}"
    versions = Counter()

    def record(body: bytes) -> bool:
        versions[json.loads(body)["model_version"]] += 1
        return True

    thread, result = run_in_background(lambda: load(
        f"{serve_app.url}/predict", [pixels_body(test_digits, i) for i in range(8)],
        clients=4, requests=100_000, time_limit_s=8, check=record))
    time.sleep(2)
    publish(serve_app.storage, new, served_models["v2"], served_models["accuracy"])
    wait_for(lambda: serve_app.model()["model_version"] == new, 10, "/model to show the new version")
    thread.join(30)
    summary = result["value"].summary()
    assert summary["requests"] > 100 and summary["success_rate"] == 1.0, summary
    assert versions[before] > 0 and versions[new] > 0, versions


def model_when(serve_app, predicate) -> dict | None:
    """/model, asked once per poll: with two model replicas two calls may get different answers."""
    status = serve_app.model()
    return status if predicate(status) else None


def test_a_bad_model_leaves_the_old_one_serving(serve_app, served_models, test_digits):
    storage, good = serve_app.storage, serve_app.model()["model_version"]
    bad_versions = {
        "corrupt-file": lambda folder: (folder / "model.pt").write_bytes(b"definitely not a torch file"),
        "wrong-network": lambda folder: __import__("torch").save(SeedNet().state_dict(), folder / "model.pt"),
    }
    for name, damage in bad_versions.items():
        publish(storage, name, served_models["v1"], served_models["accuracy"])
        damage(models_dir(storage) / name)
        point_latest(storage, name)  # re-point after damaging, so the watcher sees the bad files
        status = wait_for(lambda: model_when(serve_app, lambda m: (m.get("reload_error") or {}).get("version") == name),
                          10, f"the {name} error on /model")
        assert status["model_version"] == good and status["ready"]
        response = httpx.post(f"{serve_app.url}/predict", json={"pixels": test_digits[0][1].tolist()}, timeout=30)
        assert response.status_code == 200 and response.json()["model_version"] == good

    point_latest(storage, "never-published")
    status = wait_for(lambda: model_when(serve_app, lambda m: (m.get("reload_error") or {}).get("version")
                                         == "never-published"), 10, "the missing-version error on /model")
    assert "does not exist" in status["reload_error"]["error"] and status["model_version"] == good
    assert str(storage) not in json.dumps(status)  # no server paths on the public /model

    for escape in (f"../{good}", str(models_dir(storage) / good)):  # `latest` must name a plain version
        point_latest(storage, escape)
        status = wait_for(lambda: model_when(serve_app, lambda m: "plain version" in
                                             ((m.get("reload_error") or {}).get("error") or "")), 10, "the refusal")
        assert status["model_version"] == good and status["ready"] and escape not in json.dumps(status)

    fixed = f"fixed-{time.time_ns()}"  # the next good publication clears the error
    publish(storage, fixed, served_models["v1"], served_models["accuracy"])
    status = wait_for(lambda: model_when(serve_app, lambda m: m["model_version"] == fixed), 10, "recovery")
    assert status["reload_error"] is None
    # The next tests compare versions across requests: every replica must have moved on.
    wait_on_every_replica(lambda: serve_app.model()["model_version"] == fixed, 10, "every replica to serve the fix")
