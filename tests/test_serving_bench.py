"""Smoke test: the serving benchmark still runs end to end (tiny load; the figures are not checked)."""
import json

import pytest

from bench import bench_serving

pytestmark = pytest.mark.ray


def test_bench_serving_runs(serve_app, mnist_storage, tmp_path):
    bench_serving.main(["--storage", str(serve_app.storage), "--mnist-storage", str(mnist_storage),
                        "--serve-url", serve_app.url, "--serve-app", serve_app.name,
                        "--clients", "1,2", "--requests", "20,20", "--time-limit", "20",
                        "--plain-port", "8018", "--out", str(tmp_path)])
    report = json.loads((tmp_path / "serving.json").read_text())
    for server in ("plain", "serve"):
        assert [r["ok"] for r in report["results"][server].values()] == [20, 20]
    assert set(report["ratios"]) == {"1", "2"} and set(report["ratios"]["1"]) == {"serve"}
    assert (tmp_path / "serving.png").stat().st_size > 0 and "throughput / plain" in (tmp_path / "serving.md").read_text()


def test_bench_serving_oip_runs(serve_app, mnist_storage, tmp_path):
    """--oip: JSON and binary tensors side by side, added to an existing report (kept)."""
    (tmp_path / "serving.json").write_text(json.dumps({"kept": True}))
    bench_serving.main(["--oip", "--storage", str(serve_app.storage), "--mnist-storage", str(mnist_storage),
                        "--serve-url", serve_app.url, "--oip-clients", "1", "--oip-requests", "4",
                        "--oip-batch", "32", "--time-limit", "20", "--out", str(tmp_path)])
    report = json.loads((tmp_path / "serving.json").read_text())
    assert report["kept"] and [r["form"] for r in report["oip"]["rows"]] == list(bench_serving.OIP_FORMS)
    assert all(r["ok"] == 4 and r["server_parse_ms"] > 0 for r in report["oip"]["rows"])
    assert "binary UINT8" in (tmp_path / "serving.md").read_text()


def test_bench_serving_fold_times_the_served_model_folded_and_unfolded(tmp_path):
    """--fold's measurement (no Ray): the served version's predict, folded and unfolded, per batch size."""
    from training.model import Net
    from tests.helpers import publish_model
    from training.versions import promote_version

    publish_model(tmp_path, "v1", Net().state_dict(), {"version": "v1", "architecture": Net.architecture})
    promote_version(tmp_path, "v1")
    report = bench_serving.fold_ab(tmp_path, sizes=(1, 8), rounds=2, images_per_sample=16)
    assert report["version"] == "v1" and list(report["rows"]) == ["1", "8"]
    assert all(row["folded"] > 0 and row["unfolded"] > 0 for row in report["rows"].values())
    assert "| 8 |" in bench_serving.fold_markdown(report)


def test_loadgen_opens_a_new_connection_after_connection_close():
    """A server that answers every request with `Connection: close` and closes (uvicorn after a
    500, HAProxy while a process is replaced): no request of the load fails for it."""
    import asyncio

    from bench.loadgen import run_load

    async def scenario():
        connections = 0

        async def answer_once(reader, writer):
            nonlocal connections
            connections += 1
            head = await reader.readuntil(b"\r\n\r\n")
            length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length"))
            await reader.readexactly(length)
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
            await writer.drain()
            writer.close()

        server = await asyncio.start_server(answer_once, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        async with server:
            result = await run_load(f"http://127.0.0.1:{port}/predict", [b"{}"], clients=2, requests=10, time_limit_s=20)
        return result, connections

    result, connections = asyncio.run(scenario())
    assert (result.ok, result.errors, connections) == (10, {}, 10)
