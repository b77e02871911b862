"""Issue 11's attacks against the real Serve deployment (127.0.0.1, bounded in count and time):
decompression bombs through /predict and the Gradio page are refused for milliseconds of server
CPU; a flood of bombs beside ordinary clients leaves those served; an overloaded deployment
sheds load with 503 + Retry-After, never a 500."""
import base64
import copy
import json
import threading
import time
from collections import Counter

import httpx
import numpy as np
import psutil
import pytest
from gradio_client import Client, handle_file

from serving import deploy
from bench.drawings import encode, redraw
from serving.schemas import MAX_IMAGES, MAX_TENSOR_IMAGES
from tests.bombs import bomb_png
from tests.helpers import running_replicas

pytestmark = pytest.mark.ray

BOMBS = {"palette-4096": (4096, "palette"), "1bit-4096": (4096, "1bit"), "1bit-13000": (13000, "1bit")}
REFUSAL_CPU_MS = 25  # header checks only; decoding these cost 45 ms (2048^2) to 7 s (13000^2) of CPU
FLOOD_S = 12


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@pytest.fixture(scope="module")
def bombs() -> dict[str, bytes]:
    made = {name: bomb_png(side, kind) for name, (side, kind) in BOMBS.items()}
    made["at-budget"] = bomb_png(2048, "palette")  # exactly the per-image limit: accepted, the costliest
    return made


@pytest.fixture(scope="module")
def canvases(test_digits) -> list[str]:
    """Drawings as a phone's 280x280 canvas exports them."""
    rng = np.random.default_rng(11)
    return [b64(encode(redraw(test_digits[0][i], "black_on_white", rng).resize((280, 280)), "black_on_white"))
            for i in range(8)]


def cpu_ms(response) -> float:
    """The `cpu` entry of the Server-Timing header: CPU the replica spent on the request's images."""
    timings = dict(part.strip().split(";dur=") for part in response.headers["server-timing"].split(","))
    return float(timings["cpu"])


# ---------------------------------------------------------------- bombs through /predict

@pytest.mark.parametrize("name", BOMBS)
def test_a_bomb_is_refused_before_decoding(client, bombs, name):
    response = client.post("/predict", json={"image": b64(bombs[name])})
    assert response.status_code == 422, response.text
    assert "over the limit of 4194304 pixels" in response.json()["error"]
    assert cpu_ms(response) < REFUSAL_CPU_MS


def test_a_batch_of_bombs_is_refused_at_the_first_header(client, bombs):
    response = client.post("/predict", json={"images": [b64(bombs["1bit-4096"])] * MAX_IMAGES})
    assert response.status_code == 422 and response.json()["error"].startswith("images[0]: ")
    assert cpu_ms(response) < REFUSAL_CPU_MS


def test_a_batch_over_the_request_budget_gets_413_naming_it(client, bombs):
    response = client.post("/predict", json={"images": [b64(bombs["at-budget"])] * 5})
    assert response.status_code == 413 and "decoded pixels per request" in response.json()["error"]
    assert cpu_ms(response) < REFUSAL_CPU_MS


def test_the_largest_requests_the_contract_allows_are_answered(client, bombs, canvases, test_digits):
    four = client.post("/predict", json={"images": [b64(bombs["at-budget"])] * 4})  # the request budget
    assert four.status_code == 200 and len(four.json()["predictions"]) == 4
    batch = client.post("/predict", json={"images": (canvases * 8)[:MAX_IMAGES]})  # 64 phone canvases
    assert batch.status_code == 200 and len(batch.json()["predictions"]) == MAX_IMAGES
    tensor = {"name": "input", "datatype": "FP32", "shape": [MAX_IMAGES, 784],
              "data": (test_digits[0][:MAX_IMAGES].reshape(-1) / 255.0).tolist()}
    assert client.post("/v2/models/mnist/infer", json={"inputs": [tensor]}).status_code == 200
    # a v2 tensor is 28x28 already (nothing to decode): it has its own, larger limit
    tensor = {**tensor, "datatype": "UINT8", "shape": [MAX_TENSOR_IMAGES + 1, 784],
              "data": test_digits[0][:MAX_TENSOR_IMAGES + 1].reshape(-1).tolist()}
    too_many = client.post("/v2/models/mnist/infer", json={"inputs": [tensor]})
    assert too_many.status_code == 400 and f"1..{MAX_TENSOR_IMAGES}" in too_many.json()["error"]


# ---------------------------------------------------------------- bombs through the Gradio page

def process_cpu_s(pid: int) -> float:
    times = psutil.Process(pid).cpu_times()
    return times.user + times.system


def ui_replica_pid(serve_app) -> int:
    return running_replicas(f"{serve_app.name}-ui")["MnistUI"][0]["pid"]


def test_the_page_refuses_bombs_for_milliseconds_of_cpu(serve_app, bombs, tmp_path):
    ui = Client(serve_app.ui_url, verbose=False, download_files=str(tmp_path / "downloads"))
    paths = {}
    for name in BOMBS:
        paths[name] = tmp_path / f"{name}.png"
        paths[name].write_bytes(bombs[name])
    pid = ui_replica_pid(serve_app)
    before = process_cpu_s(pid)
    for name, path in paths.items():
        with pytest.raises(Exception, match="over the limit of 4194304 pixels"):
            ui.predict({"background": handle_file(str(path)), "layers": [], "composite": handle_file(str(path))},
                       api_name="/predict")
    spent = process_cpu_s(pid) - before
    # The whole replica's CPU (Gradio's upload, queue and event stream included): decoding the
    # 13000x13000 bomb alone costs seconds.
    assert spent / len(paths) < 0.3, f"{spent:.2f} s of CPU for {len(paths)} refusals"


# ---------------------------------------------------------------- a flood

def hammer(url: str, bodies: list[bytes], until: float, seen: Counter, bad: list) -> None:
    """Send `bodies` in turn until `until`; count statuses; keep any answer that breaks the rules."""
    with httpx.Client(timeout=30) as http:
        i = 0
        while time.monotonic() < until:
            response = http.post(url, content=bodies[i % len(bodies)], headers={"content-type": "application/json"})
            i += 1
            seen[response.status_code] += 1
            if response.status_code >= 500 and not (response.status_code == 503 and "retry-after" in response.headers):
                bad.append((response.status_code, response.text[:200]))


def test_a_flood_of_bombs_leaves_ordinary_clients_served(serve_app, bombs, canvases):
    attacks = [json.dumps(body).encode() for body in (
        {"image": b64(bombs["palette-4096"])},
        {"images": [b64(bombs["1bit-4096"])] * MAX_IMAGES},
        {"images": [b64(bombs["at-budget"])] * 5},          # over the request budget
        {"images": [b64(bombs["at-budget"])] * 4},          # at it: accepted, the costliest allowed
        {"images": ["aaaa"] * (MAX_IMAGES + 1)},
    )]
    ordinary = [json.dumps({"image": canvas}).encode() for canvas in canvases]
    until = time.monotonic() + FLOOD_S
    attacked, served, health, bad = Counter(), Counter(), Counter(), []
    url = f"{serve_app.url}/predict"
    threads = [threading.Thread(target=hammer, args=(url, attacks[i:] + attacks[:i], until, attacked, bad))
               for i in range(3)]
    threads += [threading.Thread(target=hammer, args=(url, ordinary, until, served, bad)) for _ in range(3)]

    def poll_health():
        with httpx.Client(timeout=5) as http:
            while time.monotonic() < until:
                try:
                    health[http.get(f"{serve_app.url}/healthz").status_code] += 1
                except httpx.TimeoutException:
                    health["timeout"] += 1
                time.sleep(0.2)

    threads.append(threading.Thread(target=poll_health))
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(FLOOD_S + 60)
    total = sum(served.values())
    print(f"\nflood {FLOOD_S} s: ordinary {dict(served)}, attacks {dict(attacked)}, /healthz {dict(health)}")
    assert not bad, bad[:5]
    assert total > 0 and served[200] / total >= 0.99 and set(served) <= {200, 503}
    assert set(attacked) <= {200, 413, 422, 503} and attacked[422] + attacked[413] > 0
    assert set(health) == {200}


# ---------------------------------------------------------------- load shedding, for real

def test_an_overloaded_deployment_answers_503_with_retry_after(serve_app, canvases):
    """MnistApi squeezed to 1 ongoing + 1 queued request per caller (a lightweight config update,
    no restart): a burst of 12 concurrent clients gets 200s and 503s with Retry-After, no 500."""
    squeezed = copy.deepcopy(serve_app.config)
    api = next(d for d in squeezed["applications"][0]["deployments"] if d["name"] == "MnistApi")
    api.update(max_ongoing_requests=1, max_queued_requests=1)
    deploy.deploy(squeezed, timeout=120)
    try:
        body = json.dumps({"images": canvases * 4}).encode()  # 32 images: each request takes a while
        seen, bad = Counter(), []
        until = time.monotonic() + 4
        threads = [threading.Thread(target=hammer, args=(f"{serve_app.url}/predict", [body], until, seen, bad))
                   for _ in range(12)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        print(f"\noverload: {dict(seen)}")
        assert not bad, bad[:5]
        assert seen[200] > 0 and seen[503] > 0 and set(seen) <= {200, 503}
    finally:
        deploy.deploy(serve_app.config, timeout=120)
