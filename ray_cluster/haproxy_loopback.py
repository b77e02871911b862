#!/usr/bin/env python3
"""HAProxy for Serve on a workstation: every listener on 127.0.0.1, the admin socket the user's own.

Ray 2.60 renders its HAProxy config from a fixed template (ray/serve/_private/haproxy_templates.py)
that binds the stats page (`bind *:8404`) and the Prometheus exporter (`bind :9101`) on every
interface, with no setting for their host, and makes the admin socket (level admin) mode 666. It
runs HAProxy from RAY_SERVE_HAPROXY_BINARY_PATH, so the local cluster points that at this file:
it rewrites the config Ray just wrote (the port stays, the host becomes 127.0.0.1; the socket
0600), then execs the real binary, MNIST_HAPROXY_BINARY, with the same arguments. Ray sees HAProxy
itself: the same pid, the same reloads (-sf, -x over the admin socket).

It also adds `option http-buffer-request`. Ray's `retry-on` (RAY_SERVE_HAPROXY_RETRY_ON) can replay a
request only if HAProxy held all of it when it first sent it (HAProxy drops the L7 retry of a request
still arriving); without the option HAProxy forwards a body as it arrives, so a replica that died
holding such a request gave a 502, turned into a plain-text 500 by Ray's errorfile
(docs/RELIABILITY.md).
Standard library only: it runs before any virtualenv is known.
"""
import os
import re
import sys

REAL_BINARY_ENV = "MNIST_HAPROXY_BINARY"
LOOPBACK = "127.0.0.1"
# `bind :PORT` and `bind *:PORT` (every interface); `bind 0.0.0.0:PORT`, `bind [::]:PORT` too
EVERY_INTERFACE = re.compile(r"^(\s*bind\s+)(?:\*|0\.0\.0\.0|\[::\]|::)?:(\d+)", re.MULTILINE)
SOCKET_MODE = re.compile(r"^(\s*stats socket\s+\S+\s+mode\s+)\d+", re.MULTILINE)
DEFAULTS = re.compile(r"^defaults\b.*$", re.MULTILINE)
BUFFER_REQUEST = "    option http-buffer-request"


def loopback(config: str) -> str:
    """The config with every listener on 127.0.0.1 and the admin socket private to the user."""
    config = EVERY_INTERFACE.sub(rf"\g<1>{LOOPBACK}:\g<2>", config)
    return SOCKET_MODE.sub(r"\g<1>600", config)


def buffer_requests(config: str) -> str:
    """The config with `option http-buffer-request` in its defaults: a request reaches a replica
    whole, so HAProxy can resend it to another if that replica dies before answering."""
    if BUFFER_REQUEST.strip() in config:
        return config
    return DEFAULTS.sub(lambda match: f"{match.group(0)}\n{BUFFER_REQUEST}", config, count=1)


def config_path(args: list[str]) -> str:
    """The file after `-f` (Ray passes exactly one)."""
    try:
        return args[args.index("-f") + 1]
    except (ValueError, IndexError):
        raise SystemExit(f"haproxy_loopback: no -f CONFIG in {args}") from None


def rewrite(path: str) -> None:
    """Rewrite the config in place, through a temporary file and a rename."""
    with open(path) as file:
        text = file.read()
    fixed = buffer_requests(loopback(text))
    if fixed != text:
        partial = f"{path}.{os.getpid()}.loopback"
        with open(partial, "w") as file:
            file.write(fixed)
        os.replace(partial, path)


def main() -> None:
    real = os.environ.get(REAL_BINARY_ENV)
    if not real or not os.access(real, os.X_OK):
        raise SystemExit(f"haproxy_loopback: {REAL_BINARY_ENV}={real!r} is not an executable HAProxy")
    args = sys.argv[1:]
    rewrite(config_path(args))
    os.execv(real, [real, *args])


if __name__ == "__main__":
    main()
