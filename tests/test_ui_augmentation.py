"""The page shows how the served model was trained (its augmentation settings) beside its version.
The real model store and page callbacks in this process; no Ray (the Serve path is the same Page)."""
import asyncio

import pytest

from serving.model_store import ModelStore
from serving.plain import LocalBackend
from serving.ui import Page
from training.augment import DEFAULT
from training.model import initial_weights
from tests.helpers import publish_model


def version_line(storage, version: str, metadata: dict) -> str:
    publish_model(storage, version, initial_weights(0), {"version": version, "test_accuracy": 0.9931, **metadata})
    store = ModelStore(storage)
    store.refresh()
    return asyncio.run(Page(LocalBackend(store)).version_text())


def test_augmented_model_shows_its_settings(tmp_path):
    text = version_line(tmp_path, "v-aug", {"augmentation": DEFAULT.to_metadata()})
    assert "**v-aug**" in text and "99.31%" in text
    assert "Trained with augmentation" in text
    assert f"rotation ±{DEFAULT.rotation:g}°" in text and f"shear ±{DEFAULT.shear:g}°" in text


def test_model_trained_without_augmentation_says_so(tmp_path):
    assert "Trained without augmentation" in version_line(tmp_path, "v-plain", {"augmentation": None})


@pytest.mark.parametrize("metadata", [{}, {"augmentation": {"rotation": 5, "future_knob": 1}}])
def test_older_or_unknown_metadata_still_shows_the_version(tmp_path, metadata):
    text = version_line(tmp_path, "v-old", metadata)
    assert text.startswith("Model version **v-old**")
    if metadata:
        assert "future_knob 1" in text
