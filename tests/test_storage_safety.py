"""Storage rules that serving and concurrent jobs rely on: `latest` names a plain version, a run id
is claimed atomically, publication is durable and readable by other users. No Ray needed."""
import json
import stat
import threading

import numpy as np
import pytest
import torch
from torch import nn

from serving.model_store import ModelStore
from training.model import Net, NetV1, for_inference, to_input
from training.storage import check_version_name, claim_run_dir, models_dir
from tests.helpers import publish_model
from training.versions import BadVersionName, promote_version, read_latest
import training.storage as storage_module
import training.versions as versions_module

PLAIN = ["v1", "20261129T142500Z-3fa2", "run_7.b-c", "A" * 128]
NOT_PLAIN = ["", "..", "../v1", "a/../b", "/etc/passwd", "v1/model.pt", ".hidden", "a..b", "v1\\x", "ü", "A" * 129,
             "v1\n..", " v1"]


@pytest.mark.parametrize("name", PLAIN)
def test_plain_version_names_pass(name):
    assert check_version_name(name) == name


@pytest.mark.parametrize("name", NOT_PLAIN)
def test_anything_else_is_refused(name):
    with pytest.raises(BadVersionName):
        check_version_name(name)


def metadata(version: str) -> dict:
    return {"version": version, "test_accuracy": 0.5}


def test_latest_naming_a_path_is_refused_and_the_old_model_keeps_serving(tmp_path, caplog):
    publish_model(tmp_path, "v1", Net().state_dict(), metadata("v1"))
    store = ModelStore(tmp_path)
    assert store.refresh() and store.current.version == "v1"
    for escape in ("../v1", str(models_dir(tmp_path) / "v1"), "v1/../v1"):
        (models_dir(tmp_path) / "latest").write_text(escape + "\n")
        with pytest.raises(BadVersionName):
            read_latest(tmp_path)
        assert not store.refresh()
        status = store.status()
        assert status["model_version"] == "v1" and status["ready"]
        assert "plain version" in status["reload_error"]["error"]
        assert str(tmp_path) not in json.dumps(status)  # /model shows no server paths
    assert "is not a version name" in caplog.text  # ... the log does say what was refused


def test_a_failed_load_shows_no_paths_or_library_text(tmp_path):
    publish_model(tmp_path, "v1", Net().state_dict(), metadata("v1"))
    store = ModelStore(tmp_path)
    store.refresh()
    publish_model(tmp_path, "v2", Net().state_dict(), metadata("v2"))
    (models_dir(tmp_path) / "v2" / "model.pt").write_bytes(b"not a torch file")
    assert not store.refresh()
    error = store.status()["reload_error"]["error"]
    assert error == "model.pt is missing, corrupt, or not this network's weights"
    assert str(tmp_path) not in json.dumps(store.status())


def test_a_run_id_is_claimed_by_exactly_one_of_many_at_once(tmp_path):
    results, barrier = [], threading.Barrier(8)

    def claim():
        barrier.wait()
        try:
            claim_run_dir(tmp_path, "same-id")
            results.append("claimed")
        except FileExistsError:
            results.append("refused")

    threads = [threading.Thread(target=claim) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert sorted(results) == ["claimed"] + ["refused"] * 7
    with pytest.raises(BadVersionName):
        claim_run_dir(tmp_path, "../escape")


def test_publication_is_readable_by_others_and_fsyncs_the_folders(tmp_path, monkeypatch):
    synced = []
    real = storage_module.fsync_dir
    for module in (storage_module, versions_module):  # the atomic writes' fsyncs and publication's own
        monkeypatch.setattr(module, "fsync_dir", lambda path: (synced.append(path), real(path)))
    final = publish_model(tmp_path, "v1", Net().state_dict(), metadata("v1"))
    root = models_dir(tmp_path)
    assert stat.S_IMODE(final.stat().st_mode) == 0o755
    for path in (final / "model.pt", final / "metadata.json", root / "latest"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o644
    # the rename of the staged folder into root, and of `latest`, are both made durable
    assert synced.count(root) >= 2 and any(p.name.startswith(".v1.") for p in synced)  # and the staged files
    with pytest.raises(BadVersionName):
        publish_model(tmp_path, "../v2", Net().state_dict(), metadata("v2"))


def test_serving_predicts_with_batchnorm_folded_in_and_the_networks_own_probabilities(tmp_path):
    """Serving runs the published network with every BatchNorm folded into its convolution (cheaper
    batches); the probabilities stay the network's own, to float precision."""
    torch.manual_seed(0)
    net = Net()
    for norm in (m for m in net.modules() if isinstance(m, nn.BatchNorm2d)):  # statistics as training leaves them
        norm.running_mean.uniform_(-1, 1), norm.running_var.uniform_(0.5, 2)
        norm.weight.data.uniform_(0.5, 1.5), norm.bias.data.uniform_(-0.5, 0.5)
    publish_model(tmp_path, "v1", net.state_dict(), {**metadata("v1"), "architecture": Net.architecture})
    promote_version(tmp_path, "v1")
    store = ModelStore(tmp_path)
    assert store.refresh()
    assert not any(isinstance(m, nn.BatchNorm2d) for m in store.current.inference.modules())
    images = np.random.default_rng(0).integers(0, 256, (64, 28, 28), dtype=np.uint8)
    probabilities, version = store.predict(images)
    with torch.inference_mode():
        expected = torch.softmax(net.eval()(to_input(torch.from_numpy(images))), dim=1).numpy()
    assert version == "v1" and np.allclose(probabilities, expected, atol=1e-5)


def test_making_an_inference_copy_never_disturbs_a_request_in_flight(tmp_path):
    """A replica loads a new version while it answers requests on other threads: folding the new
    network must touch nothing they use (a torch.fx trace patched torch.nn.Module process-wide, and
    requests answered meanwhile failed)."""
    publish_model(tmp_path, "v1", Net().state_dict(), {**metadata("v1"), "architecture": Net.architecture})
    promote_version(tmp_path, "v1")
    store = ModelStore(tmp_path)
    assert store.refresh()
    images = np.zeros((8, 28, 28), dtype=np.uint8)
    answered, stop, errors = threading.Event(), threading.Event(), []

    def answer():
        while not stop.is_set():
            try:
                store.predict(images)
            except Exception as error:
                errors.append(error)
            answered.set()

    thread = threading.Thread(target=answer)
    thread.start()
    try:
        assert answered.wait(10)
        for _ in range(500):
            for_inference(Net())
    finally:
        stop.set()
        thread.join()
    assert not errors, f"{len(errors)} requests failed, the first: {errors[0]!r}"


def test_serving_loads_each_published_architecture_and_refuses_a_mismatch(tmp_path):
    """Versions from before the network changed name no architecture and hold NetV1's weights:
    serving still loads them (a rollback goes on working); a version whose metadata names another
    network than its weights fit, or an unknown one, is refused and the old model keeps serving."""
    torch.manual_seed(0)
    old, new = NetV1().eval(), Net().eval()
    probe = torch.rand(4, 1, 28, 28)
    publish_model(tmp_path, "old", old.state_dict(), metadata("old"))  # no "architecture", as before
    publish_model(tmp_path, "new", new.state_dict(), {**metadata("new"), "architecture": Net.architecture})
    store = ModelStore(tmp_path)
    for version, network in (("old", old), ("new", new), ("old", old)):
        promote_version(tmp_path, version)
        assert store.refresh() and store.current.version == version
        assert type(store.current.net) is type(network)
        with torch.inference_mode():
            assert torch.equal(store.current.net(probe), network(probe))
    for name, architecture in (("mislabelled", NetV1.architecture), ("unknown", "net-v9")):
        publish_model(tmp_path, name, new.state_dict(), {**metadata(name), "architecture": architecture})
        promote_version(tmp_path, name)
        assert not store.refresh() and store.current.version == "old"
        assert store.status()["reload_error"]["error"] == "model.pt is missing, corrupt, or not this network's weights"


def test_a_replica_whose_latest_fails_falls_back_along_the_history_never_to_a_trial(tmp_path):
    """A replica starting while `latest` cannot load serves the last version that served (history.json),
    not the newest folder: a trial that was not promoted, or a folder pruned meanwhile, is skipped."""
    import os
    from training.versions import publish_version
    publish_model(tmp_path, "v1", Net().state_dict(), metadata("v1"))
    publish_model(tmp_path, "v2", Net().state_dict(), metadata("v2"))
    publish_version(tmp_path, "trial", Net().state_dict(), metadata("trial"))  # --promote never
    publish_model(tmp_path, "v3", Net().state_dict(), metadata("v3"))
    (models_dir(tmp_path) / "v3" / "model.pt").write_bytes(b"not a torch file")
    os.utime(models_dir(tmp_path) / "trial")  # the newest folder
    (models_dir(tmp_path) / "v2" / "model.pt").unlink()  # pruned while the replica starts
    store = ModelStore(tmp_path)
    assert store.refresh()
    assert store.current.version == "v1" and store.status()["reload_error"]["version"] == "v3"


def test_a_forward_pass_takes_a_bounded_number_of_images(tmp_path, monkeypatch):
    import dataclasses
    import serving.model_store as model_store
    publish_model(tmp_path, "v1", Net().state_dict(), metadata("v1"))
    store = ModelStore(tmp_path)
    store.refresh()
    images = np.random.default_rng(0).integers(0, 256, (10, 28, 28), dtype=np.uint8)
    whole, _ = store.predict(images)
    passes = []
    inference = store.current.inference
    store.current = dataclasses.replace(store.current, inference=lambda x: passes.append(len(x)) or inference(x))
    monkeypatch.setattr(model_store, "MAX_FORWARD_IMAGES", 4)
    split, version = store.predict(images)
    assert passes == [4, 4, 2] and version == "v1" and np.allclose(split, whole, atol=1e-6)


def test_model_status_shows_no_storage_path_in_the_metadata(tmp_path):
    summary = f"kept v0 because {tmp_path}/models/mnist/history.json is not readable JSON"
    publish_model(tmp_path, "v1", Net().state_dict(), {**metadata("v1"), "promotion": {"summary": summary}})
    store = ModelStore(tmp_path)
    store.refresh()
    status = store.status()
    assert str(tmp_path) not in json.dumps(status)
    assert status["metadata"]["promotion"]["summary"].startswith("kept v0 because <storage>/models")
    assert status["metadata"]["test_accuracy"] == 0.5
