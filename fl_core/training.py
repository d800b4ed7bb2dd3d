"""Training and evaluation, in plain PyTorch.

- :func:`train_upper` fits the part above the cut on feature tensors (server, stage 2).
- :func:`finetune` trains a split model on images (edge, stage 3). The stages below
  ``train_from`` stay frozen; their activations are computed once per augmented view
  and cached, so no image goes through the frozen part twice.
- :func:`evaluate` returns :class:`~fl_core.schemas.EvalMetrics`.
- :func:`frozen_activations` and :func:`evaluate_activations` evaluate several models
  that share their frozen stages (the server's model, the candidate fine-tuned from it,
  the deployed model) from one pass of those stages over the test images.

The frozen stages are run by a :class:`~fl_core.onnx_runtime.LowerRunner` when one is
given (ONNX Runtime: about twice eager PyTorch's speed on the CPU), else by torch.

All of it is seeded and runs deterministically on the CPU.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import numpy as np
import torch
from torch import nn

from fl_core.data import SYMMETRIES, ImageSet, batches, stratified_indices, symmetric_view
from fl_core.errors import InvalidInput
from fl_core.metrics import compute_metrics
from fl_core.model import SplitModel
from fl_core.onnx_runtime import Backend, LowerRunner, lower_runner, torch_threads_beside
from fl_core.schemas import EvalMetrics

Progress = Callable[[float, str], None]
"""``progress(fraction, message)`` with fraction in [0, 1]."""


@dataclass
class UpperTrainConfig:
    epochs: int = 60
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 1e-3
    val_fraction: float = 0.15
    patience: int = 12
    label_smoothing: float = 0.05
    #: weigh classes equally in the loss, then adjust the logits for the data's prior
    balanced: bool = True
    seed: int = 0


@dataclass
class FinetuneConfig:
    epochs: int = 4
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 1e-4
    #: first stage that is trained; None: the backbone's default; "upper": above the cut only
    train_from: str | None = None
    augment: bool = True
    #: views cached per training image: the label-preserving symmetries of
    #: :data:`~fl_core.data.SYMMETRIES` first (the plain image, its transpose, half turn
    #: and anti-transpose), then randomly augmented copies
    views: int = 4
    #: learning rate of pretrained backbone stages, relative to ``lr`` (the head's)
    backbone_lr_scale: float = 1.0
    patience: int = 3
    label_smoothing: float = 0.05
    #: weigh classes equally in the loss, then adjust the logits for the data's prior
    balanced: bool = True
    seed: int = 0
    #: which epoch is kept: "last" (a fixed schedule; the validation split is left to
    #: the deploy gate) or "val_loss" (the lowest validation loss, the starting weights
    #: included, stopping after ``patience`` epochs without one)
    select: Literal["last", "val_loss"] = "last"

    @property
    def cached_views(self) -> int:
        """Views of each training image that are cached and trained on."""
        return self.views if self.augment else 1


@dataclass
class TrainReport:
    metrics: EvalMetrics | None
    epochs_run: int
    best_epoch: int
    history: list[dict[str, float]] = field(default_factory=list)
    rows_train: int = 0
    rows_val: int = 0


class _Hyper(Protocol):
    """What both training configs share."""

    epochs: int
    batch_size: int
    lr: float
    weight_decay: float
    patience: int
    label_smoothing: float
    balanced: bool


@contextmanager
def _only_trainable(model: SplitModel, trainable: nn.Module) -> Iterator[None]:
    """Gradients for ``trainable`` only; everything trainable again afterwards, also on
    errors, and the model left in evaluation mode."""
    for p in model.parameters():
        p.requires_grad_(False)
    for p in trainable.parameters():
        p.requires_grad_(True)
    try:
        yield
    finally:
        for p in model.parameters():
            p.requires_grad_(True)
        model.eval()


def class_weights(labels: torch.Tensor, n_classes: int) -> torch.Tensor:
    """Inverse-frequency weights, so that each class weighs the same in the loss."""
    counts = torch.bincount(labels, minlength=n_classes).float()
    weights = counts.sum() / (n_classes * counts.clamp_min(1))
    return weights * (counts > 0)


def _set_seed(seed: int) -> torch.Generator:
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def _fit(
    trainable: nn.Module,
    x_train: torch.Tensor,
    y_train: torch.Tensor,
    x_val: torch.Tensor | None,
    y_val: torch.Tensor | None,
    class_names: list[str],
    cfg: _Hyper,
    gen: torch.Generator,
    progress: Progress | None,
    param_groups: list[dict[str, Any]] | None = None,
) -> TrainReport:
    """Mini-batch AdamW with one-cycle decay and early stopping on validation loss.

    The starting weights are a candidate too (epoch 0): when no epoch beats them on the
    validation set, training changes nothing, so fine-tuning can never make a model
    worse on held-out data than the one it started from. The report's metrics are left
    to :func:`_fit_model`, which scores the model as it will predict.
    """
    groups = param_groups or [{"params": list(trainable.parameters()), "lr": cfg.lr}]
    groups = [g | {"params": [p for p in g["params"] if p.requires_grad]} for g in groups]
    groups = [g for g in groups if g["params"]]
    if not groups:
        raise InvalidInput("nothing to train: no trainable parameters")
    opt = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps = max(4, cfg.epochs * math.ceil(len(x_train) / cfg.batch_size))
    # at least two warm-up steps: OneCycleLR divides by (warm-up steps - 1)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt,
        max_lr=[g["lr"] for g in groups],
        total_steps=steps,
        pct_start=min(0.5, max(0.1, 2.0 / steps)),
    )
    weight = class_weights(y_train, len(class_names)) if cfg.balanced else None
    loss_fn = nn.CrossEntropyLoss(weight=weight, label_smoothing=cfg.label_smoothing)
    best_loss, best_epoch, best_state = math.inf, 0, copy.deepcopy(trainable.state_dict())
    history: list[dict[str, float]] = []
    if x_val is not None and y_val is not None and len(x_val):
        best_loss, val_acc = _val_loss(trainable, x_val, y_val, loss_fn, cfg.batch_size)
        history.append({"epoch": 0, "val_loss": best_loss, "val_accuracy": val_acc})
    epoch = 0
    for epoch in range(1, cfg.epochs + 1):
        _train_mode(trainable)
        order = torch.randperm(len(x_train), generator=gen)
        total = 0.0
        for start in range(0, len(order), cfg.batch_size):
            idx = order[start : start + cfg.batch_size]
            if len(idx) < 2:  # batch norm needs two rows
                continue
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(trainable(x_train[idx]), y_train[idx])
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach()) * len(idx)
        row: dict[str, float] = {"epoch": epoch, "train_loss": total / len(x_train)}
        if x_val is not None and y_val is not None and len(x_val):
            val_loss, val_acc = _val_loss(trainable, x_val, y_val, loss_fn, cfg.batch_size)
            row |= {"val_loss": val_loss, "val_accuracy": val_acc}
            if val_loss < best_loss - 1e-4:
                best_loss, best_epoch = val_loss, epoch
                best_state = copy.deepcopy(trainable.state_dict())
            elif epoch - best_epoch >= cfg.patience:
                history.append(row)
                break
        else:
            best_epoch, best_state = epoch, copy.deepcopy(trainable.state_dict())
        history.append(row)
        if progress is not None:
            progress(epoch / cfg.epochs, f"epoch {epoch}/{cfg.epochs} loss {row['train_loss']:.4f}")
    trainable.load_state_dict(best_state)
    trainable.eval()
    n_val = len(x_val) if x_val is not None else 0
    return TrainReport(None, epoch, best_epoch, history, len(x_train), n_val)


def _train_mode(module: nn.Module) -> None:
    """Training mode with batch-norm statistics frozen.

    Fine-tuning batches are small and their images unlike ImageNet's; updating the
    running statistics from them (or normalising by batch statistics) makes the model
    behave differently in evaluation than in training. Frozen statistics keep the two
    the same; the affine weights of batch norm still learn.
    """
    module.train()
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()


@torch.inference_mode()
def _predict_rows(
    forward: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, batch_size: int
) -> torch.Tensor:
    outs = [forward(x[i : i + batch_size]).softmax(1) for i in range(0, len(x), batch_size)]
    return torch.cat(outs)


@torch.inference_mode()
def _val_loss(
    trainable: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    loss_fn: nn.Module,
    batch_size: int,
) -> tuple[float, float]:
    trainable.eval()
    logits = torch.cat([trainable(x[i : i + batch_size]) for i in range(0, len(x), batch_size)])
    return float(loss_fn(logits, y)), float((logits.argmax(1) == y).float().mean())


class _Upper(nn.Module):
    """The trainable part above the cut, as one module (for optimiser and state).

    Its logits are the head's own, without the model's logit adjustment: the loss weighs
    classes equally, and the adjustment for the data's prior is set after training.
    """

    def __init__(self, model: SplitModel, start: int) -> None:
        super().__init__()
        self.stages = nn.ModuleList(list(model.stages[start:]))
        self.head = model.head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for stage in self.stages:
            x = stage(x)
        return self.head(x)


def _fit_model(
    model: SplitModel,
    trainable: _Upper,
    x_train: torch.Tensor,
    y_train: torch.Tensor,
    x_val: torch.Tensor | None,
    y_val: torch.Tensor | None,
    cfg: _Hyper,
    gen: torch.Generator,
    progress: Progress | None,
    param_groups: list[dict[str, Any]] | None = None,
) -> TrainReport:
    """:func:`_fit` on ``trainable``, then the model's class prior set to the training
    labels' frequencies, and the validation metrics of the model as it will predict."""
    with _only_trainable(model, trainable):
        report = _fit(
            trainable,
            x_train,
            y_train,
            x_val,
            y_val,
            model.class_names,
            cfg,
            gen,
            progress,
            param_groups,
        )
    counts = torch.bincount(y_train, minlength=len(model.class_names))
    model.set_class_prior(counts if cfg.balanced else None)
    if x_val is not None and y_val is not None and len(x_val):
        adjustment: torch.Tensor = model.logit_adjustment  # type: ignore[assignment]
        probs = _predict_rows(lambda x: trainable(x) + adjustment, x_val, cfg.batch_size)
        report.metrics = compute_metrics(
            y_val.numpy(), probs.argmax(1).numpy(), model.class_names, probs.numpy()
        )
    return report


def train_upper(
    model: SplitModel,
    features: torch.Tensor,
    labels: torch.Tensor,
    config: UpperTrainConfig | None = None,
    progress: Progress | None = None,
) -> TrainReport:
    """Fit the part of ``model`` above the cut on pooled features, in place.

    A stratified ``val_fraction`` of the rows is held out for early stopping and for
    the reported metrics.
    """
    cfg = config or UpperTrainConfig()
    if len(features) != len(labels) or len(features) < 4:
        raise InvalidInput("train_upper needs at least 4 rows, with one label per row")
    gen = _set_seed(cfg.seed)
    y_np = labels.numpy()
    if cfg.val_fraction > 0:
        tr, va = stratified_indices(y_np, [1 - cfg.val_fraction, cfg.val_fraction], cfg.seed)
    else:
        tr, va = list(range(len(labels))), []
    upper = _Upper(model, model.cut_index + 1)
    x, y = features.float(), labels.long()
    x_val, y_val = (x[va], y[va]) if va else (None, None)
    return _fit_model(model, upper, x[tr], y[tr], x_val, y_val, cfg, gen, progress)


@torch.inference_mode()
def _activations(
    model: SplitModel,
    images: ImageSet,
    end: int,
    views: int,
    augment: bool,
    batch_size: int,
    seed: int,
    progress: Callable[[int], None] | None = None,
    frozen: LowerRunner | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Stages ``0 .. end-1`` over ``views`` views of ``images``, by ``frozen`` when given:
    the label-preserving :data:`~fl_core.data.SYMMETRIES` first (each image decoded once
    for all of them), then, with ``augment``, randomly augmented copies."""
    if frozen is not None and frozen.end != end:
        raise ValueError(f"the frozen runner stops before stage {frozen.end}, not {end}")
    model.eval()
    acts, labels = [], []

    def run(x: torch.Tensor) -> torch.Tensor:
        if frozen is not None:
            return frozen(x)
        return model.run_stages(model.normalize(x), 0, end)

    symmetric = min(views, len(SYMMETRIES))
    size = model.arch.input_size
    with torch_threads_beside(frozen):
        for x, y in batches(images, size, batch_size, seed=seed):
            for view in range(symmetric):
                acts.append(run(symmetric_view(x, view).contiguous()))
                labels.append(y)
            if progress is not None:
                progress(len(x) * symmetric)
        for _ in range(symmetric, views):
            for x, y in batches(images, size, batch_size, augment=augment, seed=seed):
                acts.append(run(x))
                labels.append(y)
                if progress is not None:
                    progress(len(x))
    return torch.cat(acts), torch.cat(labels).long()


def finetune_start(model: SplitModel, train_from: str | None = None) -> int:
    """Index of the first stage that fine-tuning from ``train_from`` trains (the stages
    below it stay frozen); None: the backbone's default, "upper": above the cut."""
    if train_from == "upper":
        return model.cut_index + 1
    return model.stage_index(train_from or model.info.finetune_from)


def finetune(
    model: SplitModel,
    train: ImageSet,
    val: ImageSet | None = None,
    config: FinetuneConfig | None = None,
    progress: Progress | None = None,
    frozen: LowerRunner | None = None,
    cached: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> TrainReport:
    """Fine-tune ``model`` on images, in place, from stage ``config.train_from`` up.

    ``frozen``, when given, runs the frozen stages below it for the activation cache: a
    runner of this ``model`` that stops before ``finetune_start(model, train_from)``.
    ``cached``, when given, is that cache already made (:func:`train_activations` of
    ``train`` with the same stage and views, by a model with the same frozen stages):
    the training views are then not run again.
    """
    cfg = config or FinetuneConfig()
    if len(train) < 2:
        raise InvalidInput("fine-tuning needs at least two training images")
    start = finetune_start(model, cfg.train_from)
    _set_seed(cfg.seed)  # the augmented views draw from torch's global generator
    views = cfg.cached_views
    if cached is not None and len(cached[1]) != views * len(train):
        raise ValueError(
            f"the cached activations hold {len(cached[1])} rows, not {views} views of "
            f"{len(train)} images"
        )
    total = (0 if cached else views * len(train)) + (
        len(val) if val and cfg.select == "val_loss" else 0
    )
    seen = 0

    def on_images(n: int) -> None:
        nonlocal seen
        seen += n
        if progress is not None:
            progress(0.5 * seen / total, f"caching activations {seen}/{total}")

    x_tr, y_tr = cached or _activations(
        model, train, start, views, cfg.augment, cfg.batch_size, cfg.seed, on_images, frozen
    )
    x_va = y_va = None
    if val is not None and len(val) and cfg.select == "val_loss":
        x_va, y_va = _activations(
            model, val, start, 1, False, cfg.batch_size, cfg.seed, on_images, frozen
        )

    caching_share = 0.5 if total else 0.0  # of the progress bar, for caching

    def on_epoch(frac: float, msg: str) -> None:
        if progress is not None:
            progress(caching_share + (1 - caching_share) * frac, msg)

    return finetune_activations(model, start, x_tr, y_tr, x_va, y_va, cfg, on_epoch)


def train_activations(
    model: SplitModel,
    train: ImageSet,
    config: FinetuneConfig,
    frozen: LowerRunner | None = None,
    progress: Progress | None = None,
) -> tuple[int, torch.Tensor, torch.Tensor]:
    """The recipe's views of ``train`` run through the frozen stages, once: the first
    trained stage and the activations and labels that :func:`finetune_activations`
    trains on (a federated round's local training reuses them round after round, as
    only the stages from there up change)."""
    if len(train) < 2:
        raise InvalidInput("fine-tuning needs at least two training images")
    start = finetune_start(model, config.train_from)
    _set_seed(config.seed)
    views = config.cached_views
    total = views * len(train)
    seen = 0

    def on_images(n: int) -> None:
        nonlocal seen
        seen += n
        if progress is not None:
            progress(seen / total, f"caching activations {seen}/{total}")

    x, y = _activations(
        model,
        train,
        start,
        views,
        config.augment,
        config.batch_size,
        config.seed,
        on_images,
        frozen,
    )
    return start, x, y


def finetune_activations(
    model: SplitModel,
    start: int,
    x_train: torch.Tensor,
    y_train: torch.Tensor,
    x_val: torch.Tensor | None = None,
    y_val: torch.Tensor | None = None,
    config: FinetuneConfig | None = None,
    progress: Progress | None = None,
) -> TrainReport:
    """The fine-tuning recipe on activations at stage ``start`` (stages ``start`` up and
    the head train, in place): what :func:`finetune` runs after caching them, and what a
    federated round's local training runs on its cached activations. Without a
    validation set, or with ``config.select`` "last", it trains for ``config.epochs``
    epochs and keeps the last; else it keeps the best epoch (the starting weights
    included) by validation loss."""
    cfg = config or FinetuneConfig()
    if cfg.select == "last":
        x_val = y_val = None
    gen = _set_seed(cfg.seed)
    trainable = _Upper(model, start)
    # pretrained blocks move slowly, the head fast: large steps on a few hundred
    # images would wash out what the blocks learned on ImageNet and on other edges
    groups = [
        {"params": list(trainable.stages.parameters()), "lr": cfg.lr * cfg.backbone_lr_scale},
        {"params": list(trainable.head.parameters()), "lr": cfg.lr},
    ]
    return _fit_model(model, trainable, x_train, y_train, x_val, y_val, cfg, gen, progress, groups)


@torch.inference_mode()
def predict_proba(
    model: SplitModel, images: ImageSet, batch_size: int = 64
) -> tuple[np.ndarray, np.ndarray]:
    """Class probabilities [N, C] and true labels [N] for an ImageSet."""
    model.eval()
    probs, labels = [], []
    for x, y in batches(images, model.arch.input_size, batch_size):
        probs.append(model(x).softmax(1))
        labels.append(y)
    return torch.cat(probs).numpy(), torch.cat(labels).numpy()


def evaluate(
    model: SplitModel,
    images: ImageSet,
    batch_size: int = 64,
    frozen: LowerRunner | None = None,
) -> EvalMetrics:
    """Metrics of ``model`` on a labelled ImageSet; ``frozen``, a runner of this model,
    runs the stages below its ``end``."""
    if not len(images):
        raise InvalidInput("cannot evaluate on an empty set")
    if frozen is not None:
        acts = frozen_activations(model, images, frozen.end, batch_size, frozen)
        return evaluate_activations(model, acts, batch_size)
    probs, labels = predict_proba(model, images, batch_size)
    return compute_metrics(labels, probs.argmax(1), model.class_names, probs)


@dataclass
class FrozenActivations:
    """Activations at stage ``start`` of a labelled set, and the digest of the frozen
    stages that made them (:meth:`~fl_core.model.SplitModel.stages_digest`): every model
    with the same digest can be evaluated from them with :func:`evaluate_activations`,
    without running those stages again."""

    x: torch.Tensor
    labels: torch.Tensor
    start: int
    fingerprint: str

    def fits(self, model: SplitModel) -> bool:
        return model.stages_digest(self.start) == self.fingerprint


def frozen_activations(
    model: SplitModel,
    images: ImageSet,
    start: int,
    batch_size: int = 64,
    frozen: LowerRunner | None = None,
    views: int = 1,
    seed: int = 0,
) -> FrozenActivations:
    """Stages ``0 .. start-1`` of ``model`` over ``images`` (by ``frozen``, a runner of
    this model that stops before ``start``, when given); with ``views`` > 1, the images
    once plain and then ``views - 1`` times augmented (seeded by ``seed``)."""
    if not len(images):
        raise InvalidInput("cannot evaluate on an empty set")
    x, y = _activations(model, images, start, views, views > 1, batch_size, seed, frozen=frozen)
    return FrozenActivations(x, y, start, model.stages_digest(start))


def frozen_runner(
    model: SplitModel, train_from: str | None = None, backend: Backend = "onnxruntime"
) -> LowerRunner | None:
    """The runner of the stages that fine-tuning from ``train_from`` leaves frozen (see
    :func:`finetune_start`) on ``backend``; None when fine-tuning trains every stage."""
    start = finetune_start(model, train_from)
    return lower_runner(model, backend, end=start) if start > 0 else None


def evaluate_activations(
    model: SplitModel, acts: FrozenActivations, batch_size: int = 64
) -> EvalMetrics:
    """Metrics of ``model`` from activations of its frozen stages (:func:`frozen_activations`
    of a model with the same frozen weights)."""
    if not acts.fits(model):
        raise ValueError(
            f"the activations come from other weights below stage {acts.start} than this model's"
        )
    model.eval()
    end = len(model.stages)
    probs = _predict_rows(
        lambda x: model.classify(model.run_stages(x, acts.start, end)), acts.x, batch_size
    )
    return compute_metrics(
        acts.labels.numpy(), probs.argmax(1).numpy(), model.class_names, probs.numpy()
    )


def evaluate_features(
    model: SplitModel, features: torch.Tensor, labels: torch.Tensor, batch_size: int = 256
) -> EvalMetrics:
    """Metrics of the upper part on features at the cut."""
    model.eval()
    probs = _predict_rows(model.upper, features.float(), batch_size)
    return compute_metrics(
        labels.numpy(), probs.argmax(1).numpy(), model.class_names, probs.numpy()
    )


__all__ = [
    "FinetuneConfig",
    "FrozenActivations",
    "Progress",
    "TrainReport",
    "UpperTrainConfig",
    "class_weights",
    "evaluate",
    "evaluate_activations",
    "evaluate_features",
    "finetune",
    "finetune_activations",
    "finetune_start",
    "frozen_activations",
    "frozen_runner",
    "predict_proba",
    "train_activations",
    "train_upper",
]
