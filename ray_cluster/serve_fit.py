"""Serve's CPU demand against the serving cluster's pods, checked on the rendered RayService:
KubeRay's autoscaler adds a pod only for a replica that does not fit, so a group too small for
Serve's ceiling leaves replicas pending while Serve thinks it scaled."""
from __future__ import annotations

import math

import yaml


def serve_replica_cpus(config: dict) -> dict[str, list[float]]:
    """The CPUs of each Serve replica at every deployment's floor ("min") and ceiling ("max"). A
    deployment that names no num_cpus counts 1 (Serve's default): the estimate errs large."""
    demand = {"min": [], "max": []}
    for app in config.get("applications") or []:
        for deployment in app.get("deployments") or []:
            cpus = float(((deployment.get("ray_actor_options") or {}).get("num_cpus", 1)))
            scaling = deployment.get("autoscaling_config")
            if scaling is None and deployment.get("num_replicas") == "auto":
                scaling = {"min_replicas": 1, "max_replicas": 100}  # Serve's "auto" defaults
            if scaling is not None:
                low, high = int(scaling.get("min_replicas", 1)), int(scaling.get("max_replicas", 1))
            else:
                low = high = int(deployment.get("num_replicas", 1))
            demand["min"] += [cpus] * low
            demand["max"] += [cpus] * high
    return demand


def pods_needed(replica_cpus: list[float], pod_cpus: float) -> float:
    """Pods of pod_cpus CPUs that hold these replicas, each whole in one pod (as Ray places an
    actor), packed first-fit by decreasing size; math.inf when a replica is larger than a pod."""
    free: list[float] = []
    for cpus in sorted((c for c in replica_cpus if c > 0), reverse=True):
        if cpus > pod_cpus:
            return math.inf
        for index, left in enumerate(free):
            if cpus <= left + 1e-9:
                free[index] = left - cpus
                break
        else:
            free.append(pod_cpus - cpus)
    return len(free)


def problems(service: dict, path) -> list[str]:
    """The serving group must hold Serve's replicas at their ceiling within maxReplicas pods and at
    their floor within minReplicas (the head has 0 CPUs). `path`: the Serve config, for messages."""
    from kubernetes.utils import parse_quantity  # late: local commands skip the kubernetes package
    (group,) = service["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    pod_cpus = float(parse_quantity(group["template"]["spec"]["containers"][0]["resources"]["limits"]["cpu"]))
    demand, found = serve_replica_cpus(yaml.safe_load(service["spec"]["serveConfigV2"])), []
    for level, flag in (("max", "--serve-max-pods"), ("min", "--serve-min-pods")):
        needed, pods = pods_needed(demand[level], pod_cpus), group[f"{level}Replicas"]
        if needed == math.inf:
            found.append(f"{path}: a replica asks for {max(demand[level]):g} CPUs, more than a worker pod has "
                         f"({pod_cpus:g}, --worker-cpus)")
            break
        if needed > pods:
            found.append(f"{path}: at {level}_replicas Serve asks for {sum(demand[level]):g} CPUs "
                         f"({needed} worker pods of {pod_cpus:g} CPUs), but the serving worker group "
                         f"holds {pods} ({flag}); raise {flag} or lower {level}_replicas / num_cpus")
    return found
