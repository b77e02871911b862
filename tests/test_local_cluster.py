"""`python -m ray_cluster down` stops everything its head started, also processes that left the
head's process group (HAProxy under Serve's HAProxy ingress did, and kept port 8000)."""
import json
import os
import stat
import subprocess
import sys

import psutil
import pytest

from ray_cluster import local
from training.storage import private_dir
from tests.helpers import wait_for

# A stand-in head: a session leader whose child moves to a process group of its own.
HEAD = """
import subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", "import os, time; os.setpgid(0, 0); time.sleep(300)"])
print(child.pid, flush=True)
time.sleep(300)
"""


def running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_down_stops_processes_that_left_the_heads_process_group(tmp_path, monkeypatch):
    monkeypatch.setattr(local, "PID_FILE", tmp_path / "head.pid")
    head = subprocess.Popen([sys.executable, "-c", HEAD], stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        child = int(head.stdout.readline())
        local._save_head_pid(head.pid)
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


def test_down_leaves_a_reused_pid_alone(tmp_path, monkeypatch):
    """The pid file names a live process that is not the head it recorded (the pid was reused):
    `down` must not signal it."""
    monkeypatch.setattr(local, "PID_FILE", tmp_path / "head.pid")
    monkeypatch.setattr(local, "is_up", lambda timeout=2.0: False)
    stranger = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"], start_new_session=True)
    try:
        started = local._start_time(stranger.pid)
        local.PID_FILE.write_text(json.dumps({"pid": stranger.pid, "started": started - 100}))
        assert local._head_pid() is None and not local.down(timeout=2)
        assert stranger.poll() is None and running(stranger.pid)
        local.PID_FILE.write_text(str(stranger.pid))  # the old format, without a start time: not ours either
        assert not local.down(timeout=2) and stranger.poll() is None
    finally:
        stranger.kill()
        stranger.wait(10)


def test_the_state_dir_is_private_to_the_user(tmp_path, monkeypatch):
    monkeypatch.delenv("MNIST_RAY_STATE", raising=False)
    assert str(os.getuid()) in str(local.STATE_DIR) or os.environ.get("XDG_RUNTIME_DIR")
    folder = private_dir(tmp_path / "state")
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    (tmp_path / "loose").mkdir(mode=0o777)
    os.chmod(tmp_path / "loose", 0o777)
    assert stat.S_IMODE(private_dir(tmp_path / "loose").stat().st_mode) == 0o700  # tightened
    (tmp_path / "link").symlink_to(tmp_path / "state")
    with pytest.raises(PermissionError):  # someone else's symlink in /tmp would redirect our files
        private_dir(tmp_path / "link")
