"""A Ray worker setup hook: a Serve replica's inter-deployment gRPC server listens on 127.0.0.1.

Ray 2.60's replica binds that server on "[::]:0", every interface (ray/serve/_private/replica.py,
_on_initialized), with no setting for the host. On a one-node cluster every caller of a replica is
on the same machine, so the local apps (serving/deploy.py) run this hook in each replica's worker:
the replica module's add_port_to_grpc_server gets the loopback address instead. A KubeRay pod
keeps Ray's default: replicas are called from other pods.
"""
EVERY_INTERFACE = ("[::]", "0.0.0.0")
HOOK = "ray_cluster.replica_loopback.setup"


def hook_env() -> dict:
    """The app's env_vars that run HOOK in each of its workers. Ray's runtime_env field
    worker_process_setup_hook becomes this variable only in ray.init (a driver's jobs), not in a
    Serve app's runtime_env; every Ray worker runs the module function it names at start-up."""
    from ray._private import ray_constants
    return {ray_constants.WORKER_PROCESS_SETUP_HOOK_ENV_VAR: HOOK}


def loopback_address(address: str) -> str:
    """"[::]:0" -> "127.0.0.1:0"; an address with a host of its own stays."""
    host, _, port = address.rpartition(":")
    return f"127.0.0.1:{port}" if host in EVERY_INTERFACE else address


def setup() -> None:
    from ray.serve._private import replica
    bind = replica.add_port_to_grpc_server
    if getattr(bind, "loopback", False):
        return

    def on_loopback(server, address):
        return bind(server, loopback_address(address))
    on_loopback.loopback = True
    replica.add_port_to_grpc_server = on_loopback
