"""Deploy serving/serve_config.yaml on the local Ray cluster, the way `serve deploy` would; then wait
and print the URLs. The file is sized for the GKE cluster (the RayService runs it as it is); the
local config fits it to this node (`fit_to_node`: replicas capped, CPU requests scaled down), makes
the storage root absolute and the code importable by the replicas.

    python -m serving deploy [--storage DIR] [--name mnist] [--route-prefix /] [--model-replicas N] [--split]
    python -m serving config [--storage DIR]    # the local config, for `serve deploy FILE`
    python -m serving status | delete [--name mnist]   (delete removes <name> and <name>-ui)

Declarative, through the dashboard's REST API (127.0.0.1:8265), like KubeRay. Other applications
deployed this way are kept; applications deployed with `serve.run` are never touched.
"""
import hashlib
import json
import math
import time
import urllib.error
import urllib.request
from pathlib import Path

import yaml

from ray_cluster import replica_loopback
from ray_cluster.local import DASHBOARD_URL, HOST, SERVE_PORT
from serving.model_store import storage_root
from training.storage import STORAGE_ENV

ROOT = Path(__file__).resolve().parents[1]
SERVE_CONFIG = Path(__file__).resolve().parent / "serve_config.yaml"
SPLIT_MODEL = Path(__file__).resolve().parent / "serve_split.yaml"  # the model deployment when split
APPS_PATH = "/api/serve/applications/"
# serve_config.yaml is sized for the GKE cluster; local deploys fit it to this node (fit_to_node).
LOCAL_CPUS = 2       # the 2-core workstation the local defaults are for; a larger machine gets the same
LOCAL_SHARE = 0.25   # of those CPUs, reserved by all replicas at their ceiling; the rest is training's


class DeployError(RuntimeError):
    pass


def read_config(path: Path = SERVE_CONFIG) -> dict:
    """The config file as it is: what the RayService runs on GKE."""
    return yaml.safe_load(Path(path).read_text())


def load_config(path: Path = SERVE_CONFIG) -> dict:
    """The config as this machine runs it: the file fitted to the local node (fit_to_node)."""
    return fit_to_node(read_config(path))


def fit_to_node(config: dict, cpus: int = LOCAL_CPUS, share: float = LOCAL_SHARE) -> dict:
    """The config (sized for the GKE cluster) fitted to one node of `cpus` CPUs, in place.

    - Each deployment's replicas are capped at `cpus` (max_replicas, num_replicas; min_replicas
      not above max_replicas). On one node every request crosses one Serve proxy, which saturates
      at about two busy replicas' work (docs/AUTOSCALING.md), so more would only add processes.
    - Every num_cpus is scaled by one factor, so that all replicas at their ceiling reserve at most
      `share` of the node. On one node a reservation places nothing (every replica lands there);
      it only keeps CPUs from a training job, which needs the rest. Rounded down to 0.01 CPU.

    The ratios between deployments, the targets, the delays and the queues stay as the file has them.
    """
    deployments = [d for app in config["applications"] for d in app.get("deployments", [])]
    for options in deployments:
        scaling = options.get("autoscaling_config")
        if scaling:
            scaling["max_replicas"] = min(scaling["max_replicas"], cpus)
            scaling["min_replicas"] = min(scaling.get("min_replicas", 1), scaling["max_replicas"])
        elif "num_replicas" in options:
            options["num_replicas"] = min(options["num_replicas"], cpus)
    at_ceiling = sum(ceiling(d) * d.get("ray_actor_options", {}).get("num_cpus", 1) for d in deployments)
    factor = min(1.0, share * cpus / at_ceiling) if at_ceiling else 1.0
    for options in deployments:
        actor = options.setdefault("ray_actor_options", {})
        actor["num_cpus"] = math.floor(actor.get("num_cpus", 1) * factor * 100) / 100
    return config


def ceiling(options: dict) -> int:
    """A deployment's most replicas: max_replicas when it autoscales, else num_replicas (default 1)."""
    scaling = options.get("autoscaling_config")
    return scaling["max_replicas"] if scaling else options.get("num_replicas", 1)


def local_config(storage: str | None = None, name: str | None = None, route_prefix: str | None = None,
                 model_replicas: int | None = None, split: bool = False, path: Path = SERVE_CONFIG,
                 api_replicas: int | None = None) -> dict:
    """The config fitted to this node, with an absolute storage root and this checkout on the
    replicas' PYTHONPATH.

    `split`: the two-deployment layout (MnistApi -> MnistModel) instead of the file's MnistService.
    `name` and `route_prefix` rename the API app; the page follows as <name>-ui at <prefix>/ui.
    `model_replicas` / `api_replicas` pin the deployment the page calls / the ingress at a fixed
    count instead of autoscaling (colocated, both name MnistService: model_replicas wins).
    """
    config = read_config(path)
    api, ui = app_pair(config)
    if split:
        split_layout(api, ui)
    fit_to_node(config)
    config.setdefault("http_options", {}).setdefault("host", HOST)  # loopback; the file names no host
    model, ingress = model_and_ingress(api, ui)
    if api_replicas:
        pin_replicas(ingress, api_replicas)
    if model_replicas:
        pin_replicas(model, model_replicas)
    for app in (api, ui):
        env = app.setdefault("runtime_env", {}).setdefault("env_vars", {})
        env.update(replica_loopback.hook_env())  # each replica's gRPC server on 127.0.0.1
        env["PYTHONPATH"] = str(ROOT)  # the replicas import serving/ and training/ from this checkout
        env["MNIST_CODE_HASH"] = code_hash()  # Serve redeploys when the config changes, so edits count
    api["runtime_env"]["env_vars"][STORAGE_ENV] = str(storage_root(storage))
    if name:
        api["name"], ui["name"] = name, f"{name}-ui"
        ui.setdefault("args", {})["model_app"] = name
    if route_prefix:
        api["route_prefix"] = "/" + route_prefix.strip("/")
        ui["route_prefix"] = api["route_prefix"].rstrip("/") + "/ui"
    return config


def pin_replicas(options: dict, replicas: int) -> None:
    """A fixed replica count instead of autoscaling (Serve takes one or the other)."""
    options.pop("autoscaling_config", None)
    options["num_replicas"] = replicas


def model_and_ingress(api: dict, ui: dict) -> tuple[dict, dict]:
    """The API application's model deployment (the one the page calls) and its ingress (the other;
    the same one when colocated)."""
    model = next(d for d in api["deployments"] if d["name"] == ui["args"]["model_deployment"])
    ingress = [d for d in api["deployments"] if d is not model]
    return model, (ingress[0] if ingress else model)  # colocated: one deployment is both


def split_layout(api: dict, ui: dict) -> None:
    """The file's MnistService as two deployments: MnistApi takes its options (what faces HTTP:
    queues, backpressure, autoscaling on requests, a core for decoding), MnistModel those of
    serve_split.yaml with the service's user_config; the page calls MnistModel."""
    from serving.app import MnistApi  # the name only; imported here, where it is needed
    (service,) = api["deployments"]
    model = {**yaml.safe_load(SPLIT_MODEL.read_text()), "user_config": service["user_config"]}
    ingress = {**{k: v for k, v in service.items() if k != "user_config"}, "name": MnistApi.name}
    api["args"]["colocate"] = False
    api["deployments"] = [ingress, model]
    ui["args"]["model_deployment"] = model["name"]


def code_hash() -> str:
    """A digest of the code the replicas import from this checkout."""
    digest = hashlib.sha256()
    for path in sorted([*(ROOT / "serving").rglob("*.py"), *(ROOT / "training").glob("*.py")]):
        digest.update(path.relative_to(ROOT).as_posix().encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def app_pair(config: dict) -> tuple[dict, dict]:
    """(the API application, the page application) of a config."""
    by_import = {app["import_path"]: app for app in config["applications"]}
    return by_import["serving.app:build_app"], by_import["serving.app:build_ui"]


def _request(method: str, path: str, body: dict | None = None, address: str = DASHBOARD_URL) -> dict:
    # Ray's own clients' headers: the token, when RAY_AUTH_MODE=token and a token are exported.
    from ray._private.authentication.http_token_authentication import get_auth_headers_if_auth_enabled

    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(address + path, data=data, method=method,
                                     headers={"Content-Type": "application/json",
                                              **get_auth_headers_if_auth_enabled({})})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            text = response.read().decode()
    except urllib.error.HTTPError as error:
        hint = " (token auth: eval \"$(python -m ray_cluster env)\" first)" if error.code in (401, 403) else ""
        raise DeployError(f"{method} {path}: HTTP {error.code}{hint}: {error.read().decode()[:2000]}") from None
    except OSError as error:
        raise DeployError(f"cannot reach the Ray dashboard at {address} ({error}); "
                          "start the cluster with `python -m ray_cluster up`") from None
    return json.loads(text) if text else {}


def serve_details(address: str = DASHBOARD_URL) -> dict:
    return _request("GET", APPS_PATH, address=address)


def running_replicas(app: str, details: dict | None = None) -> dict[str, list[dict]]:
    """{deployment: its RUNNING replicas (Serve's replica details: replica_id, pid, ...)} of one
    application, from Serve's status (`details`: a `serve_details()` already fetched)."""
    deployments = (details or serve_details())["applications"][app]["deployments"]
    return {name: [r for r in d["replicas"] if r["state"] == "RUNNING"] for name, d in deployments.items()}


def declarative_apps(details: dict) -> list[dict]:
    return [app["deployed_app_config"] for app in (details.get("applications") or {}).values()
            if app.get("source") == "declarative" and app.get("deployed_app_config")]


def put_apps(config: dict, apps: list[dict], address: str = DASHBOARD_URL) -> None:
    _request("PUT", APPS_PATH, {**{k: v for k, v in config.items() if k != "applications"},
                                "applications": apps}, address)


def deploy(config: dict, address: str = DASHBOARD_URL, timeout: float = 300, wait: bool = True) -> None:
    """Apply `config`'s applications beside the other declarative ones; wait until they run."""
    details = serve_details(address)
    names = [app["name"] for app in config["applications"]]
    for name in names:
        existing = details.get("applications", {}).get(name)
        if existing and existing.get("source") == "imperative":
            raise DeployError(f"application {name!r} was deployed with serve.run; delete it first "
                              "or pick another --name")
    others = [a for a in declarative_apps(details) if a["name"] not in names]
    put_apps(config, others + config["applications"], address)
    for name in names if wait else ():
        wait_running(name, address, timeout)


def wait_running(name: str, address: str = DASHBOARD_URL, timeout: float = 300) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        status = serve_details(address).get("applications", {}).get(name, {})
        if status.get("status") == "RUNNING":
            return status
        if status.get("status") == "DEPLOY_FAILED":
            raise DeployError(f"application {name!r} failed to deploy: {status.get('message')}")
        if time.monotonic() > deadline:
            raise DeployError(f"application {name!r} is not running after {timeout:.0f} s: "
                              f"{status.get('status')} {status.get('message', '')}")
        time.sleep(1.0)


def delete(names: list[str], address: str = DASHBOARD_URL) -> list[str]:
    """Remove these declarative applications (the others stay); return those that were deployed."""
    apps = declarative_apps(serve_details(address))
    found = [a["name"] for a in apps if a["name"] in names]
    if found:
        put_apps({}, [a for a in apps if a["name"] not in names], address)
    return found


def urls(route_prefix: str) -> dict:
    base = f"http://{HOST}:{SERVE_PORT}{route_prefix.rstrip('/')}"
    return {"sketchpad": f"{base}/ui/", "predict": f"{base}/predict", "health": f"{base}/healthz",
            "model": f"{base}/model", "v2": f"{base}/v2/models/mnist", "docs": f"{base}/docs"}


def health(url: str) -> dict:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as error:  # 503 before the first model: still JSON
        return json.loads(error.read() or b"{}")
    except OSError as error:
        return {"status": "unreachable", "message": str(error)}
