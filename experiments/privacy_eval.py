"""``python -m experiments.privacy_eval --out DIR``: what an attacker recovers from what
edges upload, and what each privacy mode costs in federated accuracy.

A research experiment run from a checkout (like torchvision's ``references/``), not
part of the installed product: it imports ``fl_core`` and nothing imports it.

The threat: an honest-but-curious server (or anyone who reads the uploads) who knows
the base model and the feature spec, and owns images like the edges' own. It trains a
decoder from features back to images on its own data (features passed through the
same privacy transform the spec states, fresh noise every epoch), then decodes what
the edges uploaded. Attackers: a disjoint half of elpv (in-domain), and NEU-DET steel
images (cross-domain, from ``--neu-root``; by default ``../shared/data/neu-det`` beside
the checkout, skipped when absent).

Measured, for each mode, cut and noise level:

- ``ssim``, ``psnr``: of the reconstructions against the uploaded originals (64x64
  grey); ``psnr_gain_db`` over the attacker's best guess without features, the mean
  image of its own data (``baseline``).
- ``reid_top1``: share of reconstructions whose nearest uploaded original (normalised
  correlation) is the right one; ``reid_chance`` = 1 / uploads.
- ``accuracy``: the federated stage-2 accuracy: the part above the cut trained, as the
  server does, on the uploads (decoded from the wire format), evaluated on clean
  features of a held-out test split.

In ``stats`` mode there are no per-image rows: re-identification is impossible by
construction (reported as 0), and the attacker's best per-image guess is the decoded
class mean of the image's edge (the attacker is even told each image's class).

And ``updates``: one federated round's update of one edge, at the server's default
round settings, read by the server; a membership attack scores candidate images by how
much the update lowered their loss (AUC of the edge's images against the other edges'),
without noise and with each of ``UPDATE_SIGMAS`` as the server's noise multiplier, with
the updated model's accuracy. ``--only updates`` runs this part alone.

Everything runs in process on the CPU with fl_core's own packing, training and
evaluation; nothing is downloaded.
"""

from __future__ import annotations

import copy
import dataclasses
import enum
import hashlib
import json
import math
import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import torch
import torch.nn.functional as F
import typer
from torch import nn

from fl_core import serialization
from fl_core.data import (
    SYMMETRIES,
    ImageSet,
    batches,
    load_elpv,
    load_image_folder,
    stratified_indices,
    symmetric_view,
)
from fl_core.features import FeatureBatch, apply_privacy, make_spec
from fl_core.model import SplitModel, build_split_model
from fl_core.privacy import ClassStats, pack_upload, training_rows, unpack_upload
from fl_core.rounds import (
    aggregate,
    apply_update,
    make_update,
    pack_update,
    snapshot,
    unpack_update,
    update_names,
)
from fl_core.schemas import PrivacyConfig, RoundPlan
from fl_core.training import (
    FinetuneConfig,
    UpperTrainConfig,
    evaluate_activations,
    evaluate_features,
    finetune_activations,
    frozen_activations,
    train_activations,
    train_upper,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
NEU_DET = REPO_ROOT.parent / "shared" / "data" / "neu-det"
IMAGE_SIZE = 64
N_EDGES = 3
#: noise multipliers of the round-update rows (the server's ROUND_NOISE_MULTIPLIER)
UPDATE_SIGMAS: tuple[float, ...] = (0.001, 0.01, 0.1, 0.5, 1.0)

Log = Callable[[str], None]


class Only(enum.StrEnum):
    """Run one part of the evaluation alone."""

    updates = "updates"


def _print(message: str) -> None:
    print(message, flush=True)


@dataclass
class EvalOptions:
    out: Path
    quick: bool = False
    #: elpv images used in all (None: all 2,624); half attack, half are the edges'
    limit: int | None = None
    input_size: int | None = None
    seed: int = 0
    neu_root: Path = NEU_DET
    neu_limit: int | None = None
    #: noise sigmas of the trade-off curve (pooled rows clipped to ``clip_norm``)
    sigmas: Sequence[float] = (0.5, 1.0, 2.0)
    clip_norm: float = 24.0
    decoder_epochs: int | None = None
    upper_epochs: int | None = None
    accuracy_seeds: int | None = None
    #: noise multipliers of the round-update attack (besides 0)
    update_sigmas: Sequence[float] = UPDATE_SIGMAS
    #: run only this part (None: all of it)
    only: Only | None = None

    def resolved(self) -> EvalOptions:
        q = self.quick
        return EvalOptions(
            out=self.out,
            quick=q,
            limit=self.limit if self.limit is not None else (640 if q else None),
            input_size=self.input_size or (128 if q else 160),
            seed=self.seed,
            neu_root=self.neu_root,
            neu_limit=self.neu_limit if self.neu_limit is not None else (120 if q else 600),
            sigmas=tuple(self.sigmas) if not q else (1.0,),
            clip_norm=self.clip_norm,
            decoder_epochs=self.decoder_epochs or (8 if q else 20),
            upper_epochs=self.upper_epochs or (30 if q else 60),
            accuracy_seeds=self.accuracy_seeds or (1 if q else 3),
            update_sigmas=tuple(self.update_sigmas),
            only=self.only,
        )


@dataclass(frozen=True)
class Config:
    """One row of the evaluation: what the edges upload, and who attacks it."""

    mode: str
    cut: str
    privacy: PrivacyConfig
    attacker: str = "elpv"

    @property
    def key(self) -> str:
        return f"{self.attacker}/{self.cut}/{self.privacy.model_dump_json()}"


@dataclass
class Data:
    """Features at every cut needed, and the 64x64 grey images, of one image set."""

    feats: dict[str, torch.Tensor]
    images: torch.Tensor  # [N, 1, 64, 64] in [0, 1]
    labels: torch.Tensor


@dataclass
class Row:
    mode: str
    cut: str
    attacker: str
    noise_sigma: float
    clip_norm: float | None
    accuracy: float
    ssim: float
    psnr: float
    psnr_gain_db: float
    reid_top1: float
    reid_chance: float
    input_size: int = 0
    stats_rank: int = 0
    #: stats: AUC of telling an edge's training images from unseen ones by how much of
    #: their feature lies in the edge's factor subspace (0.5 is chance); None for rows
    membership_auc: float | None = None
    default: bool = False
    note: str = ""
    examples: list[int] = field(default_factory=list, repr=False)


# --------------------------------------------------------------------------- metrics


def _gaussian_window(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    return g / g.sum()


def ssim(a: torch.Tensor, b: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """Mean SSIM per image (Wang et al. 2004: 11x11 Gaussian window, sigma 1.5,
    K1 0.01, K2 0.03, valid region only), for [N, 1, H, W] images."""
    a, b = a.double(), b.double()
    g = _gaussian_window().to(a)
    gx, gy = g.view(1, 1, 1, -1), g.view(1, 1, -1, 1)

    def blur(x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(F.conv2d(x, gx), gy)

    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    mu_a, mu_b = blur(a), blur(b)
    var_a = blur(a * a) - mu_a**2
    var_b = blur(b * b) - mu_b**2
    cov = blur(a * b) - mu_a * mu_b
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / (
        (mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2)
    )
    return s.mean(dim=(1, 2, 3)).float()


def psnr(a: torch.Tensor, b: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """PSNR in dB per image."""
    mse = ((a.double() - b.double()) ** 2).mean(dim=(1, 2, 3)).clamp_min(1e-12)
    return (10 * torch.log10(data_range**2 / mse)).float()


def reid_top1(reconstructions: torch.Tensor, originals: torch.Tensor) -> float:
    """Share of reconstructions whose most correlated original is their own."""

    def unit(x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(x.shape[0], -1).double()
        flat = flat - flat.mean(1, keepdim=True)
        return flat / flat.norm(dim=1, keepdim=True).clamp_min(1e-12)

    corr = unit(reconstructions) @ unit(originals).T
    hits = corr.argmax(1) == torch.arange(len(corr))
    return float(hits.double().mean())


# --------------------------------------------------------------------------- data


def _extract(
    model: SplitModel, images: ImageSet, cuts: Sequence[str], batch_size: int = 32
) -> Data:
    """One pass of the lower stages: features at each cut, and the image at 64 px."""
    model.eval()
    model.to(memory_format=torch.channels_last)
    wanted = {model.stage_index(c): c for c in cuts}
    last = max(wanted) + 1
    feats: dict[str, list[torch.Tensor]] = {c: [] for c in cuts}
    small: list[torch.Tensor] = []
    labels: list[torch.Tensor] = []
    with torch.inference_mode():
        for x, y in batches(images, model.arch.input_size, batch_size):
            grey = x.mean(1, keepdim=True)
            small.append(F.interpolate(grey, size=(IMAGE_SIZE, IMAGE_SIZE), mode="area"))
            h = model.normalize(x).contiguous(memory_format=torch.channels_last)
            for i, stage in enumerate(model.stages[:last]):
                h = stage(h)
                if i in wanted:
                    feats[wanted[i]].append(h.float().contiguous())
            labels.append(y.long())
    return Data({c: torch.cat(v) for c, v in feats.items()}, torch.cat(small), torch.cat(labels))


def _subset(data: Data, idx: Sequence[int]) -> Data:
    t = torch.as_tensor(list(idx), dtype=torch.long)
    return Data({c: v[t] for c, v in data.feats.items()}, data.images[t], data.labels[t])


def _limit(ds: ImageSet, n: int | None, seed: int) -> ImageSet:
    if n is None or n >= len(ds):
        return ds
    keep, _ = stratified_indices(ds.labels, [n, len(ds) - n], seed)
    return ds.subset(keep)


def _cached_extract(
    model: SplitModel, images: ImageSet, cuts: Sequence[str], cache: Path, log: Log
) -> Data:
    """Extraction is most of the run's time: keep it (safetensors) for re-runs."""
    ident = json.dumps(
        [str(r.path) for r in images.records] + [model.arch.to_json(), *cuts], sort_keys=True
    )
    path = cache / f"{images.name}-{hashlib.sha256(ident.encode()).hexdigest()[:16]}.safetensors"
    if path.is_file():
        tensors, _ = serialization.loads(path.read_bytes())
        log(f"features of {len(images)} {images.name} images from {path.name}")
        feats = {c: tensors[f"feat.{c}"] for c in cuts}
        return Data(feats, tensors["images"], tensors["labels"])
    started = time.perf_counter()
    data = _extract(model, images, cuts)
    log(f"extracted {len(images)} {images.name} images in {time.perf_counter() - started:.0f}s")
    cache.mkdir(parents=True, exist_ok=True)
    tensors = {f"feat.{c}": v for c, v in data.feats.items()}
    tensors |= {"images": data.images, "labels": data.labels}
    path.write_bytes(serialization.dumps(tensors))
    return data


# --------------------------------------------------------------------------- decoder


class Decoder(nn.Module):
    """Features (a vector or a map) -> a 64x64 grey image: a small up-sampling net.

    Sized for two CPU cores: 48 channels at 8x8, 24 at 16x16, 12 at 32x32, then bilinear
    up to 64x64 (what pooled or 5x5 features hold about a cell is coarser than that).
    """

    def __init__(self, feature_shape: Sequence[int], mean: torch.Tensor, std: torch.Tensor):
        super().__init__()
        self.register_buffer("mu", mean)
        self.register_buffer("sd", std)
        self.is_map = len(feature_shape) == 3
        if self.is_map:
            self.inp: nn.Module = nn.Sequential(
                nn.Conv2d(feature_shape[0], 48, 3, padding=1), nn.BatchNorm2d(48), nn.ReLU()
            )
        else:
            self.inp = nn.Sequential(nn.Linear(feature_shape[0], 48 * 8 * 8), nn.ReLU())
        layers: list[nn.Module] = []
        for c_in, c_out in ((48, 24), (24, 12)):
            layers += [
                nn.Upsample(scale_factor=2, mode="nearest"),
                nn.Conv2d(c_in, c_out, 3, padding=1),
                nn.BatchNorm2d(c_out),
                nn.ReLU(),
            ]
        layers += [
            nn.Conv2d(12, 1, 3, padding=1),
            nn.Upsample(size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False),
            nn.Sigmoid(),
        ]
        self.up = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mu: torch.Tensor = self.mu  # type: ignore[assignment]
        sd: torch.Tensor = self.sd  # type: ignore[assignment]
        x = (x - mu) / sd
        if self.is_map:
            x = F.interpolate(x, size=(8, 8), mode="bilinear", align_corners=False)
            h = self.inp(x)
        else:
            h = self.inp(x).view(-1, 48, 8, 8)
        out: torch.Tensor = self.up(h)
        return out


def train_decoder(
    feats: torch.Tensor,
    images: torch.Tensor,
    privacy: PrivacyConfig,
    epochs: int,
    seed: int,
    batch_size: int = 64,
) -> Decoder:
    """Fit a decoder on the attacker's own (features, image) pairs; the features go
    through the spec's privacy transform with fresh noise every epoch."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    sample = apply_privacy(feats, privacy, gen)
    dims = [0, 2, 3] if feats.dim() == 4 else [0]
    mean = sample.mean(dim=dims, keepdim=True)[0]
    std = sample.std(dim=dims, keepdim=True)[0].clamp_min(1e-3)
    dec = Decoder(list(feats.shape[1:]), mean, std)
    opt = torch.optim.AdamW(dec.parameters(), lr=2e-3, weight_decay=1e-4)
    steps = epochs * math.ceil(len(feats) / batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(1, steps))
    dec.train()
    for _ in range(epochs):
        private = apply_privacy(feats, privacy, gen)
        order = torch.randperm(len(feats), generator=gen)
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            if len(idx) < 2:
                continue
            opt.zero_grad(set_to_none=True)
            loss = F.mse_loss(dec(private[idx]), images[idx])
            loss.backward()
            opt.step()
            sched.step()
    dec.eval()
    return dec


@torch.inference_mode()
def _decode(dec: Decoder, feats: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    return torch.cat([dec(feats[i : i + batch_size]) for i in range(0, len(feats), batch_size)])


# --------------------------------------------------------------------------- the evaluation


class _Evaluation:
    def __init__(self, opts: EvalOptions, log: Log) -> None:
        self.o = opts
        self.log = log
        self.models: dict[str, SplitModel] = {}
        self.decoders: dict[str, Decoder] = {}
        self.accuracies: dict[str, float] = {}

    def model(self, cut: str) -> SplitModel:
        if cut not in self.models:
            self.models[cut] = build_split_model(
                ["functional", "defective"], cut=cut, input_size=self.o.input_size, seed=0
            )
        return self.models[cut]

    def uploads(
        self, cfg: Config, data: Data, parts: list[list[int]]
    ) -> list[FeatureBatch | ClassStats]:
        """What each edge puts on the wire, decoded as the server decodes it."""
        spec = make_spec(self.model(cfg.cut), 1, "0" * 64, cfg.privacy)
        out = []
        for e, part in enumerate(parts):
            t = torch.as_tensor(part)
            body = pack_upload(
                data.feats[cfg.cut][t], data.labels[t], spec, f"edge-{e}", seed=self.o.seed + e
            )
            out.append(unpack_upload(body, spec, max_rows=10**6))
        return out

    def accuracy(self, cfg: Config, uploads: list[FeatureBatch | ClassStats], test: Data) -> float:
        key = f"{cfg.cut}/{cfg.privacy.model_dump_json()}"
        if key in self.accuracies:
            return self.accuracies[key]
        accs = []
        assert self.o.accuracy_seeds is not None and self.o.upper_epochs is not None
        seeds, epochs = self.o.accuracy_seeds, self.o.upper_epochs
        if cfg.cut != "pooled":
            # training blocks on maps costs far more than a head on vectors: one seed,
            # a third of the epochs (early stopping usually ends sooner anyway)
            seeds, epochs = 1, max(10, epochs // 3)
        for s in range(seeds):
            x, y = training_rows(uploads, seed=self.o.seed + s)
            model = copy.deepcopy(self.model(cfg.cut))
            train_upper(model, x, y, UpperTrainConfig(epochs=epochs, seed=s))
            accs.append(evaluate_features(model, test.feats[cfg.cut], test.labels).accuracy)
        self.accuracies[key] = float(np.mean(accs))
        return self.accuracies[key]

    def decoder(self, cfg: Config, attacker: Data) -> Decoder:
        # in stats mode the attacker decodes means of rows, so it trains on clean rows
        privacy = cfg.privacy if cfg.mode != "stats" else PrivacyConfig()
        key = f"{cfg.attacker}/{cfg.cut}/{privacy.model_dump_json()}"
        if key not in self.decoders:
            started = time.perf_counter()
            assert self.o.decoder_epochs is not None
            self.decoders[key] = train_decoder(
                attacker.feats[cfg.cut], attacker.images, privacy, self.o.decoder_epochs, 0
            )
            self.log(f"decoder {key[:60]}... trained in {time.perf_counter() - started:.0f}s")
        return self.decoders[key]


def _configs(opts: EvalOptions, default: PrivacyConfig, neu: bool) -> list[Config]:
    clip = opts.clip_norm
    cfgs = [Config("pooled", "pooled", PrivacyConfig(mode="pooled"))]
    cfgs += [
        Config("pooled", "pooled", PrivacyConfig(mode="pooled", clip_norm=clip, noise_sigma=s))
        for s in opts.sigmas
    ]
    spatial_cuts = ["b13"] if opts.quick else ["b13", "b10"]
    cfgs += [Config("spatial", c, PrivacyConfig(mode="spatial")) for c in spatial_cuts]
    cfgs.append(Config("stats", "pooled", PrivacyConfig(mode="stats", stats_rank=0)))
    cfgs.append(Config("stats", "pooled", PrivacyConfig(mode="stats")))
    if not opts.quick:
        cfgs.append(
            Config("stats", "pooled", PrivacyConfig(mode="stats", clip_norm=clip, noise_sigma=1.0))
        )
    default_cfg = Config(default.mode, "pooled" if default.mode != "spatial" else "b10", default)
    if default_cfg.key not in {c.key for c in cfgs}:
        cfgs.append(default_cfg)
    if neu:
        cross = [cfgs[0], default_cfg]
        seen: set[str] = set()
        for c in cross:
            c2 = Config(c.mode, c.cut, c.privacy, attacker="neu-det")
            if c2.key not in seen:
                seen.add(c2.key)
                cfgs.append(c2)
    return cfgs


def server_default_privacy() -> PrivacyConfig:
    """The privacy config a server gets without PRIVACY__* settings."""
    from server_service.config import Settings

    privacy: PrivacyConfig = Settings.model_fields["privacy"].get_default(call_default_factory=True)
    return privacy


def _auc(members: np.ndarray, others: np.ndarray) -> float:
    """Probability that a member scores above a non-member (ties count half)."""
    scores = np.concatenate([members, others]).astype(np.float64)
    # 1-based ranks, tied scores sharing their mean rank (a model that gives many images
    # the same loss must not rank members by where they happen to stand)
    _, where, counts = np.unique(scores, return_inverse=True, return_counts=True)
    ranks = (np.cumsum(counts) - (counts - 1) / 2)[where]
    r = ranks[: len(members)].sum() - len(members) * (len(members) + 1) / 2
    return float(r / (len(members) * len(others)))


def membership_auc(
    stats: Sequence[ClassStats],
    feats: torch.Tensor,
    labels: torch.Tensor,
    parts: Sequence[Sequence[int]],
    others: torch.Tensor,
    other_labels: torch.Tensor,
) -> float | None:
    """Mean over edges of the AUC of an attacker who holds candidate images and an edge's
    statistics: a training image shaped the edge's factors, so more of its feature (about
    its class mean) lies in their span than of an image the edge never saw."""
    aucs = []
    for st, part in zip(stats, parts, strict=True):
        if st.factors is None or not len(st.factors):
            continue
        idx = torch.as_tensor(list(part))
        members = _share_in_factors(st, feats[idx], labels[idx])
        aucs.append(_auc(members, _share_in_factors(st, others, other_labels)))
    return float(np.mean(aucs)) if aucs else None


def _share_in_factors(st: ClassStats, x: torch.Tensor, y: torch.Tensor) -> np.ndarray:
    """Per row: the share of its squared distance from its class mean that lies in the
    span of the edge's factors."""
    assert st.factors is not None
    basis = torch.linalg.qr(st.factors.double().T)[0]
    centred = x.double() - st.means.double()[y]
    inside = ((centred @ basis) ** 2).sum(1)
    return (inside / (centred**2).sum(1).clamp_min(1e-12)).numpy()


# --------------------------------------------------------------------------- round updates


@dataclass
class UpdateRow:
    """The membership attack on one round's model, at one noise multiplier."""

    noise_multiplier: float
    #: standard deviation of the noise on each updated parameter (one edge: weight 1)
    noise_std: float
    #: who sees the update this way: the server reads each edge's update as sent, before
    #: its noise; everyone who gets the round's model sees the noised average
    reader: str
    #: AUC of the drop in loss from the round's model to the updated one (the headline)
    membership_auc: float
    #: AUC of the loss under the updated model alone
    membership_auc_loss: float
    #: the updated model's accuracy on the test split
    accuracy: float


def view_activations(
    model: SplitModel, images: ImageSet, start: int, views: int, batch_size: int = 32
) -> torch.Tensor:
    """Stages ``0 .. start-1`` over the first ``views`` symmetric views of ``images``,
    [views, N, ...] in image order (the views a round trains on, without augmentation)."""
    model.eval()
    out: list[list[torch.Tensor]] = [[] for _ in range(views)]
    with torch.inference_mode():
        for x, _ in batches(images, model.arch.input_size, batch_size):
            for v in range(views):
                h = model.run_stages(model.normalize(symmetric_view(x, v)), 0, start)
                out[v].append(h.float().contiguous())
    return torch.stack([torch.cat(v) for v in out])


@torch.inference_mode()
def view_losses(
    model: SplitModel, acts: torch.Tensor, labels: torch.Tensor, start: int, batch_size: int = 256
) -> torch.Tensor:
    """Per image: the model's cross-entropy (logits as it predicts), mean over the views
    of ``acts`` [views, N, ...]."""
    model.eval()
    end = len(model.stages)
    losses = []
    for view in acts:
        logits = torch.cat(
            [
                model.classify(model.run_stages(view[i : i + batch_size], start, end))
                for i in range(0, len(view), batch_size)
            ]
        )
        losses.append(F.cross_entropy(logits.float(), labels, reduction="none"))
    return torch.stack(losses).mean(0).double()


def update_attack(
    model: SplitModel,
    members: ImageSet,
    nonmembers: ImageSet,
    test: ImageSet,
    plan: RoundPlan,
    noise_multipliers: Sequence[float] = (),
    config: FinetuneConfig | None = None,
    seed: int = 0,
    batch_size: int = 32,
) -> dict[str, Any]:
    """One edge's round, and a membership attack by whoever reads its update.

    ``model`` is the round's model (a head already trained). The edge trains it on
    ``members`` exactly as an edge's cycle job does (the recipe ``config``, default
    :class:`FinetuneConfig`, with the plan's stage, epochs and learning rate; the update
    clipped, packed in the plan's dtype and checked by the server's unpacking). The
    attacker knows the round's model, applies the update (at ``plan.noise_multiplier`` 0,
    then each of ``noise_multipliers``, as the server's aggregation adds it with this edge
    alone in the round) and scores each candidate image by how much its loss dropped,
    averaged over the symmetric views the round trains on. ``membership_auc``: the AUC
    of members against ``nonmembers`` (images like them that the edge did not train on);
    0.5 is chance."""
    cfg = dataclasses.replace(
        config or FinetuneConfig(),
        train_from=plan.train_from,
        epochs=plan.epochs,
        lr=plan.lr,
        seed=seed,
    )
    round_model = copy.deepcopy(model)
    edge = copy.deepcopy(model)
    start, x, y = train_activations(edge, members, cfg)
    names = update_names(edge, plan.train_from)
    before = snapshot(edge, names)
    finetune_activations(edge, start, x, y, config=cfg)
    delta, norm = make_update(edge, before, plan)
    del x, y, edge
    params = dict(round_model.named_parameters())
    body = pack_update(
        delta,
        plan,
        spec_hash="0" * 64,
        edge_id="edge-0",
        round_number=1,
        base_version=1,
        samples=len(members),
    )
    update = unpack_update(
        body,
        expected={n: list(params[n].shape) for n in names},
        plan=plan,
        spec_hash="0" * 64,
        round_number=1,
        base_version=1,
        max_samples=len(members),
    )
    # safetensors loads tensors in no fixed order, and the server's noise is drawn tensor
    # after tensor: the model's order keeps a seed's noise the same from run to run
    update = dataclasses.replace(update, tensors={n: update.tensors[n] for n in names})

    views = min(cfg.views if cfg.augment else 1, len(SYMMETRIES))
    mem_acts = view_activations(round_model, members, start, views, batch_size)
    non_acts = view_activations(round_model, nonmembers, start, views, batch_size)
    mem_y = torch.as_tensor(members.labels)
    non_y = torch.as_tensor(nonmembers.labels)
    test_acts = frozen_activations(round_model, test, start, batch_size)
    mem_before = view_losses(round_model, mem_acts, mem_y, start)
    non_before = view_losses(round_model, non_acts, non_y, start)

    rows: list[UpdateRow] = []
    for i, sigma in enumerate([0.0, *noise_multipliers]):
        noisy_plan = plan.model_copy(update={"noise_multiplier": sigma})
        gen = torch.Generator().manual_seed(seed * 1000 + i)
        after = copy.deepcopy(round_model)
        apply_update(after, aggregate([update], noisy_plan, generator=gen))
        mem_after = view_losses(after, mem_acts, mem_y, start)
        non_after = view_losses(after, non_acts, non_y, start)
        rows.append(
            UpdateRow(
                noise_multiplier=sigma,
                noise_std=sigma * plan.clip_norm,
                reader="the server (each update as sent)"
                if sigma == 0
                else "whoever gets the round's model (server noise, one edge)",
                membership_auc=_auc(
                    (mem_before - mem_after).numpy(), (non_before - non_after).numpy()
                ),
                membership_auc_loss=_auc(-mem_after.numpy(), -non_after.numpy()),
                accuracy=evaluate_activations(after, test_acts).accuracy,
            )
        )
    n_params = sum(t.numel() for t in update.tensors.values())
    return {
        "train_from": plan.train_from,
        "epochs": plan.epochs,
        "lr": plan.lr,
        "clip_norm": plan.clip_norm,
        "dtype": plan.dtype,
        "views": views,
        "batch_size": cfg.batch_size,
        "members": len(members),
        "nonmembers": len(nonmembers),
        "test_images": len(test),
        "update_params": n_params,
        "norm_before_clip": norm,
        "norm_sent": update.norm,
        "clipped": norm > plan.clip_norm,
        "accuracy_before": evaluate_activations(round_model, test_acts).accuracy,
        "membership_auc_before": _auc(-mem_before.numpy(), -non_before.numpy()),
        "rows": [asdict(r) for r in rows],
    }


def default_round_plan(model: SplitModel) -> RoundPlan:
    """The round plan a server gets without ROUND_* settings, for ``model``."""
    from server_service.config import Settings

    fields = Settings.model_fields

    def default(name: str) -> Any:
        return fields[name].get_default(call_default_factory=True)

    return RoundPlan(
        rounds=max(1, default("rounds")),
        train_from=default("round_train_from") or model.info.finetune_from,
        epochs=default("round_epochs"),
        lr=default("round_lr"),
        clip_norm=default("round_clip_norm"),
        noise_multiplier=default("round_noise_multiplier"),
        dtype=default("round_dtype"),
        deadline_s=default("round_deadline_s"),
    )


def mark_default(results: dict[str, Any], default: PrivacyConfig) -> dict[str, Any]:
    """Flag the in-domain row measured with the server's default privacy config."""
    results["server_default_privacy"] = default.model_dump(mode="json")
    for m in results["modes"]:
        m["default"] = (
            m["attacker"] == "elpv"
            and m["mode"] == default.mode
            and m["cut"] == "pooled"
            and m["clip_norm"] == default.clip_norm
            and m["noise_sigma"] == default.noise_sigma
            and (m["mode"] != "stats" or m.get("stats_rank") == default.stats_rank)
        )
    return results


def run_privacy_eval(options: EvalOptions, log: Log = _print) -> dict[str, Any]:
    """Run the attack for every configuration, and the membership attack on one round's
    update (``updates``); write results.json, results.md, grid.png."""
    started = time.perf_counter()
    o = options.resolved()
    o.out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(o.seed)
    default = server_default_privacy()

    elpv = _limit(load_elpv(), o.limit, o.seed)
    attack_idx, target_idx = stratified_indices(elpv.labels, [1, 1], o.seed)
    neu_set: ImageSet | None = None
    notes: list[str] = []
    # --only updates: the round-update attack alone, without the decoders
    attacks = o.only is None
    if attacks and o.neu_root.is_dir():
        neu_set = _limit(load_image_folder(o.neu_root), o.neu_limit, o.seed)
        neu_set.name = "neu-det"
    elif attacks:
        notes.append(
            f"cross-domain attacker skipped: NEU-DET not found at {o.neu_root} "
            "(it is not on users' machines)"
        )
    cfgs = _configs(o, default, neu_set is not None) if attacks else []
    cuts = sorted({"pooled", *(c.cut for c in cfgs)}, key=lambda c: (c == "pooled", c))
    ev = _Evaluation(o, log)
    base = ev.model("pooled")
    cache = o.out / "cache"
    all_elpv = _cached_extract(base, elpv, cuts, cache, log)
    attacker = {"elpv": _subset(all_elpv, attack_idx)}
    if neu_set is not None:
        attacker["neu-det"] = _cached_extract(base, neu_set, cuts, cache, log)
    targets = _subset(all_elpv, target_idx)
    up_idx, test_idx = stratified_indices(targets.labels.numpy(), [3, 1], o.seed)
    uploaded, test = _subset(targets, up_idx), _subset(targets, test_idx)
    parts = stratified_indices(uploaded.labels.numpy(), [1.0] * N_EDGES, o.seed)
    edge_of = torch.empty(len(up_idx), dtype=torch.long)
    for e, part in enumerate(parts):
        edge_of[part] = e

    mean_image = attacker["elpv"].images.mean(0, keepdim=True)
    guess = mean_image.expand_as(uploaded.images)
    baseline = {
        "ssim": float(ssim(guess, uploaded.images).mean()),
        "psnr": float(psnr(guess, uploaded.images).mean()),
    }
    chance = 1.0 / len(up_idx)
    rows: list[Row] = []
    recons: dict[str, torch.Tensor] = {}
    for cfg in cfgs:
        t0 = time.perf_counter()
        ups = ev.uploads(cfg, uploaded, parts)
        acc = ev.accuracy(cfg, ups, test)
        dec = ev.decoder(cfg, attacker[cfg.attacker])
        note = ""
        members_auc: float | None = None
        if cfg.mode == "stats":
            # one decoded class mean per edge and class: the best per-image guess
            recon = torch.empty_like(uploaded.images)
            for e, st in enumerate(ups):
                assert isinstance(st, ClassStats)
                decoded = _decode(dec, st.means)
                for c in range(len(st.counts)):
                    sel = [i for i in parts[e] if int(uploaded.labels[i]) == c]
                    if sel:
                        recon[sel] = decoded[c] if int(st.counts[c]) else mean_image[0]
            reid = 0.0
            note = "no per-image rows: re-identification impossible; guess = decoded class mean"
            stats = [u for u in ups if isinstance(u, ClassStats)]
            members_auc = membership_auc(
                stats,
                uploaded.feats["pooled"],
                uploaded.labels,
                parts,
                test.feats["pooled"],
                test.labels,
            )
        else:
            # uploads come back in edge order: put them back in image order
            sent = torch.empty_like(uploaded.feats[cfg.cut])
            for part, up in zip(parts, ups, strict=True):
                assert isinstance(up, FeatureBatch)
                sent[part] = up.features
            recon = _decode(dec, sent)
            reid = reid_top1(recon, uploaded.images)
        row = Row(
            mode=cfg.mode,
            cut=cfg.cut,
            attacker=cfg.attacker,
            noise_sigma=cfg.privacy.noise_sigma,
            clip_norm=cfg.privacy.clip_norm,
            accuracy=acc,
            ssim=float(ssim(recon, uploaded.images).mean()),
            psnr=float(psnr(recon, uploaded.images).mean()),
            psnr_gain_db=0.0,
            reid_top1=reid,
            reid_chance=chance,
            input_size=o.input_size or 0,
            stats_rank=cfg.privacy.stats_rank if cfg.mode == "stats" else 0,
            membership_auc=members_auc,
            default=cfg.privacy == default and cfg.attacker == "elpv",
            note=note,
        )
        row.psnr_gain_db = row.psnr - baseline["psnr"]
        rows.append(row)
        recons[_label(row)] = recon
        log(
            f"{_label(row):<40} acc {row.accuracy:.3f}  ssim {row.ssim:.3f}  "
            f"psnr +{row.psnr_gain_db:.2f} dB  reid {100 * row.reid_top1:.1f}%  "
            f"({time.perf_counter() - t0:.0f}s)"
        )

    # one round's update of edge 0, read by the server: membership of its images
    t0 = time.perf_counter()
    target_images = elpv.subset(target_idx)
    uploaded_images = target_images.subset(up_idx)
    head_privacy = default if default.mode != "spatial" else PrivacyConfig(mode="pooled")
    round_model = copy.deepcopy(base)
    head_ups = ev.uploads(Config(head_privacy.mode, "pooled", head_privacy), uploaded, parts)
    x, y = training_rows(head_ups, seed=o.seed)
    assert o.upper_epochs is not None
    train_upper(round_model, x, y, UpperTrainConfig(epochs=o.upper_epochs, seed=o.seed))
    plan = default_round_plan(round_model)
    updates = update_attack(
        round_model,
        uploaded_images.subset(parts[0]),
        uploaded_images.subset([i for part in parts[1:] for i in part]),
        target_images.subset(test_idx),
        plan,
        o.update_sigmas,
        seed=o.seed,
    )
    updates["head"] = f"trained by the server on {head_privacy.mode} uploads of {N_EDGES} edges"
    for r in updates["rows"]:
        log(
            f"round update, noise multiplier {r['noise_multiplier']:g}: membership AUC "
            f"{r['membership_auc']:.3f} (loss alone {r['membership_auc_loss']:.3f}), "
            f"accuracy {r['accuracy']:.3f}"
        )
    log(
        f"round update: norm {updates['norm_before_clip']:.3g} before clipping to "
        f"{plan.clip_norm:g}, accuracy {updates['accuracy_before']:.3f} before the round "
        f"({time.perf_counter() - t0:.0f}s)"
    )

    seconds = time.perf_counter() - started
    command = "python -m experiments.privacy_eval" + (" --quick" if o.quick else "")
    if o.only is not None:
        command += f" --only {o.only.value}"
    results = {
        "command": command,
        "machine": _machine(),
        "seconds": round(seconds, 1),
        "options": {
            "quick": o.quick,
            "elpv_images": len(elpv),
            "attacker_images": {k: len(v.labels) for k, v in attacker.items()},
            "uploaded_images": len(up_idx),
            "test_images": len(test_idx),
            "edges": N_EDGES,
            "input_size": o.input_size,
            "image_size": IMAGE_SIZE,
            "decoder_epochs": o.decoder_epochs,
            "upper_epochs": o.upper_epochs,
            "accuracy_seeds": o.accuracy_seeds,
            "seed": o.seed,
        },
        "baseline": baseline,
        "modes": [{k: v for k, v in asdict(r).items() if k != "examples"} for r in rows],
        "updates": updates,
        "notes": notes,
    }
    mark_default(results, default)
    (o.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (o.out / "results.md").write_text(results_markdown(results))
    if recons:
        _grid(uploaded.images, mean_image[0], recons, o.out / "grid.png", o.seed)
    log(f"privacy-eval done in {seconds:.0f}s: {o.out / 'results.md'}")
    return results


def _label(row: Row) -> str:
    noise = f" clip {row.clip_norm:g} sigma {row.noise_sigma:g}" if row.noise_sigma else ""
    who = "" if row.attacker == "elpv" else f" [{row.attacker} attacker]"
    cut = f" {row.cut}" if row.mode == "spatial" else ""
    rank = f" rank {row.stats_rank}" if row.mode == "stats" else ""
    return f"{row.mode}{rank}{cut}{noise}{who}"


def _machine() -> str:
    import os

    return (
        f"{platform.machine()} {platform.processor() or ''} {os.cpu_count()} CPUs, "
        f"torch {torch.__version__} ({torch.get_num_threads()} threads)"
    ).replace("  ", " ")


def results_markdown(results: dict[str, Any]) -> str:
    o = results["options"]
    lines = [
        "# Privacy evaluation",
        "",
        f"`{results['command']}` on {results['machine']}, {results['seconds']:.0f} s.",
        f"{o['uploaded_images']} uploaded elpv cells from {o['edges']} edges (targets), "
        f"{o['test_images']} held out for accuracy; attackers own "
        + ", ".join(f"{n} {k} images" for k, n in o["attacker_images"].items())
        + f"; features at {o['input_size']} px, reconstructions at {o['image_size']} px.",
        "",
    ]
    if results["modes"]:
        lines += _modes_markdown(results)
    if results.get("updates"):
        lines += _updates_markdown(results["updates"])
    lines += [f"- {n}" for n in results["notes"]]
    if any(m["mode"] == "stats" for m in results["modes"]):
        lines.append(
            "- stats: no per-image rows leave the edge, so re-identification is impossible "
            "by construction (0); the per-image guess is the decoded class mean."
        )
    lines.append("")
    return "\n".join(lines)


def _modes_markdown(results: dict[str, Any]) -> list[str]:
    b = results["baseline"]
    lines = [
        f"Baseline (the attacker's own mean image, no features): SSIM {b['ssim']:.3f}, "
        f"PSNR {b['psnr']:.2f} dB.",
        "",
        "| mode | cut | clip | sigma | attacker | accuracy | SSIM | PSNR dB | gain dB "
        "| re-id top-1 | chance | membership AUC |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for m in results["modes"]:
        star = " **(default)**" if m["default"] else ""
        clip = "" if m["clip_norm"] is None else f"{m['clip_norm']:g}"
        auc = m.get("membership_auc")
        rank = f", rank {m['stats_rank']}" if m["mode"] == "stats" else ""
        lines.append(
            f"| {m['mode']}{rank}{star} | {m['cut']} | {clip} | {m['noise_sigma']:g} "
            f"| {m['attacker']} "
            f"| {100 * m['accuracy']:.1f}% | {m['ssim']:.3f} | {m['psnr']:.2f} "
            f"| {m['psnr_gain_db']:+.2f} | {100 * m['reid_top1']:.1f}% "
            f"| {100 * m['reid_chance']:.2f}% | {'' if auc is None else f'{auc:.3f}'} |"
        )
    return [*lines, ""]


def _updates_markdown(u: dict[str, Any]) -> list[str]:
    lines = [
        "## One round's update",
        "",
        f"Edge 0 trains the round's model (head {u['head']}) from `{u['train_from']}` up on "
        f"its {u['members']} images ({u['views']} views, {u['epochs']} epoch at lr "
        f"{u['lr']:g}); its update ({u['update_params']:,} parameters, {u['dtype']}) had "
        f"L2 norm {u['norm_before_clip']:.3g} before clipping to {u['clip_norm']:g}. "
        f"Membership: its images against {u['nonmembers']} images of the other edges, "
        f"scored by the drop in loss from the round's model to the updated one (0.5 is "
        f"chance). Loss under the round's model alone: AUC {u['membership_auc_before']:.3f}. "
        f"Accuracy on {u['test_images']} test cells before the round: "
        f"{100 * u['accuracy_before']:.1f}%.",
        "",
        "| noise multiplier | noise std | who reads it | membership AUC (loss drop) "
        "| AUC (loss after) | accuracy |",
        "|---|---|---|---|---|---|",
    ]
    for r in u["rows"]:
        lines.append(
            f"| {r['noise_multiplier']:g} | {r['noise_std']:g} | {r['reader']} "
            f"| {r['membership_auc']:.3f} | {r['membership_auc_loss']:.3f} "
            f"| {100 * r['accuracy']:.1f}% |"
        )
    return [*lines, ""]


def _grid(
    originals: torch.Tensor,
    mean_image: torch.Tensor,
    recons: dict[str, torch.Tensor],
    path: Path,
    seed: int,
    n: int = 6,
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rng = np.random.default_rng(seed)
    pick = sorted(rng.choice(len(originals), size=min(n, len(originals)), replace=False).tolist())
    columns = [("original", originals), ("mean image", mean_image.expand_as(originals))]
    columns += list(recons.items())
    fig, axes = plt.subplots(
        len(pick), len(columns), figsize=(1.1 * len(columns), 1.25 * len(pick)), squeeze=False
    )
    for j, (title, imgs) in enumerate(columns):
        for i, k in enumerate(pick):
            ax = axes[i][j]
            ax.imshow(imgs[k, 0].numpy(), cmap="gray", vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(title.replace(" clip", "\nclip").replace(" [", "\n["), fontsize=5)
    fig.tight_layout(pad=0.2)
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main(
    out: Annotated[Path, typer.Option(help="folder for results.json, results.md, grid.png")],
    quick: Annotated[
        bool, typer.Option(help="a subset of elpv and fewer epochs (a few minutes)")
    ] = False,
    limit: Annotated[
        int | None, typer.Option(min=40, help="elpv images to use (default: all; quick: 640)")
    ] = None,
    input_size: Annotated[
        int | None, typer.Option(min=32, help="backbone input size (default 160; quick 128)")
    ] = None,
    neu_root: Annotated[
        Path, typer.Option(help="NEU-DET ImageFolder of the cross-domain attacker")
    ] = NEU_DET,
    neu_limit: Annotated[
        int | None, typer.Option(min=10, help="NEU-DET images of the cross-domain attacker")
    ] = None,
    seed: Annotated[int, typer.Option(help="seed of splits, noise and training")] = 0,
    only: Annotated[
        Only | None,
        typer.Option(help="run one part alone: 'updates', the attack on a round's update"),
    ] = None,
) -> None:
    """Attack the uploads of each privacy mode with a trained decoder; measure
    reconstruction (SSIM, PSNR), re-identification and federated accuracy; and attack
    one federated round's update by membership inference."""
    run_privacy_eval(
        EvalOptions(
            out=out,
            quick=quick,
            limit=limit,
            input_size=input_size,
            neu_root=neu_root,
            neu_limit=neu_limit,
            seed=seed,
            only=only,
        )
    )


app = typer.Typer(add_completion=False)
app.command()(main)


__all__ = [
    "UPDATE_SIGMAS",
    "Decoder",
    "EvalOptions",
    "Only",
    "UpdateRow",
    "app",
    "mark_default",
    "psnr",
    "reid_top1",
    "results_markdown",
    "run_privacy_eval",
    "server_default_privacy",
    "ssim",
    "train_decoder",
    "update_attack",
    "view_activations",
    "view_losses",
]


if __name__ == "__main__":
    app()
