"""ASGI middleware for the two service limits: request body size and per-request time.

Pure ASGI (not BaseHTTPMiddleware) so it can count body bytes as they arrive and stop a body that
is larger than its Content-Length claimed. Gradio's page (/ui) keeps long-lived event streams
open, so it gets the body limit but not the timeout; StreamLifetimeMiddleware bounds those instead.
"""
import asyncio
import json

from starlette.exceptions import HTTPException

# What every 503 (overloaded, no model yet, a lost replica, over time) tells clients to wait before
# trying again; serve_config.yaml's backpressure_config says the same (tests/test_serving_config.py).
RETRY_AFTER_S = 1
RETRY_AFTER = {"retry-after": str(RETRY_AFTER_S)}  # the header, as the API's 503 answers carry it


class BodyTooLarge(HTTPException):
    """An HTTPException, so FastAPI's body parsing passes it on as a 413 instead of a 400."""

    def __init__(self, limit: int):
        super().__init__(413, f"the request body is over the limit of {limit} bytes")


def json_response(status: int, error: str):
    body = json.dumps({"error": error}).encode()
    retry = [(name.encode(), value.encode()) for name, value in RETRY_AFTER.items()] if status == 503 else []
    return [
        {"type": "http.response.start", "status": status,
         "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *retry]},
        {"type": "http.response.body", "body": body},
    ]


class LimitsMiddleware:
    def __init__(self, app, max_body_bytes: int, timeout_s: float, untimed_prefixes=("/ui",)):
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.timeout_s = timeout_s
        self.untimed_prefixes = untimed_prefixes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        too_large = BodyTooLarge(self.max_body_bytes).detail
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body_bytes:
            return await self._send_all(send, json_response(413, too_large))

        received = 0
        started = False

        async def counting_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body_bytes:
                    raise BodyTooLarge(self.max_body_bytes)
            return message

        async def tracking_send(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        path = scope.get("path", "")
        timed = not any(path == p or path.startswith(p + "/") for p in self.untimed_prefixes)
        call = self.app(scope, counting_receive, tracking_send)
        try:
            await (asyncio.wait_for(call, self.timeout_s) if timed else call)
        except BodyTooLarge:
            if not started:
                await self._send_all(send, json_response(413, too_large))
        except asyncio.TimeoutError:
            if not started:
                await self._send_all(send, json_response(
                    503, f"the request took longer than the {self.timeout_s:g} s limit; try again"))

    @staticmethod
    async def _send_all(send, messages):
        for message in messages:
            await send(message)


class StreamLifetimeMiddleware:
    """Ends any `text/event-stream` response `max_lifetime_s` after its request arrived (one that
    begins later, as soon as it begins), so that idle streams cannot hold every
    `max_ongoing_requests` slot of a replica; the inner app is cancelled as on a client's
    disconnect. `farewell` is sent last (e.g. messages that tell the client the stream is over).
    Every other response passes untouched, however long it takes."""

    def __init__(self, app, max_lifetime_s: float, farewell: bytes = b""):
        self.app, self.max_lifetime_s, self.farewell = app, max_lifetime_s, farewell

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        streaming, ended, cut, started = False, False, False, asyncio.Event()

        async def watched_send(message):
            nonlocal streaming, ended
            if cut:  # what the app says while it is being cancelled: the farewell is last
                return
            if message["type"] == "http.response.start":
                streaming = any(name.lower() == b"content-type" and value.startswith(b"text/event-stream")
                                for name, value in message.get("headers", []))
            elif message["type"] == "http.response.body":
                ended = not message.get("more_body", False)
            await send(message)
            started.set()

        task = asyncio.ensure_future(self.app(scope, receive, watched_send))
        try:
            await asyncio.wait({task}, timeout=self.max_lifetime_s)
            if not task.done() and not started.is_set():  # a slow start (a loaded replica) escapes nothing:
                start = asyncio.ensure_future(started.wait())  # a stream that begins past the bound ends at once
                try:
                    await asyncio.wait({task, start}, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    start.cancel()
            if task.done() or not streaming or ended:  # ended: only background tasks left to run
                return await task
            cut = True
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass
            await send({"type": "http.response.body", "body": self.farewell, "more_body": False})
        finally:
            task.cancel()  # our own caller cancelled us (client gone): take the inner app with us
