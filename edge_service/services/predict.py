"""Inference with the deployed model, and Grad-CAM heat maps.

Uploaded bytes are decoded defensively: the pixel count, the aspect ratio and the
pixels of the whole request are checked from the headers before any pixel is decoded
(decompression bombs), each image is shrunk right after it is decoded, before the next
one is, and a file that is not an image, or is truncated, is refused with a clear 4xx.
Images go through the same transform as training (``fl_core.data.image_array``, bit for
bit ``image_transform``, in NumPy so that decoding never wakes torch's thread pool on
cores ONNX Runtime is using), so a prediction sees what the model saw. They are decoded
and run in batches of at most ``PredictLimits.batch_size``, the next batch decoding on a
helper thread while one runs: two batches at most are decoded at any time, so a
request's decoded pixels stay bounded whatever its size.

The class probabilities come from the deployed model's runner
(:mod:`edge_service.services.serving`: ONNX Runtime unless torch is asked for or the
export failed); only the heat map needs torch, for its gradient.

Grad-CAM: the activations of the last spatial stage are weighted by the mean gradient
of the predicted class's logit over each channel; the positive part, upsampled to the
image, shows where the model looked. It is computed with ``torch.autograd.grad`` on
those activations only, so the shared model's parameters are never touched.
"""

from __future__ import annotations

import base64
import io
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from edge_service.services.metrics import EdgeMetrics
from edge_service.services.serving import NO_MODEL, DeployedModel
from fl_core.data import image_array
from fl_core.errors import Conflict, InvalidInput, PayloadTooLarge, shorten
from fl_core.model import SplitModel
from fl_core.schemas import PredictResponse, ScoredLabel

#: Heat maps are drawn at the image's size, but no side larger than this (a 50 MP
#: overlay would be tens of MiB of base64 for no visible gain).
MAX_HEATMAP_SIDE = 1024
#: images run at a time, the next as many decoding meanwhile: on 2 cores at 224 px,
#: batches of 8 overlapped with decoding ran a batch of 16 faster than ONNX Runtime
#: runs 16 already-decoded images, a single batch of 16 decoded first about 5% slower
SERVING_BATCH = 8


@dataclass(frozen=True)
class Upload:
    filename: str
    data: bytes


@dataclass(frozen=True)
class PredictLimits:
    """What one ``POST /v1/predict`` may ask of this edge's memory and time."""

    max_pixels: int  # per image, read from its header before any pixel is decoded
    max_bytes: int  # per file
    max_files: int = 16
    max_request_pixels: int = 100_000_000  # all images of one request together
    max_aspect: float = 32.0  # longest side over shortest side
    batch_size: int = SERVING_BATCH  # images decoded and run at a time


def open_image(upload: Upload, limits: PredictLimits) -> Image.Image:
    """Open one uploaded image and check its header (size, pixels, aspect ratio); no
    pixel is decoded yet. Raises a 4xx error saying what is wrong."""
    name = shorten(upload.filename or "image")
    if len(upload.data) > limits.max_bytes:
        raise PayloadTooLarge(f"{name}: {len(upload.data)} bytes; the limit is {limits.max_bytes}")
    if not upload.data:
        raise InvalidInput(f"{name}: empty file")
    try:
        # PIL warns past its own pixel limit and raises at twice that; our own limit is
        # checked just below, from the header, so the warning is redundant here.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(upload.data))
    except Image.DecompressionBombError as exc:
        raise PayloadTooLarge(f"{name}: image too large ({exc})") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
        raise InvalidInput(f"{name}: not an image (or a format this edge cannot read)") from None
    width, height = img.size
    if width * height > limits.max_pixels:
        img.close()
        raise PayloadTooLarge(
            f"{name}: {width}x{height} = {width * height} pixels; the limit is {limits.max_pixels}"
        )
    if min(width, height) < 1 or max(width, height) > limits.max_aspect * min(width, height):
        img.close()
        raise PayloadTooLarge(
            f"{name}: {width}x{height}: one side is more than {limits.max_aspect:g} times the other"
        )
    return img


#: rows of the full-size image converted at a time while shrinking it
_STRIP_ROWS = 256


def decode_small(img: Image.Image, name: str, min_size: tuple[int, int]) -> Image.Image:
    """Decode an opened image as RGB (or L for grey and 1-bit ones, which the transform
    reads the same), shrunk by an integer factor right after decoding while both sides
    stay at least ``min_size``. Conversion and shrinking go a strip of rows at a time,
    so the full-size decoded image is the only full-size copy ever held."""
    width, height = img.size
    factor = max(1, min(width // max(1, min_size[0]), height // max(1, min_size[1])))
    target = "L" if img.mode in ("1", "L") else "RGB"
    try:
        with img:
            img.load()
            if factor == 1:
                return img.convert(target) if img.mode != target else img.copy()
            out = Image.new(target, (-(-width // factor), -(-height // factor)))
            rows = factor * max(1, _STRIP_ROWS // factor)  # whole blocks of the reduction
            for top in range(0, height, rows):
                strip = img.crop((0, top, width, min(height, top + rows)))
                if strip.mode != target:
                    strip = strip.convert(target)
                out.paste(strip.reduce(factor), (0, top // factor))
            return out
    except (OSError, SyntaxError, ValueError) as exc:
        raise InvalidInput(
            f"{name}: the image is truncated or corrupt ({shorten(str(exc))})"
        ) from None


def _heatmap_size(width: int, height: int) -> tuple[int, int]:
    scale = min(1.0, MAX_HEATMAP_SIDE / max(width, height))
    return max(1, round(width * scale)), max(1, round(height * scale))


def grad_cam(model: SplitModel, x: torch.Tensor, class_index: int) -> torch.Tensor:
    """Grad-CAM of ``class_index`` for one normalised-to-[0, 1] image ``x`` [1, 3, S, S].

    Returns a [h, w] map in [0, 1] at the resolution of the last spatial stage.
    """
    k = model.last_spatial_stage
    with torch.enable_grad():
        acts = model.run_stages(model.normalize(x), 0, k + 1).detach().requires_grad_(True)
        logits = model.classify(model.run_stages(acts, k + 1, len(model.stage_names)))
        (grad,) = torch.autograd.grad(logits[0, class_index], acts)
    weights = grad.mean(dim=(2, 3), keepdim=True)
    cam = torch.relu((weights * acts.detach()).sum(dim=1))[0]
    peak = float(cam.max())
    return cam / peak if peak > 0 else torch.zeros_like(cam)


def _jet(v: np.ndarray) -> np.ndarray:
    """A jet-like colour map: [H, W] in [0, 1] -> [H, W, 3] uint8."""
    channels = [np.clip(1.5 - np.abs(4 * v - c), 0, 1) for c in (3.0, 2.0, 1.0)]
    return (np.stack(channels, axis=-1) * 255).astype(np.uint8)


def heatmap_png(image: Image.Image, cam: torch.Tensor) -> bytes:
    """The heat map over the image, at the image's size (longest side capped), as PNG."""
    size = _heatmap_size(*image.size)
    cam_img = Image.fromarray((cam.numpy() * 255).astype(np.uint8))
    cam_big = np.asarray(cam_img.resize(size, Image.Resampling.BILINEAR), dtype=np.float32) / 255
    base = image if image.size == size else image.resize(size, Image.Resampling.BILINEAR)
    blended = 0.55 * np.asarray(base, dtype=np.float32) + 0.45 * _jet(cam_big).astype(np.float32)
    out = io.BytesIO()
    Image.fromarray(np.clip(blended, 0, 255).astype(np.uint8)).save(out, format="PNG")
    return out.getvalue()


class Predictor:
    """Classifies uploaded images with the deployed local model."""

    def __init__(
        self, deployed: DeployedModel, metrics: EdgeMetrics, limits: PredictLimits
    ) -> None:
        self.deployed = deployed
        self.metrics = metrics
        self.limits = limits

    def _open(self, uploads: list[Upload]) -> list[Image.Image]:
        """Every upload opened and its header checked, before any pixel is decoded."""
        limits = self.limits
        if len(uploads) > limits.max_files:
            raise PayloadTooLarge(
                f"{len(uploads)} files in one request; the limit is {limits.max_files}"
            )
        opened: list[Image.Image] = []
        try:
            for upload in uploads:
                opened.append(open_image(upload, limits))
            total = sum(img.size[0] * img.size[1] for img in opened)
            if total > limits.max_request_pixels:
                raise PayloadTooLarge(
                    f"{total} pixels in one request; the limit is {limits.max_request_pixels}"
                )
        except BaseException:
            for img in opened:
                img.close()
            raise
        return opened

    @staticmethod
    def _decode(
        uploads: list[Upload], opened: list[Image.Image], input_size: int, heatmap: bool
    ) -> tuple[torch.Tensor, list[Image.Image | None]]:
        """The model's input for these uploads, and (with ``heatmap``) each image at its
        heat map's size; each image is shrunk and transformed before the next is decoded."""
        inputs = np.empty((len(uploads), 3, input_size, input_size), dtype=np.float32)
        bases: list[Image.Image | None] = []
        for i, (upload, img) in enumerate(zip(uploads, opened, strict=True)):
            name = shorten(upload.filename or "image")
            heat = _heatmap_size(*img.size) if heatmap else (0, 0)
            need = (max(input_size, heat[0]), max(input_size, heat[1]))
            small = decode_small(img, name, need)
            image_array(small, input_size, out=inputs[i])
            if heatmap and small.size != heat:
                small = small.resize(heat, Image.Resampling.BILINEAR)
            bases.append(small.convert("RGB") if heatmap else None)
        return torch.from_numpy(inputs), bases

    def predict(self, uploads: list[Upload], heatmap: bool = False) -> PredictResponse:
        started = time.perf_counter()
        if not uploads:
            raise InvalidInput("send at least one image in the multipart field 'files'")
        serving = self.deployed.serving()
        if serving is None:
            raise Conflict(NO_MODEL)
        model = serving.model
        names = model.class_names
        opened = self._open(uploads)
        size = model.arch.input_size
        step = max(1, self.limits.batch_size)
        starts = list(range(0, len(uploads), step))

        def decode(first: int) -> tuple[torch.Tensor, list[Image.Image | None]]:
            end = first + step
            return self._decode(uploads[first:end], opened[first:end], size, heatmap)

        predictions = []
        try:
            # the next batch decodes on a helper thread while one runs: the engine leaves
            # a core idle now and then (idle threads sleep), and decoding fills it
            with ThreadPoolExecutor(1, thread_name_prefix="predict-decode") as pool:
                pending = pool.submit(decode, 0)
                for k, first in enumerate(starts):
                    x, images = pending.result()
                    if k + 1 < len(starts):
                        pending = pool.submit(decode, starts[k + 1])
                    probs = serving.runner(x)
                    chunk = uploads[first : first + step]
                    for i, (upload, img) in enumerate(zip(chunk, images, strict=True)):
                        top = int(probs[i].argmax())
                        png = None
                        if img is not None:
                            cam = grad_cam(model, x[i : i + 1].clone(), top)
                            png = base64.b64encode(heatmap_png(img, cam)).decode("ascii")
                        predictions.append(
                            ScoredLabel(
                                filename=shorten(upload.filename, 255),
                                label=names[top],
                                scores={n: float(probs[i, j]) for j, n in enumerate(names)},
                                heatmap_png_base64=png,
                                heatmap_class=names[top] if heatmap else None,
                            )
                        )
        finally:
            for img in opened:
                img.close()
        seconds = time.perf_counter() - started
        self.metrics.predictions.inc(len(uploads))
        self.metrics.prediction_latency.observe(seconds)
        return PredictResponse(
            model_id=serving.local.id,
            model_version=serving.local.base_version,
            latency_ms=round(seconds * 1000, 3),
            predictions=predictions,
        )


__all__ = [
    "MAX_HEATMAP_SIDE",
    "NO_MODEL",
    "SERVING_BATCH",
    "PredictLimits",
    "Predictor",
    "Upload",
    "decode_small",
    "grad_cam",
    "open_image",
]
