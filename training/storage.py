"""The storage root's layout and crash-safe writes.

<storage>/datasets/mnist/            verified IDX files
<storage>/runs/<run_id>/shards/      one .npz per worker + manifest.json
<storage>/runs/<run_id>/rounds/      worker and averaged weights per round
<storage>/models/mnist/<version>/    published model.pt + metadata.json
<storage>/models/mnist/latest        one line: the version serving should load

Every file is written under a temporary name and renamed into place, so a crash never
leaves a half-written file that looks complete.
"""
import hashlib
import io
import json
import os
import shutil
import tempfile
from pathlib import Path

STORAGE_ENV = "MNIST_STORAGE"
DEFAULT_STORAGE = "storage"
MODEL_NAME = "mnist"


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


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path, obj) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def atomic_torch_save(path: Path, obj) -> None:
    import torch  # here, so that `python -m ray_cluster` can resolve the storage root without torch

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def read_latest(storage: Path) -> str | None:
    """The published version that `latest` names, or None before the first publication."""
    try:
        return (models_dir(storage) / "latest").read_text().strip() or None
    except FileNotFoundError:
        return None


def publish_model(storage: Path, version: str, state_dict: dict, metadata: dict) -> Path:
    """Write <version>/ completely under a temporary name, rename it, then point `latest` at it."""
    root = models_dir(storage)
    final = root / version
    if final.exists():
        raise FileExistsError(f"model version {version} is already published at {final}")
    staging = Path(tempfile.mkdtemp(dir=root if root.exists() else _mkdir(root), prefix=f".{version}."))
    try:
        atomic_torch_save(staging / "model.pt", state_dict)
        atomic_write_json(staging / "metadata.json", metadata)
        os.replace(staging, final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    atomic_write_bytes(root / "latest", f"{version}\n".encode())
    return final


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path
