"""The cost oracle: what handling one request costs the server, in CPU time and peak memory,
measured in a process of its own so that nothing else the test process did counts.

    cost = measure(function, *args)   # Cost(cpu_s, peak_bytes, outcome, error)

The process is a fork of the caller, made after the payload exists: the payload's own bytes are
not counted, everything the function allocates is (Python, numpy, Pillow's and libjpeg's C
buffers alike: the peak resident set, reset at the start with /proc/self/clear_refs). CPU time is
the process's, all threads included. `outcome` is "served" when the function returned, "refused"
when it raised one of the `refusals` (a 4xx in the service), "error" for anything else (a 5xx).
"""
import json
import os
import resource
import signal
import traceback
from dataclasses import dataclass

MB = 1024 * 1024


@dataclass
class Cost:
    cpu_s: float
    peak_bytes: int
    outcome: str       # served | refused | error | killed
    error: str = ""

    def __str__(self):
        return (f"{self.outcome}: {self.cpu_s * 1000:.1f} ms CPU, {self.peak_bytes / MB:.1f} MB peak"
                + (f" ({self.error[:200]})" if self.error else ""))


def _rss_kb(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def _cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _run_child(function, args, refusals, write_end: int) -> None:
    try:
        with open("/proc/self/clear_refs", "w") as clear:
            clear.write("5")  # the peak resident set starts again from here
    except OSError:
        pass
    before_kb, started = _rss_kb("VmRSS"), _cpu_s()
    outcome, error = "served", ""
    try:
        function(*args)
    except refusals as refused:
        outcome, error = "refused", str(refused)
    except BaseException:
        outcome, error = "error", traceback.format_exc()
    cpu = _cpu_s() - started
    peak = max(0, _rss_kb("VmHWM") - before_kb) * 1024
    os.write(write_end, json.dumps({"cpu_s": cpu, "peak_bytes": peak, "outcome": outcome, "error": error}).encode())


def measure(function, *args, refusals: tuple = (ValueError,), timeout_s: float = 60) -> Cost:
    """Run `function(*args)` once in a forked child and return what it cost."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: measure, report, leave without running the parent's cleanup
        os.close(read_end)
        try:
            signal.alarm(int(timeout_s))
            _run_child(function, args, refusals, write_end)
        finally:
            os._exit(0)
    os.close(write_end)
    chunks = []
    while chunk := os.read(read_end, 65536):
        chunks.append(chunk)
    os.close(read_end)
    _, status = os.waitpid(pid, 0)
    if not chunks:
        return Cost(float(timeout_s), 0, "killed", f"wait status {status}")
    return Cost(**json.loads(b"".join(chunks)))
