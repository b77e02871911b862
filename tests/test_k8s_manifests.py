"""The KubeRay manifests, checked without a cluster: what the CLI renders for several option sets
(and kustomize's output of k8s/), strictly validated against pinned Kubernetes schemas and the
KubeRay v1.7.0 CRDs (../shared/kuberay/crds), then checked for consistency and lockdown."""
import copy
import functools
import ipaddress
import math
import os
import re
import shutil
import shlex
import subprocess
import tempfile
import tomllib
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

from ray_cluster import manifests, serve_fit
from ray_cluster.manifests import MOUNT_PATH, InvalidOptions, Options
from tests.browser import under_ci  # CI=1 (.ci/run sets it): a missing tool fails instead of skipping

ROOT = Path(__file__).resolve().parents[1]
CRD_DIR = Path(os.environ.get("KUBERAY_CRD_DIR") or Path(__file__).resolve().parents[2] / "shared" / "kuberay" / "crds")
# The oldest Kubernetes minor we target on GKE, and the newest kubernetes-validate knows.
K8S_VERSIONS = ("1.33", "1.37")
RAY_KINDS = ("RayCluster", "RayJob", "RayService")
PUSHED = "us-central1-docker.pkg.dev/proj/mnist/mnist-ray"
INTERNAL_LB = "networking.gke.io/load-balancer-type"

NFS_IP = "10.8.0.12"
PARAMETER_SETS = {
    "defaults": dict(nfs_server=NFS_IP),
    "big": dict(worker_pods=8, worker_cpus=4, worker_memory="16Gi", head_cpus=4, head_memory="8Gi",
                workers=32, epochs=5, batch_size=64, rounds=5, run_id="run-42", serve_min_pods=2, serve_max_pods=6,
                storage_size="100Gi", image=f"{PUSHED}:2.60.0-py311-abc123", nfs_server=NFS_IP,
                lb_source_ranges=("203.0.113.0/24", "2001:db8::/32"), internal_lb=True, node_range="10.0.0.0/16"),
    "filestore": dict(shared_storage="filestore", name="digits", namespace="ml-team", worker_pods=1,
                      worker_cpus=1, workers=1, operator_namespace="default", storage_size="2Ti"),
    "longest-names": dict(name="a" * 41, job_name="j" * 47, nfs_server=NFS_IP),  # <name>-serve is 47 characters
}

SAMPLE_SERVE_CONFIG = """\
# a Serve config that runs both locally and in the cluster: no host, no working_dir, no storage root
proxy_location: EveryNode
http_options:
  port: 8000
  request_timeout_s: 30
applications:
  - name: mnist
    route_prefix: /
    import_path: serving.app:app
    runtime_env:
      env_vars:
        GRADIO_ANALYTICS_ENABLED: "False"
    args:
      num_replicas: 2
"""


def missing(reason: str):
    """Fail in CI (it must have what the test needs), skip with the reason elsewhere."""
    if under_ci():
        pytest.fail(f"{reason} (CI must provide it)")
    pytest.skip(reason)


@pytest.fixture(scope="module", autouse=True)
def cached_kubernetes_schemas():
    """kubernetes-validate reads its JSON schemas from disk on every call; they never change."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(kubernetes_validate.utils, "schema_contents",
                      functools.cache(kubernetes_validate.utils.schema_contents))
        yield


@pytest.fixture(scope="session")
def serve_config(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("serving") / "serve_config.yaml"
    path.write_text(SAMPLE_SERVE_CONFIG)
    return path


@pytest.fixture(scope="session")
def rendered(serve_config) -> dict[str, list[dict]]:
    return {name: manifests.render(Options(serve_config=serve_config, **params))
            for name, params in PARAMETER_SETS.items()}


@pytest.fixture(params=sorted(PARAMETER_SETS))
def objects(request, rendered) -> list[dict]:
    return copy.deepcopy(rendered[request.param])


def strict(schema):
    """A CRD schema as the API server's strict field validation reads it: unknown fields fail."""
    if isinstance(schema, list):
        return [strict(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    out = {key: strict(value) for key, value in schema.items()}
    if ("properties" in schema and "additionalProperties" not in schema
            and not schema.get("x-kubernetes-preserve-unknown-fields")):
        out["additionalProperties"] = False
    return out


@pytest.fixture(scope="session")
def crd_validators() -> dict[str, jsonschema.Draft7Validator]:
    if not CRD_DIR.is_dir():
        missing(f"KubeRay v1.7.0 CRDs not found at {CRD_DIR}")
    validators = {}
    for path in sorted(CRD_DIR.glob("ray.io_*.yaml")):
        crd = yaml.load(path.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))  # 3 MB of YAML
        (v1,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
        validators[crd["spec"]["names"]["kind"]] = jsonschema.Draft7Validator(strict(v1["schema"]["openAPIV3Schema"]))
    assert set(RAY_KINDS) <= set(validators), f"CRDs in {CRD_DIR}: {sorted(validators)}"
    return validators


# ---------------------------------------------------------------- walking the objects

def ray_cluster_specs(obj: dict) -> list[dict]:  # the RayJob runs on the RayCluster (clusterSelector): none
    return {"RayCluster": [obj.get("spec")], "RayService": [obj.get("spec", {}).get("rayClusterConfig")]}.get(obj["kind"], [])


def ray_pod_templates(objects) -> list[dict]:
    return [t for obj in objects for spec in ray_cluster_specs(obj)
            for t in [spec["headGroupSpec"]["template"]] + [g["template"] for g in spec["workerGroupSpecs"]]]


def pod_templates(obj: dict) -> list[dict]:
    other = {"RayJob": ["submitterPodTemplate"], "Deployment": ["template"]}.get(obj["kind"], [])
    return ray_pod_templates([obj]) + [obj["spec"][key] for key in other]


def containers(template: dict) -> list[dict]:
    return template["spec"].get("initContainers", []) + template["spec"]["containers"]


def all_containers(objects) -> list[tuple[dict, dict]]:
    """(object, container) for every container of every pod template of these objects."""
    return [(obj, c) for obj in objects for template in pod_templates(obj) for c in containers(template)]


def env_of(container: dict) -> dict:
    return {e["name"]: e.get("value") for e in container.get("env", [])}


def of_kind(objects, kind) -> list[dict]:
    return [o for o in objects if o["kind"] == kind]


def as_pod_template(template: dict) -> dict:
    """A pod template as an object kubernetes-validate knows."""
    return {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"}, "template": template}


def one(objects, kind, name=None) -> dict:
    found = [o for o in objects if o["kind"] == kind and name in (None, o["metadata"]["name"])]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def k8s_validate(obj: dict, version: str) -> None:
    try:
        kubernetes_validate.validate(obj, version, strict=True)
    except kubernetes_validate.ValidationError as error:
        raise AssertionError(f"{obj['kind']} {obj['metadata'].get('name')} is invalid for Kubernetes "
                             f"{version} at {list(error.path)}: {error.message}") from None


def embedded_k8s_objects(obj: dict) -> list[dict]:
    """The Kubernetes types inside a Ray object, wrapped so kubernetes-validate knows them."""
    wrapped = [{"apiVersion": "v1", "kind": "ConfigMap", "metadata": obj["metadata"]}]
    wrapped += [as_pod_template(t) for t in pod_templates(obj)]
    if obj["kind"] == "RayService":
        service = obj["spec"]["serveService"]
        wrapped.append({"apiVersion": "v1", "kind": "Service", **service,
                        "metadata": {"name": "s", **service.get("metadata", {})}})
    return wrapped


# ---------------------------------------------------------------- schemas

def assert_valid(objects, crd_validators, version=K8S_VERSIONS[-1]) -> None:
    """Ray objects against the KubeRay CRDs; every object (and the Kubernetes types inside Ray
    objects) against Kubernetes' schemas."""
    for obj in objects:
        if obj["kind"] in RAY_KINDS:
            errors = sorted(crd_validators[obj["kind"]].iter_errors(obj), key=lambda e: list(e.path))
            assert not errors, "\n".join(f"{obj['kind']} at {list(e.path)}: {e.message}" for e in errors)
        for part in embedded_k8s_objects(obj) if obj["kind"] in RAY_KINDS else [obj]:
            k8s_validate(part, version)


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_every_object_is_valid(objects, version, crd_validators):
    assert sorted(obj["kind"] for obj in objects if obj["kind"] in RAY_KINDS) == sorted(RAY_KINDS)
    assert_valid(objects, crd_validators, version)


def test_the_validators_catch_typos(rendered, crd_validators):
    """A misspelt field fails both checks, so a passing run means something."""
    cluster = copy.deepcopy(one(rendered["defaults"], "RayCluster"))
    cluster["spec"]["workerGroupSpecs"][0]["replica"] = 3
    assert list(crd_validators["RayCluster"].iter_errors(cluster))
    template = cluster["spec"]["headGroupSpec"]["template"]
    template["spec"]["containers"][0]["containerPorts"] = []
    with pytest.raises(AssertionError, match="containerPorts"):
        k8s_validate(as_pod_template(template), K8S_VERSIONS[0])
    policy = copy.deepcopy(one(rendered["defaults"], "NetworkPolicy", "mnist-training"))
    policy["spec"]["ingres"] = policy["spec"].pop("ingress")
    with pytest.raises(AssertionError, match="ingres"):
        k8s_validate(policy, K8S_VERSIONS[0])


# ---------------------------------------------------------------- consistency

def test_ray_versions_agree_with_the_pin(rendered):
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    (pin,) = [d.split("==")[1] for d in pyproject["project"]["dependencies"] if d.startswith("ray[")]
    assert manifests.pinned_ray_version() == pin
    assert pyproject["project"]["requires-python"] == "==3.11.*"
    dockerfile = (ROOT / "k8s" / "Dockerfile").read_text()
    assert f"\nFROM rayproject/ray:{pin}-py311\n" in dockerfile
    assert f"ray.__version__ == '{pin}'" in dockerfile
    assert f"\nWORKDIR {manifests.APP_DIR}\n" in dockerfile
    # The pods run HAProxy through the wrapper the image copies with ray_cluster/ (mode kept: executable).
    from ray_cluster import haproxy_wrapper
    wrapper = Path(haproxy_wrapper.__file__).relative_to(ROOT)
    assert manifests.CLUSTER_INGRESS_ENV["RAY_SERVE_HAPROXY_BINARY_PATH"] == f"{manifests.APP_DIR}/{wrapper}"
    assert f"\nCOPY --chown=1000:100 {wrapper.parent} ./{wrapper.parent}\n" in dockerfile
    assert os.access(ROOT / wrapper, os.X_OK) and (ROOT / wrapper).read_text().startswith("#!/usr/bin/env python3\n")
    # Every Ray container runs --image (test_each_option_reaches_its_fields), whose tag check() ties to the pin.
    for spec in [s for objects in rendered.values() for obj in objects for s in ray_cluster_specs(obj)]:
        assert spec["rayVersion"] == pin
    # The plain YAML files hold the defaults: they must name the pinned Ray too.
    for path in (ROOT / "k8s" / "base").glob("*.yaml"):
        text = path.read_text()
        assert "image: mnist-ray:" not in text or f"image: mnist-ray:{pin}-py311" in text, path
        assert "rayVersion:" not in text or f'rayVersion: "{pin}"' in text, path


def test_one_storage_root_everywhere(objects):
    cluster = one(objects, "RayCluster")
    namespace = cluster["metadata"]["namespace"]
    (claim_name,) = [v["persistentVolumeClaim"]["claimName"] for v in
                     cluster["spec"]["headGroupSpec"]["template"]["spec"]["volumes"] if "persistentVolumeClaim" in v]
    claim = one([o for o in objects if o["metadata"].get("namespace") == namespace], "PersistentVolumeClaim", claim_name)
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    ray_templates = ray_pod_templates(objects)
    assert len(ray_templates) == 4  # training head + workers, serving head + workers
    serving = ray_pod_templates([one(objects, "RayService")])
    for template in ray_templates:
        spec = template["spec"]
        volumes = {v["name"]: v for v in spec["volumes"]}
        for container in containers(template):
            (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == MOUNT_PATH]
            source = volumes[mount["name"]]["persistentVolumeClaim"]
            assert source["claimName"] == claim["metadata"]["name"]
            # training writes the models, serving only reads them
            assert mount.get("readOnly", False) == source.get("readOnly", False) == (template in serving)
        assert env_of(spec["containers"][0])[manifests.STORAGE_ENV] == MOUNT_PATH
    entrypoint = shlex.split(one(objects, "RayJob")["spec"]["entrypoint"])
    assert entrypoint[entrypoint.index("--storage") + 1] == MOUNT_PATH
    serve_config = yaml.safe_load(one(objects, "RayService")["spec"]["serveConfigV2"])
    for app in serve_config["applications"]:  # Serve replicas take the pods' MNIST_STORAGE (checked above)
        assert manifests.STORAGE_ENV not in ((app.get("runtime_env") or {}).get("env_vars") or {})
        assert not set(manifests.STORAGE_ARGS) & set(app.get("args") or {})
    for volume in of_kind(objects, "PersistentVolume"):  # the NFS flavour binds exactly this claim
        assert volume["spec"]["claimRef"] == {"namespace": claim["metadata"]["namespace"], "name": claim["metadata"]["name"]}
        assert claim["spec"]["volumeName"] == volume["metadata"]["name"]


def test_the_rayjob_fits_its_cluster(objects):
    job = one(objects, "RayJob")
    cluster = one(objects, "RayCluster", job["spec"]["clusterSelector"]["ray.io/cluster"])
    assert job["metadata"]["namespace"] == cluster["metadata"]["namespace"]
    entrypoint = shlex.split(job["spec"]["entrypoint"])
    assert entrypoint[:2] == ["python", f"{manifests.APP_DIR}/training/train.py"]
    workers = int(entrypoint[entrypoint.index("--workers") + 1])
    (group,) = cluster["spec"]["workerGroupSpecs"]
    cpus = int(group["template"]["spec"]["containers"][0]["resources"]["limits"]["cpu"])
    assert 1 <= workers <= group["replicas"] * cpus == manifests.worker_slots(cluster)
    # a Train run asks for all its workers at once: the training group does not autoscale
    assert group["replicas"] == group["minReplicas"] == group["maxReplicas"]
    assert not cluster["spec"].get("enableInTreeAutoscaling") and "autoscalerOptions" not in cluster["spec"]
    assert "runtimeEnvYAML" not in job["spec"]  # dependencies are in the image
    assert "rayClusterSpec" not in job["spec"]  # it runs on the RayCluster, whose specs the tests check


def test_only_the_serve_port_leaves_the_cluster(objects):  # and the heads list their ports
    services = of_kind(objects, "Service") + [o["spec"]["serveService"] for o in of_kind(objects, "RayService")]
    exposed = [s for s in services if s["spec"].get("type") in ("LoadBalancer", "NodePort")]
    assert len(exposed) == 1
    assert exposed[0]["spec"]["ports"] == [{"name": "serve", "port": 8000}]
    assert exposed[0]["spec"]["allocateLoadBalancerNodePorts"] is False  # no NodePort on every node
    for spec in [s for obj in objects for s in ray_cluster_specs(obj)]:
        assert spec["headGroupSpec"]["serviceType"] == "ClusterIP"
        ports = {p["name"]: p["containerPort"] for p in spec["headGroupSpec"]["template"]["spec"]["containers"][0]["ports"]}
        assert ports == {"gcs-server": 6379, "dashboard": 8265, "client": 10001, "serve": 8000}
        assert not spec["headGroupSpec"].get("enableIngress")
    assert not [o for o in objects if o["kind"] in ("Ingress", "Gateway", "HTTPRoute")]
    assert not [t for obj in objects for t in pod_templates(obj) if t["spec"].get("hostNetwork")]
    assert not [p for _, c in all_containers(objects) for p in c.get("ports", []) if "hostPort" in p]


def test_requests_equal_limits(objects):
    for obj, container in all_containers(objects):
        resources = container["resources"]
        assert resources["requests"] == resources["limits"], (obj["metadata"]["name"], container["name"])
        # ephemeral-storage too: a pod that fills the node's disk (Ray logs, spilled objects,
        # uploads) is evicted alone instead of taking the node's other pods with it.
        assert set(resources["limits"]) == {"cpu", "memory", "ephemeral-storage"}


def assert_restricted(template: dict, where: str) -> None:
    """The Pod Security "restricted" rules: non-root, no escalation, all capabilities dropped."""
    pod = template["spec"].get("securityContext", {})
    assert pod.get("runAsNonRoot") is True and pod.get("runAsUser") == 1000, where
    assert pod.get("seccompProfile") == {"type": "RuntimeDefault"}, where
    assert template["spec"].get("automountServiceAccountToken") is False, where
    for container in containers(template):
        context = container.get("securityContext", {})
        assert context.get("allowPrivilegeEscalation") is False, (where, container["name"])
        assert context.get("capabilities") == {"drop": ["ALL"]}, (where, container["name"])
        assert not context.get("privileged") and context.get("runAsUser", 1000) != 0, (where, container["name"])
    for volume in template["spec"].get("volumes", []):
        assert "hostPath" not in volume, where


def test_pods_are_locked_down(objects):
    namespaces = {o["metadata"]["name"]: o for o in of_kind(objects, "Namespace")}
    app = one(objects, "RayCluster")["metadata"]["namespace"]
    assert namespaces[app]["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    for obj in objects:
        for template in pod_templates(obj):
            if obj["kind"] == "Deployment":  # the NFS server: the one documented exception
                assert obj["metadata"]["namespace"] == f"{app}-nfs" != app
                labels = namespaces[obj["metadata"]["namespace"]]["metadata"]["labels"]
                assert labels["pod-security.kubernetes.io/enforce"] == "privileged"
                privileged = [c["name"] for c in containers(template) if c.get("securityContext", {}).get("privileged")]
                assert privileged == ["nfs-server"]
            else:
                assert_restricted(template, f"{obj['kind']} {obj['metadata']['name']}")


def selects(selector: dict, labels: dict) -> bool:
    return selector["matchLabels"].items() <= labels.items()


def test_network_policies(objects):
    """One policy per Ray cluster: each admits its own pods, the operator (and the training
    cluster the submitter) on 8265, and only the serving cluster opens 8000, from anywhere."""
    cluster, service = one(objects, "RayCluster"), one(objects, "RayService")
    policies = [o for o in objects if o["kind"] == "NetworkPolicy" and o["metadata"]["namespace"] == cluster["metadata"]["namespace"]]
    # Ingress only: the serving head's autoscaler sidecar calls the API server (443). A policy
    # selects pods of its own namespace only, so no other policy can restrict that egress.
    assert len(policies) == 2 and all(p["spec"]["policyTypes"] == ["Ingress"] for p in policies)
    for obj, other in ((cluster, service), (service, cluster)):
        labels, other_labels = (ray_pod_templates([o])[0]["metadata"]["labels"] for o in (obj, other))
        (policy,) = [p for p in policies if selects(p["spec"]["podSelector"], labels)]
        assert not selects(policy["spec"]["podSelector"], other_labels)
        for template in ray_pod_templates([obj]):  # every pod of the cluster is isolated by its policy
            assert selects(policy["spec"]["podSelector"], template["metadata"]["labels"])
        peers, operator, *rest = policy["spec"]["ingress"]
        (peer,) = peers["from"]
        # the other cluster's pods are not peers: no dashboard, job server or GCS across clusters
        assert "ports" not in peers and selects(peer["podSelector"], labels)
        assert not selects(peer["podSelector"], other_labels)
        assert operator["ports"] == [{"protocol": "TCP", "port": 8265}]
        assert operator["from"][0]["podSelector"]["matchLabels"] == {"app.kubernetes.io/name": "kuberay-operator"}
        assert not [source for source in operator["from"] if selects(source["podSelector"], other_labels)]
        if obj is cluster:
            submitter = one(objects, "RayJob")["spec"]["submitterPodTemplate"]["metadata"]["labels"]
            assert selects(operator["from"][1]["podSelector"], submitter)
            assert not labels.items() <= submitter.items()  # the submitter is not a Ray peer
            assert rest == []  # the training cluster opens nothing else
        else:
            assert len(operator["from"]) == 1
            assert rest == [{"ports": [{"protocol": "TCP", "port": 8000}]}]


def test_the_nfs_server_admits_only_the_nfs_port_exports_only_to_the_nodes_and_is_pinned(objects):
    servers = of_kind(objects, "Deployment")
    if not servers:
        return  # Filestore: no server pod
    (server,) = servers
    (policy,) = [o for o in objects if o["kind"] == "NetworkPolicy" and o["metadata"]["namespace"] == server["metadata"]["namespace"]]
    assert selects(policy["spec"]["podSelector"], server["spec"]["template"]["metadata"]["labels"])
    # No `from`: the kubelets mount from node addresses, which no NetworkPolicy peer names reliably.
    assert policy["spec"]["ingress"] == [{"ports": [{"protocol": "TCP", "port": 2049}]}]
    (container,) = server["spec"]["template"]["spec"]["containers"]
    assert env_of(container)["SYNC"] == "true"  # acknowledged commits are on disk: fsync-then-rename holds
    for each in containers(server["spec"]["template"]):
        assert re.fullmatch(r"[^@]+@sha256:[0-9a-f]{64}", each["image"]), each["image"]
    permitted = env_of(container)["PERMITTED"]
    assert exports_line(permitted).startswith(f"/exports {ipaddress.ip_network(permitted.replace(chr(92), ''))}(rw,")


def exports_line(permitted: str) -> str:
    """/etc/exports as the image's nfsd.sh writes it: its own template and sed lines (the image is not
    pulled here). An unescaped slash in PERMITTED makes sed fail, and the export would admit no one."""
    script = ('''echo "{{SHARED_DIRECTORY}} {{PERMITTED}}({{READ_ONLY}},fsid=0,{{SYNC}},no_subtree_check)" > exports && '''
              '''sed -i "s@{{SHARED_DIRECTORY}}@/exports@g" exports && sed -i "s/{{PERMITTED}}/"${PERMITTED}"/g" exports && '''
              '''sed -i "s/{{READ_ONLY}}/rw/g" exports && cat exports''')
    with tempfile.TemporaryDirectory() as folder:
        return subprocess.run(["bash", "-c", script], env={**os.environ, "PERMITTED": permitted}, cwd=folder,
                              capture_output=True, text=True, check=True).stdout


def test_each_option_reaches_its_fields(rendered):
    """The CLI's kustomization puts every option where it belongs, in both Ray clusters."""
    for case in ("big", "filestore"):
        o = Options(**PARAMETER_SETS[case])
        objects = rendered[case]
        cluster, service = one(objects, "RayCluster", o.name), one(objects, "RayService", o.service_name)
        assert {obj["metadata"]["namespace"] for obj in objects if "namespace" in obj["metadata"]} <= {o.namespace, o.nfs_namespace}
        for spec, instance, counts in ((cluster["spec"], o.name, (o.worker_pods,) * 3),
                                       (service["spec"]["rayClusterConfig"], o.service_name,
                                        (o.serve_min_pods, o.serve_min_pods, o.serve_max_pods))):
            (group,) = spec["workerGroupSpecs"]
            assert (group["replicas"], group["minReplicas"], group["maxReplicas"]) == counts
            for template, cpus, memory in ((spec["headGroupSpec"]["template"], o.head_cpus, o.head_memory),
                                           (group["template"], o.worker_cpus, o.worker_memory)):
                assert template["metadata"]["labels"]["app.kubernetes.io/instance"] == instance
                pod = template["spec"]
                assert pod["containers"][0]["resources"]["limits"] | {"ephemeral-storage": "-"} == {
                    "cpu": str(cpus), "memory": memory, "ephemeral-storage": "-"}
                assert {c["image"] for c in containers(template)} == {o.image_ref}
        # what every pod reads (the HAProxy-env and storage-root tests follow the pods' references)
        assert one(objects, "ConfigMap", o.env_config_map)
        claim = one(objects, "PersistentVolumeClaim", o.claim_name)
        assert claim["spec"]["resources"]["requests"]["storage"] == o.size
        policies = [p for p in objects if p["kind"] == "NetworkPolicy" and p["metadata"]["namespace"] == o.namespace]
        assert sorted(p["metadata"]["name"] for p in policies) == sorted([f"{o.name}-training", o.service_name])
        for policy in policies:
            selector = policy["spec"]["ingress"][1]["from"][0]["namespaceSelector"]["matchLabels"]
            assert selector == {"kubernetes.io/metadata.name": o.operator_namespace}
        job = one(objects, "RayJob", o.rayjob_name)
        assert job["spec"]["clusterSelector"] == {"ray.io/cluster": o.name}
        assert shlex.split(job["spec"]["entrypoint"]) == manifests.train_command(o)
        assert job["spec"]["submitterPodTemplate"]["spec"]["containers"][0]["image"] == o.image_ref
        serve_service = service["spec"]["serveService"]
        assert serve_service["spec"]["loadBalancerSourceRanges"] == list(o.lb_source_ranges)
        assert serve_service["metadata"].get("annotations") == ({INTERNAL_LB: "Internal"} if o.internal_lb else None)
    server = one(rendered["big"], "Deployment")  # the NFS export's clients, its address
    assert env_of(server["spec"]["template"]["spec"]["containers"][0])["PERMITTED"] == "10.0.0.0\\/16"
    assert one(rendered["big"], "PersistentVolume")["spec"]["nfs"]["server"] == NFS_IP
    # Filestore: no NFS server, no privileged pod, a claim of GKE's Filestore class
    assert not [o for o in rendered["filestore"] if o["kind"] in ("Deployment", "PersistentVolume")]
    assert one(rendered["filestore"], "PersistentVolumeClaim")["spec"]["storageClassName"] == "standard-rwx"


def test_the_export_takes_any_node_range():
    assert exports_line(manifests.nfs_clients("10.0.0.0/16")).startswith("/exports 10.0.0.0/16(rw,")
    with pytest.raises(subprocess.CalledProcessError):
        exports_line("10.0.0.0/16")  # unescaped: sed refuses it


def test_token_authentication_on_both_clusters(objects):
    specs = [s for obj in objects for s in ray_cluster_specs(obj)]
    assert len(specs) == 2
    for spec in specs:
        assert spec["authOptions"] == {"mode": "token"}  # KubeRay generates the token into a Secret
        # validation.go (v1.7.0) refuses token mode below Ray 2.52.0
        assert tuple(map(int, spec["rayVersion"].split("."))) >= (2, 52, 0)
    for template in ray_pod_templates(objects):  # nothing overrides the token KubeRay injects
        assert not [e for c in containers(template) for e in c.get("env", []) if e["name"].startswith("RAY_AUTH")]


def test_serving_pods_keep_gradio_uploads_in_a_small_empty_dir(objects):
    for template in ray_pod_templates([one(objects, "RayService")]):
        (container,) = template["spec"]["containers"]
        uploads = env_of(container)["GRADIO_TEMP_DIR"]
        (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == uploads]
        (volume,) = [v for v in template["spec"]["volumes"] if v["name"] == mount["name"]]
        assert set(volume) == {"name", "emptyDir"} and volume["emptyDir"]["sizeLimit"], volume


def test_every_ray_pod_runs_serve_behind_haproxy_like_local_haproxy_mode(objects):
    """The HAProxy settings live in one place on the cluster, k8s/base/ray.env (a ConfigMap every
    Ray container reads), and equal the local cluster's: HAProxy, and the ingress retry settings
    that make losing an ingress replica lose no request (docs/RELIABILITY.md)."""
    HAPROXY_ENV = manifests.CLUSTER_INGRESS_ENV

    assert env_file(ROOT / "k8s" / "base" / "ray.env") == HAPROXY_ENV
    config_maps = {o["metadata"]["name"]: o for o in of_kind(objects, "ConfigMap")}
    assert len(config_maps) == 1  # kustomize's generator of the serve config leaves no ConfigMap behind
    for template in ray_pod_templates(objects):
        container = template["spec"]["containers"][0]
        (source,) = container["envFrom"]
        assert config_maps[source["configMapRef"]["name"]]["data"] == HAPROXY_ENV
        assert not env_of(container).keys() & set(HAPROXY_ENV)  # not restated per pod
        assert env_of(container)["RAY_SERVE_DEFAULT_HTTP_HOST"] == "0.0.0.0"  # serve_config.yaml names no host
        assert env_of(container)["GRADIO_ANALYTICS_ENABLED"] == "False"
    assert HAPROXY_ENV["RAY_SERVE_HAPROXY_RETRY_ON"] == "conn-failure empty-response"
    assert HAPROXY_ENV["RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"] == "serving.ingress:proxy_middlewares"


def test_no_debug_servers_share_links_or_floating_images(objects):
    text = manifests.to_yaml(objects).lower()
    for needle in ("debugpy", "--debug", "share=true", "share: true", "ray_debug", ":latest"):
        assert needle not in text
    for _, container in all_containers(objects):
        assert manifests.image_tag(container["image"]), container["image"]
        assert not [name for name in env_of(container) if "DEBUG" in name.upper()]
    for source in (ROOT / "serving").glob("*.py"):  # what the RayService runs
        code = source.read_text().replace(" ", "")
        assert "share=True" not in code and "debug=True" not in code, source


# ---------------------------------------------------------------- kustomize

def kubectl() -> str:
    try:
        return manifests.kubectl()
    except manifests.RenderError as error:
        missing(str(error))


@functools.cache
def kustomize(relative: str) -> list[dict]:
    """`kubectl kustomize` of k8s/<relative> (or of an absolute path)."""
    out = subprocess.run([kubectl(), "kustomize", str(ROOT / "k8s" / relative)], capture_output=True, text=True)
    assert out.returncode == 0, f"kubectl kustomize {relative}: {out.stderr}"
    return [doc for doc in yaml.safe_load_all(out.stdout) if doc]


def env_file(path: Path) -> dict[str, str]:
    """KEY=VALUE lines, as kustomize's configMapGenerator `envs:` reads them."""
    lines = [line.strip() for line in path.read_text().splitlines()]
    return dict(line.split("=", 1) for line in lines if line and not line.startswith("#"))


def by_identity(objects: list[dict]) -> dict[tuple, dict]:
    keyed = {(o["kind"], o["metadata"].get("namespace"), o["metadata"]["name"]): o for o in objects}
    assert len(keyed) == len(objects)
    return keyed


# What each kustomization gives, and the CLI's choices that give the same objects: at its
# defaults the CLI's own kustomization changes nothing.
KUSTOMIZATIONS = {
    "overlays/filestore": (dict(shared_storage="filestore"), [p for p in manifests.PARTS if p != "job"]),
    "overlays/nfs": (dict(nfs_server=env_file(ROOT / "k8s" / "overlays" / "nfs" / "nfs.env")["NFS_SERVER"]),
                     [p for p in manifests.PARTS if p != "job"]),
    "components/nfs/server": (dict(), ["nfs"]),
    "train": (dict(), ["job"]),
}


@pytest.mark.parametrize("relative", sorted(KUSTOMIZATIONS))
def test_the_cli_at_its_defaults_gives_what_kubectl_kustomize_gives(relative):
    """So everything checked of the CLI's objects (schemas, lockdown, the serve config read verbatim,
    k8s/train's entrypoint is training/defaults.py's) holds for `kubectl apply -k` of k8s/ too."""
    options, parts = KUSTOMIZATIONS[relative]
    assert by_identity(kustomize(relative)) == by_identity(manifests.render(Options(**options), parts))


def test_the_kustomize_tree_is_complete():
    """Every YAML file in k8s/ belongs to a kustomization; overlays set the image the kustomize way,
    and are the base plus one storage component."""
    listed = set()
    for kustomization in (ROOT / "k8s").rglob("kustomization.yaml"):
        spec = yaml.safe_load(kustomization.read_text())
        entries = spec.get("resources", []) + [patch["path"] for patch in spec.get("patches", []) if "path" in patch]
        listed |= {(kustomization.parent / entry).resolve() for entry in entries}
        if "overlays" in kustomization.parts or kustomization.parent.name == "train":
            if "components" not in kustomization.parts:
                assert [i["name"] for i in spec["images"]] == ["mnist-ray"], kustomization
            if "overlays" in kustomization.parts:
                assert spec["components"] == [f"../../components/{kustomization.parent.name}"], kustomization
    for path in (ROOT / "k8s").rglob("*.yaml"):
        if path.name != "kustomization.yaml":
            assert path.resolve() in listed, f"{path} is in no kustomization"


LOCAL_ONLY_SERVE_CONFIGS = {
    "loopback host": ("http_options: {host: 127.0.0.1}\napplications:\n  - {name: a, import_path: x:y}\n", "http_options.host '127.0.0.1'"),
    "other port": ("http_options: {port: 9000}\napplications:\n  - {name: a, import_path: x:y}\n", "port 9000 is not 8000"),
    "local working_dir": ("applications:\n  - {name: a, import_path: x:y, runtime_env: {working_dir: .}}\n", "local working_dir"),
    "storage arg": ("applications:\n  - {name: a, import_path: x:y, args: {storage: ./storage}}\n", "args.storage"),
    "pip": ("applications:\n  - name: a\n    import_path: x:y\n    runtime_env: {pip: [torch]}\n", "bake them into the image"),
    "no import path": ("applications:\n  - {name: a}\n", "has no import_path"),
    "no applications": ("proxy_location: EveryNode\n", "has no `applications:` list"),
    "no file": (None, "serve_config.yaml not found"),
}


@pytest.mark.parametrize("case", sorted(LOCAL_ONLY_SERVE_CONFIGS))
def test_serve_configs_that_cannot_run_in_the_cluster_are_refused(tmp_path, case):
    text, message = LOCAL_ONLY_SERVE_CONFIGS[case]
    path = tmp_path / "serve_config.yaml"
    if text is not None:
        path.write_text(text)
    with pytest.raises(InvalidOptions, match=re.escape(message)):
        manifests.serve_config_v2(path)


@pytest.mark.filterwarnings("ignore")  # pydantic deprecation warnings from inside ray.serve
def test_the_projects_serve_config_renders():
    from ray.serve.schema import ServeDeploySchema  # what KubeRay's PUT to the Serve API must satisfy

    local = yaml.safe_load(manifests.SERVE_CONFIG.read_text())
    (service,) = manifests.render(Options(), ["service"])
    assert service["spec"]["serveConfigV2"] == manifests.SERVE_CONFIG.read_text()  # verbatim, not a transformed copy
    config = yaml.safe_load(service["spec"]["serveConfigV2"])
    parsed = ServeDeploySchema.model_validate(config)
    assert parsed.http_options.port == 8000 and "host" not in (config.get("http_options") or {})
    assert [a.import_path for a in parsed.applications] == [a["import_path"] for a in local["applications"]]


def test_kustomize_failures_are_reported_with_its_message(monkeypatch, tmp_path):
    monkeypatch.setattr(manifests, "K8S_DIR", tmp_path)  # a k8s/ without the base
    with pytest.raises(manifests.RenderError, match="kubectl kustomize refused the kustomization.*base"):
        manifests.render(Options(shared_storage="filestore"))


def test_worker_slots_read_a_live_cluster():
    group = {"replicas": 4, "template": {"spec": {"containers": [{"resources": {"limits": {"cpu": "2500m"}}}]}}}
    assert manifests.worker_slots({"spec": {"workerGroupSpecs": [group, {**group, "replicas": 1}]}}) == 10


# A stand-in for gcloud's lookups (no Google Cloud here): us-east1 has no zone "-a".
FAKE_GCLOUD = """#!/bin/sh
case "$*" in
  "compute zones list --project proj --filter region:$REGION AND status:UP --format value(name) --sort-by name --limit 1")
    case "$REGION" in us-east1) echo us-east1-b ;; europe-west4) echo europe-west4-a ;; esac ;;
  "projects describe proj --format value(projectNumber)") echo 123456789 ;;
  *) echo "unexpected: gcloud $*" >&2; exit 9 ;;
esac
"""


@pytest.fixture
def create_script(tmp_path):
    """Runs k8s/create-gke-cluster.sh with DRY_RUN=1, gcloud's lookups answered by FAKE_GCLOUD."""
    (tmp_path / "gcloud").write_text(FAKE_GCLOUD)
    (tmp_path / "gcloud").chmod(0o700)
    env = {**os.environ, "PATH": f"{tmp_path}{os.pathsep}{os.environ['PATH']}",
           "DRY_RUN": "1", "PROJECT": "proj", "REGION": "europe-west4"}
    return lambda **extra: subprocess.run(["bash", str(ROOT / "k8s" / "create-gke-cluster.sh")],
                                          env={**env, **extra}, capture_output=True, text=True)


def test_the_create_script_is_clean_for_shellcheck_and_old_bash():
    """macOS's bash 3.2 calls an empty array unbound under `set -u`: the scripts use none."""
    scripts = sorted((ROOT / "k8s").rglob("*.sh")) + [p for p in [ROOT / ".ci" / "run"] if p.exists()]
    for script in scripts:
        assert "[@]" not in script.read_text() and "=(" not in script.read_text(), script
    if not shutil.which("shellcheck"):
        pytest.skip("shellcheck is not installed")
    result = subprocess.run(["shellcheck", *map(str, scripts)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


def test_the_create_script(create_script):
    out = create_script().stdout
    create = next(line for line in out.splitlines() if "clusters create" in line)
    assert "--enable-dataplane-v2" in create and "--location europe-west4-a" in create
    assert "--create-subnetwork name=mnist-nodes,range=10.20.0.0/22" in create  # the NFS export's clients
    assert "file.googleapis.com" not in out and "--update-addons" not in out  # defaults: nfs, helm
    filestore = create_script(SHARED_STORAGE="filestore", RAY_OPERATOR="addon").stdout
    assert "services enable file.googleapis.com" in filestore
    assert "--update-addons GcpFilestoreCsiDriver=ENABLED" in filestore and "--update-addons RayOperator=ENABLED" in filestore
    assert "--workload-pool proj.svc.id.goog --workload-metadata GKE_METADATA" in create
    assert "--addons" not in out  # would turn off every default add-on it does not list
    assert "node-pools create ray" in out and "--autoscaling-profile optimize-utilization" in create
    pool = next(line for line in out.splitlines() if "node-pools create" in line)
    assert "--workload-metadata GKE_METADATA" in pool
    assert "--num-nodes 2 --disk-size 100 --enable-autoscaling --min-nodes 2 --max-nodes 4" in pool
    resized = create_script(RAY_MIN_NODES="1", RAY_MAX_NODES="6").stdout
    assert "--num-nodes 1 --disk-size 100 --enable-autoscaling --min-nodes 1 --max-nodes 6" in resized
    # one region for the cluster and the registry, so the image push lands where nodes pull
    assert "artifacts repositories create mnist --project proj --location europe-west4 " in out
    assert "--role roles/artifactregistry.reader" in out and "-compute@developer.gserviceaccount.com" in out
    assert "gcloud services enable container.googleapis.com artifactregistry.googleapis.com --project proj" in out
    assert "europe-west4-docker.pkg.dev/proj/mnist/mnist-ray" in out
    east = create_script(REGION="us-east1").stdout  # a region without a zone "-a": looked up
    assert "--location us-east1-b" in east and "us-east1-a" not in east and "serviceAccount:123456789-compute@" in east
    text = (ROOT / "k8s" / "create-gke-cluster.sh").read_text()
    assert "|| echo" not in text and "|| true" not in text and "set -euo pipefail" in text


@pytest.mark.parametrize("env, message", [
    (dict(RAY_MIN_NODES="5", RAY_MAX_NODES="4"), "min <= max"), (dict(RAY_MIN_NODES="x"), "min <= max"),
    (dict(RAY_MIN_NODES="0", RAY_MAX_NODES="0"), "min <= max"), (dict(SHARED_STORAGE="s3"), "nfs or filestore"),
    (dict(ZONE="us-central1-a"), "is not a zone of REGION europe-west4"), (dict(REGION=""), "set REGION")])
def test_the_create_script_refuses_bad_settings(create_script, env, message):
    bad = create_script(**env)
    assert bad.returncode == (1 if "REGION" in env else 2) and message in bad.stderr  # 1: bash's own ${REGION:?}


def doc_patches() -> dict[str, str]:
    """The kustomize `patches:` blocks docs/GKE.md tells users to add, by the field they set."""
    guide = (ROOT / "docs" / "GKE.md").read_text()
    blocks = re.findall(r"```yaml\n(patches:\n.*?)```", guide, re.S)
    fields = ("gcsFaultToleranceOptions", "loadBalancerSourceRanges", "replicas")
    return {next(f for f in fields if f in block): block for block in blocks}


@pytest.mark.parametrize("field", ["loadBalancerSourceRanges", "gcsFaultToleranceOptions", "replicas"])
def test_the_documented_overlay_patches_apply_and_validate(tmp_path, field, crd_validators):
    patch = doc_patches()[field]
    overlay = os.path.relpath(ROOT / "k8s" / "overlays" / "filestore", tmp_path)  # kustomize wants it relative
    (tmp_path / "kustomization.yaml").write_text(f"resources:\n  - {overlay}\n{patch}")
    objects = kustomize(str(tmp_path))
    assert_valid(objects, crd_validators)
    service = one(objects, "RayService")
    if field == "replicas":
        (group,) = one(objects, "RayCluster")["spec"]["workerGroupSpecs"]
        assert group["replicas"] == group["minReplicas"] == group["maxReplicas"] == 4
        assert service["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["replicas"] == 1  # serving untouched
        assert one(objects, "PersistentVolumeClaim")["spec"]["resources"]["requests"]["storage"] == "2Ti"
    elif field == "loadBalancerSourceRanges":
        assert service["spec"]["serveService"]["spec"][field] == ["203.0.113.0/24"]
    else:
        assert service["spec"]["rayClusterConfig"][field]["redisAddress"].startswith("redis://")


def test_the_guide_covers_the_steps_a_first_user_needs():
    guide = (ROOT / "docs" / "GKE.md").read_text()
    for needle in ("gke-gcloud-auth-plugin", "gcloud services enable container.googleapis.com artifactregistry.googleapis.com",
                   "file.googleapis.com", "roles/artifactregistry.reader", "export PROJECT=my-project REGION=",
                   "kubectl apply --server-side -k k8s/overlays/filestore", "kubectl create -k k8s/train",
                   "RAY_AUTH_TOKEN", "loadBalancerSourceRanges", "gcsFaultToleranceOptions", "Billing goes on",
                   "gcloud filestore instances list", "gcloud compute disks list", "## Not verified here",
                   "--enable-auth", "get-auth-string", "allocateLoadBalancerNodePorts: false",
                   "SHARED_STORAGE=nfs RAY_OPERATOR=helm", "privileged"):  # privileged: the NFS server's exception
        assert needle in guide, needle
    assert "${REGION:-" not in guide and "ZONE%-*" not in guide  # one region, set once
    from ray_cluster.kuberay_cli import token_export
    assert token_export(Options()) in guide  # the line a test submits a job with (test_local_cluster.py)
    not_verified = guide.split("## Not verified here", 1)[1]
    for needle in ("Token authentication", "digest", "NetworkPolicies", "Workload Identity", "Memorystore",
                   "Autoscaling end to end", "cluster autoscaler", "safe-to-evict"):
        assert needle in not_verified, needle
    scaling = guide.split("### Scaling with load", 1)[1].split("\n### ", 1)[0]
    for needle in ("enableInTreeAutoscaling: true", "maxReplicas: 4", "idleTimeoutSeconds", "Growing.", "Shrinking.",
                   "--enable-autoscaling", "What it costs"):
        assert needle in scaling, needle


# ---------------------------------------------------------------- autoscaling (KubeRay v1.7.0)

AUTOSCALER_V2_ENV = "RAY_enable_autoscaler_v2"
TOKEN_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"


def kuberay_rule_violations(spec: dict) -> list[str]:
    """The rules of KubeRay v1.7.0's ValidateRayClusterSpec (ray-operator/controllers/ray/utils/
    validation.go) that the worker groups and autoscaler options meet, plus the one its reconciler
    applies silently (GetWorkerGroupDesiredReplicas clamps replicas into [min, max]: a value
    outside would be rewritten, so we refuse it). The operator refuses a spec that breaks one."""
    found = []
    autoscaling = bool(spec.get("enableInTreeAutoscaling"))
    options = spec.get("autoscalerOptions") or {}
    head = spec["headGroupSpec"]["template"]["spec"]
    head_env = env_of(head["containers"][0])
    v2 = options.get("version") == "v2"
    for group in spec.get("workerGroupSpecs", []):
        name, low, high = group["groupName"], group.get("minReplicas"), group.get("maxReplicas")
        if not autoscaling and (low is None or high is None):
            found.append(f"{name}: minReplicas and maxReplicas are required without the autoscaler")
        if (low is not None and low < 0) or (high is not None and high < 0):
            found.append(f"{name}: negative minReplicas or maxReplicas")
        if low is not None and high is not None and low > high:
            found.append(f"{name}: minReplicas {low} greater than maxReplicas {high}")
        if not (low or 0) <= group.get("replicas", 0) <= (high if high is not None else float("inf")):
            found.append(f"{name}: replicas {group.get('replicas')} outside [{low}, {high}]")
        if autoscaling and group.get("suspend"):
            found.append(f"{name}: cannot be suspended with the autoscaler")
        if group.get("idleTimeoutSeconds") is not None and (group["idleTimeoutSeconds"] < 0 or not v2):
            found.append(f"{name}: idleTimeoutSeconds needs autoscaler v2 and must be non-negative")
        if group.get("priority") and not v2:
            found.append(f"{name}: priority needs autoscaler v2")
        if autoscaling and v2 and group["template"]["spec"].get("restartPolicy", "Never") != "Never":
            found.append(f"{name}: restartPolicy must be Never or unset with autoscaler v2")
    if autoscaling and options.get("version") and AUTOSCALER_V2_ENV in head_env:
        found.append(f"both autoscalerOptions.version and {AUTOSCALER_V2_ENV} are set")
    if autoscaling and v2 and head.get("restartPolicy", "Never") != "Never":
        found.append("head restartPolicy must be Never or unset with autoscaler v2")
    if not autoscaling and head_env.get(AUTOSCALER_V2_ENV) in ("1", "true"):
        found.append(f"{AUTOSCALER_V2_ENV} set without enableInTreeAutoscaling")
    if options.get("idleTimeoutSeconds", 0) < 0:
        found.append("autoscalerOptions.idleTimeoutSeconds must be non-negative")
    if "KUBERAY_GEN_AUTOSCALER_START_CMD" in {e["name"] for e in options.get("env", [])}:
        found.append("autoscalerOptions.env must not set KUBERAY_GEN_AUTOSCALER_START_CMD")
    return found


def head_pod_as_kuberay_builds_it(cluster_name: str, spec: dict) -> dict:
    """The head pod template after KubeRay v1.7.0 injects the autoscaler (common/pod.go:
    BuildAutoscalerContainer, mergeAutoscalerOverrides, the ray-logs emptyDir, the service
    account named like the cluster, restartPolicy Never and the env var for v2)."""
    template = copy.deepcopy(spec["headGroupSpec"]["template"])
    if not spec.get("enableInTreeAutoscaling"):
        return template
    options, pod = spec.get("autoscalerOptions") or {}, template["spec"]
    sidecar = {
        "name": "autoscaler", "image": options.get("image", pod["containers"][0]["image"]),
        "imagePullPolicy": "IfNotPresent",
        "env": [{"name": "RAY_CLUSTER_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.labels['ray.io/cluster']"}}},
                {"name": "RAY_CLUSTER_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
                {"name": "KUBERAY_CRD_VER", "value": "v1"}] + options.get("env", []),
        "command": ["/bin/bash", "-c", "--"],
        "args": ["ray kuberay-autoscaler --cluster-name $(RAY_CLUSTER_NAME) --cluster-namespace $(RAY_CLUSTER_NAMESPACE)"],
        "resources": options.get("resources", {"requests": {"cpu": "500m", "memory": "512Mi"},
                                               "limits": {"cpu": "500m", "memory": "512Mi"}}),
        "volumeMounts": options.get("volumeMounts", []) + [{"name": "ray-logs", "mountPath": "/tmp/ray"}],
    }
    if "securityContext" in options:
        sidecar["securityContext"] = options["securityContext"]
    pod["containers"].append(sidecar)
    pod["containers"][0].setdefault("volumeMounts", []).append({"name": "ray-logs", "mountPath": "/tmp/ray"})
    pod["volumes"].append({"name": "ray-logs", "emptyDir": {}})
    pod["serviceAccountName"] = pod.get("serviceAccountName") or cluster_name
    if options.get("version") == "v2":
        pod["restartPolicy"] = "Never"
        pod["containers"][0]["env"].append({"name": AUTOSCALER_V2_ENV, "value": "true"})
    return template


def ray_clusters(objects) -> list[tuple[str, dict]]:
    return [(o["metadata"]["name"], s) for o in objects for s in ray_cluster_specs(o)]


def test_the_serving_cluster_autoscales(objects):  # and training does not: test_the_rayjob_fits_its_cluster
    spec = one(objects, "RayService")["spec"]["rayClusterConfig"]
    assert spec["enableInTreeAutoscaling"] is True
    options = spec["autoscalerOptions"]
    assert options["version"] == "v2" and options["upscalingMode"] == "Default"
    assert options["idleTimeoutSeconds"] == 300  # sidecar's requests = limits: test_the_head_pod_kuberay_builds_...
    context = options["securityContext"]
    assert context["runAsNonRoot"] is True and context["allowPrivilegeEscalation"] is False
    assert context["capabilities"] == {"drop": ["ALL"]} and context["seccompProfile"] == {"type": "RuntimeDefault"}
    (group,) = spec["workerGroupSpecs"]
    assert 1 <= group["minReplicas"] == group["replicas"] < group["maxReplicas"]
    # Serve replicas go to the workers only: the head advertises no CPU to Ray
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    # The token: a projected service-account token, mounted into the autoscaler sidecar only (that no
    # other container mounts it: test_the_head_pod_kuberay_builds_passes_pod_security_and_the_schemas)
    head = spec["headGroupSpec"]["template"]["spec"]
    assert head["automountServiceAccountToken"] is False and "serviceAccountName" not in head  # KubeRay names it
    (mount,) = options["volumeMounts"]
    assert mount == {"name": "autoscaler-kube-api", "mountPath": TOKEN_DIR, "readOnly": True}
    (volume,) = [v for v in head["volumes"] if v["name"] == mount["name"]]
    sources = {key for source in volume["projected"]["sources"] for key in source}
    assert sources == {"serviceAccountToken", "configMap", "downwardAPI"}


def test_every_ray_cluster_meets_kuberays_validation_rules(objects):
    for name, spec in ray_clusters(objects):
        assert kuberay_rule_violations(spec) == [], name


KUBERAY_RULE_BREAKS = {
    "min above max": (lambda s: s["workerGroupSpecs"][0].update(minReplicas=5), "greater than maxReplicas"),
    "replicas above max": (lambda s: s["workerGroupSpecs"][0].update(replicas=9), "outside"),
    "replicas below min": (lambda s: s["workerGroupSpecs"][0].update(replicas=0), "outside"),
    "negative max": (lambda s: s["workerGroupSpecs"][0].update(maxReplicas=-1), "negative"),
    "suspended group": (lambda s: s["workerGroupSpecs"][0].update(suspend=True), "suspended"),
    "env and version": (lambda s: s["headGroupSpec"]["template"]["spec"]["containers"][0]["env"].append(
        {"name": AUTOSCALER_V2_ENV, "value": "true"}), "both autoscalerOptions.version"),
    "head restarts": (lambda s: s["headGroupSpec"]["template"]["spec"].update(restartPolicy="Always"), "head restartPolicy"),
    "worker restarts": (lambda s: s["workerGroupSpecs"][0]["template"]["spec"].update(restartPolicy="OnFailure"), "cpu: restartPolicy"),
    "group idle timeout on v1": (lambda s: (s["autoscalerOptions"].update(version="v1"),
                                            s["workerGroupSpecs"][0].update(idleTimeoutSeconds=60)), "needs autoscaler v2"),
    "negative idle timeout": (lambda s: s["autoscalerOptions"].update(idleTimeoutSeconds=-1), "non-negative"),
    "generated command env": (lambda s: s["autoscalerOptions"]["env"].append(
        {"name": "KUBERAY_GEN_AUTOSCALER_START_CMD", "value": "x"}), "KUBERAY_GEN_AUTOSCALER_START_CMD"),
    "no bounds without autoscaler": (lambda s: (s.pop("enableInTreeAutoscaling"), s["workerGroupSpecs"][0].pop("maxReplicas")),
                                     "required without the autoscaler"),
}


@pytest.mark.parametrize("case", sorted(KUBERAY_RULE_BREAKS))
def test_the_kuberay_rules_catch_each_break(rendered, case):
    """Each rule fails on a spec that breaks it, so a passing check means something."""
    spec = copy.deepcopy(one(rendered["defaults"], "RayService")["spec"]["rayClusterConfig"])
    assert kuberay_rule_violations(spec) == []
    breaks, message = KUBERAY_RULE_BREAKS[case]
    breaks(spec)
    assert any(message in problem for problem in kuberay_rule_violations(spec)), kuberay_rule_violations(spec)


def test_the_head_pod_kuberay_builds_passes_pod_security_and_the_schemas(objects):
    """With the autoscaler sidecar injected, the head pod is still "restricted" (the namespace
    enforces it on every container), Guaranteed, valid Kubernetes, and only the sidecar holds the
    API token."""
    for name, spec in ray_clusters(objects):
        template = head_pod_as_kuberay_builds_it(name, spec)
        assert_restricted(template, f"head of {name}")
        k8s_validate(as_pod_template(template), K8S_VERSIONS[-1])
        volumes = {v["name"]: v for v in template["spec"]["volumes"]}
        for container in containers(template):
            assert container["resources"]["requests"] == container["resources"]["limits"], container["name"]
            for mount in container.get("volumeMounts", []):
                assert mount["name"] in volumes, (name, container["name"], mount["name"])  # else the pod never starts
                holds_token = any("serviceAccountToken" in s for s in volumes[mount["name"]].get("projected", {}).get("sources", []))
                assert holds_token == (container["name"] == "autoscaler" and mount["mountPath"] == TOKEN_DIR)
        if spec.get("enableInTreeAutoscaling"):
            assert [c["name"] for c in template["spec"]["containers"]] == ["ray-head", "autoscaler"]


# ---------------------------------------------------------------- Serve's demand fits the pods

GKE_SIZED_SERVE_CONFIG = """\
applications:
  - name: mnist
    import_path: serving.app:build_app
    deployments:
      - name: MnistApi
        autoscaling_config: {min_replicas: 2, max_replicas: 8}
        ray_actor_options: {num_cpus: 0.5}
      - name: MnistModel
        autoscaling_config: {min_replicas: 1, max_replicas: 4}
        ray_actor_options: {num_cpus: 1}
  - name: mnist-ui
    route_prefix: /ui
    import_path: serving.app:build_ui
    deployments:
      - {name: MnistUI, num_replicas: 1, ray_actor_options: {num_cpus: 0}}
"""


def test_the_renderer_refuses_a_serve_config_the_pods_cannot_hold(tmp_path):
    path = tmp_path / "serve_config.yaml"
    path.write_text(GKE_SIZED_SERVE_CONFIG)  # 2 x 0.5 + 1 x 1 = 2 CPUs at the floor, 8 at the ceiling
    (service,) = manifests.render(Options(serve_config=path), ["service"])  # 1 to 4 pods of 2 CPUs: fits
    with pytest.raises(InvalidOptions, match=r"at max_replicas Serve asks for 8 CPUs \(4 worker pods of 2 CPUs\).*holds 3 \(--serve-max-pods\)"):
        manifests.render(Options(serve_config=path, serve_max_pods=3), ["service"])
    with pytest.raises(InvalidOptions, match=r"at min_replicas Serve asks for 2 CPUs.*holds 1 \(--serve-min-pods\)"):
        manifests.render(Options(serve_config=path, worker_cpus=1), ["service"])
    path.write_text(GKE_SIZED_SERVE_CONFIG.replace("num_cpus: 1}", "num_cpus: 3}"))  # a replica larger than a pod
    with pytest.raises(InvalidOptions, match=r"a replica asks for 3 CPUs, more than a worker pod has \(2, --worker-cpus\)"):
        manifests.render(Options(serve_config=path, serve_max_pods=20), ["service"])


def test_replicas_are_packed_whole_into_pods():
    assert serve_fit.pods_needed([], 2) == 0
    assert serve_fit.pods_needed([0, 0, 0], 2) == 0  # 0-CPU replicas fit anywhere
    assert serve_fit.pods_needed([0.5] * 4, 2) == 1
    assert serve_fit.pods_needed([1.5, 1.5], 2) == 2  # 3 CPUs, but no pod takes both
    assert serve_fit.pods_needed([0.75] * 3, 2) == 2  # 2.25 CPUs: two per pod
    assert serve_fit.pods_needed([3], 2) == math.inf
    config = yaml.safe_load(GKE_SIZED_SERVE_CONFIG)
    assert serve_fit.serve_replica_cpus(config) == {"min": [0.5, 0.5, 1.0, 0.0], "max": [0.5] * 8 + [1.0] * 4 + [0.0]}
    auto = {"applications": [{"deployments": [{"name": "a", "num_replicas": "auto"}]}]}  # Serve's default: 1 CPU
    assert len(serve_fit.serve_replica_cpus(auto)["max"]) == 100


# e2-standard-8, the script's Ray node: 7.91 CPUs allocatable after GKE's reservation, less about
# 0.4 for GKE's own DaemonSets (Dataplane V2, logging, the metadata server; an estimate, not measured
# here). The autoscaler sidecar's 0.5 CPU comes with the serving head (KubeRay injects it).
NODE_CPUS_FOR_PODS = 7.5


def pod_cpus(template: dict) -> float:
    """A pod's CPU request as the scheduler counts it: its containers' sum, or its largest init container."""
    def cpu(container):
        return manifests.quantity(container["resources"]["requests"]["cpu"])
    return max(sum(cpu(c) for c in template["spec"]["containers"]),
               max((cpu(c) for c in template["spec"].get("initContainers", [])), default=0))


def test_the_node_pool_holds_the_ray_pods_at_rest_and_at_the_ceiling(create_script):
    """create-gke-cluster.sh's --min-nodes holds every Ray pod of the default manifests at rest,
    and --max-nodes holds them with the serving group at maxReplicas plus a RayService upgrade's
    second cluster (its head and minReplicas workers), packed whole into nodes."""
    out = create_script().stdout
    pool = shlex.split(next(line for line in out.splitlines() if "node-pools create ray" in line)[2:])
    flag = lambda name: pool[pool.index(name) + 1]
    assert flag("--machine-type") == "e2-standard-8"
    objects = kustomize("overlays/filestore")
    fixed, serving_at = [], {}
    for name, spec in ray_clusters(objects):
        fixed.append(pod_cpus(head_pod_as_kuberay_builds_it(name, spec)))
        (group,) = spec["workerGroupSpecs"]
        worker = pod_cpus(group["template"])
        if spec.get("enableInTreeAutoscaling"):
            serving_head = fixed[-1]
            serving_at = {level: [worker] * group[f"{level}Replicas"] for level in ("min", "max")}
        else:
            fixed += [worker] * group["replicas"]
    assert serving_head == 2.5  # 2 CPUs and the sidecar's 0.5
    at_rest = fixed + serving_at["min"]
    at_ceiling = fixed + serving_at["max"] + [serving_head] + serving_at["min"]
    assert serve_fit.pods_needed(at_rest, NODE_CPUS_FOR_PODS) <= int(flag("--min-nodes"))
    assert serve_fit.pods_needed(at_ceiling, NODE_CPUS_FOR_PODS) <= int(flag("--max-nodes"))


def test_ray_pods_are_not_evicted_by_the_cluster_autoscaler(objects):
    for template in ray_pod_templates(objects):
        assert template["metadata"]["annotations"] == {"cluster-autoscaler.kubernetes.io/safe-to-evict": "false"}
