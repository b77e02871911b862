"""A bounded HTTP/1.1 load generator for 127.0.0.1: N keep-alive clients, a fixed number of
requests and a time limit. Raw asyncio streams, so the client costs little of the CPU it shares
with the servers it measures (httpx would cost several times more per request).
"""
import asyncio
import time
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import numpy as np


@dataclass
class LoadResult:
    clients: int
    latencies_s: list[float] = field(default_factory=list)
    statuses: dict[int, int] = field(default_factory=dict)
    errors: dict[str, int] = field(default_factory=dict)
    wall_s: float = 0.0

    @property
    def ok(self) -> int:
        return self.statuses.get(200, 0)

    @property
    def total(self) -> int:
        return sum(self.statuses.values()) + sum(self.errors.values())

    def summary(self) -> dict:
        lat = np.array(self.latencies_s) * 1000 if self.latencies_s else np.array([np.nan])
        return {"clients": self.clients, "requests": self.total, "ok": self.ok,
                "success_rate": self.ok / self.total if self.total else 0.0,
                "statuses": {str(k): v for k, v in sorted(self.statuses.items())}, "errors": self.errors,
                "wall_s": round(self.wall_s, 3),
                "throughput_rps": round(self.ok / self.wall_s, 1) if self.wall_s else 0.0,
                "p50_ms": round(float(np.percentile(lat, 50)), 2), "p95_ms": round(float(np.percentile(lat, 95)), 2),
                "p99_ms": round(float(np.percentile(lat, 99)), 2), "mean_ms": round(float(lat.mean()), 2)}


def build_request(url: str, body: bytes, headers: dict | None = None) -> tuple[str, int, bytes]:
    """`headers` replace the default `Content-Type: application/json` (e.g. a binary OIP body's)."""
    parts = urlsplit(url)
    if parts.hostname not in ("127.0.0.1", "localhost"):
        raise ValueError(f"the load generator only targets 127.0.0.1, not {parts.hostname}")
    extra = "".join(f"{name}: {value}\r\n" for name, value in (headers or {"Content-Type": "application/json"}).items())
    head = (f"POST {parts.path or '/'} HTTP/1.1\r\nHost: {parts.netloc}\r\n"
            f"{extra}Content-Length: {len(body)}\r\n\r\n")
    return "127.0.0.1", parts.port or 80, head.encode() + body


async def read_response(reader: asyncio.StreamReader) -> tuple[int, bytes, bool]:
    """(status, body, whether the connection stays open): after `Connection: close` (uvicorn's
    after a 500, HAProxy's from a process being replaced) the server closes it."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:] if line)}
    keep_alive = "close" not in headers.get("connection", "").lower()
    if "content-length" in headers:
        return status, await reader.readexactly(int(headers["content-length"])), keep_alive
    if headers.get("transfer-encoding", "").lower() == "chunked":
        chunks = []
        while True:
            size = int((await reader.readuntil(b"\r\n")).strip().split(b";")[0], 16)
            chunk = await reader.readexactly(size + 2)
            if size == 0:
                return status, b"".join(chunks), keep_alive
            chunks.append(chunk[:-2])
    return status, await reader.read(), False  # the body ends where the connection does


async def _client(host, port, payloads, budget, deadline, result: LoadResult, check) -> None:
    conn = None
    while budget() and time.monotonic() < deadline:
        payload = payloads[result.total % len(payloads)]
        start = time.perf_counter()
        try:
            if conn is None:
                conn = await asyncio.open_connection(host, port)
            conn[1].write(payload)
            status, body, keep_alive = await read_response(conn[0])
            if not keep_alive:  # the next request goes on a new connection, as a real client's would
                conn[1].close()
                conn = None
        except (OSError, asyncio.IncompleteReadError, ValueError) as error:
            result.errors[type(error).__name__] = result.errors.get(type(error).__name__, 0) + 1
            if conn:
                conn[1].close()
            conn = None
            await asyncio.sleep(0.01)
            continue
        elapsed = time.perf_counter() - start
        if status == 200 and check and not check(body):
            status = -1  # a 200 with a wrong answer is a failure too
        result.statuses[status] = result.statuses.get(status, 0) + 1
        if status == 200:
            result.latencies_s.append(elapsed)
    if conn:
        conn[1].close()


async def run_load(url: str, bodies: list[bytes | tuple[bytes, dict]], clients: int, requests: int, time_limit_s: float,
                   check=None) -> LoadResult:
    """`clients` concurrent keep-alive connections send `requests` POSTs in all (or stop at the limit)."""
    built = [build_request(url, *body) if isinstance(body, tuple) else build_request(url, body) for body in bodies]
    host, port = built[0][0], built[0][1]
    payloads = [b for _, _, b in built]
    result = LoadResult(clients)
    issued = 0

    def budget() -> bool:
        nonlocal issued
        issued += 1
        return issued <= requests

    start = time.perf_counter()
    deadline = time.monotonic() + time_limit_s
    await asyncio.gather(*[_client(host, port, payloads, budget, deadline, result, check) for _ in range(clients)])
    result.wall_s = time.perf_counter() - start
    return result


def load(url: str, bodies: list[bytes], clients: int, requests: int, time_limit_s: float, check=None) -> LoadResult:
    return asyncio.run(run_load(url, bodies, clients, requests, time_limit_s, check))
