"""Inference with the deployed model, and Grad-CAM heat maps.

Uploaded bytes are decoded defensively: the pixel count is checked from the header
before any pixel is decoded (decompression bombs), and a file that is not an image,
or is truncated, is refused with a clear 4xx. Images go through the same transform as
training (``fl_core.data.image_transform``), so a prediction sees what the model saw.

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
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from edge_service.services.metrics import EdgeMetrics
from edge_service.services.registry import ModelRegistry
from fl_core.data import image_transform
from fl_core.errors import Conflict, InvalidInput, PayloadTooLarge
from fl_core.model import SplitModel
from fl_core.schemas import PredictResponse, ScoredLabel

#: Heat maps are drawn at the image's size, but no side larger than this (a 50 MP
#: overlay would be tens of MiB of base64 for no visible gain).
MAX_HEATMAP_SIDE = 1024
NO_MODEL = "no model deployed yet: run a cycle first"


@dataclass(frozen=True)
class Upload:
    filename: str
    data: bytes


def decode_image(upload: Upload, max_pixels: int, max_bytes: int) -> Image.Image:
    """Decode one uploaded image as RGB, or raise a 4xx error saying what is wrong."""
    name = upload.filename or "image"
    if len(upload.data) > max_bytes:
        raise PayloadTooLarge(f"{name}: {len(upload.data)} bytes; the limit is {max_bytes}")
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
    if width * height > max_pixels:
        img.close()
        raise PayloadTooLarge(
            f"{name}: {width}x{height} = {width * height} pixels; the limit is {max_pixels}"
        )
    try:
        with img:
            return img.convert("RGB")
    except (OSError, SyntaxError, ValueError) as exc:
        raise InvalidInput(f"{name}: the image is truncated or corrupt ({exc})") from None


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
    width, height = image.size
    scale = min(1.0, MAX_HEATMAP_SIDE / max(width, height))
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
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
        self, registry: ModelRegistry, metrics: EdgeMetrics, max_pixels: int, max_bytes: int
    ) -> None:
        self.registry = registry
        self.metrics = metrics
        self.max_pixels = max_pixels
        self.max_bytes = max_bytes

    def predict(self, uploads: list[Upload], heatmap: bool = False) -> PredictResponse:
        started = time.perf_counter()
        if not uploads:
            raise InvalidInput("send at least one image in the multipart field 'files'")
        serving = self.registry.serving_model()
        if serving is None:
            raise Conflict(NO_MODEL)
        local, model = serving
        images = [decode_image(u, self.max_pixels, self.max_bytes) for u in uploads]
        transform = image_transform(model.arch.input_size, augment=False)
        x = torch.stack([transform(img) for img in images])
        with torch.inference_mode():
            probs = model(x).softmax(dim=1)
        names = model.class_names
        predictions = []
        for i, (upload, img) in enumerate(zip(uploads, images, strict=True)):
            top = int(probs[i].argmax())
            png = None
            if heatmap:
                cam = grad_cam(model, x[i : i + 1].clone(), top)
                png = base64.b64encode(heatmap_png(img, cam)).decode("ascii")
            predictions.append(
                ScoredLabel(
                    filename=upload.filename,
                    label=names[top],
                    scores={n: float(probs[i, j]) for j, n in enumerate(names)},
                    heatmap_png_base64=png,
                    heatmap_class=names[top] if heatmap else None,
                )
            )
        seconds = time.perf_counter() - started
        self.metrics.predictions.inc(len(uploads))
        self.metrics.prediction_latency.observe(seconds)
        return PredictResponse(
            model_id=local.id,
            model_version=local.base_version,
            latency_ms=round(seconds * 1000, 3),
            predictions=predictions,
        )


__all__ = ["MAX_HEATMAP_SIDE", "NO_MODEL", "Predictor", "Upload", "decode_image", "grad_cam"]
