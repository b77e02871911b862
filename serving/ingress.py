"""Serve's Python proxy, made to survive an ingress replica that dies mid-request.

When an ingress replica (MnistApi) dies while it holds a request, Serve's proxy (Ray 2.60,
`proxy.py` / `http_util.get_http_response_status`) ends the request with no response at all, and
uvicorn answers a plain-text `500 Internal Server Error`. Serve lets a proxy carry Starlette
middlewares from an import path (`RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH`, read by
`configure_http_middlewares`); `proxy_middlewares` below is that callback. Its middleware keeps
the body of a request that is safe to repeat and, when the proxy ended it without starting a
response, sends it again: the proxy's router has meanwhile marked the dead replica and picks a
live one, once: a request that loses a second replica is answered with a retryable 503 with
`Retry-After` (never a 500), logged as suspect, and not resent again, so that one poison request
cannot take down the replicas in turn (each layer retries at most once: docs/RELIABILITY.md).
The body kept for that is bounded: one over MAX_REPLAY_BYTES (declared, or counted as a chunked
body arrives) passes through without a retry.

Only the proxy carries it: replicas behind HAProxy read the same variable for their own HTTP
server, where a retry would only repeat the request in the same replica.

It imports nothing of this project but serving.limits (starlette alone): the proxy imports it at
its start, and an import error there would take the whole HTTP ingress down.
"""
import asyncio
import logging
import re

from serving.limits import RETRY_AFTER_S, json_response

SAFE_METHODS = {"GET", "HEAD", "OPTIONS"}
# POSTs that are pure functions of their body (the API's inference routes), under any route prefix.
PURE_POSTS = re.compile(r"/(predict|v2/models/[^/]+(/versions/[^/]+)?/infer)$")
ATTEMPTS = 2            # the first try and one more: a replica lost by chance is rare twice in a row
BACKOFF_S = (0.1,)      # before the second try: the router learns of the death meanwhile
MAX_REPLAY_BYTES = 4 * 1024 * 1024 + 65536  # the API's 4 MiB limit and a form's overhead; larger passes through
log = logging.getLogger("ray.serve")


def is_repeatable(scope: dict) -> bool:
    method = scope.get("method", "")
    return method in SAFE_METHODS or (method == "POST" and bool(PURE_POSTS.search(scope.get("path", ""))))


def _declared_length(scope: dict) -> int | None:
    for name, value in scope.get("headers", []):
        if name.lower() == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


async def _read_body(receive) -> tuple[bytes, bool] | None:
    """(the body, complete): the whole body, or its first MAX_REPLAY_BYTES and a bit once it
    passes that (the rest is still to receive); None if the client left before sending it."""
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunks.append(message.get("body", b""))
        size += len(chunks[-1])
        if not message.get("more_body", False):
            return b"".join(chunks), True
        if size > MAX_REPLAY_BYTES:
            return b"".join(chunks), False


def _prepend(body: bytes, receive):
    """`receive` that first hands back the part of the body already read."""
    pending = [{"type": "http.request", "body": body, "more_body": True}]

    async def receive_rest():
        return pending.pop() if pending else await receive()
    return receive_rest


class RetryLostIngressReplica:
    """Pure ASGI middleware: resend a repeatable request the proxy ended with no response."""

    def __init__(self, app, attempts: int = ATTEMPTS):
        self.app, self.attempts = app, attempts

    async def __call__(self, scope, receive, send):
        length = _declared_length(scope)
        if (scope["type"] != "http" or not is_repeatable(scope)
                or (length is not None and length > MAX_REPLAY_BYTES)):
            return await self.app(scope, receive, send)
        read = await _read_body(receive)
        if read is None:
            return
        body, complete = read
        if not complete:  # a chunked body over the replay limit: passed on as it comes, not kept
            return await self.app(scope, _prepend(body, receive), send)
        for attempt in range(self.attempts):
            if attempt:
                await asyncio.sleep(BACKOFF_S[min(attempt - 1, len(BACKOFF_S) - 1)])
            if await self._attempt(scope, body, receive, send):
                return
        log.warning("suspect request: %s %s lost %d ingress replicas; answered 503, not resent",
                    scope.get("method"), scope.get("path", "")[:200], self.attempts)
        await _unavailable(send)

    async def _attempt(self, scope, body: bytes, receive, send) -> bool:
        """True once a response has started (then it is the client's, whatever it says)."""
        started = False
        delivered = False

        async def replay():
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: wait for the client's disconnect, as the proxy does

        async def watch(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        # A copy per attempt: the proxy and Serve's request-id middleware add to scope and headers.
        fresh = {**scope, "headers": list(scope.get("headers", []))}
        try:
            await self.app(fresh, replay, watch)
        except Exception:
            if started:
                raise
        return started


async def _unavailable(send) -> None:
    for message in json_response(503, "the service lost the replica that held this request; "
                                      f"try again in {RETRY_AFTER_S} s"):
        await send(message)


def _in_serve_proxy() -> bool:
    try:
        import ray
        return (ray.get_runtime_context().get_actor_name() or "").startswith("SERVE_PROXY_ACTOR")
    except Exception:
        return False


def proxy_middlewares() -> list:
    """RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH=serving.ingress:proxy_middlewares"""
    from starlette.middleware import Middleware
    return [Middleware(RetryLostIngressReplica)] if _in_serve_proxy() else []
