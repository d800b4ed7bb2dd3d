"""The frozen lower part of a split model, run by ONNX Runtime.

On CPUs ONNX Runtime runs EfficientNet-Lite0 several times faster than eager PyTorch
(fused convolutions and activations, no per-op dispatch). The edge never trains the
part below the cut while extracting, so it exports that part once per base model and
runs it through an ``onnxruntime.InferenceSession``; training stays in PyTorch.
Stage 3 does the same with the stages below the first one it fine-tunes (``end``):
they are frozen there, and their activations are computed once and cached.

The export is trusted only after a check: the session's output on a seeded probe batch
must match torch's within ``rtol`` of the largest activation. When export, session or
check fail (an operator the exporter does not know, onnxruntime not installed, a wrong
result), :func:`lower_runner` falls back to torch and says why in the log and in the
runner's ``reason``; extraction then runs as before, only slower.

:func:`lower_runner` keeps the last few checked sessions, keyed by the digest of the
stages they run: a model whose frozen stages are unchanged (the next cycle's base model,
the candidate fine-tuned above them, the demo's references built on the same ImageNet
weights) reuses the export instead of paying for it again.

The exporter is the TorchScript one (``dynamo=False``): it works offline and handles
the backbones' data-dependent "same" padding by tracing at the model's input size,
which is the only size the edge feeds. The batch axis is dynamic.

The whole model (stages and classifier, class prior included) is exported the same way
by :func:`export_model` and run by :func:`model_runner`: the edge serves predictions
through it, and offers the file to lines that run it in their own runtime. Its graph
answers ``logits`` and ``probabilities``; the class names and input size travel in the
file's metadata.
"""

from __future__ import annotations

import io
import json
import logging
import threading
import time
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from fl_core.errors import FedInspectError
from fl_core.model import SplitModel

log = logging.getLogger("fl_core.onnx_runtime")

Backend = Literal["onnxruntime", "torch"]
BACKENDS: tuple[Backend, ...] = ("onnxruntime", "torch")

#: opset understood by every onnxruntime release of the last years
OPSET = 17
#: largest allowed |ort - torch|, relative to the largest |torch| activation
DEFAULT_RTOL = 1e-3


class OnnxUnavailable(FedInspectError):
    """Export, session creation or the equality check failed; torch must do the work."""


def _end(model: SplitModel, end: int | None) -> int:
    """``end`` checked, or the stage after the cut (``model.lower``) when it is None."""
    if end is None:
        return model.cut_index + 1
    if not 1 <= end <= len(model.stages):
        raise ValueError(f"end must be in 1..{len(model.stages)}, got {end}")
    return end


class _Prefix(nn.Module):
    """Normalisation and stages ``0 .. end-1`` as a module of its own, so that only that
    part is exported (``end = cut + 1`` is ``model.lower``)."""

    def __init__(self, model: SplitModel, end: int) -> None:
        super().__init__()
        self.model = model
        self.end = end

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.run_stages(self.model.normalize(x), 0, self.end)


def _export(module: nn.Module, model: SplitModel, outputs: list[str]) -> bytes:
    """``module`` (which runs ``model``) as ONNX bytes, traced at the model's input size
    with a dynamic batch axis; input ``images`` [B, 3, S, S] float32 in [0, 1]."""
    was_training = model.training
    # the exporter restores the wrapper's training flag afterwards, recursively: a
    # wrapper left in training mode would switch the model's batch norms to batch stats
    module.eval()
    size = model.arch.input_size
    probe = torch.zeros(2, 3, size, size)
    buffer = io.BytesIO()
    # fork_rng: tracing runs the model once; keep the caller's random stream untouched
    with torch.random.fork_rng(), warnings.catch_warnings():
        # the tracer warns about Python control flow on shapes (the backbone's "same"
        # padding); at the one input size the edge uses these branches are constants
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module,
            (probe,),
            buffer,  # type: ignore[arg-type]  # the TorchScript exporter takes file objects
            dynamo=False,
            opset_version=OPSET,
            input_names=["images"],
            output_names=outputs,
            dynamic_axes={"images": {0: "batch"}, **{name: {0: "batch"} for name in outputs}},
        )
    model.train(was_training)
    return buffer.getvalue()


def export_lower(model: SplitModel, end: int | None = None) -> bytes:
    """The lower part of ``model`` (normalisation included) as ONNX bytes; with ``end``,
    the stages below ``end`` instead of those up to the cut.

    Input ``images`` [B, 3, S, S] float32 in [0, 1]; output ``features`` [B, ...].
    """
    return _export(_Prefix(model, _end(model, end)), model, ["features"])


class _Whole(nn.Module):
    """The whole model, answering its logits and their softmax."""

    def __init__(self, model: SplitModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.model(x)
        return logits, logits.softmax(dim=1)


#: keys of the metadata :func:`export_model` writes into the file
META_CLASS_NAMES = "fedinspect.class_names"
META_INPUT_SIZE = "fedinspect.input_size"
META_ARCH = "fedinspect.arch"


def export_model(model: SplitModel, metadata: dict[str, str] | None = None) -> bytes:
    """The whole of ``model`` (normalisation, stages, classifier with its class prior) as
    ONNX bytes, with the class names, input size, architecture and ``metadata`` in the
    file's metadata (``session.get_modelmeta().custom_metadata_map``).

    Input ``images`` [B, 3, S, S] float32 in [0, 1] (grey images repeated on the three
    channels); outputs ``logits`` and ``probabilities`` [B, classes], in the order of
    the class names.
    """
    import onnx

    data = _export(_Whole(model), model, ["logits", "probabilities"])
    proto = onnx.load_from_string(data)
    meta = {
        META_CLASS_NAMES: json.dumps(model.class_names),
        META_INPUT_SIZE: str(model.arch.input_size),
        META_ARCH: model.arch.to_json(),
        **(metadata or {}),
    }
    for key, value in meta.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    return bytes(proto.SerializeToString())


def make_session(onnx_bytes: bytes, threads: int | None = None) -> Any:
    """An ``onnxruntime.InferenceSession`` on the CPU with ``threads`` intra-op threads
    (default: torch's thread count, so both backends are compared on equal terms)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads or torch.get_num_threads()
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3  # errors only: its warnings are about unused initialisers
    # Idle pool threads sleep instead of spinning. On cores shared with other work (the
    # edge's own decoding between batches, other edges on one machine) spinning threads
    # take the cores that work needs: whole-model ONNX Runtime at 224 px, batch 16, two
    # threads on a loaded 2-core machine ran at 56 img/s without spinning, 39 with it.
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(onnx_bytes, opts, providers=["CPUExecutionProvider"])


@dataclass
class LowerRunner:
    """Runs a model's lower part on [0, 1] image batches; ``backend`` says which engine."""

    backend: Backend
    run: Callable[[torch.Tensor], torch.Tensor]
    #: the stages it runs: ``0 .. end-1`` (``cut + 1``: the lower part)
    end: int
    #: why this backend (e.g. the reason of a fallback to torch)
    reason: str = ""
    #: seconds spent exporting and checking (0 for torch)
    setup_s: float = 0.0
    #: max |ort - torch| on the probe batch (None for torch)
    max_abs_diff: float | None = None
    #: threads the engine runs on (None: torch's intra-op pool, as it is at call time)
    threads: int | None = None

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return self.run(images)


@contextmanager
def torch_threads_beside(runner: LowerRunner | None) -> Iterator[None]:
    """torch's intra-op threads while ``runner`` runs: one when ONNX Runtime runs the
    model on its own pool (torch then only decodes, resizes and augments), unchanged
    otherwise.

    Tiny parallel resizes on cores that ONNX Runtime keeps busy cost far more in thread
    hand-offs than they save (measured ten times slower with two threads on a loaded
    2-core machine).
    """
    before = torch.get_num_threads()
    if runner is not None and runner.backend == "onnxruntime":
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def torch_runner(model: SplitModel, reason: str = "", end: int | None = None) -> LowerRunner:
    """Eager PyTorch, channels-last (about twice NCHW's speed on this kind of CPU)."""
    end = _end(model, end)
    model.eval()
    # converted outside inference mode so the parameters stay trainable afterwards
    model.to(memory_format=torch.channels_last)

    def run(images: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return model.run_stages(model.normalize(images), 0, end).float()

    return LowerRunner("torch", run, end, reason or "torch requested")


def _session(onnx_bytes: bytes, threads: int) -> Any:
    """:func:`make_session`, its failures as :class:`OnnxUnavailable`."""
    try:
        return make_session(onnx_bytes, threads)
    except ImportError:
        raise OnnxUnavailable("onnxruntime is not installed") from None
    except Exception as exc:
        raise OnnxUnavailable(f"onnxruntime refused the model: {type(exc).__name__}") from None


def _probe(model: SplitModel, batch: int, seed: int) -> torch.Tensor:
    size = model.arch.input_size
    return torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _check(got_array: np.ndarray, expected: torch.Tensor, rtol: float) -> float:
    """max |got - expected|; :class:`OnnxUnavailable` past ``rtol`` of the largest
    expected value, or when the shapes differ."""
    got = torch.from_numpy(np.asarray(got_array))
    if got.shape != expected.shape:
        raise OnnxUnavailable(
            f"ONNX output has shape {list(got.shape)}, torch's {list(expected.shape)}"
        )
    diff = float((got - expected).abs().max())
    bound = rtol * max(1.0, float(expected.abs().max()))
    if not diff <= bound:  # also catches NaN
        raise OnnxUnavailable(
            f"ONNX output differs from torch's by {diff:.3g} (allowed {bound:.3g})"
        )
    return diff


def onnx_runner(
    model: SplitModel,
    threads: int | None = None,
    rtol: float = DEFAULT_RTOL,
    probe_batch: int = 2,
    seed: int = 0,
    end: int | None = None,
) -> LowerRunner:
    """Export ``model``'s lower part (stages below ``end``, if given), open a session,
    and check it against torch.

    Raises :class:`OnnxUnavailable` with the reason when any step fails.
    """
    started = time.perf_counter()
    threads = threads or torch.get_num_threads()
    end = _end(model, end)
    try:
        onnx_bytes = export_lower(model, end)
    except Exception as exc:  # the exporter raises many types; all mean "not exportable"
        raise OnnxUnavailable(f"ONNX export failed: {type(exc).__name__}: {exc}") from None
    session = _session(onnx_bytes, threads)
    probe = _probe(model, probe_batch, seed)
    with torch.inference_mode():
        expected = model.run_stages(model.normalize(probe), 0, end).float()
    diff = _check(session.run(None, {"images": probe.numpy()})[0], expected, rtol)

    def run(images: torch.Tensor) -> torch.Tensor:
        x = np.ascontiguousarray(images.numpy(), dtype=np.float32)
        return torch.from_numpy(session.run(None, {"images": x})[0])

    return LowerRunner(
        "onnxruntime",
        run,
        end,
        reason=f"checked against torch: max abs diff {diff:.2e}",
        setup_s=time.perf_counter() - started,
        max_abs_diff=diff,
        threads=threads,
    )


#: checked ONNX Runtime runners kept by :func:`lower_runner` (an EfficientNet-Lite0
#: session holds some tens of MB)
CACHED_SESSIONS = 4
_cache: OrderedDict[tuple[str, int], LowerRunner] = OrderedDict()
_cache_lock = threading.Lock()


def clear_sessions() -> None:
    """Forget the kept sessions (the next :func:`lower_runner` exports again)."""
    with _cache_lock:
        _cache.clear()


def lower_runner(
    model: SplitModel,
    backend: Backend = "onnxruntime",
    threads: int | None = None,
    end: int | None = None,
) -> LowerRunner:
    """The fastest checked way to run ``model.lower`` (or the stages below ``end``):
    ONNX Runtime, else torch. A session checked before for the same stages (same
    weights, same threads) is reused, with ``setup_s`` 0."""
    if backend == "torch":
        return torch_runner(model, end=end)
    if backend != "onnxruntime":
        raise ValueError(f"unknown extraction backend {backend!r}; choose one of {BACKENDS}")
    end = _end(model, end)
    threads = threads or torch.get_num_threads()
    key = (model.stages_digest(end), threads)
    with _cache_lock:
        cached = _cache.get(key)
        if cached is not None:
            _cache.move_to_end(key)
    if cached is not None:
        log.info("event=onnx_reused end=%d", end)
        return replace(cached, setup_s=0.0, reason=f"{cached.reason}; export reused")
    try:
        runner = onnx_runner(model, threads, end=end)
    except OnnxUnavailable as exc:
        log.warning("event=onnx_fallback backend=torch reason=%r", str(exc))
        return torch_runner(model, f"fell back to torch: {exc}", end)
    log.info("event=onnx_ready setup_s=%.2f max_abs_diff=%.2e", runner.setup_s, runner.max_abs_diff)
    with _cache_lock:
        _cache[key] = runner
        while len(_cache) > CACHED_SESSIONS:
            _cache.popitem(last=False)
    return runner


# --------------------------------------------------------------------------- whole model


@dataclass
class ModelRunner:
    """Class probabilities of a whole model on [0, 1] image batches: [B, 3, S, S] ->
    [B, classes] float32; ``backend`` says which engine."""

    backend: Backend
    run: Callable[[torch.Tensor], np.ndarray]
    #: the checked export it runs (None for torch)
    onnx_bytes: bytes | None = None
    #: why this backend (e.g. the reason of a fallback to torch)
    reason: str = ""
    #: seconds spent exporting and checking (0 for torch)
    setup_s: float = 0.0
    #: max |ort - torch| of the logits on the probe batch (None for torch)
    max_abs_diff: float | None = None
    #: threads the engine runs on (None: torch's intra-op pool, as it is at call time)
    threads: int | None = None

    def __call__(self, images: torch.Tensor) -> np.ndarray:
        return self.run(images)


def torch_model_runner(model: SplitModel, reason: str = "") -> ModelRunner:
    """Eager PyTorch (channels-last, as the model keeps its stages)."""
    model.eval()

    def run(images: torch.Tensor) -> np.ndarray:
        with torch.inference_mode():
            return model(images).softmax(dim=1).float().numpy()

    return ModelRunner("torch", run, reason=reason or "torch requested")


def onnx_model_runner(
    model: SplitModel,
    threads: int | None = None,
    onnx_bytes: bytes | None = None,
    rtol: float = DEFAULT_RTOL,
    probe_batch: int = 2,
    seed: int = 0,
) -> ModelRunner:
    """Export ``model`` whole (or take ``onnx_bytes``, an earlier export of it), open a
    session and check its logits against torch's on a seeded probe batch.

    Raises :class:`OnnxUnavailable` with the reason when any step fails.
    """
    started = time.perf_counter()
    threads = threads or torch.get_num_threads()
    if onnx_bytes is None:
        try:
            onnx_bytes = export_model(model)
        except Exception as exc:  # the exporter raises many types; all mean "not exportable"
            raise OnnxUnavailable(f"ONNX export failed: {type(exc).__name__}: {exc}") from None
    session = _session(onnx_bytes, threads)
    model.eval()
    probe = _probe(model, probe_batch, seed)
    with torch.inference_mode():
        expected = model(probe).float()
    try:
        got = session.run(["logits"], {"images": probe.numpy()})[0]
    except Exception as exc:  # a file that is not this model's export
        raise OnnxUnavailable(
            f"onnxruntime could not run the model: {type(exc).__name__}"
        ) from None
    diff = _check(got, expected, rtol)

    def run(images: torch.Tensor) -> np.ndarray:
        x = np.ascontiguousarray(images.numpy(), dtype=np.float32)
        out: np.ndarray = session.run(["probabilities"], {"images": x})[0]
        return out

    return ModelRunner(
        "onnxruntime",
        run,
        onnx_bytes,
        reason=f"checked against torch: max abs diff of the logits {diff:.2e}",
        setup_s=time.perf_counter() - started,
        max_abs_diff=diff,
        threads=threads,
    )


def model_runner(
    model: SplitModel,
    backend: Backend = "onnxruntime",
    threads: int | None = None,
    onnx_bytes: bytes | None = None,
) -> ModelRunner:
    """The fastest checked way to run the whole ``model``: ONNX Runtime (from
    ``onnx_bytes`` when they pass the check, else a fresh export), else torch, with the
    reason of the fallback logged and in ``reason``."""
    if backend == "torch":
        return torch_model_runner(model)
    if backend != "onnxruntime":
        raise ValueError(f"unknown backend {backend!r}; choose one of {BACKENDS}")
    try:
        if onnx_bytes is not None:
            try:
                return onnx_model_runner(model, threads, onnx_bytes)
            except OnnxUnavailable as exc:
                log.warning("event=onnx_stale reason=%r: exporting again", str(exc))
        runner = onnx_model_runner(model, threads)
    except OnnxUnavailable as exc:
        log.warning("event=onnx_fallback backend=torch reason=%r", str(exc))
        return torch_model_runner(model, f"fell back to torch: {exc}")
    log.info(
        "event=onnx_model_ready setup_s=%.2f max_abs_diff=%.2e", runner.setup_s, runner.max_abs_diff
    )
    return runner


__all__ = [
    "BACKENDS",
    "CACHED_SESSIONS",
    "DEFAULT_RTOL",
    "META_ARCH",
    "META_CLASS_NAMES",
    "META_INPUT_SIZE",
    "OPSET",
    "Backend",
    "LowerRunner",
    "ModelRunner",
    "OnnxUnavailable",
    "clear_sessions",
    "export_lower",
    "export_model",
    "lower_runner",
    "make_session",
    "model_runner",
    "onnx_model_runner",
    "onnx_runner",
    "torch_model_runner",
    "torch_runner",
    "torch_threads_beside",
]
