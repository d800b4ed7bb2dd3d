"""The same task trained with Flower's FedAvg, side by side with ours.

Same backbone (EfficientNet-Lite0, ImageNet weights), same base model (seeded as the
server's version 1), same partitions and train/val/test splits (``fedinspect.demo``'s
plan), same input size. Two configurations:

- ``flower``: FedAvg of the blocks our stage 3 fine-tunes (from ``b11``) plus the head;
  the frozen blocks below run once per image (cached activations, the augmented views
  our fine-tuning uses, on the same engine), as our fine-tuning does.
- ``flower_head``: FedAvg of the head alone on frozen pooled features.

Flower's simulation engine needs Ray (``flwr[simulation]``), which is not installed
here, and its gRPC server/clients would add processes without changing the arithmetic;
so the rounds are driven by a minimal in-process loop around Flower's own ``FedAvg``
strategy (``configure``-free: every client trains every round; ``aggregate_fit``
averages the clients' parameters weighted by their example counts, exactly as a Flower
server does). Bytes are what Flower would put on the wire: the serialised ``Parameters``
(numpy ``.npy`` buffers) down to and up from every client each round.

Local epochs and learning rate are picked from a small grid; for each we train up to
``max_rounds`` rounds and record the mean test accuracy after every round, stopping
early once ``patience`` rounds in a row bring no better mean. The best (grid point,
round) is reported, which favours Flower (the choice is made on the test split), with
the first round at which it reaches our mean federated accuracy. The full bench
searches the grid on the first seed and trains the other seeds with its winner: at
300 px on two cores one round of the blocks takes minutes, and one seed's grid hours, so
each finished grid point is handed to a caller's store (``done``, then ``saved()``) and
not trained again when the seed is resumed.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.numpy import load_file, save_file
from torch import nn

from bench.stats import summary
from fedinspect.demo import DemoOptions, DemoPlan, plan_demo
from fl_core.data import ImageSet
from fl_core.model import HeadConfig, SplitModel, build_split_model
from fl_core.onnx_runtime import lower_runner
from fl_core.training import FrozenActivations, class_weights, finetune_start, frozen_activations


def _flwr() -> Any:
    try:
        import flwr  # noqa: F401
    except ImportError as exc:  # the bench extra is not installed
        raise RuntimeError(
            "flwr is not installed: make setup installs it (with --no-deps, see the Makefile)"
        ) from exc
    from flwr.common import (
        Code,
        FitRes,
        Status,
        ndarrays_to_parameters,
        parameters_to_ndarrays,
    )
    from flwr.server.strategy import FedAvg

    return FedAvg, FitRes, Status, Code, ndarrays_to_parameters, parameters_to_ndarrays


class _Trainable(nn.Module):
    def __init__(self, model: SplitModel, start: int) -> None:
        super().__init__()
        self.stages = nn.ModuleList(list(model.stages[start:]))
        self.head = model.head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for stage in self.stages:
            x = stage(x)
        return self.head(x)


def _train_mode(module: nn.Module) -> None:
    module.train()
    for m in module.modules():  # frozen batch-norm statistics, as our fine-tuning
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()


@dataclass
class _Client:
    #: the frozen part's activations: train+val (every view) and the test split
    train: FrozenActivations
    test: FrozenActivations
    prep_s: float


def _get(module: nn.Module) -> list[np.ndarray]:
    return [v.detach().cpu().numpy().copy() for v in module.state_dict().values()]


def _set(module: nn.Module, arrays: list[np.ndarray]) -> None:
    keys = list(module.state_dict())
    module.load_state_dict(
        {k: torch.from_numpy(np.asarray(a)) for k, a in zip(keys, arrays, strict=True)}
    )


def _fit_local(
    module: nn.Module, c: _Client, n_classes: int, epochs: int, lr: float, bs: int, seed: int
) -> None:
    gen = torch.Generator().manual_seed(seed)
    params = [p for p in module.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-4)
    loss_fn = nn.CrossEntropyLoss(
        weight=class_weights(c.train.labels, n_classes), label_smoothing=0.05
    )
    _train_mode(module)
    for _ in range(epochs):
        order = torch.randperm(len(c.train.x), generator=gen)
        for s in range(0, len(order), bs):
            idx = order[s : s + bs]
            if len(idx) < 2:
                continue
            opt.zero_grad(set_to_none=True)
            loss_fn(module(c.train.x[idx]), c.train.labels[idx]).backward()
            opt.step()
    module.eval()


@torch.inference_mode()
def _accuracy(module: nn.Module, c: _Client) -> float:
    module.eval()
    pred = torch.cat(
        [module(c.test.x[i : i + 128]).argmax(1) for i in range(0, len(c.test.x), 128)]
    )
    return float((pred == c.test.labels).float().mean())


def _clients(plan: DemoPlan, model: SplitModel, start: int, views: int) -> list[_Client]:
    # the frozen stages run on our edges' engine (ONNX Runtime, else torch): exported
    # once here, and its set-up time charged to every client, as each edge pays it
    frozen = lower_runner(model, end=start)
    out = []
    for spec in plan.edge_specs:
        sp = plan.split(spec)
        began = time.perf_counter()
        train = ImageSet(sp.train.records + sp.val.records, sp.train.class_names)
        cached = frozen_activations(model, train, start, plan.batch_size, frozen, views, plan.seed)
        test = frozen_activations(model, sp.test, start, plan.batch_size, frozen, 1, plan.seed)
        prep = time.perf_counter() - began + frozen.setup_s
        out.append(_Client(cached, test, prep))
    return out


@dataclass
class _Progress:
    """A grid point in progress: the aggregated parameters after its last round, its
    rounds so far, and the client compute and wall seconds they took."""

    params: list[np.ndarray]
    history: list[dict[str, Any]]
    compute: float
    wall: float


def _state_name(name: str, seed: int, stage: str, key: str) -> str:
    """``elpv-seed0-b11-3-lr0.001.safetensors``: a file per dataset, seed, stage, point."""
    return f"{name}-seed{seed}-{stage}-{key.replace(':', '-lr')}.safetensors"


def _save_progress(path: Path, prog: _Progress) -> None:
    """Parameters as safetensors (no pickle), the rest as JSON in its metadata;
    written beside and renamed, so an interruption leaves the previous round whole."""
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"history": prog.history, "compute": prog.compute, "wall": prog.wall}
    tmp = path.with_suffix(".tmp")
    save_file(
        {f"{i:04d}": np.ascontiguousarray(a) for i, a in enumerate(prog.params)},
        str(tmp),
        metadata={"progress": json.dumps(meta)},
    )
    tmp.replace(path)


def _load_progress(path: Path) -> _Progress:
    arrays = load_file(str(path))
    with safe_open(str(path), "np") as f:
        meta = json.loads(f.metadata()["progress"])
    params = [arrays[k] for k in sorted(arrays)]
    return _Progress(params, meta["history"], meta["compute"], meta["wall"])


def first_round_at(means: list[float], target: float) -> int | None:
    """The first round (from 1) whose mean test accuracy is at or above ``target``."""
    return next((i for i, m in enumerate(means, start=1) if m >= target), None)


def rounds(
    step: Callable[[int], list[float]],
    max_rounds: int,
    patience: int | None,
    label: str | None = None,
    history: list[dict[str, Any]] | None = None,
    after: Callable[[list[dict[str, Any]]], None] | None = None,
) -> list[dict[str, Any]]:
    """Call ``step(round)`` (per-edge test accuracies after that round) up to
    ``max_rounds`` times; stop after ``patience`` rounds in a row without a better mean.

    ``history`` (the rounds run before an interruption) is continued, not repeated;
    ``after(history)`` is called after every round. With ``label``, each round prints a
    line to stderr: a full run takes hours."""
    history = list(history or [])
    best, best_round = -1.0, 0
    for h in history:
        if h["mean"] > best:
            best, best_round = h["mean"], h["round"]
    if patience is not None and history and len(history) - best_round >= patience:
        return history  # interrupted after its last round, before it was reported
    began = time.perf_counter()
    for rnd in range(len(history) + 1, max_rounds + 1):
        accs = step(rnd)
        mean = float(np.mean(accs))
        history.append({"round": rnd, "per_edge": accs, "mean": mean})
        if after is not None:
            after(history)
        if label is not None:
            print(
                f"[flower] {label}: round {rnd}/{max_rounds}, mean test accuracy {mean:.4f}"
                f" ({time.perf_counter() - began:.0f} s)",
                file=sys.stderr,
                flush=True,
            )
        if mean > best:
            best, best_round = mean, rnd
        elif patience is not None and rnd - best_round >= patience:
            break
    return history


def _fedavg(
    plan: DemoPlan,
    start_stage: str | None,
    grid: list[tuple[int, float]],
    max_rounds: int,
    target: float | None,
    patience: int | None = None,
    name: str = "",
    done: dict[str, dict[str, Any]] | None = None,
    saved: Callable[[], None] | None = None,
    scratch: Path | None = None,
) -> dict[str, Any]:
    """The best (grid point, round) of FedAvg from ``start_stage`` (None: the head alone).

    ``done`` holds the grid points already trained (by :func:`point_key`): they are
    reused, and each point trained here is added to it, then ``saved()`` is called.
    In ``scratch``, the point in progress keeps its aggregated parameters and history
    after every round (a round of b11 up at 3 local epochs takes 7 minutes on full
    elpv), and an interrupted point goes on from its last round. The head's dropout
    then draws other random numbers than an uninterrupted run would."""
    FedAvg, FitRes, Status, Code, to_params, from_params = _flwr()
    done = {} if done is None else done
    torch.manual_seed(plan.seed)
    model = build_split_model(
        plan.class_names, plan.backbone, plan.cut, plan.input_size, HeadConfig(plan.head_hidden)
    )
    start = finetune_start(model, start_stage or "upper")  # None: the head alone
    views = plan.finetune.views if start_stage is not None and plan.finetune.augment else 1
    n_classes = len(plan.class_names)
    initial = _get(_Trainable(model, start))
    clients: list[_Client] = []
    for epochs, lr in grid:
        where = f"{name} seed {plan.seed}, {start_stage or 'head'}, {epochs} epochs lr {lr:g}"
        key = point_key(epochs, lr)
        if key in done:
            print(f"[flower] {where}: trained before, kept", file=sys.stderr, flush=True)
            continue
        if not clients:  # the frozen part runs only when some point is left to train
            clients.extend(_clients(plan, model, start, views))
        strategy = FedAvg(
            min_fit_clients=len(clients),
            min_available_clients=len(clients),
            fit_metrics_aggregation_fn=lambda _metrics: {},
        )
        wire = sum(len(t) for t in to_params(initial).tensors)
        stage = start_stage or "head"
        state = None if scratch is None else scratch / _state_name(name, plan.seed, stage, key)
        prog = _Progress(initial, [], 0.0, 0.0)
        if state is not None and state.is_file():
            prog = _load_progress(state)
            print(
                f"[flower] {where}: resumed after round {len(prog.history)}",
                file=sys.stderr,
                flush=True,
            )
        began = time.perf_counter()
        wall_before = prog.wall

        def step(
            rnd: int,
            epochs: int = epochs,
            lr: float = lr,
            strategy: Any = strategy,
            prog: _Progress = prog,
        ) -> list[float]:
            results = []
            for i, c in enumerate(clients):
                t0 = time.perf_counter()
                local = _Trainable(model, start)
                _set(local, prog.params)
                _fit_local(local, c, n_classes, epochs, lr, plan.batch_size, plan.seed + rnd + i)
                fit = FitRes(Status(Code.OK, ""), to_params(_get(local)), len(c.train.labels), {})
                prog.compute += time.perf_counter() - t0
                results.append((None, fit))
            aggregated, _ = strategy.aggregate_fit(rnd, results, [])
            prog.params = from_params(aggregated)
            glob = _Trainable(model, start)
            _set(glob, prog.params)
            return [_accuracy(glob, c) for c in clients]

        def after(
            history: list[dict[str, Any]],
            prog: _Progress = prog,
            state: Path | None = state,
            began: float = began,
            wall_before: float = wall_before,
        ) -> None:
            prog.history = history
            prog.wall = wall_before + time.perf_counter() - began
            if state is not None:
                _save_progress(state, prog)

        history = rounds(step, max_rounds, patience, where, prog.history, after)
        wall = wall_before + time.perf_counter() - began
        compute = prog.compute
        top = max(history, key=lambda h: h["mean"])
        reach = None if target is None else first_round_at([h["mean"] for h in history], target)
        cand = {
            "local_epochs": epochs,
            "lr": lr,
            "best_round": top["round"],
            "accuracy": {
                "per_edge": [round(a, 4) for a in top["per_edge"]],
                "mean": round(top["mean"], 4),
            },
            "rounds_to_reach_ours": reach,
            "history_mean": [round(h["mean"], 4) for h in history],
            "rounds_run": len(history),
            "bytes_per_round": 2 * wire * len(clients),
            "bytes": 2 * wire * len(clients) * top["round"],
            "parameter_bytes": wire,
            "seconds": {
                "edge_compute_to_best": round(
                    compute * top["round"] / len(history) + sum(c.prep_s for c in clients), 1
                ),
                "wall_to_best": round(
                    wall * top["round"] / len(history) + sum(c.prep_s for c in clients), 1
                ),
                "frozen_part_once_s": round(sum(c.prep_s for c in clients), 1),
            },
        }
        done[key] = cand
        if saved is not None:
            saved()
        if state is not None:
            state.unlink(missing_ok=True)  # kept in ``done`` now
    # the best mean; on a tie, the earlier point (max keeps the first)
    points = [done[point_key(e, lr)] for e, lr in grid]
    best = dict(max(points, key=lambda c: c["accuracy"]["mean"]))  # the stored point stays
    best["rounds"] = best["best_round"]
    best["trained_from"] = start_stage or "head"
    # every point's own result, so the grid search stays readable once the seed is done
    best["grid"] = [dict(p) for p in points]
    return best


CONFIGURATIONS = ("flower", "flower_head")
#: (local epochs, lr). The last two were added after NEU-DET's runs: on full elpv at 300
#: px, 1 local epoch at lr 1e-3 left the model predicting one class (68.4% or 31.6%), while
#: lr 1e-4 (our fine-tuning's rate for these blocks) reached 85.8% at round 2. Appended,
#: so a tie still keeps the earlier point.
FULL_GRID = [(1, 1e-3), (3, 1e-3), (1, 3e-3), (1, 1e-4), (3, 1e-4)]


def point_key(epochs: int, lr: float) -> str:
    """How a grid point is named where finished points are kept: ``"3:0.001"``."""
    return f"{epochs}:{lr:g}"


def winners(run: dict[str, Any]) -> dict[str, list[tuple[int, float]]]:
    """Each configuration's chosen (local epochs, lr) in one seed's result, as a grid."""
    return {k: [(run[k]["local_epochs"], run[k]["lr"])] for k in CONFIGURATIONS}


def run(
    quick: bool,
    dataset: str,
    seed: int,
    ours_mean: float | None,
    grids: dict[str, list[tuple[int, float]]] | None = None,
    done: dict[str, dict[str, dict[str, Any]]] | None = None,
    saved: Callable[[], None] | None = None,
    scratch: Path | None = None,
) -> dict[str, Any]:
    """Both configurations on one seed; ``grids`` (per configuration) replaces the
    default grid, e.g. with the winners of the first seed (:func:`winners`).

    ``done`` keeps each configuration's finished grid points (see :func:`_fedavg`), so
    an interrupted seed resumes from the last point it finished, and ``scratch`` keeps
    the point in progress after every round."""
    done = {} if done is None else done
    plan = plan_demo(DemoOptions(edges=3, quick=quick, dataset=dataset, seed=seed))
    finetune_from = "b11"  # efficientnet_lite0's default first fine-tuned stage
    if quick:
        # one grid point to stay short: (3, 1e-3) won the two-point grid on both datasets
        grid, max_rounds, patience = [(3, 1e-3)], 6, None
    else:
        grid, max_rounds, patience = FULL_GRID, 20, 4
    grids = grids or {}
    name = Path(dataset).name
    trained_from = {"flower": finetune_from, "flower_head": None}  # None: the head alone
    return {
        **{
            key: _fedavg(
                plan,
                trained_from[key],
                grids.get(key, grid),
                max_rounds,
                ours_mean,
                patience,
                name,
                done.setdefault(key, {}),
                saved,
                scratch,
            )
            for key in CONFIGURATIONS
        },
        "engine": "flwr.server.strategy.FedAvg (flwr 1.42) driven by an in-process round loop",
        "seed": seed,
        "grid_searched": not grids,
    }


def summarize(runs: list[dict[str, Any]], key: str) -> dict[str, Any]:
    """Median/min/max over seeds of one configuration's figures."""
    rs = [r[key] for r in runs]
    n_edges = len(rs[0]["accuracy"]["per_edge"])
    return {
        "accuracy": {
            "per_edge": [
                summary([r["accuracy"]["per_edge"][i] for r in rs], 4) for i in range(n_edges)
            ],
            "mean": summary([r["accuracy"]["mean"] for r in rs], 4),
        },
        "bytes": summary([r["bytes"] for r in rs], 0),
        "seconds": {
            "edge_compute": summary([r["seconds"]["edge_compute_to_best"] for r in rs], 1),
            "wall": summary([r["seconds"]["wall_to_best"] for r in rs], 1),
        },
        "rounds": summary([r["rounds"] for r in rs], 0),
        "rounds_to_reach_ours": [r["rounds_to_reach_ours"] for r in rs],
        "choice": [{"local_epochs": r["local_epochs"], "lr": r["lr"]} for r in rs],
        "trained_from": rs[0]["trained_from"],
        "per_seed": [{**r[key], "seed": r["seed"]} for r in runs],
    }


def same_seed(runs: list[dict[str, Any]], ours: dict[int, dict[str, Any]]) -> list[dict[str, Any]]:
    """Each seed's Flower result against our cycle on the same seed (same splits).

    ``ours`` is :func:`bench.demo_runs.ours_per_seed`. Per configuration: its best mean
    and the points it is above (+) or below (-) ours; its bytes and wall time to that
    best as multiples of ours; and the first round whose mean reached ours, with the
    bytes and the wall time up to it (the wall pro rata over the rounds to the best,
    plus the frozen part run once). Seeds we have no cycle for are left out."""
    rows = []
    for r in runs:
        o = ours.get(r["seed"])
        if o is None:
            continue
        row: dict[str, Any] = {"seed": r["seed"], "ours": o}
        for key in CONFIGURATIONS:
            f = r[key]
            reach = first_round_at(f["history_mean"], o["mean"])
            frozen = f["seconds"]["frozen_part_once_s"]
            per_round = (f["seconds"]["wall_to_best"] - frozen) / f["best_round"]
            row[key] = {
                "mean": f["accuracy"]["mean"],
                "per_edge": f["accuracy"]["per_edge"],
                "points_above_ours": round(100 * (f["accuracy"]["mean"] - o["mean"]), 1),
                "bytes_x_ours": round(f["bytes"] / o["bytes"], 1),
                "wall_x_ours": round(f["seconds"]["wall_to_best"] / o["wall"], 2),
                "reaches_ours_at_round": reach,
                "to_reach_ours": None
                if reach is None
                else {
                    "bytes": f["bytes_per_round"] * reach,
                    "wall_s": round(frozen + per_round * reach, 1),
                },
            }
        rows.append(row)
    return rows


__all__ = [
    "CONFIGURATIONS",
    "first_round_at",
    "point_key",
    "rounds",
    "run",
    "same_seed",
    "summarize",
    "winners",
]
