"""A KubeRay client on the official `kubernetes` package (KubeRay's own is not on PyPI): create,
server-side apply, get, list, delete and wait_ready on RayClusters, RayJobs and RayServices, and
apply/delete of the plain objects beside them. API failures become errors that say what to do."""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Callable

import urllib3
from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

GROUP = "ray.io"
VERSION = "v1"
OPERATOR_VERSION = "1.7.0"
INSTALL_HINT = (
    f"install the KubeRay operator v{OPERATOR_VERSION} with Helm (its CRDs are too large for "
    "client-side `kubectl apply`): `helm repo add kuberay https://ray-project.github.io/kuberay-helm/ "
    f"&& helm install kuberay-operator kuberay/kuberay-operator --version {OPERATOR_VERSION} "
    "--namespace kuberay-system --create-namespace`, or enable GKE's Ray operator add-on; see docs/GKE.md")


class KubeRayError(RuntimeError):
    """A failure the user can act on; the message says how."""

    transient = False  # the API server was busy or unreachable: a later try may succeed


class CRDsNotInstalled(KubeRayError):
    pass


class AlreadyExists(KubeRayError):
    pass


class NotFound(KubeRayError):
    pass


class Forbidden(KubeRayError):
    pass


class Unreachable(KubeRayError):
    pass


class Failed(KubeRayError):
    """The object reached a state it will not recover from (a failed RayJob, for example)."""


class WaitTimeout(KubeRayError):
    """The object was not ready in time."""


# ---------------------------------------------------------------- readiness from status

@dataclass(frozen=True)
class Progress:
    ready: bool
    failed: str | None   # why it will never become ready, if so
    summary: str         # one line for humans: the status fields that matter


def _conditions(status: dict) -> dict[str, dict]:
    return {c.get("type"): c for c in status.get("conditions") or []}


def _describe(conditions: dict[str, dict], types: tuple[str, ...]) -> list[str]:
    parts = []
    for kind in types:
        if kind in conditions:
            c = conditions[kind]
            detail = ": ".join(x for x in (c.get("reason"), c.get("message")) if x)
            parts.append(f"{kind}={c.get('status')}" + (f" ({detail})" if detail else ""))
    return parts


def _generation_note(obj: dict) -> str | None:
    """Why the status may be stale: the operator has not yet seen the latest spec (after a patch)."""
    generation = (obj.get("metadata") or {}).get("generation")
    observed = (obj.get("status") or {}).get("observedGeneration")
    if generation is not None and observed is not None and observed < generation:
        return f"observedGeneration {observed} < generation {generation}"
    return None


def raycluster_progress(obj: dict) -> Progress:
    """Ready when the head pod is ready and every pod has been ready once (for the current spec);
    failed when a pod cannot be created (ReplicaFailure), the cluster failed or was suspended."""
    status = obj.get("status") or {}
    conditions = _conditions(status)
    if "HeadPodReady" in conditions or "RayClusterProvisioned" in conditions:
        ready = all(conditions.get(t, {}).get("status") == "True" for t in ("HeadPodReady", "RayClusterProvisioned"))
    else:  # an operator that does not write conditions still writes state
        ready = status.get("state") == "ready"
    parts = [f"state={status.get('state', '-')}",
             f"workers ready {status.get('readyWorkerReplicas', 0)}/{status.get('desiredWorkerReplicas', '?')}"]
    parts += _describe(conditions, ("HeadPodReady", "RayClusterProvisioned", "ReplicaFailure",
                                    "RayClusterSuspending", "RayClusterSuspended"))
    stale = _generation_note(obj)
    if stale:
        parts.append(stale)
    failed = None
    replica_failure = conditions.get("ReplicaFailure", {})
    if replica_failure.get("status") == "True":
        failed = ("a pod could not be created: " + ": ".join(
            x for x in (replica_failure.get("reason"), replica_failure.get("message")) if x))
    elif status.get("state") == "failed":
        failed = f"state=failed ({status.get('reason', 'no reason given')})"
    elif status.get("state") == "suspended" or conditions.get("RayClusterSuspended", {}).get("status") == "True":
        failed = "the RayCluster is suspended (spec.suspend); set it to false to resume"
    return Progress(ready and not stale and not failed, failed, ", ".join(parts))


# KubeRay v1.7.0, ray-operator/apis/ray/v1/rayjob_types.go: JobDeploymentStatus values and what a
# wait does on each. Complete/Failed are terminal (IsJobDeploymentTerminal); ValidationFailed is set
# once by the controller, which never reconciles the RayJob again; Suspending/Suspended wait for a
# person to clear spec.suspend. Anything else (New "", Initializing, Running, Waiting, Retrying, or
# a value a later operator adds) is still under way.
JOB_DEPLOYMENT_TERMINAL = {"Complete", "Failed", "ValidationFailed"}
JOB_DEPLOYMENT_STOPPED = {"Suspending": "is being suspended (spec.suspend)", "Suspended": "is suspended (spec.suspend)"}
# JobStatus (the Ray job itself): STOPPED, SUCCEEDED and FAILED are terminal (IsJobTerminal).
JOB_TERMINAL = {"STOPPED", "SUCCEEDED", "FAILED"}


def rayjob_progress(obj: dict) -> Progress:
    """Ready when the Ray job SUCCEEDED and the deployment is Complete; failed on any other end."""
    status = obj.get("status") or {}
    deployment = status.get("jobDeploymentStatus") or "New"
    job = status.get("jobStatus") or "-"
    detail = ": ".join(x for x in (status.get("reason"), status.get("message")) if x)
    summary = f"jobDeploymentStatus={deployment}, jobStatus={job}" + (f" ({detail})" if detail else "")
    ready = deployment == "Complete" and job == "SUCCEEDED"
    failed = None
    if deployment == "ValidationFailed":
        failed = f"the operator refused the RayJob and will not retry: {detail or summary}; fix the spec, " \
                 "delete the RayJob and create it again"
    elif job in ("FAILED", "STOPPED"):
        failed = summary
    elif deployment in JOB_DEPLOYMENT_TERMINAL and not ready:
        failed = summary
    elif deployment in JOB_DEPLOYMENT_STOPPED:
        failed = f"the RayJob {JOB_DEPLOYMENT_STOPPED[deployment]}: {summary}"
    return Progress(ready, failed, summary)


# KubeRay v1.7.0, rayservice_types.go: RayServiceConditionReason values of the Ready condition on
# which no wait can end well (ValidationFailed: the controller refuses the spec until it changes;
# InitializingTimeout: the operator gave up on the cluster).
SERVICE_TERMINAL_REASONS = {"ValidationFailed": "the operator refused the RayService spec",
                            "InitializingTimeout": "the RayService did not initialize"}
# Ray Serve application statuses (ApplicationStatusEnum there): DEPLOY_FAILED ends the wait;
# UNHEALTHY may recover (Serve restarts replicas), so it is shown and waited on.
APP_FAILED = "DEPLOY_FAILED"


def rayservice_progress(obj: dict) -> Progress:
    """Ready when Ready=True for the current spec (observedGeneration == generation) and no upgrade
    is in progress; failed on a terminal Ready reason, a failed application, or a suspension."""
    status = obj.get("status") or {}
    conditions = _conditions(status)
    ready_condition = conditions.get("Ready", {})
    parts = [f"serviceStatus={status.get('serviceStatus', '-')}", f"endpoints={status.get('numServeEndpoints', 0)}"]
    parts += _describe(conditions, ("Ready", "UpgradeInProgress", "RollbackInProgress", "Suspending", "Suspended"))
    stale = _generation_note(obj)
    if stale:
        parts.append(stale)
    failed = None
    for side in ("activeServiceStatus", "pendingServiceStatus"):
        for app, app_status in ((status.get(side) or {}).get("applicationStatuses") or {}).items():
            parts.append(f"app {app}={app_status.get('status')}")
            if app_status.get("status") == APP_FAILED:
                failed = f"Serve application {app!r} failed to deploy: {app_status.get('message', '')}"
    reason = ready_condition.get("reason")
    if ready_condition.get("status") == "False" and reason in SERVICE_TERMINAL_REASONS:
        failed = f"{SERVICE_TERMINAL_REASONS[reason]}: {ready_condition.get('message', '')}"
    for kind in ("Suspending", "Suspended"):
        if conditions.get(kind, {}).get("status") == "True":
            failed = f"the RayService is {kind.lower()} (spec.suspend); set it to false to resume"
    upgrading = any(conditions.get(kind, {}).get("status") == "True" for kind in ("UpgradeInProgress", "RollbackInProgress"))
    ready = ready_condition.get("status") == "True" and not stale and not upgrading and not failed
    return Progress(ready, failed, ", ".join(parts))


# ---------------------------------------------------------------- errors

def _status_message(error: ApiException) -> tuple[str, dict]:
    try:
        body = json.loads(error.body or "")
    except (TypeError, ValueError):
        body = {}
    if not isinstance(body, dict):
        body = {}
    text = body.get("message") or (error.body or "").strip() or error.reason or ""
    return text, body


def translate(error: ApiException, what: str, plural: str | None = None) -> KubeRayError:
    """An ApiException as the error that tells the user what happened and what to do.
    `plural` is set for Ray objects: a 404 that names no object means the CRD is missing."""
    message, body = _status_message(error)
    if error.status == 404:
        if plural and not (body.get("details") or {}).get("name"):
            return CRDsNotInstalled(f"the cluster does not know {plural}.{GROUP}/{VERSION}: the KubeRay "
                                    f"CRDs are not installed. {INSTALL_HINT}")
        return NotFound(f"{what} not found ({message})")
    if error.status == 409:
        return AlreadyExists(f"{what} already exists; `python -m ray_cluster kuberay down` deletes it, "
                             "or pick another name")
    if error.status == 403:
        return Forbidden(f"forbidden to act on {what}: {message}. Ask a cluster admin for RBAC on "
                         f"{plural + '.' + GROUP if plural else 'this kind'} in that namespace "
                         "(KubeRay's chart ships ray-*-editor ClusterRoles)")
    if error.status == 401:
        return Forbidden(f"the API server rejected the credentials ({message}); refresh them, e.g. "
                         "`gcloud container clusters get-credentials CLUSTER --location LOCATION`")
    if error.status == 422:
        return KubeRayError(f"{what} was rejected as invalid: {message}")
    return KubeRayError(f"{what}: HTTP {error.status} {error.reason}: {message}")


def _unreachable(api_client: client.ApiClient, error: Exception) -> Unreachable:
    host = api_client.configuration.host
    if isinstance(error, urllib3.exceptions.MaxRetryError) and error.reason is not None:
        error = error.reason  # what the last attempt ran into
    # (NewConnectionError subclasses ConnectTimeoutError in urllib3 2, but nobody listened there.)
    if isinstance(error, urllib3.exceptions.TimeoutError) and not isinstance(error, urllib3.exceptions.NewConnectionError):
        return Unreachable(f"the Kubernetes API at {host} did not answer within {REQUEST_TIMEOUT[1]:g} s "
                           f"({type(error).__name__}); check the cluster's health and your network")
    return Unreachable(f"cannot reach the Kubernetes API at {host} ({type(error).__name__}); check "
                       "`kubectl config current-context` and that the cluster is running")


REQUEST_TIMEOUT = (5.0, 30.0)   # seconds: connect, read; no request waits forever
FIELD_MANAGER = "mnist-ray-cluster"  # who owns the fields the CLI applies (`kubectl get -o yaml --show-managed-fields`)
# Server-side apply: the API server merges the body into the live object and records FIELD_MANAGER
# as the owner of its fields; force takes over fields last set by another manager (a `kubectl edit`).
APPLY = dict(field_manager=FIELD_MANAGER, force=True, field_validation="Strict",
             _content_type="application/apply-patch+yaml")
TRANSIENT_STATUS = {429, 500, 502, 503, 504}
RETRIES = 4                      # transient failures a read or delete retries before giving up
BACKOFF = 0.5                    # seconds, doubled on each retry


def _transient(error: Exception) -> bool:
    """Worth another try: the API server busy or restarting, or the connection dropped. A 4xx
    (but 429) is an answer about the request itself and is final."""
    if isinstance(error, ApiException):
        return error.status in TRANSIENT_STATUS
    return isinstance(error, urllib3.exceptions.HTTPError)


def _call(api_client: client.ApiClient, what: str, plural: str | None, request: Callable, retry: bool = False):
    """One API request with a timeout; `retry` (for idempotent ones) retries transient failures
    with exponential backoff."""
    attempts = 1 + (RETRIES if retry else 0)
    for attempt in range(attempts):
        try:
            return request()
        except (ApiException, urllib3.exceptions.HTTPError) as error:
            if attempt + 1 < attempts and _transient(error):
                time.sleep(BACKOFF * 2 ** attempt)
                continue
            final = translate(error, what, plural) if isinstance(error, ApiException) else _unreachable(api_client, error)
            final.transient = _transient(error)
            raise final from None


# ---------------------------------------------------------------- Ray custom objects

class Resource:
    """One kind of KubeRay object in one namespace."""

    def __init__(self, api: client.CustomObjectsApi, namespace: str, kind: str, plural: str,
                 progress: Callable[[dict], Progress]):
        self.api, self.namespace, self.kind, self.plural, self.progress = api, namespace, kind, plural, progress

    def _what(self, name: str | None = None) -> str:
        return f"{self.kind} {self.namespace}/{name}" if name else f"{self.plural} in namespace {self.namespace}"

    def _call(self, name: str | None, request: Callable, retry: bool = False):
        return _call(self.api.api_client, self._what(name), self.plural, request, retry)

    def create(self, body: dict) -> dict:
        if body.get("kind") != self.kind:
            raise KubeRayError(f"expected a {self.kind}, got {body.get('kind')}")
        return self._call(body["metadata"]["name"], lambda: self.api.create_namespaced_custom_object(
            GROUP, VERSION, self.namespace, self.plural, body, field_validation="Strict",
            _headers={"Content-Type": "application/json"},  # this method sets none by itself
            _request_timeout=REQUEST_TIMEOUT))

    def apply(self, body: dict) -> dict:
        """Server-side apply: create it, or take this body's fields as ours (FIELD_MANAGER)."""
        return self._call(body["metadata"]["name"], lambda: self.api.patch_namespaced_custom_object(
            GROUP, VERSION, self.namespace, self.plural, body["metadata"]["name"], body, **APPLY,
            _request_timeout=REQUEST_TIMEOUT))

    def get(self, name: str) -> dict:
        return self._call(name, lambda: self.api.get_namespaced_custom_object(
            GROUP, VERSION, self.namespace, self.plural, name, _request_timeout=REQUEST_TIMEOUT), retry=True)

    def list(self, label_selector: str | None = None) -> list[dict]:
        found = self._call(None, lambda: self.api.list_namespaced_custom_object(
            GROUP, VERSION, self.namespace, self.plural, label_selector=label_selector,
            _request_timeout=REQUEST_TIMEOUT), retry=True)
        return found.get("items", [])

    def delete(self, name: str) -> dict:
        return self._call(name, lambda: self.api.delete_namespaced_custom_object(
            GROUP, VERSION, self.namespace, self.plural, name, propagation_policy="Foreground",
            _request_timeout=REQUEST_TIMEOUT), retry=True)

    def wait_ready(self, name: str, timeout: float = 600.0, poll: float = 2.0,
                   on_change: Callable[[str], None] | None = None) -> dict:
        """Poll until the status says ready; raise Failed or WaitTimeout (with the last status)."""
        deadline = time.monotonic() + timeout
        last = None
        while True:
            try:
                obj = self.get(name)
            except KubeRayError as error:
                # An API server outage (a control-plane upgrade takes minutes) does not end a long
                # wait: keep trying until the deadline. Anything else is final.
                if not error.transient or time.monotonic() >= deadline:
                    raise
                if on_change:
                    on_change(f"(retrying) {error}")
                time.sleep(max(0.0, min(poll, deadline - time.monotonic())))
                continue
            progress = self.progress(obj)
            if on_change and progress.summary != last:
                on_change(progress.summary)
            last = progress.summary
            if progress.ready:
                return obj
            if progress.failed:
                raise Failed(f"{self._what(name)} failed: {progress.failed}")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise WaitTimeout(f"{self._what(name)} was not ready after {timeout:g} s; last status: "
                                  f"{progress.summary}")
            time.sleep(min(poll, remaining))


class KubeRay:
    """RayCluster, RayJob and RayService objects in one namespace."""

    def __init__(self, namespace: str, api_client: client.ApiClient | None = None):
        self.namespace = namespace
        self.api_client = api_client or client.ApiClient()
        api = client.CustomObjectsApi(self.api_client)
        self.rayclusters = Resource(api, namespace, "RayCluster", "rayclusters", raycluster_progress)
        self.rayjobs = Resource(api, namespace, "RayJob", "rayjobs", rayjob_progress)
        self.rayservices = Resource(api, namespace, "RayService", "rayservices", rayservice_progress)

    @classmethod
    def connect(cls, namespace: str, kubeconfig: str | None = None, context: str | None = None) -> "KubeRay":
        """From a kubeconfig (default: $KUBECONFIG or ~/.kube/config), else in-cluster credentials."""
        try:
            return cls(namespace, config.new_client_from_config(config_file=kubeconfig, context=context))
        except config.ConfigException as error:
            try:
                config.load_incluster_config()
            except config.ConfigException:
                raise KubeRayError(f"no Kubernetes credentials ({error}); run `gcloud container clusters "
                                   "get-credentials CLUSTER --location LOCATION` or pass --kubeconfig") from None
            return cls(namespace, client.ApiClient())

    def resource(self, kind: str) -> Resource:
        found = {r.kind: r for r in (self.rayclusters, self.rayjobs, self.rayservices)}.get(kind)
        if not found:
            raise KubeRayError(f"not a KubeRay kind: {kind}")
        return found

    # ------------------------------------------------------------ plain objects for the CLI

    def apply(self, obj: dict) -> None:
        """Server-side apply of a Ray object or one of the plain kinds the manifests hold."""
        if obj["kind"] in _PLAIN:
            self._plain(obj, "patch", obj, **APPLY)
        else:
            self.resource(obj["kind"]).apply(obj)

    def delete_object(self, obj: dict) -> bool:
        """Delete it; False if it was not there."""
        try:
            if obj["kind"] in _PLAIN:
                self._plain(obj, "delete")
            else:
                self.resource(obj["kind"]).delete(obj["metadata"]["name"])
            return True
        except NotFound:
            return False

    def _plain(self, obj: dict, verb: str, *body, **kwargs):
        api_class, suffix, namespaced = _PLAIN[obj["kind"]]
        api = getattr(client, api_class)(self.api_client)
        meta = obj["metadata"]
        method = getattr(api, f"{verb}_namespaced_{suffix}" if namespaced else f"{verb}_{suffix}")
        args = (meta["name"],) + ((meta["namespace"],) if namespaced else ()) + body  # patch_x(name, ns, body)
        what = f"{obj['kind']} " + (f"{meta['namespace']}/" if namespaced else "") + meta["name"]
        kwargs.setdefault("_request_timeout", REQUEST_TIMEOUT)
        return _call(self.api_client, what, None, lambda: method(*args, **kwargs), retry=True)  # both idempotent

    def _core(self, what: str, method: str, *args, **kwargs):
        """A CoreV1Api read (retried)."""
        call = getattr(client.CoreV1Api(self.api_client), method)
        return _call(self.api_client, what, None, lambda: call(*args, **kwargs, _request_timeout=REQUEST_TIMEOUT), retry=True)

    def read_service(self, namespace: str, name: str) -> client.V1Service:
        return self._core(f"Service {namespace}/{name}", "read_namespaced_service", name, namespace)

    def read_secret_keys(self, namespace: str, name: str) -> list[str]:
        """The data keys of a Secret (never its values): enough to say whether a token is there."""
        return sorted(self._core(f"Secret {namespace}/{name}", "read_namespaced_secret", name, namespace).data or {})

    def ray_pods(self, namespace: str) -> list[str]:
        """Names of the pods of any Ray cluster (KubeRay labels them ray.io/cluster)."""
        pods = self._core(f"pods in namespace {namespace}", "list_namespaced_pod", namespace, label_selector="ray.io/cluster")
        return [pod.metadata.name for pod in pods.items]


# kind -> (API class, method suffix, namespaced): patch_namespaced_service, delete_persistent_volume, ...
_PLAIN = {
    "Namespace": ("CoreV1Api", "namespace", False),
    "ConfigMap": ("CoreV1Api", "config_map", True),
    "PersistentVolume": ("CoreV1Api", "persistent_volume", False),
    "PersistentVolumeClaim": ("CoreV1Api", "persistent_volume_claim", True),
    "Service": ("CoreV1Api", "service", True),
    "Deployment": ("AppsV1Api", "deployment", True),
    "NetworkPolicy": ("NetworkingV1Api", "network_policy", True),
}
