"""A KubeRay client on the official `kubernetes` package (KubeRay's own is not on PyPI): create,
server-side apply, get, list and delete of the kinds the CLI uses (KINDS), one request path for all,
and wait_ready on RayClusters, RayJobs and RayServices. API failures become errors that say what to do."""
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


def _detail(fields: dict) -> str:
    """"reason: message", or whichever of the two is there."""
    return ": ".join(x for x in (fields.get("reason"), fields.get("message")) if x)


def _describe(obj: dict, conditions: dict[str, dict], types: tuple[str, ...]) -> tuple[list[str], bool]:
    """The conditions of these types in words, and whether the status is stale: the operator has not
    yet seen the latest spec (after a patch), which the words then say too."""
    parts = [f"{t}={conditions[t].get('status')}" + (f" ({_detail(conditions[t])})" if _detail(conditions[t]) else "")
             for t in types if t in conditions]
    generation, observed = (obj.get("metadata") or {}).get("generation"), (obj.get("status") or {}).get("observedGeneration")
    stale = generation is not None and observed is not None and observed < generation
    return parts + ([f"observedGeneration {observed} < generation {generation}"] if stale else []), stale


def raycluster_progress(obj: dict) -> Progress:
    """Ready when the head pod is ready and every pod has been ready once (for the current spec);
    failed when a pod cannot be created (ReplicaFailure), the cluster failed or was suspended."""
    status = obj.get("status") or {}
    conditions = _conditions(status)
    if "HeadPodReady" in conditions or "RayClusterProvisioned" in conditions:
        ready = all(conditions.get(t, {}).get("status") == "True" for t in ("HeadPodReady", "RayClusterProvisioned"))
    else:  # an operator that does not write conditions still writes state
        ready = status.get("state") == "ready"
    described, stale = _describe(obj, conditions, ("HeadPodReady", "RayClusterProvisioned", "ReplicaFailure",
                                                   "RayClusterSuspending", "RayClusterSuspended"))
    parts = [f"state={status.get('state', '-')}",
             f"workers ready {status.get('readyWorkerReplicas', 0)}/{status.get('desiredWorkerReplicas', '?')}"] + described
    failed = None
    if conditions.get("ReplicaFailure", {}).get("status") == "True":
        failed = "a pod could not be created: " + _detail(conditions["ReplicaFailure"])
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


def rayjob_progress(obj: dict) -> Progress:
    """Ready when the Ray job SUCCEEDED and the deployment is Complete; failed on any other end."""
    status = obj.get("status") or {}
    deployment = status.get("jobDeploymentStatus") or "New"
    job = status.get("jobStatus") or "-"
    detail = _detail(status)
    summary = f"jobDeploymentStatus={deployment}, jobStatus={job}" + (f" ({detail})" if detail else "")
    ready = deployment == "Complete" and job == "SUCCEEDED"
    failed = None
    if deployment == "ValidationFailed":
        failed = f"the operator refused the RayJob and will not retry: {detail or summary}; fix the spec, " \
                 "delete the RayJob and create it again"
    elif job in ("FAILED", "STOPPED") or (deployment in JOB_DEPLOYMENT_TERMINAL and not ready):
        failed = summary  # FAILED, STOPPED: the terminal JobStatus values (IsJobTerminal) but SUCCEEDED
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
    described, stale = _describe(obj, conditions, ("Ready", "UpgradeInProgress", "RollbackInProgress", "Suspending", "Suspended"))
    parts = [f"serviceStatus={status.get('serviceStatus', '-')}", f"endpoints={status.get('numServeEndpoints', 0)}"] + described
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
        body = None
    body = body if isinstance(body, dict) else {}  # a Status object, else the text is the message
    return body.get("message") or (error.body or "").strip() or error.reason or "", body


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
TRANSIENT_STATUS = {429, 500, 502, 503, 504}
RETRIES = 4                      # transient failures a request retries before giving up (creates: none)
BACKOFF = 0.5                    # seconds, doubled on each retry


def _transient(error: Exception) -> bool:
    """Worth another try: the API server busy or restarting, or the connection dropped. A 4xx
    (but 429) is an answer about the request itself and is final."""
    if isinstance(error, ApiException):
        return error.status in TRANSIENT_STATUS
    return isinstance(error, urllib3.exceptions.HTTPError)


def poll_until(check: Callable, timeout: float, poll: float, timed_out: Callable[[], Exception]):
    """check() every `poll` seconds until it returns something true, and return that; at the
    deadline raise timed_out()."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() >= deadline:
            raise timed_out()
        time.sleep(max(0.0, min(poll, deadline - time.monotonic())))


# ---------------------------------------------------------------- the API

PROGRESS = {"RayCluster": raycluster_progress, "RayJob": rayjob_progress, "RayService": rayservice_progress}
# kind -> (API path, plural, namespaced): every kind the CLI applies, reads or deletes
KINDS = {
    "Namespace": ("api/v1", "namespaces", False),
    "PersistentVolume": ("api/v1", "persistentvolumes", False),
    **{kind: ("api/v1", kind.lower() + "s", True) for kind in ("ConfigMap", "PersistentVolumeClaim", "Service", "Secret", "Pod")},
    "Deployment": ("apis/apps/v1", "deployments", True),
    "NetworkPolicy": ("apis/networking.k8s.io/v1", "networkpolicies", True),
    **{kind: (f"apis/{GROUP}/{VERSION}", kind.lower() + "s", True) for kind in PROGRESS},
}


class KubeRay:
    """Objects of KINDS, in one namespace unless told otherwise."""

    def __init__(self, namespace: str, api_client: client.ApiClient | None = None):
        self.namespace = namespace
        self.api_client = api_client or client.ApiClient()

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

    def request(self, method: str, kind: str, name: str | None = None, namespace: str | None = None,
                body: dict | None = None, retry: bool = True, content_type: str = "application/json", **query):
        """One API request on an object (a collection without `name`, or for POST), with a timeout;
        `retry` (for idempotent ones) retries transient failures with exponential backoff."""
        prefix, plural, namespaced = KINDS[kind]
        namespace = namespace or self.namespace
        what = (f"{kind} " + (f"{namespace}/" if namespaced else "") + name) if name else f"{plural} in namespace {namespace}"
        path = f"/{prefix}" + (f"/namespaces/{namespace}" if namespaced else "") + f"/{plural}"
        path += f"/{name}" if name and method != "POST" else ""
        attempts = 1 + (RETRIES if retry else 0)
        for attempt in range(attempts):
            try:
                response = self.api_client.call_api(*self.api_client.param_serialize(
                    method, path, query_params=list(query.items()), body=body, auth_settings=["BearerToken"],
                    header_params={"Accept": "application/json", "Content-Type": content_type}), _request_timeout=REQUEST_TIMEOUT)
                response.read()
                if not 200 <= response.status < 300:
                    raise ApiException(http_resp=response)
                return json.loads(response.data)
            except (ApiException, urllib3.exceptions.HTTPError) as error:
                if attempt + 1 < attempts and _transient(error):
                    time.sleep(BACKOFF * 2 ** attempt)
                    continue
                final = (translate(error, what, plural if kind in PROGRESS else None) if isinstance(error, ApiException)
                         else _unreachable(self.api_client, error))
                final.transient = _transient(error)
                raise final from None

    def create(self, body: dict) -> dict:
        """Not retried: a create that failed with a 5xx may still have happened."""
        return self.request("POST", body["kind"], body["metadata"]["name"], body["metadata"].get("namespace"),
                            body, retry=False, fieldValidation="Strict")  # the API server refuses unknown fields

    def apply(self, obj: dict) -> dict:
        """Server-side apply: the API server creates the object or merges the body into it, and records
        FIELD_MANAGER as the owner of its fields; force takes over fields another manager set (a `kubectl edit`)."""
        meta = obj["metadata"]
        return self.request("PATCH", obj["kind"], meta["name"], meta.get("namespace"), obj,
                            content_type="application/apply-patch+yaml", fieldManager=FIELD_MANAGER, force=True,
                            fieldValidation="Strict")

    def get(self, kind: str, name: str, namespace: str | None = None) -> dict:
        return self.request("GET", kind, name, namespace)

    def list(self, kind: str, namespace: str | None = None, label_selector: str | None = None) -> list[dict]:
        selector = {"labelSelector": label_selector} if label_selector else {}
        return self.request("GET", kind, namespace=namespace, **selector)["items"]

    def delete(self, obj: dict) -> bool:
        """Delete it (a Ray object once its pods are gone); False if it was not there."""
        kind, meta = obj["kind"], obj["metadata"]
        try:
            self.request("DELETE", kind, meta["name"], meta.get("namespace"),
                         **({"propagationPolicy": "Foreground"} if kind in PROGRESS else {}))
            return True
        except NotFound:
            return False

    def wait_ready(self, kind: str, name: str, timeout: float = 600.0, poll: float = 2.0,
                   on_change: Callable[[str], None] | None = None) -> dict:
        """Poll a Ray object until its status says ready; raise Failed, or WaitTimeout with the last status."""
        seen = {"summary": None, "error": None}

        def check():
            try:
                obj = self.get(kind, name)
            except KubeRayError as error:
                # An API server outage (a control-plane upgrade takes minutes) does not end a long
                # wait: keep trying until the deadline. Anything else is final.
                if not error.transient:
                    raise
                seen["error"] = error
                if on_change:
                    on_change(f"(retrying) {error}")
                return None
            progress, seen["error"] = PROGRESS[kind](obj), None
            if on_change and progress.summary != seen["summary"]:
                on_change(progress.summary)
            seen["summary"] = progress.summary
            if progress.failed:
                raise Failed(f"{kind} {self.namespace}/{name} failed: {progress.failed}")
            return obj if progress.ready else None

        return poll_until(check, timeout, poll, lambda: seen["error"] or WaitTimeout(
            f"{kind} {self.namespace}/{name} was not ready after {timeout:g} s; last status: {seen['summary']}"))
