"""Promotion: a finished run publishes a version; `latest` moves only by the policy or the CLI.

Unit tests work on real files in a temporary storage root; the last test moves `latest` under a
live Ray Serve deployment (the job-level check is in tests/test_train_job.py)."""
import contextlib
import io
import json
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
import torch

from bench.loadgen import load
from training import train, versions
from training.versions import TOLERANCE, decide, publish_run
from tests.helpers import publish_model, wait_for, wait_on_every_replica
from training.storage import history_path, models_dir, run_dir
from training.versions import (PromotionError, promote_version, publish_version, read_history, read_latest,
                               rollback_version)

ROOT = Path(__file__).resolve().parents[1]
WEIGHTS = {"w": torch.zeros(4)}  # the promotion code never looks inside model.pt


def meta(version: str, accuracy: float, subset: int | None = None, created: str = "2026-01-01T00:00:00+00:00") -> dict:
    return {"version": version, "run_id": version, "test_accuracy": accuracy, "subset": subset, "created_at": created}


def cli(storage: Path | None, *args: str) -> subprocess.CompletedProcess:
    """`python -m training.versions [--storage STORAGE] ARGS`, run in this process: its exit code and output."""
    argv = (["--storage", str(storage)] if storage is not None else []) + list(args)
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = versions.main(argv)
        except SystemExit as error:  # argparse's errors
            code = error.code
    return subprocess.CompletedProcess(["training.versions", *argv], code, out.getvalue(), err.getvalue())


@pytest.fixture
def storage(tmp_path) -> Path:
    """A root where `serving-v` (99.34%, full data) was published and serves."""
    publish_model(tmp_path, "serving-v", WEIGHTS, meta("serving-v", 0.9934))
    return tmp_path


def snapshot(storage: Path) -> dict:
    """Every file under models/ and runs/ with its bytes: to show that nothing moved."""
    return {str(p.relative_to(storage)): p.read_bytes() for p in storage.rglob("*")
            if p.is_file() and p.name != ".promotion.lock"}


# ---------------------------------------------------------------- the policy, as a pure function

SERVING = ("serving-v", {"test_accuracy": 0.9934, "subset": None})


@pytest.mark.parametrize("run, promote", [
    ({"test_accuracy": 0.9990, "subset": 6000}, False),             # a subset run never replaces a served model
    ({"test_accuracy": 0.9850, "subset": None}, False),             # worse than the tolerance allows
    ({"test_accuracy": 0.9938, "subset": None}, True),              # better
    ({"test_accuracy": 0.9934 - TOLERANCE, "subset": None}, True),  # within the tolerance
])
def test_auto_promotes_only_a_full_run_at_least_as_good(run, promote):
    decision = decide("auto", run, *SERVING)
    assert decision.promote is promote
    if not promote:
        assert decision.summary.startswith("kept serving-v (99.34%) because")


def test_auto_says_why_it_kept_the_serving_version():
    assert "--subset 6000" in decide("auto", {"test_accuracy": 0.999, "subset": 6000}, *SERVING).summary
    assert "98.50% is more than 0.10 points below" in decide("auto", {"test_accuracy": 0.985}, *SERVING).summary


def test_auto_promotes_anything_when_nothing_serves_and_a_full_run_over_an_unreadable_one():
    assert decide("auto", {"test_accuracy": 0.5, "subset": 300}, None, None).promote
    assert decide("auto", {"test_accuracy": 0.5, "subset": None}, "broken", None).promote
    assert not decide("auto", {"test_accuracy": 0.5, "subset": 300}, "broken", None).promote


def test_always_and_never_do_what_they_say():
    worse_subset = {"test_accuracy": 0.5, "subset": 300}
    assert decide("always", worse_subset, *SERVING).promote
    never = decide("never", {"test_accuracy": 0.9999, "subset": None}, *SERVING)
    assert not never.promote and never.summary == "kept serving-v (99.34%) because --promote never"
    with pytest.raises(ValueError, match="unknown promotion policy"):
        decide("sometimes", worse_subset, *SERVING)


def test_the_driver_takes_the_policy_flag():
    assert train.parse_args([]).promote == "auto"
    assert train.parse_args(["--promote", "never"]).promote == "never"
    with pytest.raises(SystemExit):
        train.parse_args(["--promote", "maybe"])


# ---------------------------------------------------------------- a finishing run

def test_a_run_is_published_either_way_and_its_metadata_says_what_happened(storage):
    path, decision = publish_run(storage, "quick", WEIGHTS, meta("quick", 0.8585, subset=6000), "auto")
    assert not decision.promote and read_latest(storage) == "serving-v"
    assert (path / "model.pt").is_file()
    record = json.loads((path / "metadata.json").read_text())["promotion"]
    assert record["promoted"] is False and record["serving_before"] == "serving-v"
    assert record["summary"].startswith("kept serving-v (99.34%) because this run trained on --subset 6000")

    path, decision = publish_run(storage, "better", WEIGHTS, meta("better", 0.9940), "auto")
    assert decision.promote and read_latest(storage) == "better"
    assert json.loads((path / "metadata.json").read_text())["promotion"]["promoted"] is True
    assert [e["version"] for e in read_history(storage)] == ["serving-v", "better"]


def test_a_run_over_a_malformed_history_is_published_but_not_promoted(storage):
    history_path(storage).write_text("{not json")
    path, decision = publish_run(storage, "better", WEIGHTS, meta("better", 0.9990), "always")
    assert not decision.promote and "history.json is not readable JSON" in decision.summary
    assert read_latest(storage) == "serving-v" and (path / "model.pt").is_file()


# ---------------------------------------------------------------- promote and rollback

def test_promote_and_rollback_move_latest_and_keep_a_history(storage):
    for name, accuracy in (("b", 0.95), ("c", 0.99)):
        publish_version(storage, name, WEIGHTS, meta(name, accuracy))
    assert cli(storage, "promote", "b").stdout.strip() == "latest: serving-v -> b"
    assert cli(storage, "promote", "c").returncode == 0 and read_latest(storage) == "c"
    assert cli(storage, "rollback").stdout.strip() == "latest: c -> b (rolled back)"
    assert rollback_version(storage) == ("b", "serving-v")  # a second rollback goes one further back
    history = read_history(storage)
    assert [e["version"] for e in history] == ["serving-v", "b", "c"]
    assert [bool(e.get("rolled_back_at")) for e in history] == [False, True, True]
    result = cli(storage, "rollback")
    assert result.returncode == 2 and "nothing to roll back to" in result.stderr
    assert read_latest(storage) == "serving-v"
    assert not [p for p in models_dir(storage).iterdir() if p.name.startswith(".") and p.suffix == ".tmp"]


def test_rollback_goes_to_a_version_that_was_pointed_at_outside_the_history(storage):
    """`latest` moved by hand (or by code before promotion existed): the next promotion records
    what served, so rollback still returns to it."""
    publish_version(storage, "by-hand", WEIGHTS, meta("by-hand", 0.99))
    publish_version(storage, "next", WEIGHTS, meta("next", 0.99))
    (models_dir(storage) / "latest").write_text("by-hand\n")
    promote_version(storage, "next")
    assert rollback_version(storage) == ("next", "by-hand")


def test_list_shows_versions_which_serves_and_the_rollback_target(storage, monkeypatch):
    publish_version(storage, "quick", WEIGHTS, meta("quick", 0.8585, subset=6000, created="2026-01-02T00:00:00+00:00"))
    publish_version(storage, "newer", WEIGHTS, meta("newer", 0.9941, created="2026-01-03T00:00:00+00:00"))
    promote_version(storage, "newer")
    monkeypatch.setenv("MNIST_STORAGE", str(storage))  # the root from the environment, as in a pod
    listing = cli(None, "list")
    lines = {line[2:].split()[0]: line for line in listing.stdout.splitlines()[1:]}
    assert lines["newer"].startswith("* newer") and "99.41%" in lines["newer"] and lines["newer"].endswith("serving")
    assert "previous (rollback target)" in lines["serving-v"] and "subset 6000" in lines["quick"]
    rows = json.loads(cli(storage, "list", "--json").stdout)["versions"]
    assert [r["version"] for r in rows] == ["serving-v", "quick", "newer"]  # by creation time

    history_path(storage).write_text("garbage")
    listing = cli(storage, "list")
    assert listing.returncode == 0 and "history.json is not readable JSON" in listing.stderr
    assert "* newer" in listing.stdout


# ---------------------------------------------------------------- bad input: a clear error, nothing moves

@pytest.mark.parametrize("damage, args, message", [
    (lambda s: None, ("promote", "nope"), "no published version 'nope'"),
    (lambda s: None, ("promote", "../runs"), "is not a version name"),
    (lambda s: (models_dir(s) / "half").mkdir(), ("promote", "half"), "has no metadata.json"),
    (lambda s: history_path(s).write_text("[{\"version\": "), ("rollback",), "history.json is not readable JSON"),
    (lambda s: history_path(s).write_text('{"version": "b"}'), ("promote", "b"), "history.json is malformed"),
    (lambda s: history_path(s).write_text("[1, 2]"), ("prune", "--keep", "0"), "history.json is malformed"),
])
def test_bad_input_gets_a_clear_error_and_nothing_moves(storage, damage, args, message):
    publish_version(storage, "b", WEIGHTS, meta("b", 0.99))
    damage(storage)
    before = snapshot(storage)
    result = cli(storage, *args)
    assert result.returncode == 2 and message in result.stderr and "nothing was changed" in result.stderr
    assert "Traceback" not in result.stderr
    assert snapshot(storage) == before


def test_a_storage_root_without_models_is_refused_and_left_alone(tmp_path):
    result = cli(tmp_path / "typo", "rollback")
    assert result.returncode == 2 and "no models are published under" in result.stderr
    assert not (tmp_path / "typo").exists()


# ---------------------------------------------------------------- a promote racing a finishing run

PROMOTER = """
import sys
from pathlib import Path
from training import versions
versions.HISTORY_LENGTH = 10_000  # keep every entry, so a lost one shows
root, stop, moves = Path(sys.argv[1]), Path(sys.argv[2]), 0
for i in range(5000):  # until the runs are done
    if stop.exists():
        break
    version = ("serving-v", "alt")[i % 2]
    moves += versions.promote_version(root, version) != version
print(moves)
"""


def test_a_concurrent_promote_and_finishing_runs_leave_latest_complete_and_the_history_right(storage, monkeypatch):
    """Another process promotes back and forth while runs finish and promote themselves: every
    `latest` seen names a complete version, and every move is in the history, in order (without
    the lock, moves overtake each other between `latest` and the history and entries get lost)."""
    monkeypatch.setattr("training.versions.HISTORY_LENGTH", 10_000)
    publish_version(storage, "alt", WEIGHTS, meta("alt", 0.99))
    seen, stop = Counter(), threading.Event()

    def watch():
        while not stop.is_set():
            folder = models_dir(storage) / read_latest(storage)
            seen[(folder / "metadata.json").is_file() and (folder / "model.pt").is_file()] += 1
            time.sleep(0.001)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    stop_file = storage / "stop"
    promoter = subprocess.Popen([sys.executable, "-c", PROMOTER, str(storage), str(stop_file)], cwd=ROOT,
                                stdout=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: read_latest(storage) == "alt", 60, "the promoter's first move")
        runs = [f"run-{i:02d}" for i in range(30)]
        for name in runs:
            publish_run(storage, name, WEIGHTS, meta(name, 0.99), "always")
        stop_file.touch()
        out, _ = promoter.communicate(timeout=120)
    finally:
        promoter.kill()
        stop.set()
        watcher.join(10)
    assert promoter.returncode == 0
    assert seen[True] > 0 and seen[False] == 0, seen
    history = read_history(storage)
    assert [e["note"] for e in history if "found serving" in e["note"]] == []
    assert len(history) == 1 + len(runs) + int(out)  # the first publication, every run, every CLI move
    assert history[-1]["version"] == read_latest(storage)
    assert [e["version"] for e in history if e["version"].startswith("run-")] == runs
    between = [e for e in history[history.index(next(e for e in history if e["version"] == runs[0])):]
               if not e["version"].startswith("run-")]
    assert between, "the promoter should have moved latest while the runs finished"


# ---------------------------------------------------------------- prune

def test_prune_keeps_serving_and_its_predecessor_and_dry_run_deletes_nothing(storage):
    for day, name in enumerate(("old-1", "old-2", "prev", "cur", "new-1"), start=2):
        publish_version(storage, name, WEIGHTS, meta(name, 0.99, created=f"2026-01-0{day}T00:00:00+00:00"))
        (run_dir(storage, name) / "rounds").mkdir(parents=True)
        (run_dir(storage, name) / "rounds" / "global.pt").write_bytes(b"x" * 1000)
    promote_version(storage, "prev")
    promote_version(storage, "cur")
    history_path(storage).write_text(json.dumps(read_history(storage)[-2:]))  # serving-v fell off the history

    before = snapshot(storage)
    dry = cli(storage, "prune", "--keep", "0", "--dry-run")
    assert dry.returncode == 0 and snapshot(storage) == before
    assert "would remove 4 versions" in dry.stdout  # serving-v, old-1, old-2, new-1: never served

    report = versions.prune(storage, keep=1, dry_run=False)
    assert sorted(r["version"] for r in report["removed"]) == ["old-1", "old-2", "serving-v"]
    assert sorted(p.name for p in models_dir(storage).iterdir() if p.is_dir()) == ["cur", "new-1", "prev"]
    assert not run_dir(storage, "old-1").exists() and run_dir(storage, "prev").exists()
    assert report["bytes"] >= 2000 and read_latest(storage) == "cur"

    versions.prune(storage, keep=0, dry_run=False)
    assert sorted(p.name for p in models_dir(storage).iterdir() if p.is_dir()) == ["cur", "prev"]
    assert rollback_version(storage) == ("cur", "prev")


def test_prune_leaves_a_folder_without_metadata_alone(storage):
    (models_dir(storage) / "half").mkdir()
    versions.prune(storage, keep=0, dry_run=False)
    assert (models_dir(storage) / "half").is_dir() and read_latest(storage) == "serving-v"


def test_errors_in_the_library_are_promotion_errors(storage):
    with pytest.raises(PromotionError, match="no published version"):
        promote_version(storage, "ghost")
    assert read_latest(storage) == "serving-v"


# ---------------------------------------------------------------- against a live Ray Serve deployment

@pytest.mark.ray
def test_promote_and_rollback_switch_a_live_deployment_under_load_without_a_failed_request(
        serve_app, served_models, test_digits):
    storage, before = serve_app.storage, serve_app.model()["model_version"]
    assert read_latest(storage) == before, "the serving tests should leave latest on the served version"
    new = f"promoted-{time.time_ns()}"
    publish_version(storage, new, served_models["v2"], meta(new, served_models["accuracy"]))
    versions, result = Counter(), {}

    def record(body: bytes) -> bool:
        versions[json.loads(body)["model_version"]] += 1
        return True

    bodies = [json.dumps({"pixels": test_digits[0][i].tolist()}).encode() for i in range(8)]
    with serve_app.client() as client:
        wait_on_every_replica(lambda: client.post("/predict", json={"pixels": test_digits[0][0].tolist()}).status_code == 200,
                              30, "every model replica to serve")
    loader = threading.Thread(target=lambda: result.setdefault("load", load(
        f"{serve_app.url}/predict", bodies, clients=4, requests=100_000, time_limit_s=10, check=record)))
    loader.start()
    try:
        wait_for(lambda: versions[before] > 0, 10, "the load to be answered")
        assert cli(storage, "promote", new).returncode == 0
        wait_for(lambda: serve_app.model()["model_version"] == new, 10, "/model to show the promoted version")
        wait_for(lambda: versions[new] > 0, 10, "the load to be answered by the promoted version")
        rolled = cli(storage, "rollback")
        assert rolled.stdout.strip() == f"latest: {new} -> {before} (rolled back)", rolled.stderr
        wait_for(lambda: serve_app.model()["model_version"] == before, 10, "/model to show the version rolled back to")
    finally:
        loader.join(30)
    summary = result["load"].summary()
    assert summary["requests"] > 50 and summary["success_rate"] == 1.0, json.dumps(summary)
    assert versions[new] > 0 and versions[before] > 0, dict(versions)
