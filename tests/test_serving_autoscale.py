"""Serve autoscaling: the config's floors and ceilings (no Ray), and on the local cluster a bounded
load ramp that takes MnistApi and MnistModel from their minimum to more replicas and back down
once the load stops, with no 5xx while replicas start or stop."""
import itertools
import json
import os
import threading
import time

import pytest
from ray.serve.config import AutoscalingConfig
from ray.serve.schema import ServeDeploySchema

from bench.bench_serving import load_in_windows, replica_counts, server_errors
from serving import deploy
from tests.helpers import make_app, publish, running_replicas, wait_for, wait_on_every_replica


SCALED = ("MnistApi", "MnistModel")
# The test's own delays, so that a ramp fits in about a minute: metrics every 0.5 s (the default
# is 10 s), averaged over 2 s, and a scale-down after 3 s instead of the config's minute.
FAST = {"metrics_interval_s": 0.5, "look_back_period_s": 2, "upscale_delay_s": 1, "downscale_delay_s": 3}
HEAVY_CLIENTS = 16  # twice MnistApi's target of 8 requests in flight per replica
TRICKLE = (1, 0, 0)  # clients per 1-s window, in turn, while replicas stop: requests keep flowing, and
# the model's average stays well under its 0.5 batches in flight, so it shrinks too (one window in two
# kept it near 0.5 on a slow CPU: seen stuck at two replicas for 30 s and more)


def deployments(config: dict) -> dict[str, dict]:
    """The API application's deployments by name (the page application may be left out)."""
    (api,) = [app for app in config["applications"] if app["import_path"] == "serving.app:build_app"]
    return {d["name"]: d for d in api["deployments"]}


@pytest.mark.parametrize("split", [False, True], ids=["colocated", "split"])
def test_the_config_autoscales_between_a_floor_and_a_ceiling(tmp_path, split):
    config = deploy.local_config(str(tmp_path), split=split)
    ServeDeploySchema.model_validate(config)
    for name in (SCALED if split else ["MnistService"]):
        deployment = deployments(config)[name]
        assert "num_replicas" not in deployment  # Serve refuses both together
        scaling = AutoscalingConfig(**deployment["autoscaling_config"])
        assert 1 <= scaling.min_replicas < scaling.max_replicas  # never to zero: no cold start to fail on
        assert scaling.upscale_delay_s < scaling.downscale_delay_s  # grow fast, shrink slowly
        assert scaling.look_back_period_s > scaling.metrics_interval_s
    model = deployments(config)["MnistModel" if split else "MnistService"]
    # A 2-CPU workstation keeps a CPU for training even at the ceiling.
    assert model["autoscaling_config"]["max_replicas"] * model["ray_actor_options"]["num_cpus"] <= 1


def test_fixed_replicas_replace_autoscaling(tmp_path):
    config = deploy.local_config(str(tmp_path), model_replicas=3, split=True)
    ServeDeploySchema.model_validate(config)
    model = deployments(config)["MnistModel"]
    assert model["num_replicas"] == 3 and "autoscaling_config" not in model
    assert "autoscaling_config" in deployments(config)["MnistApi"]


def test_the_colocated_service_scales_on_http_requests_like_the_api(tmp_path):
    config = deploy.local_config(str(tmp_path))
    ServeDeploySchema.model_validate(config)
    (service,) = deploy.app_pair(config)[0]["deployments"]
    split = deployments(deploy.local_config(str(tmp_path), split=True))
    assert service["autoscaling_config"] == split["MnistApi"]["autoscaling_config"]


def running(app: str) -> dict[str, int]:
    return {name: len(replicas) for name, replicas in running_replicas(app).items()}


@pytest.mark.ray
def test_a_load_ramp_scales_up_and_back_down_without_errors(ray_head, tmp_path, served_models, test_digits):
    publish(tmp_path, "v1", served_models["v1"], served_models["accuracy"])
    app = make_app(f"mnist-scale-{os.getpid()}", tmp_path, with_ui=False)
    for name, deployment in deployments(app.config).items():
        deployment["autoscaling_config"].update(FAST)
    # One busy MnistApi replica keeps about one batch in flight: a target of 0.5 makes that enough
    # to add a model replica, so the ramp also starts a replica that must load the model first.
    deployments(app.config)["MnistModel"]["autoscaling_config"]["target_ongoing_requests"] = 0.5
    bodies = [json.dumps({"pixels": test_digits[0][i].tolist()}).encode() for i in range(8)]
    heavy_over, stop, windows = threading.Event(), threading.Event(), []

    turns = itertools.cycle(TRICKLE)

    def drive() -> None:
        windows.extend(load_in_windows(f"{app.url}/predict", bodies,
                                       lambda: next(turns) if heavy_over.is_set() else HEAVY_CLIENTS,
                                       stop, window_s=1.0, limit_s=150))

    driver = threading.Thread(target=drive, daemon=True)
    try:
        deploy.deploy(app.config, timeout=240)
        with app.client() as client:
            wait_on_every_replica(lambda: client.get("/healthz").status_code == 200, 60,
                                  "every model replica to load v1")
        assert running(app.name) == {"MnistApi": 1, "MnistModel": 1}  # the minimum, at rest

        driver.start()
        wait_for(lambda: all(n >= 2 for n in running(app.name).values()), 75,
                 "both deployments to scale up under load")
        heavy_over.set()
        heavy_until = time.monotonic()
        wait_for(lambda: all(c["running"] == c["target"] == 1 for c in replica_counts(app.name).values()), 150,
                 "both deployments to scale back to one replica after the load stopped")
        stop.set()
        driver.join(30)

        assert sum(w["ok"] for w in windows if w["t"] < heavy_until) > 0
        assert sum(w["ok"] for w in windows if w["t"] > heavy_until) > 0  # served while scaling down
        statuses = {code: sum(w["statuses"].get(code, 0) for w in windows) for w in windows for code in w["statuses"]}
        assert server_errors(windows) == 0, f"5xx or broken connections while scaling: {statuses}"
        assert set(statuses) == {"200"}
    finally:
        stop.set()
        deploy.delete(app.names)


# ---------------------------------------------------------------- the ramp benchmark's pieces (no Ray)

def test_the_ramp_bench_compares_the_config_against_its_ceiling(tmp_path):
    from bench.bench_serving import ramp_config
    fixed, scaled = ramp_config(tmp_path, "max"), ramp_config(tmp_path, {"MnistApi": {"upscale_delay_s": 1}})
    for config in (fixed, scaled):
        ServeDeploySchema.model_validate(config)
    config = deployments(deploy.local_config(str(tmp_path), split=True))
    for name in SCALED:
        assert deployments(fixed)[name]["num_replicas"] == config[name]["autoscaling_config"]["max_replicas"]
        assert "autoscaling_config" not in deployments(fixed)[name]
    assert deployments(scaled)["MnistApi"]["autoscaling_config"] == {**config["MnistApi"]["autoscaling_config"],
                                                                     "upscale_delay_s": 1}
    assert deployments(scaled)["MnistModel"]["autoscaling_config"] == config["MnistModel"]["autoscaling_config"]


def test_the_steady_state_bench_pins_replicas_at_the_ceiling(tmp_path):
    """The latency/throughput table measures a fixed layout, not autoscaling's transients."""
    from bench.bench_serving import at_ceiling
    for split in (False, True):
        app = at_ceiling(deploy.app_pair(deploy.local_config(str(tmp_path), split=split))[0])
        assert all("autoscaling_config" not in d and d["num_replicas"] == 2 for d in app["deployments"])


def test_ramp_profiles_and_reaction_times():
    from bench.bench_serving import ramp_profile, reactions
    assert ramp_profile("10:1,40:16,90:0") == [(10.0, 1), (40.0, 16), (90.0, 0)]
    for bad in ("10", "10:x", "0:4", "5:-1"):
        with pytest.raises(SystemExit):
            ramp_profile(bad)
    counts = lambda api, model: {"MnistApi": {"running": api}, "MnistModel": {"running": model}}  # noqa: E731
    samples = [{"t": t, **counts(*n)} for t, n in [(0, (1, 1)), (12, (1, 1)), (17, (2, 1)), (51, (2, 1)),
                                                    (54, (2, 2)), (75, (1, 2)), (80, (1, 1))]]
    run = {"profile": [(10, 1), (40, 16), (90, 1)], "samples": samples}
    # The model's replica came up only after the load fell (at 50 s): its scale-down counts from then.
    assert reactions(run) == {"MnistApi": {"up_s": 7.0, "down_s": 25.0}, "MnistModel": {"up_s": 44.0, "down_s": 30.0}}
