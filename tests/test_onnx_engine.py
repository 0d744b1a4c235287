"""Featurize on CPU through ONNX Runtime: the same embeddings as torch, and a cache that repairs itself."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import sklearn
from PIL import Image

from lookalike.backbones import (CACHE_ENV, ENGINE_ENV, EfficientNetLite0, EfficientNetLite0Texture, onnx_file,
                                 onnx_session)

PHOTOS = [Path(sklearn.__file__).parent / "datasets" / "images" / name for name in ("china.jpg", "flower.jpg")]


@pytest.fixture(scope="module")
def engines(tmp_path_factory) -> tuple[EfficientNetLite0, EfficientNetLite0]:
    """(ONNX Runtime, torch) backbones; the ONNX file exported into a fresh cache folder."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(CACHE_ENV, str(tmp_path_factory.mktemp("cache")))
        patch.delenv(ENGINE_ENV, raising=False)
        onnx = EfficientNetLite0()
        patch.setenv(ENGINE_ENV, "torch")
        torch_backbone = EfficientNetLite0()
    return onnx, torch_backbone


def batch(backbone) -> np.ndarray:
    images = [Image.open(path).convert("RGB") for path in PHOTOS]
    images += [image.transpose(Image.Transpose.FLIP_LEFT_RIGHT) for image in images]
    return np.stack([backbone.preprocess(image) for image in images])


def test_onnx_features_equal_torch_features(engines):
    onnx, torch_backbone = engines
    assert onnx.session is not None and torch_backbone.session is None
    pixels = batch(onnx)
    assert np.abs(onnx.features(pixels) - torch_backbone.features(pixels)).max() < 1e-4
    # ...and the unit embeddings that featurize stores, batch size not mattering
    together = onnx.embed_batch(pixels)
    one_by_one = np.concatenate([onnx.embed_batch(pixels[k:k + 1]) for k in range(len(pixels))])
    assert np.abs(together - torch_backbone.embed_batch(pixels)).max() < 1e-4
    assert np.abs(together - one_by_one).max() < 1e-5


def test_the_texture_backbone_runs_the_same_onnx_network_on_its_own_input(engines, monkeypatch):
    onnx, torch_backbone = engines
    monkeypatch.setenv(CACHE_ENV, str(onnx_file(onnx.info.weights_sha256).parent))
    texture = EfficientNetLite0Texture()
    assert texture.session is not None
    pixels = batch(texture)
    assert np.abs(texture.features(pixels) - torch_backbone.features(pixels)).max() < 1e-4


def test_a_torn_or_altered_cache_file_is_exported_again(engines, monkeypatch, tmp_path):
    onnx, _ = engines
    monkeypatch.setenv(CACHE_ENV, str(tmp_path))
    path = onnx_file(onnx.info.weights_sha256)
    assert path.parent == tmp_path and not path.exists()
    pixels = batch(onnx)
    expected = onnx.features(pixels)
    onnx_session(onnx.pooled, onnx.info.weights_sha256, threads=1)  # exports into the empty cache
    good = path.read_bytes()
    checksum = path.with_name(path.name + ".sha256")
    assert checksum.read_text() == hashlib.sha256(good).hexdigest()
    for damage in (good[: len(good) // 2], good[:-64] + bytes(64), b""):
        path.write_bytes(damage)                                 # a write cut short, or bytes changed
        session = onnx_session(onnx.pooled, onnx.info.weights_sha256, threads=1)
        assert np.abs(session.run(None, {"images": pixels})[0] - expected).max() < 1e-5
        assert path.read_bytes() == good
    checksum.unlink()                                            # the checksum lost: exported again too
    onnx_session(onnx.pooled, onnx.info.weights_sha256, threads=1)
    assert checksum.read_text() == hashlib.sha256(good).hexdigest()


def test_an_unwritable_cache_still_gives_a_working_session(engines, monkeypatch, tmp_path):
    onnx, _ = engines
    blocked = tmp_path / "not-a-folder"
    blocked.write_text("a file where the cache folder would be")
    monkeypatch.setenv(CACHE_ENV, str(blocked))
    session = onnx_session(onnx.pooled, onnx.info.weights_sha256, threads=1)
    pixels = batch(onnx)
    assert np.abs(session.run(None, {"images": pixels})[0] - onnx.features(pixels)).max() < 1e-5
