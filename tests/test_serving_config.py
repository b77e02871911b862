"""serving/serve_config.yaml, the deploy tool's local config, the KubeRay rendering of it, and the
API's limits in-process (no Ray: the same FastAPI app over a stand-in backend)."""
import asyncio
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from ray.serve.schema import ServeDeploySchema

from serving import app as serve_app
from serving import deploy
from serving.api import create_api
from serving.limits import RETRY_AFTER_S
from serving.schemas import Limits


def test_the_config_is_a_valid_serve_config():
    config = deploy.load_config()
    ServeDeploySchema.model_validate(config)
    api, ui = deploy.app_pair(config)
    assert (api["name"], api["route_prefix"], ui["name"], ui["route_prefix"]) == ("mnist", "/", "mnist-ui", "/ui")
    assert ui["args"]["model_app"] == api["name"]


@pytest.mark.parametrize("split", [False, True], ids=["colocated", "split"])
def test_config_deployments_exist_and_ask_for_little_cpu(tmp_path, split):
    """Training and serving share a 2-CPU machine: the model asks for a quarter, the rest for none."""
    api, ui = deploy.app_pair(deploy.local_config(str(tmp_path), split=split))
    built = {"MnistApi": serve_app.MnistApi, "MnistModel": serve_app.MnistModel, "MnistUI": serve_app.MnistUI,
             "MnistService": serve_app.MnistService}
    for app in (api, ui):
        for deployment in app["deployments"]:
            assert deployment["name"] in built
            assert deployment["ray_actor_options"]["num_cpus"] <= 0.25
    model = next(d for d in api["deployments"] if d["name"] == ui["args"]["model_deployment"])
    serve_app.ModelConfig(**model["user_config"])  # reconfigure() accepts it
    assert model["max_ongoing_requests"] >= model["user_config"]["max_batch_size"]
    assert model["name"] == ("MnistModel" if split else "MnistService")


def test_builders_accept_the_config_args():
    api, ui = deploy.app_pair(deploy.load_config())
    assert serve_app.build_app(api["args"]) is not None
    assert serve_app.build_app({**api["args"], "colocate": False}) is not None
    assert serve_app.build_ui(ui["args"]) is not None
    with pytest.raises(ValueError):
        serve_app.build_app({"max_body_bytes": 10, "colour": "red"})


def test_the_default_layout_is_colocated_and_split_is_one_option_away(tmp_path):
    config = deploy.local_config(str(tmp_path), model_replicas=2)
    ServeDeploySchema.model_validate(config)
    api, ui = deploy.app_pair(config)
    assert [d["name"] for d in api["deployments"]] == ["MnistService"] and api["args"]["colocate"]
    assert api["deployments"][0]["num_replicas"] == 2 and ui["args"]["model_deployment"] == "MnistService"
    split = deploy.local_config(str(tmp_path), split=True, model_replicas=2, api_replicas=3)
    ServeDeploySchema.model_validate(split)
    api, ui = deploy.app_pair(split)
    ingress, model = api["deployments"]
    assert (ingress["name"], model["name"], ui["args"]["model_deployment"]) == ("MnistApi", "MnistModel", "MnistModel")
    assert not api["args"]["colocate"] and (ingress["num_replicas"], model["num_replicas"]) == (3, 2)
    (service,) = deploy.app_pair(deploy.read_config())[0]["deployments"]
    # the API takes what faces HTTP; the model keeps the service's batching
    assert model["user_config"] == service["user_config"] and "user_config" not in ingress
    for key in ("max_queued_requests", "backpressure_config", "health_check_timeout_s"):
        assert ingress[key] == service[key]


def test_local_config_points_at_an_absolute_storage_and_this_checkout(tmp_path):
    config = deploy.local_config(str(tmp_path), name="mine", route_prefix="/mine", model_replicas=3)
    ServeDeploySchema.model_validate(config)
    api, ui = deploy.app_pair(config)
    assert api["runtime_env"]["env_vars"]["MNIST_STORAGE"] == str(tmp_path.resolve())
    assert Path(api["runtime_env"]["env_vars"]["PYTHONPATH"]) == Path(deploy.__file__).resolve().parents[1]
    assert (api["name"], api["route_prefix"], ui["name"], ui["route_prefix"]) == ("mine", "/mine", "mine-ui", "/mine/ui")
    (model,) = api["deployments"]
    assert ui["args"]["model_app"] == "mine" and model["num_replicas"] == 3
    assert config["http_options"]["host"] == "127.0.0.1"


def test_kuberay_renders_it_for_the_cluster():
    """The RayService runs this very file; the pods give it the storage root and Serve's host."""
    import yaml
    from ray_cluster.manifests import SERVE_CONFIG, serve_config_v2
    assert serve_config_v2() == SERVE_CONFIG.read_text()
    rendered = yaml.safe_load(serve_config_v2())
    ServeDeploySchema.model_validate(rendered)
    assert "host" not in rendered["http_options"]  # loopback locally (local_config), 0.0.0.0 in a pod
    for app in rendered["applications"]:
        env = (app.get("runtime_env") or {}).get("env_vars") or {}
        assert "PYTHONPATH" not in env and "MNIST_STORAGE" not in env  # the image and the pod set them


# ---------------------------------------------------------------- GKE sizes in the file, fitted locally

# The serving RayCluster's worker group (k8s/base/rayservice.yaml): 2-CPU pods, 1 to 4 of them; the
# head reserves no CPUs, so replicas that ask for CPUs run on worker pods only.
POD_CPUS, MIN_PODS, MAX_PODS = 2, 1, 4


def demand(config: dict, bound: str) -> float:
    """CPUs all replicas of a config ask for at their floor ("min_replicas") or ceiling ("max_replicas")."""
    total = 0.0
    for app in config["applications"]:
        for options in app["deployments"]:
            scaling = options.get("autoscaling_config")
            replicas = scaling[bound] if scaling else options.get("num_replicas", 1)
            total += replicas * options["ray_actor_options"]["num_cpus"]
    return total


def test_the_file_is_sized_for_the_gke_serving_cluster():
    """Replicas that ask for real CPUs make KubeRay add worker pods under load; the floor fits the
    one pod that always runs, the ceiling the most pods the group may have."""
    config = deploy.read_config()
    assert demand(config, "min_replicas") <= MIN_PODS * POD_CPUS
    assert MIN_PODS * POD_CPUS < demand(config, "max_replicas") <= MAX_PODS * POD_CPUS
    for app in config["applications"]:
        for options in app["deployments"]:
            assert options["ray_actor_options"]["num_cpus"] <= POD_CPUS  # a replica fits a pod


def scaled_app(**model) -> dict:
    return {"applications": [{"name": "a", "import_path": "x:y", "deployments": [
        {"name": "Api", "ray_actor_options": {"num_cpus": 1},
         "autoscaling_config": {"min_replicas": 1, "max_replicas": 6, "target_ongoing_requests": 8}},
        {"name": "Model", "ray_actor_options": {"num_cpus": 0.5}, **model},
        {"name": "Page", "ray_actor_options": {"num_cpus": 0}, "num_replicas": 1}]}]}


def test_fit_to_node_caps_replicas_and_scales_cpus_to_a_share_of_the_node():
    fitted = deploy.fit_to_node(scaled_app(num_replicas=4), cpus=2, share=0.25)
    api, model, page = fitted["applications"][0]["deployments"]
    assert api["autoscaling_config"] == {"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 8}
    assert model["num_replicas"] == 2 and page["num_replicas"] == 1
    # 2 x 1 + 2 x 0.5 = 3 CPUs at the ceiling, scaled to a quarter of 2 CPUs (rounded down to 0.01)
    assert (api["ray_actor_options"]["num_cpus"], model["ray_actor_options"]["num_cpus"]) == (0.16, 0.08)
    assert page["ray_actor_options"]["num_cpus"] == 0
    assert demand(fitted, "max_replicas") <= 0.25 * 2


def test_fit_to_node_never_raises_a_request_and_keeps_a_floor_under_the_ceiling():
    roomy = deploy.fit_to_node(scaled_app(num_replicas=1), cpus=64, share=0.25)
    assert roomy == scaled_app(num_replicas=1)  # everything fits: the file as it is
    tiny = deploy.fit_to_node(scaled_app(autoscaling_config={"min_replicas": 3, "max_replicas": 4}), cpus=1)
    model = tiny["applications"][0]["deployments"][1]
    assert model["autoscaling_config"] == {"min_replicas": 1, "max_replicas": 1}


def test_local_deploys_run_the_file_fitted_to_the_node(tmp_path):
    """One file: the local config differs from it only in replica counts and CPU requests (and in
    the runtime_env and host it adds for this machine)."""
    def without_sizes(config: dict) -> list:
        """The applications, less their runtime_env, with replica counts and CPU requests removed."""
        apps = [{k: v for k, v in app.items() if k != "runtime_env"} for app in deploy.app_pair(config)]
        for options in (d for app in apps for d in app["deployments"]):
            options["ray_actor_options"].pop("num_cpus")
            for key in ("min_replicas", "max_replicas"):
                options.get("autoscaling_config", {}).pop(key, None)
        return apps

    assert deploy.load_config() == deploy.fit_to_node(deploy.read_config())
    local = deploy.local_config(str(tmp_path))
    assert demand(local, "max_replicas") <= deploy.LOCAL_SHARE * deploy.LOCAL_CPUS
    assert without_sizes(local) == without_sizes(deploy.read_config())


# ---------------------------------------------------------------- limits, in-process

class SlowBackend:
    """Answers uniform probabilities after `delay` seconds."""

    def __init__(self, delay: float = 0.0):
        self.delay = delay

    async def infer(self, images):
        await asyncio.sleep(self.delay)
        return np.full((len(images), 10), 0.1, np.float32), "stand-in"

    async def status(self):
        return {"ready": True, "model_version": "stand-in", "metadata": {}, "loaded_at": 0.0,
                "storage": "/nowhere", "reload_error": None, "message": None}


def test_per_request_timeout_is_enforced(test_digits):
    api = create_api(SlowBackend(delay=2.0), Limits(request_timeout_s=0.3))
    with TestClient(api) as client:
        response = client.post("/predict", json={"pixels": test_digits[0][0].tolist()})
        assert response.status_code == 503 and "0.3 s limit" in response.json()["error"]
        assert client.get("/healthz").status_code == 200  # and the service carries on


def test_body_limit_is_configurable(test_digits):
    api = create_api(SlowBackend(), Limits(max_body_bytes=1000))
    with TestClient(api) as client:
        response = client.post("/predict", json={"pixels": test_digits[0][0].tolist()})
        assert response.status_code == 413 and "1000 bytes" in response.json()["error"]
        assert client.post("/predict", json={"pixels": [[0]]}).status_code == 422  # small bodies still parsed


def test_every_deployment_sheds_load_with_a_503_and_retry_after():
    """Bounded queues everywhere: past max_ongoing + max_queued, Serve answers 503 + Retry-After at once."""
    for app in deploy.app_pair(deploy.load_config()):
        for deployment in app["deployments"]:
            assert 0 < deployment["max_queued_requests"] and 0 < deployment["max_ongoing_requests"] <= 256
            assert deployment["backpressure_config"] == {"status_code": 503, "retry_after_s": RETRY_AFTER_S}
