"""`python -m ray_cluster down` stops everything its head started, also processes that left the
head's process group (HAProxy under Serve's HAProxy ingress did, and kept port 8000)."""
import os
import subprocess
import sys
from pathlib import Path

from ray_cluster import local
from tests.waiting import wait_for

# A stand-in head: a session leader whose child moves to a process group of its own.
HEAD = """
import subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", "import os, time; os.setpgid(0, 0); time.sleep(300)"])
print(child.pid, flush=True)
time.sleep(300)
"""


def running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_down_stops_processes_that_left_the_heads_process_group(tmp_path, monkeypatch):
    monkeypatch.setattr(local, "PID_FILE", tmp_path / "head.pid")
    head = subprocess.Popen([sys.executable, "-c", HEAD], stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        child = int(head.stdout.readline())
        local.PID_FILE.write_text(str(head.pid))
        wait_for(lambda: os.getpgid(child) == child, 10, "the child's own process group")
        assert local.down(timeout=10)
        head.wait(10)
        wait_for(lambda: not running(child), 10, "the child to stop")
        assert not local.PID_FILE.exists()
    finally:
        head.kill()


def test_the_head_gives_jobs_an_absolute_storage_root(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MNIST_STORAGE", raising=False)
    assert local.head_env()["MNIST_STORAGE"] == str(tmp_path.resolve() / "storage")
    monkeypatch.setenv("MNIST_STORAGE", "elsewhere")
    assert local.head_env()["MNIST_STORAGE"] == str(tmp_path.resolve() / "elsewhere")
    assert local.head_env(haproxy=True).items() >= local.HAPROXY_ENV.items()
    assert not local.head_env().keys() & local.HAPROXY_ENV.keys()
