"""The KubeRay client (ray_cluster/kuberay.py) and the `kuberay` CLI, against `StandIn`: an HTTP
server on 127.0.0.1 that answers ray.io/v1 and the few core paths the way the API server does
(Status bodies, "404 page not found" without the CRDs, server-side apply as create-or-merge),
plays the operator (each read of a Ray object returns the next status of a script) and records
every request."""
import json
import re
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

import pytest
import yaml
from kubernetes import client

from ray_cluster import kuberay, kuberay_cli
from ray_cluster.__main__ import main
from ray_cluster.kuberay import KubeRay

NAMESPACE = "mnist"
REPOSITORY = "us-central1-docker.pkg.dev/proj/mnist/mnist-ray"
IMAGE = f"{REPOSITORY}:2.60.0-py311"
# /api/v1/ or /apis/<group>/v1/, then namespaces/<namespace>/ for a namespaced kind, then <plural>[/<name>]
PATH = re.compile(r"/apis?/(?:(?P<group>[a-z0-9.]+)/)?v1(?:/namespaces/(?P<namespace>[^/]+)(?=/))?"
                  r"/(?P<plural>[a-z]+)(?:/(?P<name>[^/]+))?")
CLUSTER_IP = "10.12.0.7"
EXTERNAL_IP = "203.0.113.7"


def merge_patch(target, patch):
    """RFC 7386 merge: how the stand-in folds an applied object into the live one."""
    if not isinstance(patch, dict):
        return patch
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


class StandIn:
    """A stand-in Kubernetes API server (see the module docstring)."""

    def __init__(self):
        self.objects: dict[tuple[str, str], dict] = {}   # (collection path, name) -> object
        self.requests: list[dict] = []
        self.crds_installed = True
        self.forbidden: set[str] = set()                  # plurals answered with 403
        self.scripts: dict[tuple[str, str], list[dict]] = {}  # (plural, name) -> statuses to serve
        self.reads: dict[tuple[str, str], int] = {}
        self.failures: list[int | str] = []   # answers for the next requests: an HTTP code, "drop" or "slow"
        self.pod_lists_until_gone: int | None = None  # pod lists that still show the pods (None: forever)
        self.lock = threading.Lock()
        handler = type("Handler", (_Handler,), {"standin": self})
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    def client(self, host: str | None = None) -> KubeRay:
        configuration = client.Configuration(host=host or self.url)
        configuration.retries = 0  # only the client's own retries: requests counted exactly
        return KubeRay(NAMESPACE, client.ApiClient(configuration))

    def script(self, plural: str, name: str, *statuses: dict) -> None:
        """The operator's view: each read returns the next status; the last one stays."""
        self.scripts[(plural, name)] = list(statuses)

    def put(self, collection: str, obj: dict) -> None:
        self.objects[(collection, obj["metadata"]["name"])] = obj

    def get(self, collection: str, name: str) -> dict | None:
        return self.objects.get((collection, name))

    def sent(self, method: str, pattern: str = "") -> list[dict]:
        return [r for r in self.requests if r["method"] == method and re.search(pattern, r["path"])]

    def applied(self) -> list[str]:
        """The paths of the server-side applies, in order (each with the CLI's field manager, forced)."""
        applies = [r for r in self.sent("PATCH") if r["headers"]["content-type"] == "application/apply-patch+yaml"]
        assert all(r["query"]["fieldManager"] == [kuberay.FIELD_MANAGER] and r["query"]["force"] == ["true"]
                   for r in applies)
        return [r["path"] for r in applies]

    # ------------------------------------------------------------ request handling

    def handle(self, method: str, path: str, body) -> tuple[int, object]:
        match = PATH.fullmatch(path)
        if not match or (match["group"] == "ray.io" and not self.crds_installed):
            return 404, "404 page not found\n"
        plural, name = match["plural"], match["name"]
        if plural in self.forbidden:
            verb = {"GET": "get" if name else "list", "POST": "create", "PATCH": "patch", "APPLY": "patch", "DELETE": "delete"}[method]
            return 403, status_body(403, "Forbidden", f'{plural} is forbidden: User "dev" cannot {verb} resource "{plural}" '
                                    f'in API group "{match["group"] or ""}" in the namespace "{match["namespace"]}"')
        return self.crud(method, path.rsplit("/", 1)[0] if name else path, plural, name, body)

    def crud(self, method, collection, plural, name, body):
        key = (collection, name or (body or {}).get("metadata", {}).get("name"))
        if method == "APPLY":  # server-side apply: create, or merge into the live object
            method = "PATCH" if key in self.objects else "POST"
        kind = plural[:-1].capitalize()
        if method == "POST":
            if key in self.objects:
                return 409, status_body(409, "AlreadyExists", f'{plural} "{key[1]}" already exists', key[1], plural)
            obj = json.loads(json.dumps(body))
            obj["metadata"].setdefault("uid", f"uid-{len(self.objects)}")
            obj["metadata"]["generation"] = 1
            if plural == "services":
                obj["spec"]["clusterIP"] = CLUSTER_IP
            self.objects[key] = obj
            return 201, obj
        if method == "GET" and not name:
            if plural == "pods" and self.pod_lists_until_gone is not None:
                if self.pod_lists_until_gone <= 0:  # the kubelet finished: the pods are gone
                    for key in [k for k in self.objects if k[0] == collection]:
                        del self.objects[key]
                self.pod_lists_until_gone -= 1
            return 200, {"kind": f"{kind}List", "items": [o for (c, _), o in self.objects.items() if c == collection]}
        if key not in self.objects:
            return 404, status_body(404, "NotFound", f'{plural} "{name}" not found', name, plural)
        if method == "GET":
            return 200, self.with_status(plural, name, self.objects[key])
        if method == "PATCH":
            before = self.objects[key]
            self.objects[key] = merge_patch(before, body)
            if self.objects[key].get("spec") != before.get("spec"):  # as the API server counts spec changes
                self.objects[key]["metadata"]["generation"] = before["metadata"].get("generation", 1) + 1
            return 200, self.objects[key]
        if method == "DELETE":  # built-in kinds answer with the object; custom objects with a Status
            obj = self.objects.pop(key)
            return 200, {"kind": "Status", "apiVersion": "v1", "status": "Success"} if plural.startswith("ray") else obj
        return 405, status_body(405, "MethodNotAllowed", method)

    def with_status(self, plural, name, obj):
        self.reads[(plural, name)] = self.reads.get((plural, name), 0) + 1
        statuses = self.scripts.get((plural, name))
        if statuses:
            obj["status"] = statuses.pop(0) if len(statuses) > 1 else statuses[0]
        return obj


def status_body(code, reason, message, name=None, plural=None):
    body = {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": message, "reason": reason, "code": code}
    if name:
        body["details"] = {"name": name, "group": "ray.io" if plural and plural.startswith("ray") else "",
                           "kind": plural}
    return body


class _Handler(BaseHTTPRequestHandler):
    standin: StandIn

    def _serve(self):
        parts = urlsplit(self.path)
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        body = json.loads(raw) if raw else None
        method = "APPLY" if self.headers.get("Content-Type") == "application/apply-patch+yaml" else self.command
        with self.standin.lock:
            self.standin.requests.append({"method": self.command, "path": parts.path, "query": parse_qs(parts.query),
                                          "headers": {k.lower(): v for k, v in self.headers.items()}, "body": body})
            failure = self.standin.failures.pop(0) if self.standin.failures else None
            if failure is None:
                code, answer = self.standin.handle(method, parts.path, body)
        if failure in ("drop", "slow"):  # no answer: an API server restarting, or past the client's read timeout
            time.sleep(1.0 if failure == "slow" else 0)
            self.close_connection = True
            return
        if failure is not None:
            code, answer = failure, status_body(failure, "InternalError" if failure >= 500 else "BadRequest",
                                                f"injected {failure}")
        data = answer.encode() if isinstance(answer, str) else json.dumps(answer).encode()
        self.send_response(code)
        self.send_header("Content-Type", "text/plain" if isinstance(answer, str) else "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_POST = do_PATCH = do_DELETE = do_PUT = _serve

    def log_message(self, *args):  # keep test output clean
        pass


@pytest.fixture
def api():
    standin = StandIn()
    standin.thread.start()
    yield standin
    standin.server.shutdown()
    standin.server.server_close()


def raycluster(name="mnist", pods=3, cpus="2") -> dict:
    return {"apiVersion": "ray.io/v1", "kind": "RayCluster", "metadata": {"name": name, "namespace": NAMESPACE},
            "spec": {"rayVersion": "2.60.0", "headGroupSpec": {"template": {}},
                     "workerGroupSpecs": [{"groupName": "cpu", "replicas": pods, "minReplicas": pods, "maxReplicas": pods,
                                           "template": {"spec": {"containers": [{"resources": {"limits": {"cpu": cpus}}}]}}}]}}


def condition(kind, status, reason="Reason", message=""):
    return {"type": kind, "status": status, "reason": reason, "message": message,
            "lastTransitionTime": "2026-01-01T00:00:00Z"}


CLUSTER_READY = {"state": "ready", "readyWorkerReplicas": 3, "desiredWorkerReplicas": 3,
                 "conditions": [condition("HeadPodReady", "True"), condition("RayClusterProvisioned", "True")]}
JOB_SUCCEEDED = {"jobDeploymentStatus": "Complete", "jobStatus": "SUCCEEDED"}
SERVICE_READY = {"serviceStatus": "Running", "numServeEndpoints": 2,
                 "conditions": [condition("Ready", "True", "NonZeroServeEndpoints")],
                 "activeServiceStatus": {"applicationStatuses": {"mnist": {"status": "RUNNING"}}}}


# ---------------------------------------------------------------- the client: requests

@pytest.mark.parametrize("kind, collection", [  # RayJob's and RayService's paths: the CLI's train and serve tests
    ("RayCluster", f"/apis/ray.io/v1/namespaces/{NAMESPACE}/rayclusters"),
    ("Deployment", f"/apis/apps/v1/namespaces/{NAMESPACE}/deployments"),
    ("PersistentVolume", "/api/v1/persistentvolumes")])  # cluster-wide
def test_create_get_list_apply_delete(api, kind, collection):
    cluster = api.client()
    namespace = {"namespace": NAMESPACE} if "/namespaces/" in collection else {}
    body = {"kind": kind, "metadata": {"name": "x", **namespace, "labels": {"app": "mnist"}}, "spec": {"a": [1, 2]}}

    assert cluster.create(body)["metadata"]["name"] == "x"
    (post,) = api.sent("POST")
    assert post["path"] == collection and post["body"] == body
    assert post["headers"]["content-type"] == "application/json"
    assert post["query"] == {"fieldValidation": ["Strict"]}  # the API server refuses unknown fields

    assert cluster.get(kind, "x")["spec"] == {"a": [1, 2]}
    assert api.sent("GET")[-1]["path"] == f"{collection}/x"

    assert [o["metadata"]["name"] for o in cluster.list(kind, label_selector="app=mnist")] == ["x"]
    assert api.sent("GET")[-1]["query"] == {"labelSelector": ["app=mnist"]}

    applied = cluster.apply({**body, "spec": {"a": [3]}})
    assert applied["spec"] == {"a": [3]} and applied["metadata"]["generation"] == 2
    (patch,) = api.sent("PATCH")
    assert patch["path"] == f"{collection}/x"
    assert patch["headers"]["content-type"] == "application/apply-patch+yaml"
    assert patch["query"] == {"fieldManager": [kuberay.FIELD_MANAGER], "force": ["true"], "fieldValidation": ["Strict"]}

    assert cluster.delete(body) and not cluster.delete(body)  # False: it was not there
    delete = api.sent("DELETE")[0]
    assert delete["path"] == f"{collection}/x"
    assert delete["query"].get("propagationPolicy") == (["Foreground"] if kind.startswith("Ray") else None)
    assert api.get(collection, "x") is None


# ---------------------------------------------------------------- the client: errors

@pytest.mark.parametrize("call", ["create", "apply", "get", "list", "delete"])
def test_missing_crds_say_how_to_install_the_operator(api, call):
    api.crds_installed = False
    args = {"get": ("RayCluster", "mnist"), "list": ("RayCluster",)}.get(call, (raycluster(),))
    with pytest.raises(kuberay.CRDsNotInstalled) as error:
        getattr(api.client(), call)(*args)
    message = str(error.value)
    assert "rayclusters.ray.io/v1" in message and "KubeRay CRDs are not installed" in message
    assert "helm install kuberay-operator kuberay/kuberay-operator --version 1.7.0" in message
    assert "Ray operator add-on" in message


@pytest.mark.parametrize("standin, call, error, words", [
    ({}, lambda c: c.create(raycluster()) and c.create(raycluster()), kuberay.AlreadyExists,
     ["RayCluster mnist/mnist already exists; `python -m ray_cluster kuberay down` deletes it"]),
    ({}, lambda c: c.get("RayService", "gone"), kuberay.NotFound,
     ['RayService mnist/gone not found (rayservices "gone" not found)']),
    ({"forbidden": {"rayjobs"}}, lambda c: c.create({"kind": "RayJob", "metadata": {"name": "t"}}), kuberay.Forbidden,
     ['User "dev" cannot create resource "rayjobs"', "RBAC on rayjobs.ray.io"]),
    ({"failures": [401]}, lambda c: c.get("RayCluster", "x"), kuberay.Forbidden,
     ["the API server rejected the credentials (injected 401); refresh them"]),
    ({"failures": [422]}, lambda c: c.get("RayCluster", "x"), kuberay.KubeRayError,  # the server's message kept
     ["RayCluster mnist/x was rejected as invalid: injected 422"])])
def test_api_errors_say_what_happened(api, standin, call, error, words):
    for name, value in standin.items():
        setattr(api, name, value)
    with pytest.raises(error) as raised:
        call(api.client())
    assert all(w in str(raised.value) for w in words), str(raised.value)


def test_an_unreachable_api_server(api, fast_retries):
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(kuberay.Unreachable, match=f"cannot reach the Kubernetes API at http://127.0.0.1:{port}"):
        api.client(f"http://127.0.0.1:{port}").get("RayCluster", "mnist")


# ---------------------------------------------------------------- the CLI

@pytest.fixture
def cli(api, tmp_path, monkeypatch):
    """Run `python -m ray_cluster kuberay ...` in-process against the stand-in (via a kubeconfig)."""
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "standin",
        "clusters": [{"name": "standin", "cluster": {"server": api.url}}],
        "users": [{"name": "dev", "user": {"token": "test-token"}}],
        "contexts": [{"name": "standin", "context": {"cluster": "standin", "user": "dev"}}]}))
    serve_config = tmp_path / "serve_config.yaml"
    serve_config.write_text("applications:\n  - name: mnist\n    route_prefix: /\n    import_path: serving.app:app\n")
    monkeypatch.setattr(kuberay_cli, "POLL", 0.01)

    def run(action, *extra):
        args = ["kuberay", action, "--kubeconfig", str(kubeconfig), "--image", IMAGE,
                "--serve-config", str(serve_config), "--timeout", "5", *extra]
        return main(args)
    return run


BAD_CLI_OPTIONS = [
    (["--workers", "0"], "--workers must be at least 1"),
    (["--rounds", "0"], "--rounds must be at least 1 (got 0)"),
    (["--serve-min-pods", "0"], "--serve-min-pods must be at least 1"),
    (["--serve-min-pods", "3", "--serve-max-pods", "2"], "--serve-max-pods 2 is below --serve-min-pods 3"),
    (["--worker-pods", "0"], "--worker-pods must be at least 1"),
    (["--workers", "7"], "more than the worker group holds: 3 pods x 2 CPUs = 6"),
    (["--name", "n" * 54], "KubeRay allows at most 53"),
    (["--job-name", "j" * 48], "KubeRay allows at most 47"),
    (["--image", "us-docker.pkg.dev/p/r/mnist-ray:2.55.0-py311"], "to match the ray==2.60.0"),
    (["--image", "mnist-ray:2.60.0-py311"], "names no registry"),
    (["--shared-storage", "s3"], "--shared-storage 's3': choose one of nfs, filestore"),
    (["--worker-memory", "lots"], "--worker-memory 'lots' is not a Kubernetes quantity"),
    (["--lb-source-range", "everyone"], "--lb-source-range 'everyone' is not a CIDR range"),
    (["--node-range", "10.0.0.0/33"], "--node-range '10.0.0.0/33' is not a CIDR range"),
    (["--name", "a" * 42], "RayService name 'aaaa"),
    (["--name", "MNIST_1"], "lowercase letters"),
    (["--image", f"{REPOSITORY}:2.60.0-py310"], "must be '2.60.0-py311'"),
    (["--image", REPOSITORY], "must be '2.60.0-py311'"),
    (["--image", f"{REPOSITORY}:latest"], "must be '2.60.0-py311'"),
    (["--shared-storage", "filestore", "--storage-size", "100Gi"], "below Filestore's minimum of 1Ti"),
    (["--run-id", "../x"], "--run-id '../x'"),
]


@pytest.mark.parametrize("action", ["up", "train", "serve"])
@pytest.mark.parametrize("extra, message", BAD_CLI_OPTIONS)
def test_cli_refuses_invalid_options_before_sending_anything(api, cli, capsys, action, extra, message):
    assert cli(action, *extra) == 2
    assert message in capsys.readouterr().err
    assert api.requests == []


def test_cli_up_creates_everything_prints_the_next_steps_and_updates_on_a_second_run(api, cli, capsys):
    api.script("rayclusters", "mnist", {"state": ""}, CLUSTER_READY)
    assert cli("up") == 0
    out = capsys.readouterr().out
    assert api.applied() == [  # kustomize's order: namespaces and the NFS server first (its IP is read next)
        "/api/v1/namespaces/mnist",
        "/api/v1/namespaces/mnist-nfs",
        "/api/v1/namespaces/mnist-nfs/services/nfs-server",
        "/api/v1/namespaces/mnist-nfs/persistentvolumeclaims/nfs-disk",
        "/apis/apps/v1/namespaces/mnist-nfs/deployments/nfs-server",
        "/apis/networking.k8s.io/v1/namespaces/mnist-nfs/networkpolicies/nfs-server",
        "/api/v1/namespaces/mnist/configmaps/mnist-ray-env",
        "/api/v1/persistentvolumes/mnist-mnist-shared",
        "/api/v1/namespaces/mnist/persistentvolumeclaims/mnist-shared",
        "/apis/networking.k8s.io/v1/namespaces/mnist/networkpolicies/mnist-serve",
        "/apis/networking.k8s.io/v1/namespaces/mnist/networkpolicies/mnist-training",
        "/apis/ray.io/v1/namespaces/mnist/rayclusters/mnist",
    ]
    assert not api.sent("POST")
    assert all(r["headers"]["authorization"] == "Bearer test-token" for r in api.requests)
    volume = api.get("/api/v1/persistentvolumes", "mnist-mnist-shared")
    assert volume["spec"]["nfs"]["server"] == CLUSTER_IP  # nodes mount by IP, not cluster DNS
    cluster = api.get("/apis/ray.io/v1/namespaces/mnist/rayclusters", "mnist")
    assert cluster["spec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["image"] == IMAGE
    assert "RayCluster mnist: state=ready" in out
    assert "kubectl -n mnist port-forward svc/mnist-head-svc 8265:8265" in out
    assert ("ray job submit --address http://localhost:8265 --working-dir . -- python training/train.py "
            "--workers 3 --epochs 2 --batch-size 100 --storage /mnt/shared") in out
    assert out.index("export RAY_AUTH_MODE=token RAY_AUTH_TOKEN=\"$(kubectl -n mnist get secret mnist") < \
        out.index("ray job submit")
    assert cli("up", "--worker-pods", "4", "--nfs-server", "10.1.2.3") == 0  # again: applied over what is there
    out = capsys.readouterr().out
    assert "PersistentVolumeClaim mnist-nfs/nfs-disk: applied" in out and "RayCluster mnist/mnist: applied" in out
    cluster = api.get(f"/apis/ray.io/v1/namespaces/{NAMESPACE}/rayclusters", "mnist")
    assert cluster["spec"]["workerGroupSpecs"][0]["replicas"] == 4 and cluster["metadata"]["generation"] == 2
    assert api.get("/api/v1/persistentvolumes", "mnist-mnist-shared")["spec"]["nfs"]["server"] == "10.1.2.3"


def test_cli_up_with_filestore_creates_no_nfs_server(api, cli):
    api.script("rayclusters", "mnist", CLUSTER_READY)
    assert cli("up", "--shared-storage", "filestore") == 0
    kinds = [path.split("/")[-2] for path in api.applied()]
    assert kinds == ["namespaces", "configmaps", "persistentvolumeclaims", "networkpolicies", "networkpolicies", "rayclusters"]


def test_cli_up_timeout_shows_the_last_status(api, cli, capsys):
    api.script("rayclusters", "mnist", {"state": "", "conditions": [
        condition("HeadPodReady", "False", "HeadPodNotFound"), condition("RayClusterProvisioned", "False")]})
    assert cli("up", "--timeout", "0.2") == 1
    err = capsys.readouterr().err
    assert "RayCluster mnist/mnist was not ready after 0.2 s; last status:" in err
    assert "HeadPodReady=False (HeadPodNotFound)" in err


def test_cli_train_submits_a_rayjob_and_waits(api, cli, capsys):
    api.put(f"/apis/ray.io/v1/namespaces/{NAMESPACE}/rayclusters", raycluster())
    api.script("rayjobs", "mnist-train", {"jobDeploymentStatus": "Running", "jobStatus": "RUNNING"}, JOB_SUCCEEDED)
    assert cli("train", "--epochs", "3", "--run-id", "r1") == 0
    (post,) = api.sent("POST")
    assert post["path"] == "/apis/ray.io/v1/namespaces/mnist/rayjobs"
    assert post["body"]["spec"]["clusterSelector"] == {"ray.io/cluster": "mnist"}
    assert post["body"]["spec"]["entrypoint"] == ("python /home/ray/mnist/training/train.py --workers 3 --epochs 3 "
                                                  "--batch-size 100 --run-id r1 --storage /mnt/shared")
    out = capsys.readouterr().out
    assert "kubectl -n mnist logs -f job/mnist-train" in out and "Training succeeded" in out
    assert cli("train") == 1  # finished jobs keep their record
    assert "already exists (finished jobs keep their record): pass --job-name" in capsys.readouterr().err


def test_cli_train_sizes_the_job_by_the_live_cluster(api, cli, capsys):
    """Without --workers the live RayCluster's size is the count: whatever options created it, the
    job asks for one Train worker per worker pod it has now. More than it holds is refused."""
    assert cli("train") == 1
    assert "RayCluster mnist/mnist not found: run `python -m ray_cluster kuberay up` first" in capsys.readouterr().err
    api.put(f"/apis/ray.io/v1/namespaces/{NAMESPACE}/rayclusters", raycluster(pods=1, cpus="2"))
    assert cli("train", "--workers", "3") == 2  # the options allow 6, the live cluster holds 2
    assert "--workers 3 is more than RayCluster mnist holds (2 worker CPUs)" in capsys.readouterr().err
    assert not api.sent("POST")
    api.put(f"/apis/ray.io/v1/namespaces/{NAMESPACE}/rayclusters", raycluster(pods=5, cpus="2"))
    api.script("rayjobs", "mnist-train", JOB_SUCCEEDED)
    assert cli("train") == 0  # the options' --worker-pods is 3: the live cluster's 5 win
    (post,) = api.sent("POST")
    assert " --workers 5 " in post["body"]["spec"]["entrypoint"]


def test_cli_serve_creates_then_updates_and_waits_for_the_operator_to_see_the_update(api, cli, capsys, tmp_path):
    ready = {**SERVICE_READY, "observedGeneration": 1}
    api.script("rayservices", "mnist-serve", {"conditions": [condition("Ready", "False", "Initializing")]}, ready)
    api.put("/api/v1/namespaces/mnist/services", {
        "apiVersion": "v1", "kind": "Service", "metadata": {"name": "mnist-serve-serve-svc", "namespace": NAMESPACE},
        "spec": {"type": "LoadBalancer", "ports": [{"name": "serve", "port": 8000}]},
        "status": {"loadBalancer": {"ingress": [{"ip": EXTERNAL_IP}]}}})
    assert cli("serve") == 0
    (apply,) = api.sent("PATCH")
    assert apply["body"]["spec"]["serveConfigV2"] == (tmp_path / "serve_config.yaml").read_text()  # the file as it is
    out = capsys.readouterr().out
    assert "app mnist=RUNNING" in out and "endpoints=2, Ready=True (NonZeroServeEndpoints)" in out
    assert f"Serving at http://{EXTERNAL_IP}:8000/" in out
    # The update makes generation 2. The operator first still reports Ready=True for generation 1,
    # then an upgrade, and only then Ready for generation 2.
    upgrading = {**ready, "observedGeneration": 2,
                 "conditions": ready["conditions"] + [condition("UpgradeInProgress", "True", "BothActivePendingClustersExist")]}
    api.script("rayservices", "mnist-serve", ready, upgrading, {**ready, "observedGeneration": 2})
    api.reads.clear()
    assert cli("serve", "--serve-min-pods", "2", "--serve-max-pods", "3") == 0
    assert api.applied() == ["/apis/ray.io/v1/namespaces/mnist/rayservices/mnist-serve"] * 2
    patch = api.sent("PATCH")[-1]
    (group,) = patch["body"]["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    assert (group["replicas"], group["minReplicas"], group["maxReplicas"]) == (2, 2, 3)
    assert patch["body"]["spec"]["rayClusterConfig"]["enableInTreeAutoscaling"] is True
    assert api.get(f"/apis/ray.io/v1/namespaces/{NAMESPACE}/rayservices", "mnist-serve")["metadata"]["generation"] == 2
    assert api.reads[("rayservices", "mnist-serve")] == 3
    out = capsys.readouterr().out
    assert "observedGeneration 1 < generation 2" in out and "UpgradeInProgress=True" in out


def test_cli_status_reports_the_token_without_it_and_down(api, cli, capsys):
    api.put(f"/apis/ray.io/v1/namespaces/{NAMESPACE}/rayclusters", raycluster())
    api.put(f"/apis/ray.io/v1/namespaces/{NAMESPACE}/rayjobs",
            {"kind": "RayJob", "metadata": {"name": "mnist-train"}, "spec": {"clusterSelector": {"ray.io/cluster": "mnist"}}})
    api.script("rayclusters", "mnist", CLUSTER_READY)
    assert cli("status") == 0
    out = capsys.readouterr().out
    assert "RayCluster mnist/mnist: state=ready" in out and "RayService mnist/mnist-serve: not created" in out
    assert "RayJob mnist/mnist-train: jobDeploymentStatus=New" in out and "token authentication: off (spec.authOptions)" in out
    api.get(f"/apis/ray.io/v1/namespaces/{NAMESPACE}/rayclusters", "mnist")["spec"]["authOptions"] = {"mode": "token"}
    assert cli("status") == 0
    assert "token authentication: on, but Secret mnist/mnist does not exist yet" in capsys.readouterr().out
    api.put(f"/api/v1/namespaces/{NAMESPACE}/secrets",
            {"kind": "Secret", "metadata": {"name": "mnist"}, "data": {"auth_token": "c2VjcmV0LXRva2Vu"}})
    assert cli("status") == 0
    out = capsys.readouterr().out
    assert ("token authentication: on; clients: export RAY_AUTH_MODE=token RAY_AUTH_TOKEN=\"$(kubectl -n mnist "
            "get secret mnist -o jsonpath='{.data.auth_token}' | base64 -d)\"") in out
    assert "c2VjcmV0LXRva2Vu" not in out and "secret-token" not in out
    api.forbidden.add("secrets")
    assert cli("status") == 0
    assert "token authentication: on; Secret mnist/mnist holds the token (you may not read" in capsys.readouterr().out
    assert cli("down") == 0
    out = capsys.readouterr().out
    assert "RayService mnist/mnist-serve: not found" in out and "RayCluster mnist/mnist: deleted" in out
    assert "Kept the shared storage" in out
    assert [r["path"].rsplit("/", 2)[-2:] for r in api.sent("DELETE")] == [
        ["rayservices", "mnist-serve"], ["rayjobs", "mnist-train"], ["rayclusters", "mnist"]]


def test_cli_without_credentials(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    assert main(["kuberay", "status", "--kubeconfig", str(tmp_path / "none")]) == 1
    assert "no Kubernetes credentials" in capsys.readouterr().err


# ---------------------------------------------------------------- KubeRay v1.7.0's status machine, value by value
# The values below are written out from KubeRay v1.7.0's source (git tag v1.7.0 of
# github.com/ray-project/kuberay): ray-operator/apis/ray/v1/rayjob_types.go (JobStatus,
# JobDeploymentStatus, JobFailedReason), rayservice_types.go (RayServiceConditionType,
# RayServiceConditionReason, ApplicationStatusEnum) and raycluster_types.go (RayClusterConditionType,
# ClusterState). Each value has the outcome a wait must reach: "wait" (keep polling), "ready", "fail".

JOB_DEPLOYMENT_STATUS = {  # with jobStatus RUNNING, the Ray job itself still going
    "": "wait", "Initializing": "wait", "Running": "wait", "Waiting": "wait", "Retrying": "wait",
    "Complete": "fail",          # terminal (IsJobDeploymentTerminal) without SUCCEEDED
    "Failed": "fail",            # terminal
    "ValidationFailed": "fail",  # set once; the controller never reconciles the RayJob again
    "Suspending": "fail", "Suspended": "fail",  # only a person clearing spec.suspend moves it on
}
JOB_STATUS_WHILE_RUNNING = {  # jobDeploymentStatus Running
    "": "wait", "PENDING": "wait", "RUNNING": "wait",
    "SUCCEEDED": "wait",  # the operator moves the deployment to Complete next
    "STOPPED": "fail", "FAILED": "fail",  # terminal (IsJobTerminal)
}
JOB_STATUS_WHEN_COMPLETE = {"": "fail", "PENDING": "fail", "RUNNING": "fail", "SUCCEEDED": "ready",
                            "STOPPED": "fail", "FAILED": "fail"}
JOB_FAILED_REASONS = ["SubmissionFailed", "DeadlineExceeded", "PreRunningDeadlineExceeded", "AppFailed",
                      "JobDeploymentStatusTransitionGracePeriodExceeded", "JobStatusCheckTimeoutExceeded",
                      "ValidationFailed"]

SERVICE_READY_REASONS_WHEN_FALSE = {
    "Initializing": "wait", "ZeroServeEndpoints": "wait", "NonZeroServeEndpoints": "wait",
    "BothActivePendingClustersExist": "wait", "NoPendingCluster": "wait", "NoActiveCluster": "wait",
    "DesiredClusterSpecChanged": "wait", "SuspendRequested": "wait", "SuspendInProgress": "wait",
    "SuspendComplete": "wait", "RayServiceResumed": "wait",
    "InitializingTimeout": "fail",  # the operator gave up on the cluster
    "ValidationFailed": "fail",     # the controller refuses this spec until it changes
}
SERVICE_CONDITIONS_WHEN_TRUE = {  # alongside Ready=True for the current generation
    "Ready": "ready", "UpgradeInProgress": "wait", "RollbackInProgress": "wait",
    "Suspending": "fail", "Suspended": "fail",
}
APPLICATION_STATUSES = {  # Ready=False, Initializing
    "NOT_STARTED": "wait", "DEPLOYING": "wait", "RUNNING": "wait", "DELETING": "wait",
    "UNHEALTHY": "wait",     # Serve restarts replicas: it may recover
    "DEPLOY_FAILED": "fail",
}
CLUSTER_CONDITIONS_WHEN_TRUE = {  # alongside HeadPodReady=True and RayClusterProvisioned=True
    "HeadPodReady": "ready", "RayClusterProvisioned": "ready",
    "ReplicaFailure": "fail",    # e.g. a pod refused by Pod Security admission
    "RayClusterSuspending": "ready", "RayClusterSuspended": "fail",
}
CLUSTER_STATES = {"ready": "ready", "failed": "fail", "suspended": "fail", "": "wait"}  # an operator writing no conditions


def status_cases():
    """(progress function, object, outcome, text that its failure, else its summary, shows) for each value above."""
    job, cluster, service = kuberay.rayjob_progress, kuberay.raycluster_progress, kuberay.rayservice_progress
    for deployment, outcome in JOB_DEPLOYMENT_STATUS.items():
        yield job, {"status": {"jobDeploymentStatus": deployment, "jobStatus": "RUNNING", "reason": "AppFailed",
                               "message": "why"}}, outcome, "AppFailed: why"
    for deployment, table in (("Running", JOB_STATUS_WHILE_RUNNING), ("Complete", JOB_STATUS_WHEN_COMPLETE)):
        for status, outcome in table.items():
            yield job, {"status": {"jobDeploymentStatus": deployment, "jobStatus": status}}, outcome, f"jobStatus={status or '-'}"
    for reason in JOB_FAILED_REASONS:
        deployment = "ValidationFailed" if reason == "ValidationFailed" else "Failed"
        yield job, {"status": {"jobDeploymentStatus": deployment, "reason": reason, "message": "details"}}, "fail", f"{reason}: details"
    for reason, outcome in SERVICE_READY_REASONS_WHEN_FALSE.items():
        yield service, {"status": {"conditions": [condition("Ready", "False", reason, "msg")]}}, outcome, "msg"
    for kind, outcome in SERVICE_CONDITIONS_WHEN_TRUE.items():
        conditions = [condition("Ready", "True", "NonZeroServeEndpoints")] + [condition(kind, "True", "X")] * (kind != "Ready")
        yield (service, {"metadata": {"generation": 3}, "status": {"observedGeneration": 3, "conditions": conditions}},
               outcome, kind.lower() if outcome == "fail" else f"{kind}=True")
    for app_status, outcome in APPLICATION_STATUSES.items():
        apps = {"applicationStatuses": {"mnist": {"status": app_status, "message": "ModuleNotFoundError"}}}
        yield (service, {"status": {"conditions": [condition("Ready", "False", "Initializing")], "activeServiceStatus": apps}},
               outcome, "Serve application 'mnist' failed to deploy: ModuleNotFoundError" if outcome == "fail"
               else f"app mnist={app_status}")
    yield (service, {"status": {"pendingServiceStatus": {"applicationStatuses": {"mnist": {"status": "DEPLOY_FAILED"}}}}},
           "fail", "'mnist' failed to deploy")  # an upgrade's new cluster
    for kind, outcome in CLUSTER_CONDITIONS_WHEN_TRUE.items():
        conditions = {t: condition(t, "True") for t in ("HeadPodReady", "RayClusterProvisioned")}
        conditions[kind] = condition(kind, "True", "FailedCreateHeadPod", "pods are forbidden: violates PodSecurity")
        yield (cluster, {"status": {"conditions": list(conditions.values())}}, outcome,
               {"ReplicaFailure": "FailedCreateHeadPod: pods are forbidden", "RayClusterSuspended": "suspended"}.get(kind, f"{kind}=True"))
    for state, outcome in CLUSTER_STATES.items():
        yield cluster, {"status": {"state": state}}, outcome, "suspended" if state == "suspended" else f"state={state}"
    # where the operator writes conditions, they decide, and ready needs both
    yield cluster, {"status": {"state": "ready", "conditions": [condition("HeadPodReady", "False")]}}, "wait", "HeadPodReady=False"
    yield cluster, {"status": {}}, "wait", "state=-"
    yield (cluster, {"status": {"state": "", "conditions": [condition("HeadPodReady", "False", "HeadPodNotFound")]}},
           "wait", "HeadPodReady=False (HeadPodNotFound)")
    yield (cluster, {"status": {"conditions": [condition("HeadPodReady", "True"), condition("RayClusterProvisioned", "False")]}},
           "wait", "HeadPodReady=True (Reason), RayClusterProvisioned=False")
    for progress, conditions in ((cluster, [condition("HeadPodReady", "True"), condition("RayClusterProvisioned", "True")]),
                                 (service, [condition("Ready", "True", "NonZeroServeEndpoints")])):
        for observed, outcome in ((1, "wait"), (2, "ready")):  # ready only for the current generation
            yield (progress, {"metadata": {"generation": 2}, "status": {"observedGeneration": observed, "conditions": conditions}},
                   outcome, "observedGeneration 1 < generation 2" if observed == 1 else "=True")


@pytest.mark.parametrize("progress, obj, outcome, shows", list(status_cases()))
def test_every_status_value(progress, obj, outcome, shows):
    result = progress(obj)
    assert not (result.ready and result.failed), result
    assert ("ready" if result.ready else "fail" if result.failed else "wait") == outcome
    assert shows in (result.failed or result.summary)


@pytest.mark.parametrize("action, plural, name, status, words", [
    ("up", "rayclusters", "mnist", {"state": "", "conditions": [
        condition("HeadPodReady", "False", "HeadPodNotFound"),
        condition("ReplicaFailure", "True", "FailedCreateHeadPod", 'pods "mnist-head" is forbidden: violates PodSecurity')]},
     'RayCluster mnist/mnist failed: a pod could not be created: FailedCreateHeadPod: pods "mnist-head" is forbidden'),
    ("train", "rayjobs", "mnist-train", {"jobDeploymentStatus": "Complete", "jobStatus": "FAILED", "message": "exit code 2"},
     "RayJob mnist/mnist-train failed: jobDeploymentStatus=Complete, jobStatus=FAILED (exit code 2)"),
    ("train", "rayjobs", "mnist-train", {"jobDeploymentStatus": "ValidationFailed", "reason": "ValidationFailed",
                                         "message": "The RayJob spec is invalid: entrypoint is required"},
     "refused the RayJob and will not retry: ValidationFailed: The RayJob spec is invalid: entrypoint is required"),
    ("serve", "rayservices", "mnist-serve", {"conditions": [condition(
        "Ready", "False", "ValidationFailed", "spec.rayClusterConfig.headGroupSpec: invalid")]},
     "the operator refused the RayService spec: spec.rayClusterConfig.headGroupSpec: invalid")])
def test_a_status_that_cannot_end_well_ends_the_command_at_once(api, cli, capsys, action, plural, name, status, words):
    """Not after its hour: v1.7.0 writes ValidationFailed once and never reconciles the object again."""
    api.put(f"/apis/ray.io/v1/namespaces/{NAMESPACE}/rayclusters", raycluster())  # train runs on a live RayCluster
    api.script(plural, name, status)
    assert cli(action, "--timeout", "3600") == 1
    assert words in capsys.readouterr().err
    assert api.reads[(plural, name)] == 1


# ---------------------------------------------------------------- requests: timeouts and retries

@pytest.fixture
def fast_retries(monkeypatch):
    monkeypatch.setattr(kuberay, "BACKOFF", 0.01)


GIVE_UP = [503] * (kuberay.RETRIES + 1)


@pytest.mark.parametrize("call, failures, requests, error", [
    ("get", [503, 500], 3, None), ("get", [429], 2, None), ("get", [502, 504, 503], 4, None),  # transient: retried
    ("get", ["drop"], 2, None),
    ("get", GIVE_UP, kuberay.RETRIES + 1, "HTTP 503"),  # given up after the retries
    ("create", GIVE_UP, 1, "HTTP 503"),  # a create that failed with a 5xx may still have happened: not repeated
    *[("get", [code], 1, "") for code in (400, 401, 403, 404, 409, 422)]])  # an answer about the request: final
def test_transient_failures_are_retried_and_others_are_final(api, fast_retries, call, failures, requests, error):
    api.put(f"/apis/ray.io/v1/namespaces/{NAMESPACE}/rayclusters", raycluster())
    api.failures = list(failures)
    cluster, args = api.client(), (("RayCluster", "mnist") if call == "get" else (raycluster("new"),))
    if error is None:
        assert getattr(cluster, call)(*args)["metadata"]["name"] == "mnist"
    else:
        with pytest.raises(kuberay.KubeRayError, match=error or None):
            getattr(cluster, call)(*args)
    assert len(api.requests) == requests


def test_every_request_has_a_timeout(api, monkeypatch, fast_retries):
    monkeypatch.setattr(kuberay, "REQUEST_TIMEOUT", (1.0, 0.2))
    monkeypatch.setattr(kuberay, "RETRIES", 0)
    cluster = api.client()
    for call in (lambda: cluster.get("RayCluster", "mnist"), lambda: cluster.create(raycluster()),
                 lambda: cluster.list("Pod"), lambda: cluster.apply(raycluster()), lambda: cluster.delete(raycluster())):
        api.failures = ["slow"]
        with pytest.raises(kuberay.Unreachable, match="did not answer within 0.2 s"):
            call()


# ---------------------------------------------------------------- down --all, render, token

def test_down_all_waits_for_the_ray_pods_before_deleting_the_nfs_server(api, cli, capsys):
    api.script("rayclusters", "mnist", CLUSTER_READY)
    assert cli("up") == 0
    api.put(f"/apis/ray.io/v1/namespaces/{NAMESPACE}/rayjobs",  # created with --job-name
            {"kind": "RayJob", "metadata": {"name": "nightly"}, "spec": {"clusterSelector": {"ray.io/cluster": "mnist"}}})
    api.put(f"/api/v1/namespaces/{NAMESPACE}/pods",
            {"kind": "Pod", "metadata": {"name": "mnist-head-x", "labels": {"ray.io/cluster": "mnist"}}})
    api.pod_lists_until_gone = 2
    assert cli("down", "--all") == 0
    paths = [(r["method"], r["path"]) for r in api.requests]
    last_pod_list = max(i for i, (m, path) in enumerate(paths) if m == "GET" and path.endswith("/pods"))
    nfs_deletes = [i for i, (m, path) in enumerate(paths) if m == "DELETE" and "mnist-nfs" in path]
    assert nfs_deletes and last_pod_list < min(nfs_deletes)
    assert "Waiting for the Ray pods to go" in capsys.readouterr().out
    deleted = [r["path"].rsplit("/", 1)[-1] for r in api.sent("DELETE")]  # users of a thing before it
    assert deleted == ["mnist-serve", "mnist-train", "nightly", "mnist", "mnist-serve", "mnist-training", "mnist-ray-env",
                       "mnist-mnist-shared", "mnist-shared", "nfs-server", "nfs-disk", "nfs-server", "nfs-server",
                       "mnist-nfs", "mnist"]
    assert not [key for key in api.objects]


def test_down_all_keeps_the_storage_while_ray_pods_remain(api, cli, capsys):
    api.put(f"/api/v1/namespaces/{NAMESPACE}/pods",
            {"kind": "Pod", "metadata": {"name": "mnist-worker-y", "labels": {"ray.io/cluster": "mnist"}}})
    assert cli("down", "--all", "--timeout", "0.1") == 1
    err = capsys.readouterr().err
    assert "1 Ray pod(s) still in mnist" in err and "mnist-worker-y" in err and "kept the NFS server" in err
    assert not [r for r in api.sent("DELETE") if "mnist-nfs" in r["path"] or "persistentvolume" in r["path"]]


def test_render_refuses_a_volume_without_the_nfs_server(api, cli, capsys):
    assert cli("render") == 2
    assert "the NFS volume needs --nfs-server" in capsys.readouterr().err
    assert cli("render", "--nfs-server", "10.4.0.9") == 0
    docs = list(yaml.safe_load_all(capsys.readouterr().out))
    (volume,) = [d for d in docs if d["kind"] == "PersistentVolume"]
    assert volume["spec"]["nfs"]["server"] == "10.4.0.9"
    assert cli("render", "--shared-storage", "filestore") == 0  # no PV, nothing to ask
    assert cli("render", "--part", "cluster", "--part", "job", "--nfs-server", "10.4.0.9") == 0
    assert [d["kind"] for d in yaml.safe_load_all(capsys.readouterr().out)][-2:] == ["RayCluster", "RayJob"]
    assert api.requests == []


def test_a_wait_outlasts_an_api_server_outage(api, fast_retries):
    """Each read gives up after its retries, but the wait keeps trying until its own deadline."""
    api.put(f"/apis/ray.io/v1/namespaces/{NAMESPACE}/rayjobs", {"kind": "RayJob", "metadata": {"name": "t"}})
    api.script("rayjobs", "t", JOB_SUCCEEDED)
    api.failures = [503] * (2 * (kuberay.RETRIES + 1)) + ["drop"]
    seen = []
    assert api.client().wait_ready("RayJob", "t", timeout=30, poll=0.01, on_change=seen.append)["status"] == JOB_SUCCEEDED
    assert sum("(retrying)" in line and "HTTP 503" in line for line in seen) >= 1


def test_a_wait_stops_at_once_on_a_client_error(api, fast_retries):
    api.failures = [403]
    with pytest.raises(kuberay.Forbidden):
        api.client().wait_ready("RayJob", "t", timeout=30, poll=0.01)
    assert len(api.requests) == 1
