"""Render the Kubernetes manifests for MNIST on KubeRay from the plain YAML files in k8s/.

k8s/base/*.yaml and k8s/overlays/<storage>/storage.yaml are complete, readable manifests that
hold the defaults. `render(options)` loads them and sets the fields the options change on the
parsed objects (no string templating), so the same options always give the same bytes.
Invalid options are refused with every problem listed before anything is rendered or sent.
"""
from __future__ import annotations

import copy
import functools
import re
import shlex
import tomllib
from dataclasses import dataclass
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
K8S_DIR = ROOT / "k8s"
PYPROJECT = ROOT / "pyproject.toml"
SERVE_CONFIG = ROOT / "serving" / "serve_config.yaml"

MOUNT_PATH = "/mnt/shared"     # the storage root in every pod ($MNIST_STORAGE, --storage)
STORAGE_ENV = "MNIST_STORAGE"
STORAGE_ARGS = ("storage", "storage_root", "storage_path")  # Serve app args that name the root
APP_DIR = "/home/ray/mnist"    # WORKDIR of k8s/Dockerfile: the project inside the image
PYTHON_TAG = "py311"
SERVE_PORT = 8000
HEAD_PORTS = {"gcs-server": 6379, "dashboard": 8265, "client": 10001, "serve": SERVE_PORT}
NAME_LIMITS = {"RayCluster": 53, "RayJob": 47, "RayService": 47}  # KubeRay's limits
NFS_SERVICE = "nfs-server"
STORAGE_KINDS = ("nfs", "filestore")
FILESTORE_MIN = "1Ti"
# namespace: the app namespace; nfs: the NFS server (nfs storage only); volume: the PVC every
# Ray pod mounts; network: NetworkPolicies; cluster: RayCluster; job: RayJob; service: RayService.
PARTS = ("namespace", "nfs", "volume", "network", "cluster", "job", "service")

_DNS1035 = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")
_DNS1123 = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
_RUN_ID = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]{0,62}")  # as training/train.py accepts
_QUANTITY = re.compile(r"(\d+(?:\.\d+)?)(Ki|Mi|Gi|Ti|Pi|k|M|G|T|P)?")
_UNITS = {None: 1, "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15,
          "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50}


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


def default_image() -> str:
    return f"mnist-ray:{image_tag_prefix()}"


@dataclass(frozen=True)
class Options:
    """Everything a user may set. Pass the same options to every command."""
    name: str = "mnist"                # RayCluster name; the RayService is <name>-serve
    namespace: str = "mnist"
    image: str | None = None           # default mnist-ray:<ray>-py311 (push it to a registry)
    worker_pods: int = 3               # pods in the RayCluster's worker group
    worker_cpus: int = 2               # CPUs per worker pod (requests = limits)
    worker_memory: str = "4Gi"
    head_cpus: int = 2
    head_memory: str = "4Gi"
    serve_worker_pods: int = 1         # worker pods of the RayService's own Ray cluster
    shared_storage: str = "nfs"        # nfs | filestore
    storage_size: str | None = None    # default 10Gi (nfs disk) or 1Ti (Filestore's minimum)
    nfs_server: str | None = None      # default the NFS Service's DNS name; the CLI uses its IP
    workers: int = 3                   # Ray Train workers of the RayJob (train.py --workers)
    epochs: int = 2
    batch_size: int = 100
    rounds: int | None = None
    run_id: str | None = None
    job_name: str | None = None        # default <name>-train
    operator_namespace: str = "kuberay-system"
    serve_config: Path = SERVE_CONFIG

    @property
    def image_ref(self) -> str:
        return self.image or default_image()

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
    def size(self) -> str:
        return self.storage_size or (FILESTORE_MIN if self.shared_storage == "filestore" else "10Gi")


def head_service_name(cluster: str) -> str:
    return f"{cluster}-head-svc"   # named by KubeRay


def serve_service_name(service: str) -> str:
    return f"{service}-serve-svc"  # named by KubeRay


# ---------------------------------------------------------------- validation

def quantity_bytes(text: str) -> float | None:
    """A Kubernetes memory/storage quantity in bytes ("4Gi", "500M"), or None if malformed."""
    match = _QUANTITY.fullmatch(str(text))
    return float(match.group(1)) * _UNITS[match.group(2)] if match else None


def image_tag(image: str) -> str | None:
    last = image.split("@", 1)[0].rsplit("/", 1)[-1]
    return last.split(":", 1)[1] if ":" in last else None


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
                        ("--head-cpus", o.head_cpus), ("--serve-worker-pods", o.serve_worker_pods),
                        ("--workers", o.workers), ("--epochs", o.epochs), ("--batch-size", o.batch_size)):
        if value < 1:
            found.append(f"{flag} must be at least 1 (got {value})")
    if o.rounds is not None and o.rounds < 1:
        found.append(f"--rounds must be at least 1 (got {o.rounds})")
    slots = o.worker_pods * o.worker_cpus
    if o.worker_pods >= 1 and o.worker_cpus >= 1 and o.workers > slots:
        found.append(f"--workers {o.workers} is more than the worker group holds: {o.worker_pods} pods x "
                     f"{o.worker_cpus} CPUs = {slots} Train workers at most (raise --worker-pods or --worker-cpus)")
    for flag, value in (("--worker-memory", o.worker_memory), ("--head-memory", o.head_memory)):
        if not quantity_bytes(value):
            found.append(f"{flag} {value!r} is not a Kubernetes quantity such as 4Gi")
    tag = image_tag(o.image_ref)
    prefix = image_tag_prefix()
    if tag != prefix and not (tag or "").startswith(prefix + "-"):
        found.append(f"image {o.image_ref!r}: its tag must be {prefix!r} (or {prefix}-<anything>) to match "
                     f"the ray=={pinned_ray_version()} that pyproject.toml pins; image, rayVersion and "
                     "client must run the same Ray")
    if o.shared_storage not in STORAGE_KINDS:
        found.append(f"--shared-storage {o.shared_storage!r}: choose one of {', '.join(STORAGE_KINDS)}")
    size = quantity_bytes(o.size)
    if not size:
        found.append(f"--storage-size {o.size!r} is not a Kubernetes quantity such as 10Gi")
    elif o.shared_storage == "filestore" and size < quantity_bytes(FILESTORE_MIN):
        found.append(f"--storage-size {o.size} is below Filestore's minimum of {FILESTORE_MIN}")
    if o.run_id is not None and not _RUN_ID.fullmatch(o.run_id):
        found.append(f"--run-id {o.run_id!r}: use 1-63 letters, digits, '-', '_' or '.' (not starting with '.')")
    return found


def check(o: Options) -> None:
    found = problems(o)
    if found:
        raise InvalidOptions(found)


# ---------------------------------------------------------------- rendering

def render(o: Options, parts: tuple[str, ...] | list[str] = PARTS) -> list[dict]:
    """The objects of the requested parts, in the order they should be created."""
    check(o)
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        raise InvalidOptions([f"unknown part(s) {unknown}; choose from {', '.join(PARTS)}"])
    builders = {"namespace": _namespace, "nfs": _nfs_server, "volume": _volume, "network": _network,
                "cluster": _raycluster, "job": _rayjob, "service": _rayservice}
    return [obj for part in PARTS if part in parts for obj in builders[part](o)]


def to_yaml(objects: list[dict]) -> str:
    return yaml.dump_all(objects, Dumper=_Dumper, sort_keys=False, width=4096)


class _Dumper(yaml.SafeDumper):
    """Writes multi-line strings (serveConfigV2, scripts) as readable `|` blocks."""


_Dumper.add_representer(str, lambda dumper, text: dumper.represent_scalar(
    "tag:yaml.org,2002:str", text, style="|" if "\n" in text else None))


def _load(relative: str, kinds: list[str]) -> list[dict]:
    """The documents of a k8s/ file, checked to be the expected kinds in the expected order."""
    docs = [doc for doc in yaml.safe_load_all((K8S_DIR / relative).read_text()) if doc]
    found = [doc.get("kind") for doc in docs]
    if found != kinds:
        raise RuntimeError(f"k8s/{relative} holds {found}, the renderer expects {kinds}")
    return docs


def _place(obj: dict, name: str, namespace: str | None) -> dict:
    obj["metadata"]["name"] = name
    if namespace is not None:
        obj["metadata"]["namespace"] = namespace
    return obj


def _namespace(o: Options) -> list[dict]:
    (namespace,) = _load("base/namespace.yaml", ["Namespace"])
    return [_place(namespace, o.namespace, None)]


def _nfs_server(o: Options) -> list[dict]:
    if o.shared_storage != "nfs":
        return []
    docs = _load("overlays/gke-nfs/storage.yaml", NFS_KINDS)
    namespace, disk, deployment, service = docs[:4]
    _place(namespace, o.nfs_namespace, None)
    for obj in (disk, deployment, service):
        obj["metadata"]["namespace"] = o.nfs_namespace
    disk["spec"]["resources"]["requests"]["storage"] = o.size
    return [namespace, disk, deployment, service]


NFS_KINDS = ["Namespace", "PersistentVolumeClaim", "Deployment", "Service", "PersistentVolume",
             "PersistentVolumeClaim"]


def _volume(o: Options) -> list[dict]:
    """The ReadWriteMany claim every Ray pod mounts at /mnt/shared (and its NFS volume)."""
    if o.shared_storage == "filestore":
        (claim,) = _load("overlays/filestore/storage.yaml", ["PersistentVolumeClaim"])
        _place(claim, o.claim_name, o.namespace)
        claim["spec"]["resources"]["requests"]["storage"] = o.size
        return [claim]
    volume, claim = _load("overlays/gke-nfs/storage.yaml", NFS_KINDS)[4:]
    _place(volume, o.volume_name, None)
    volume["spec"]["capacity"]["storage"] = o.size
    volume["spec"]["claimRef"] = {"namespace": o.namespace, "name": o.claim_name}
    volume["spec"]["nfs"]["server"] = o.nfs_server or f"{NFS_SERVICE}.{o.nfs_namespace}.svc.cluster.local"
    _place(claim, o.claim_name, o.namespace)
    claim["spec"]["volumeName"] = o.volume_name
    claim["spec"]["resources"]["requests"]["storage"] = o.size
    return [volume, claim]


def _network(o: Options) -> list[dict]:
    internal, serve = _load("base/networkpolicy.yaml", ["NetworkPolicy", "NetworkPolicy"])
    _place(internal, f"{o.name}-ray-internal", o.namespace)
    operator = internal["spec"]["ingress"][1]["from"][0]
    operator["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"] = o.operator_namespace
    _place(serve, f"{o.name}-serve-ingress", o.namespace)
    serve["spec"]["podSelector"]["matchLabels"]["app.kubernetes.io/instance"] = o.service_name
    return [internal, serve]


def _raycluster(o: Options) -> list[dict]:
    (cluster,) = _load("base/raycluster.yaml", ["RayCluster"])
    _place(cluster, o.name, o.namespace)
    _cluster_spec(cluster["spec"], o, instance=o.name, worker_pods=o.worker_pods)
    return [cluster]


def _cluster_spec(spec: dict, o: Options, instance: str, worker_pods: int) -> None:
    spec["rayVersion"] = pinned_ray_version()
    _pod(spec["headGroupSpec"]["template"], o, instance, o.head_cpus, o.head_memory)
    (group,) = spec["workerGroupSpecs"]
    group.update(replicas=worker_pods, minReplicas=worker_pods, maxReplicas=worker_pods)
    _pod(group["template"], o, instance, o.worker_cpus, o.worker_memory)


def _pod(template: dict, o: Options, instance: str, cpus: int, memory: str) -> None:
    template["metadata"]["labels"]["app.kubernetes.io/instance"] = instance
    spec = template["spec"]
    for container in spec.get("initContainers", []) + spec["containers"]:
        container["image"] = o.image_ref
    spec["containers"][0]["resources"] = _guaranteed(str(cpus), memory)
    for volume in spec.get("volumes", []):
        if "persistentVolumeClaim" in volume:
            volume["persistentVolumeClaim"]["claimName"] = o.claim_name


def _guaranteed(cpu: str, memory: str) -> dict:
    amount = {"cpu": cpu, "memory": memory}
    return {"requests": dict(amount), "limits": dict(amount)}


def train_command(o: Options, script: str = f"{APP_DIR}/training/train.py") -> list[str]:
    """The training command line (the RayJob's entrypoint; the CLI prints it for `ray job submit`)."""
    command = ["python", script, "--workers", str(o.workers), "--epochs", str(o.epochs),
               "--batch-size", str(o.batch_size), "--storage", MOUNT_PATH]
    if o.rounds is not None:
        command += ["--rounds", str(o.rounds)]
    if o.run_id is not None:
        command += ["--run-id", o.run_id]
    return command


def _rayjob(o: Options) -> list[dict]:
    (job,) = _load("base/rayjob.yaml", ["RayJob"])
    _place(job, o.rayjob_name, o.namespace)
    job["spec"]["clusterSelector"] = {"ray.io/cluster": o.name}
    job["spec"]["entrypoint"] = shlex.join(train_command(o))
    for container in job["spec"]["submitterPodTemplate"]["spec"]["containers"]:
        container["image"] = o.image_ref
    return [job]


def _rayservice(o: Options) -> list[dict]:
    (service,) = _load("base/rayservice.yaml", ["RayService"])
    _place(service, o.service_name, o.namespace)
    service["spec"]["serveConfigV2"] = serve_config_v2(o.serve_config)
    (cluster,) = _load("base/raycluster.yaml", ["RayCluster"])
    _cluster_spec(cluster["spec"], o, instance=o.service_name, worker_pods=o.serve_worker_pods)
    service["spec"]["rayClusterConfig"] = cluster["spec"]
    return [service]


def serve_config_v2(path: Path = SERVE_CONFIG) -> str:
    """The local Serve config, made to run in the cluster: storage root /mnt/shared, Serve on
    0.0.0.0:8000 inside the pods, no local working_dir (the image holds the code)."""
    try:
        config = yaml.safe_load(Path(path).read_text())
    except FileNotFoundError:
        raise InvalidOptions([f"{path} not found: the RayService runs the local Serve config, so it "
                              "must exist (or leave the RayService out with --part)"]) from None
    applications = config.get("applications") if isinstance(config, dict) else None
    if not applications:
        raise InvalidOptions([f"{path} has no `applications:` list"])
    config = copy.deepcopy(config)
    for app in config["applications"]:
        _cluster_app(app, path)
    http = config.get("http_options") or {}
    config["http_options"] = {**http, "host": "0.0.0.0", "port": SERVE_PORT}
    return yaml.dump(config, Dumper=_Dumper, sort_keys=False, width=4096)


def _cluster_app(app: dict, path: Path) -> None:
    name = app.get("name", app.get("import_path"))
    if not app.get("import_path"):
        raise InvalidOptions([f"{path}: application {name!r} has no import_path"])
    runtime_env = app.setdefault("runtime_env", {})
    installs = sorted({"pip", "conda", "uv"} & set(runtime_env))
    if installs:
        raise InvalidOptions([f"{path}: application {name!r} sets runtime_env {installs}, which installs "
                              "packages at run time; bake them into the image (k8s/Dockerfile) instead"])
    if "://" not in str(runtime_env.get("working_dir", "://")):
        del runtime_env["working_dir"]  # a local path does not exist in the pods; the image has the code
    runtime_env.setdefault("env_vars", {})[STORAGE_ENV] = MOUNT_PATH
    args = app.get("args")
    if isinstance(args, dict):
        for key in STORAGE_ARGS:
            if key in args:
                args[key] = MOUNT_PATH


def worker_slots(raycluster: dict) -> int:
    """Train workers a live RayCluster holds: worker pods x whole CPUs each, over its groups."""
    slots = 0
    for group in raycluster.get("spec", {}).get("workerGroupSpecs", []):
        limits = group["template"]["spec"]["containers"][0].get("resources", {}).get("limits", {})
        cpu = str(limits.get("cpu", "0"))
        cpus = int(cpu[:-1]) // 1000 if cpu.endswith("m") else int(float(cpu))
        slots += int(group.get("replicas", 0)) * cpus
    return slots
