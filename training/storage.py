"""The storage root's layout and crash-safe writes.

<storage>/datasets/mnist/            verified IDX files
<storage>/runs/<run_id>/shards/      one .npz per worker + manifest.json
<storage>/runs/<run_id>/rounds/      worker and averaged weights per round
<storage>/models/mnist/<version>/    published model.pt + metadata.json
<storage>/models/mnist/latest        one line: the version serving should load

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
import shutil
import tempfile
from pathlib import Path

STORAGE_ENV = "MNIST_STORAGE"
DEFAULT_STORAGE = "storage"
MODEL_NAME = "mnist"
FILE_MODE, DIR_MODE = 0o644, 0o755
# A version (= run id) is one plain path component: `latest` is read by every serving replica,
# and whatever it names is joined to the models folder.
VERSION_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


class BadVersionName(ValueError):
    """`latest` (or a caller) names something that is not a plain version name."""


def check_version_name(name: str) -> str:
    """`name` if it is a plain version name (letters, digits, '.', '_', '-'; no separators, no '..',
    not starting with '.'), else BadVersionName."""
    if not VERSION_NAME.fullmatch(name) or ".." in name:
        raise BadVersionName(f"{name[:80]!r} is not a plain version name")
    return name


def given_storage(path: str | os.PathLike | None = None) -> Path:
    """The storage root as given, maybe relative: the argument, else $MNIST_STORAGE, else ./storage."""
    return Path(path or os.environ.get(STORAGE_ENV) or DEFAULT_STORAGE).expanduser()


def resolve_storage(path: str | os.PathLike | None = None) -> Path:
    """The storage root as an absolute path."""
    return given_storage(path).resolve()


def dataset_dir(storage: Path) -> Path:
    return storage / "datasets" / "mnist"


def run_dir(storage: Path, run_id: str) -> Path:
    return storage / "runs" / run_id


def models_dir(storage: Path) -> Path:
    return storage / "models" / MODEL_NAME


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


def read_latest(storage: Path) -> str | None:
    """The published version that `latest` names, or None before the first publication.
    BadVersionName if it names anything but a plain version name (a path, '..')."""
    try:
        text = (models_dir(storage) / "latest").read_text(errors="replace").strip()
    except FileNotFoundError:
        return None
    return check_version_name(text) if text else None


def claim_run_dir(storage: Path, run_id: str) -> Path:
    """Create runs/<run_id>/ for this run alone: FileExistsError if it exists, so two jobs given
    the same --run-id cannot both write into it (mkdir is atomic, also on NFS)."""
    folder = run_dir(storage, check_version_name(run_id))
    folder.parent.mkdir(parents=True, exist_ok=True)
    folder.mkdir()
    return folder


def publish_model(storage: Path, version: str, state_dict: dict, metadata: dict) -> Path:
    """Write <version>/ completely under a temporary name, rename it, then point `latest` at it."""
    root = models_dir(storage)
    final = root / check_version_name(version)
    if final.exists():
        raise FileExistsError(f"model version {version} is already published at {final}")
    staging = Path(tempfile.mkdtemp(dir=root if root.exists() else _mkdir(root), prefix=f".{version}."))
    try:
        atomic_torch_save(staging / "model.pt", state_dict)
        atomic_write_json(staging / "metadata.json", metadata)
        staging.chmod(DIR_MODE)  # mkdtemp makes 0700
        os.replace(staging, final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    fsync_dir(root)
    atomic_write_bytes(root / "latest", f"{version}\n".encode())  # fsyncs root again
    return final


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def private_dir(path: str | os.PathLike) -> Path:
    """A folder only this user can enter (0700): made if missing, refused if it belongs to someone
    else or is a symlink (in a shared /tmp anyone could have made it first, to read or plant files)."""
    path = Path(path)
    try:
        path.mkdir(mode=0o700, parents=True)
    except FileExistsError:
        pass
    info = os.lstat(path)
    if not os.path.isdir(path) or os.path.islink(path) or info.st_uid != os.getuid():
        raise PermissionError(f"{path} is not a folder of this user's; remove it or choose another")
    if info.st_mode & 0o077:
        os.chmod(path, 0o700)
    return path


def private_state_dir(name: str) -> Path:
    """Where local state of `name` lives: $XDG_RUNTIME_DIR/<name> (per user by design), else
    <tmp>/<name>-<uid>; made private by private_dir."""
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime and Path(runtime).is_dir():
        return Path(runtime) / name
    return Path(tempfile.gettempdir()) / f"{name}-{os.getuid()}"
