"""`python -m ray_cluster kuberay up | status | train | serve | down | render`: MNIST on KubeRay.

Every command renders k8s/ with kustomize for its options (pass the same ones to each command),
refuses invalid options before contacting the cluster, applies what it rendered (server-side
apply), waits for the operator to report it ready, and prints the next step. See docs/GKE.md.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import shlex
import sys
import time
from pathlib import Path

from ray_cluster import manifests

DEFAULT_TIMEOUTS = {"up": 900, "train": 3600, "serve": 900, "down": 300}  # seconds; image pulls take minutes
POLL = 2.0  # seconds between status reads


class _Lazy:
    """`kuberay`, imported on first use: local commands need not load the kubernetes package."""

    def __getattr__(self, name):
        from ray_cluster import kuberay as module
        return getattr(module, name)


kuberay = _Lazy()


def add_subparser(commands) -> None:
    parser = commands.add_parser("kuberay", help="run on Kubernetes with KubeRay (docs/GKE.md)",
                                 description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    actions = parser.add_subparsers(dest="action", required=True)
    common = argparse.ArgumentParser(add_help=False)
    _add_options(common)
    for name, action, summary in (
            ("render", render, "print the manifests (YAML) without contacting a cluster"),
            ("up", up, "create namespace, shared storage, NetworkPolicies and the RayCluster; wait"),
            ("status", status, "show the RayCluster, RayJobs and RayService as the operator reports them"),
            ("train", train, "run training as a RayJob on the RayCluster; wait for it to finish"),
            ("serve", serve, "create or update the RayService; wait; print its external address"),
            ("down", down, "delete the RayService, RayJobs and RayCluster (--all: storage and data too)")):
        sub = actions.add_parser(name, parents=[common], help=summary, description=summary)
        sub.set_defaults(run=_guarded(action))
        if name == "render":
            sub.add_argument("--part", action="append", choices=manifests.PARTS,
                             help="render only this part (repeatable; default: all)")
        if name in ("train", "serve"):
            sub.add_argument("--no-wait", action="store_true", help="return once the object is created")
        if name == "down":
            sub.add_argument("--all", action="store_true",
                             help="also delete NetworkPolicies, shared storage (the trained models!) and namespaces")


def _add_options(parser: argparse.ArgumentParser) -> None:
    for option in dataclasses.fields(manifests.Options):
        flag, default, help = "--" + option.name.replace("_", "-"), option.default, option.metadata["help"]
        if option.name == "lb_source_ranges":  # repeatable; the dataclass's default stands for none given
            parser.add_argument("--lb-source-range", dest=option.name, action="append", help=help)
        elif isinstance(default, bool):
            parser.add_argument(flag, action="store_true", help=help)
        else:
            kind = int if "int" in option.type else Path if "Path" in option.type else str
            default = os.environ.get("MNIST_IMAGE") if option.name == "image" else default
            parser.add_argument(flag, type=kind, default=default, help=help + (" (default %(default)s)" if default else ""))
    parser.add_argument("--kubeconfig", help="kubeconfig file (default $KUBECONFIG or ~/.kube/config)")
    parser.add_argument("--context", help="kubeconfig context (default: the current one)")
    parser.add_argument("--timeout", type=float, help="seconds to wait (default: up 900, train 3600, serve 900, down --all 300)")


def options_from_args(args: argparse.Namespace) -> manifests.Options:
    values = {option.name: getattr(args, option.name) for option in dataclasses.fields(manifests.Options)}
    values["lb_source_ranges"] = tuple(args.lb_source_ranges or manifests.Options.lb_source_ranges)
    return manifests.Options(**values)


def _guarded(action):
    """Validate first (nothing is sent for invalid options), then turn known failures into one line."""
    def run(args: argparse.Namespace) -> int:
        try:
            options = options_from_args(args)
            manifests.check(options)
            return action(args, options)
        except (manifests.InvalidOptions, kuberay.KubeRayError, manifests.RenderError) as error:
            print(f"error: {error}", file=sys.stderr)
            return 2 if isinstance(error, manifests.InvalidOptions) else 1
    return run


def _connect(args, o: manifests.Options) -> kuberay.KubeRay:
    return kuberay.KubeRay.connect(o.namespace, kubeconfig=args.kubeconfig, context=args.context)


def _require_registry(o: manifests.Options) -> None:
    """Nodes pull from a registry: an image without one cannot start (found before any pod waits)."""
    first = o.image_ref.split("/", 1)[0]
    if "/" not in o.image_ref or not ("." in first or ":" in first or first == "localhost"):
        raise manifests.InvalidOptions([
            f"image {o.image_ref!r} names no registry, so GKE nodes cannot pull it: build and push it "
            "(docs/GKE.md, step 3), then pass --image or set MNIST_IMAGE"])


def _timeout(args, action: str) -> float:
    return args.timeout if args.timeout is not None else DEFAULT_TIMEOUTS[action]


def _say(text: str) -> None:
    print(text, flush=True)


def _wait(cluster: kuberay.KubeRay, args, action: str, kind: str, name: str) -> None:
    """Wait for the operator to report it ready, printing each new status."""
    cluster.wait_ready(kind, name, timeout=_timeout(args, action), poll=POLL,
                       on_change=lambda summary: _say(f"  {kind} {name}: {summary}"))


def _label(obj: dict) -> str:
    meta = obj["metadata"]
    return f"{obj['kind']} " + (f"{meta['namespace']}/" if "namespace" in meta else "") + meta["name"]


def _apply(cluster: kuberay.KubeRay, objects: list[dict]) -> None:
    for obj in objects:
        cluster.apply(obj)
        _say(f"{_label(obj)}: applied")


# ---------------------------------------------------------------- actions

def render(args, o: manifests.Options) -> int:
    sys.stdout.write(manifests.to_yaml(manifests.render(o, args.part or manifests.PARTS)))
    return 0


def up(args, o: manifests.Options) -> int:
    _require_registry(o)
    cluster = _connect(args, o)
    _apply(cluster, manifests.render(o, ["namespace", "nfs"]))
    if o.shared_storage == "nfs" and not o.nfs_server:
        # Nodes mount the volume and may not resolve cluster DNS: give the PV the Service's IP.
        service = cluster.get("Service", manifests.NFS_SERVICE, o.nfs_namespace)
        o = dataclasses.replace(o, nfs_server=service["spec"]["clusterIP"])
    _apply(cluster, manifests.render(o, ["volume", "network", "env", "cluster"]))
    _say(f"Waiting up to {_timeout(args, 'up'):g} s for the RayCluster (pulling the image takes minutes)...")
    _wait(cluster, args, "up", "RayCluster", o.name)
    head = f"{o.name}-head-svc"  # named by KubeRay
    _say(f"\nRayCluster {o.name} is ready. The dashboard and job API stay inside the cluster; in another terminal:\n"
         f"  kubectl -n {o.namespace} port-forward svc/{head} 8265:8265\n"
         "Then train through the port-forward, with the cluster's token (token authentication is on):\n"
         f"  {token_export(o)}\n"
         "  ray job submit --address http://localhost:8265 --working-dir . -- "
         f"{shlex.join(manifests.train_command(o, 'training/train.py'))}\n"
         "or as a RayJob (same options as this command):\n"
         "  python -m ray_cluster kuberay train")
    return 0


def token_export(o: manifests.Options, cluster: str | None = None) -> str:
    """The shell line that makes a shell's Ray clients send the cluster's token (a Secret KubeRay
    generates, named like the cluster, key auth_token): they send it only with RAY_AUTH_MODE=token."""
    return (f"export RAY_AUTH_MODE=token RAY_AUTH_TOKEN=\"$(kubectl -n {o.namespace} get secret {cluster or o.name} "
            "-o jsonpath='{.data.auth_token}' | base64 -d)\"")


def train(args, o: manifests.Options) -> int:
    _require_registry(o)
    cluster = _connect(args, o)
    try:
        live = cluster.get("RayCluster", o.name)
    except kuberay.NotFound:
        raise kuberay.NotFound(f"RayCluster {o.namespace}/{o.name} not found: run "
                               "`python -m ray_cluster kuberay up` first") from None
    if o.workers is None:  # the live cluster's size is the count, whatever options made it
        o = dataclasses.replace(o, workers=manifests.worker_pods(live))
    slots = manifests.worker_slots(live)
    if o.workers > slots:
        raise manifests.InvalidOptions([f"--workers {o.workers} is more than RayCluster {o.name} holds "
                                        f"({slots} worker CPUs)"])
    (job,) = manifests.render(o, ["job"])
    try:
        cluster.create(job)
    except kuberay.AlreadyExists:
        raise kuberay.AlreadyExists(
            f"RayJob {o.namespace}/{o.rayjob_name} already exists (finished jobs keep their record): pass "
            f"--job-name, or delete it with `kubectl -n {o.namespace} delete rayjob {o.rayjob_name}`") from None
    _say(f"RayJob {o.namespace}/{o.rayjob_name}: created (KubeRay gives its submitter the cluster's token)\n"
         f"  entrypoint: {job['spec']['entrypoint']}\n"
         f"  logs: kubectl -n {o.namespace} logs -f job/{o.rayjob_name}")
    if args.no_wait:
        return 0
    _wait(cluster, args, "train", "RayJob", o.rayjob_name)
    _say(f"\nTraining succeeded; the model is published under {manifests.MOUNT_PATH}/models/mnist. "
         "Serve it with `python -m ray_cluster kuberay serve`.")
    return 0


def serve(args, o: manifests.Options) -> int:
    _require_registry(o)
    (body,) = manifests.render(o, ["service"])
    cluster = _connect(args, o)
    _apply(cluster, [body])  # on a running RayService, KubeRay upgrades it without downtime
    if args.no_wait:
        return 0
    deadline = time.monotonic() + _timeout(args, "serve")
    _wait(cluster, args, "serve", "RayService", o.service_name)
    address = _external_address(cluster, o, deadline)
    _say(f"\nServing at http://{address}:{manifests.SERVE_PORT}/ (Gradio sketchpad at /ui/). "
         "Only this port is exposed.")
    return 0


def _external_address(cluster: kuberay.KubeRay, o: manifests.Options, deadline: float) -> str:
    """The LoadBalancer's IP (or hostname) once the cloud has assigned it."""
    name = f"{o.service_name}-serve-svc"  # named by KubeRay

    def address():
        ingress = ((cluster.get("Service", name).get("status") or {}).get("loadBalancer") or {}).get("ingress") or []
        return next(filter(None, (entry.get("ip") or entry.get("hostname") for entry in ingress)), None)
    return kuberay.poll_until(address, deadline - time.monotonic(), POLL, lambda: kuberay.WaitTimeout(
        f"Service {o.namespace}/{name} has no external address yet; `kubectl -n {o.namespace} get svc {name} -w` "
        "shows when it does"))


def status(args, o: manifests.Options) -> int:
    cluster = _connect(args, o)
    for kind, name in (("RayCluster", o.name), ("RayService", o.service_name)):
        try:
            obj = cluster.get(kind, name)
            _say(f"{kind} {o.namespace}/{name}: {kuberay.PROGRESS[kind](obj).summary}")
        except kuberay.NotFound:
            _say(f"{kind} {o.namespace}/{name}: not created")
            continue
        if kind == "RayCluster":
            _say(f"  token authentication: {_token_state(cluster, o, obj)}")
    jobs = _jobs_of(cluster, o)
    for job in jobs:
        _say(f"RayJob {o.namespace}/{job['metadata']['name']}: {kuberay.rayjob_progress(job).summary}")
    if not jobs:
        _say(f"RayJobs on {o.name}: none")
    return 0


def _token_state(cluster: kuberay.KubeRay, o: manifests.Options, raycluster: dict) -> str:
    auth = raycluster.get("spec", {}).get("authOptions") or {}
    if auth.get("mode", "token" if auth else "disabled") != "token":
        return "off (spec.authOptions)"
    secret = auth.get("secretName") or o.name
    try:
        keys = cluster.get("Secret", secret).get("data") or {}  # its keys say whether a token is there
    except kuberay.NotFound:
        return f"on, but Secret {o.namespace}/{secret} does not exist yet (KubeRay creates it)"
    except kuberay.Forbidden:
        return f"on; Secret {o.namespace}/{secret} holds the token (you may not read Secrets there)"
    if "auth_token" not in keys:
        return f"on, but Secret {o.namespace}/{secret} has no auth_token key"
    return f"on; clients: {token_export(o, secret)}"


def _jobs_of(cluster: kuberay.KubeRay, o: manifests.Options) -> list[dict]:
    """The RayJobs that run on this RayCluster, whatever their names (--job-name)."""
    return [job for job in cluster.list("RayJob")
            if (job.get("spec", {}).get("clusterSelector") or {}).get("ray.io/cluster") == o.name]


def _wait_for_ray_pods_to_go(cluster: kuberay.KubeRay, o: manifests.Options, timeout: float) -> None:
    """A hard NFS mount whose server is gone blocks the unmount: pods and namespace would stay
    Terminating. So the storage goes only once no pod of any Ray cluster is left."""
    pods = []

    def gone():  # KubeRay labels the pods of any Ray cluster ray.io/cluster
        pods[:] = sorted(pod["metadata"]["name"] for pod in cluster.list("Pod", label_selector="ray.io/cluster"))
        return not pods
    kuberay.poll_until(gone, timeout, POLL, lambda: kuberay.WaitTimeout(
        f"{len(pods)} Ray pod(s) still in {o.namespace} after {timeout:g} s ({', '.join(pods[:5])}); "
        "kept the NFS server and volume so their unmount can finish. Run `down --all` again later"))


def down(args, o: manifests.Options) -> int:
    cluster = _connect(args, o)
    jobs = {job["metadata"]["name"] for job in _jobs_of(cluster, o)} | {o.rayjob_name}
    ray_objects = [{"kind": kind, "metadata": {"name": name, "namespace": o.namespace}} for kind, name in
                   [("RayService", o.service_name)] + [("RayJob", n) for n in sorted(jobs)] + [("RayCluster", o.name)]]
    # Deleting needs only names: the NFS address is not asked for.
    o_names = dataclasses.replace(o, nfs_server=o.nfs_server or "not-needed-to-delete.invalid")
    order = ["network", "env", "volume", "nfs", "namespace"]  # users of a thing go before it, namespaces last
    plain = sorted(manifests.render(o_names, order) if args.all else [],
                   key=lambda obj: (obj["kind"] == "Namespace", order.index(manifests.part_of(obj, o))))
    for obj in ray_objects:
        _say(f"{_label(obj)}: {'deleted' if cluster.delete(obj) else 'not found'}")
    if args.all:
        _say("Waiting for the Ray pods to go before deleting the storage they mount...")
        _wait_for_ray_pods_to_go(cluster, o, _timeout(args, "down"))
    for obj in plain:
        _say(f"{_label(obj)}: {'deleted' if cluster.delete(obj) else 'not found'}")
    if not args.all:
        _say("Kept the shared storage (trained models), NetworkPolicies and namespaces; `down --all` deletes them.")
    return 0
