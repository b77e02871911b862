"""The storage root: its one layout, the rules for its names, and crash-safe writes.
(What lives under models/ - publishing, `latest`, promotion, pruning - is training/versions.py.)

Every path below is built here and nowhere else (training, serving, ray_cluster, bench and the
tests import these functions):

<storage>/datasets/mnist/                     verified IDX files                     dataset_dir
<storage>/runs/<run_id>/                      one training run (claimed atomically)  run_dir, claim_run_dir
<storage>/runs/<run_id>/shards/               shard-RRR.npz per worker + manifest.json  shard_path, manifest_path
<storage>/runs/<run_id>/init.pt               the seeded initial weights             init_path
<storage>/runs/<run_id>/rounds/round-NNN/     worker-RRR.pt: each worker's state at the round's end
                                              (+ worker-RRR.partial.pt while the round runs)  worker_path, partial_path
<storage>/runs/<run_id>/ray/                  Ray Train's run state                  ray_dir
<storage>/runs/<run_id>/ray/<run_id>/round-NNN/  the round's average (global.pt, round.txt): the
                                              aggregator writes it, Ray Train keeps it as the
                                              round's checkpoint                     checkpoint_dir, global_path
<storage>/models/mnist/<version>/             published model.pt + metadata.json     version_dir,
                                                                                     model_path, metadata_path
<storage>/models/mnist/latest                 one line: the version serving loads    latest_path
<storage>/models/mnist/history.json           the last promotions, oldest first      history_path

The root is --storage, else $MNIST_STORAGE, else ./storage of the working directory, made
absolute where it is read (resolve_storage); processes that another one starts (Ray jobs, Serve
replicas, pods) get it absolute through $MNIST_STORAGE. A run id is also its model's version name:
one rule (check_run_id, check_version_name) for both.

Every file is written under a temporary name and renamed into place, so a crash never
leaves a half-written file that looks complete; the folder is fsynced after the rename, so the
rename itself survives a power cut. Files are 0644 and published folders 0755: a serving process
under another uid (a pod's, an NFS client's) can read what training wrote. Nothing here is secret.
"""
import hashlib
import io
import json
import os
import re
import tempfile
import uuid
from datetime import datetime, timezone
from pathlib import Path

STORAGE_ENV = "MNIST_STORAGE"
CHECKPOINT_MODEL, CHECKPOINT_ROUND = "global.pt", "round.txt"  # the files of a round's checkpoint folder
DEFAULT_STORAGE = "storage"  # relative to the working directory of the process that reads the root
MODEL_NAME = "mnist"  # the one model: its folder under models/ and its name in the HTTP API
MODEL_FILE, METADATA_FILE = "model.pt", "metadata.json"  # what a published version's folder holds
FILE_MODE, DIR_MODE = 0o644, 0o755
# A version (= run id) is one plain path component: `latest` is read by every serving replica,
# and whatever it names is joined to the models folder.
VERSION_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
RUN_ID_LENGTH = 63  # a run id also names Ray Train's run and the Kubernetes objects of a job
LATEST, HISTORY = "latest", "history.json"


class PromotionError(ValueError):
    """A promotion, rollback or prune that cannot be done; nothing was moved or deleted."""


class BadVersionName(PromotionError):
    """`latest` (or a caller) names something that is not a plain version name."""


# ---------------------------------------------------------------- names

def is_version_name(name: str) -> bool:
    """A plain version name: letters, digits, '.', '_', '-'; no separators, no '..', not starting with '.'."""
    return bool(VERSION_NAME.fullmatch(name)) and ".." not in name and name not in (LATEST, HISTORY)


def check_version_name(name: str) -> str:
    """`name` if it is a plain version name, else BadVersionName."""
    if not is_version_name(name):
        raise BadVersionName(f"{name[:80]!r} is not a version name (a plain folder name under models/{MODEL_NAME}/)")
    return name


RUN_ID_RULE = f"use 1-{RUN_ID_LENGTH} letters, digits, '-', '_' or '.' (starting with a letter or digit, no '..')"


def is_run_id(text: str) -> bool:
    """Can `text` name a run and, later, its model version? (The CLIs refuse it otherwise.)"""
    return len(text) <= RUN_ID_LENGTH and is_version_name(text)


def check_run_id(run_id: str) -> str:
    """`run_id` if is_run_id, else BadVersionName."""
    if not is_run_id(run_id):
        raise BadVersionName(f"{run_id[:80]!r} is not a run id: {RUN_ID_RULE}")
    return run_id


def new_run_id() -> str:
    """The default run id: UTC time + a random suffix, so ids sort by start and never collide."""
    return datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:4]


# ---------------------------------------------------------------- the root

def given_storage(path: str | os.PathLike | None = None) -> Path:
    """The storage root as given, maybe relative: the argument, else $MNIST_STORAGE, else ./storage."""
    return Path(path or os.environ.get(STORAGE_ENV) or DEFAULT_STORAGE).expanduser()


def resolve_storage(path: str | os.PathLike | None = None) -> Path:
    """The storage root as an absolute path (a relative one against the working directory)."""
    return given_storage(path).resolve()


# ---------------------------------------------------------------- the layout

def dataset_dir(storage: Path) -> Path:
    return storage / "datasets" / "mnist"


def run_dir(storage: Path, run_id: str) -> Path:
    return storage / "runs" / run_id


def shards_dir(storage: Path, run_id: str) -> Path:
    return run_dir(storage, run_id) / "shards"


def shard_name(rank: int) -> str:
    return f"shard-{rank:03d}.npz"


def shard_path(storage: Path, run_id: str, rank: int) -> Path:
    return shards_dir(storage, run_id) / shard_name(rank)


def manifest_path(storage: Path, run_id: str) -> Path:
    return shards_dir(storage, run_id) / "manifest.json"


def init_path(storage: Path, run_id: str) -> Path:
    return run_dir(storage, run_id) / "init.pt"


def ray_dir(storage: Path, run_id: str) -> Path:
    """Ray Train's storage_path for the run (absolute, as Ray requires)."""
    return run_dir(storage, run_id) / "ray"


def round_dir(storage: Path, run_id: str, round_index: int) -> Path:
    return run_dir(storage, run_id) / "rounds" / f"round-{round_index:03d}"


def worker_path(storage: Path, run_id: str, round_index: int, rank: int) -> Path:
    """A worker's state at the end of a round (model, optimizer, schedule): what it resumes from."""
    return round_dir(storage, run_id, round_index) / f"worker-{rank:03d}.pt"


def partial_path(storage: Path, run_id: str, round_index: int, rank: int) -> Path:
    """A worker's mid-round state; only the worker reads it (after a restart); removed at the round's end."""
    return round_dir(storage, run_id, round_index) / f"worker-{rank:03d}.partial.pt"


def checkpoint_dir(storage: Path, run_id: str, round_index: int) -> Path:
    """The round's Ray Train checkpoint, inside the run's Ray Train folder (RunConfig(name=run_id,
    storage_path=ray_dir)), where Ray takes a checkpoint without copying it (NO_UPLOAD)."""
    return ray_dir(storage, run_id) / run_id / f"round-{round_index:03d}"


def global_path(storage: Path, run_id: str, round_index: int) -> Path:
    """The round's averaged model (and the strategy's server state): what a restart resumes from."""
    return checkpoint_dir(storage, run_id, round_index) / CHECKPOINT_MODEL


def checkpoint_round_path(storage: Path, run_id: str, round_index: int) -> Path:
    """The round's index, beside its average: what a resumed worker reads to know where it stands."""
    return checkpoint_dir(storage, run_id, round_index) / CHECKPOINT_ROUND


def models_dir(storage: Path) -> Path:
    return storage / "models" / MODEL_NAME


def version_dir(storage: Path, version: str) -> Path:
    """A published version's folder: model.pt + metadata.json."""
    return models_dir(storage) / check_version_name(version)


def model_path(storage: Path, version: str) -> Path:
    return version_dir(storage, version) / MODEL_FILE


def metadata_path(storage: Path, version: str) -> Path:
    return version_dir(storage, version) / METADATA_FILE


def latest_path(storage: Path) -> Path:
    return models_dir(storage) / LATEST


def history_path(storage: Path) -> Path:
    return models_dir(storage) / HISTORY


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fsync_dir(path: Path) -> None:
    """Make a rename into (or out of) `path` durable."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), FILE_MODE)  # mkstemp makes 0600
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write_json(path: Path, obj) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def atomic_torch_save(path: Path, obj) -> None:
    import torch  # here, so that `python -m ray_cluster` can resolve the storage root without torch

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def claim_run_dir(storage: Path, run_id: str) -> Path:
    """Create runs/<run_id>/ for this run alone: FileExistsError if it exists, so two jobs given
    the same --run-id cannot both write into it (mkdir is atomic, also on NFS)."""
    folder = run_dir(storage, check_run_id(run_id))
    folder.parent.mkdir(parents=True, exist_ok=True)
    folder.mkdir()
    return folder
