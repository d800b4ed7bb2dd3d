"""The deploy gate's choice: pure, no I/O (the cycle scores the models and acts on it).

Stage 3 ends with up to three models that could serve: the fine-tuned ``candidate``,
the ``server_model`` as received (before fine-tuning), and the ``previous`` model, the
one deployed now (scored only when it has the same classes). :func:`choose_model`
picks one from their metrics on the edge's *validation* split (the training split,
in-sample, when the validation split is empty; never the test split, whose numbers
stay honest for reporting):

1. Rank by accuracy, the previous model's counted ``min_delta`` lower (the setting
   ``deploy_min_delta``, 0 by default: a new model replaces the deployed one when its
   accuracy is above the deployed one's minus delta, or equal to it with a higher
   balanced accuracy); ties go to the higher balanced accuracy, then to the previous
   model (no churn), then to the fine-tuned one: it started from the server model and
   kept it unless an epoch lowered the validation loss, so on the same validation
   accuracy it fits this edge's data at least as well.
2. Majority floor: a model whose accuracy is below always answering the majority
   class (the most frequent class of the training split; its accuracy is the fraction
   of scored images of that class) is not eligible. When none is, nothing new is
   deployed: the deployed model, if any, stays.

The reason is written for an operator, e.g. "deployed the fine-tuned model: validation
accuracy 93.1% on 58 images, best of fine-tuned 93.1%, server model 91.4%, previously
deployed 90.0%; always answering 'functional' scores 89.7%".
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from fl_core.schemas import EvalMetrics, GateModel

ModelName = GateModel

#: the order models are listed in reasons and results
MODEL_NAMES: tuple[ModelName, ...] = ("candidate", "server_model", "previous")

# last tie-break: the deployed model (no churn), then the fine-tuned one
_PREFERENCE: dict[ModelName, int] = {"previous": 2, "candidate": 1, "server_model": 0}
_LABEL: dict[ModelName, str] = {
    "candidate": "fine-tuned",
    "server_model": "server model",
    "previous": "previously deployed",
}
_THE: dict[ModelName, str] = {
    "candidate": "the fine-tuned model",
    "server_model": "the server model",
    "previous": "the deployed model",
}


@dataclass(frozen=True)
class MajorityBaseline:
    """Always answering the training split's most frequent class, on the scored set."""

    class_index: int
    class_name: str
    accuracy: float
    #: images in the scored set (validation, or training when in-sample)
    n: int


@dataclass(frozen=True)
class GateChoice:
    """What the gate decided. ``chosen`` is the scored model that serves afterwards
    (``previous`` when the deployed model stays), None when none of them does."""

    chosen: ModelName | None
    #: a new model (candidate or server model) goes into service
    deploy: bool
    reason: str


def majority_baseline(
    train_labels: Sequence[int] | np.ndarray,
    scored_labels: Sequence[int] | np.ndarray,
    class_names: Sequence[str],
) -> MajorityBaseline:
    """The most frequent class of ``train_labels`` (the first one on a tie) and the
    fraction of ``scored_labels`` that are of it."""
    train = np.asarray(train_labels, dtype=np.int64)
    if not len(train):
        raise ValueError("the majority class needs training labels")
    index = int(np.argmax(np.bincount(train, minlength=len(class_names))))
    scored = np.asarray(scored_labels, dtype=np.int64)
    accuracy = float(np.mean(scored == index)) if len(scored) else 0.0
    return MajorityBaseline(index, class_names[index], accuracy, len(scored))


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def _rank_key(name: ModelName, m: EvalMetrics, min_delta: float) -> tuple[float, float, int]:
    # rounded so that 0.8 - 0.05 ties with 0.75
    accuracy = round(m.accuracy - (min_delta if name == "previous" else 0.0), 9)
    return accuracy, round(m.balanced_accuracy, 9), _PREFERENCE[name]


def choose_model(
    scores: Mapping[ModelName, EvalMetrics],
    majority: MajorityBaseline,
    min_delta: float = 0.0,
    *,
    in_sample: bool = False,
    deployed_id: int | None = None,
) -> GateChoice:
    """Choose among the scored models by the rule in this module's docstring.

    ``scores``: validation metrics (training, when ``in_sample``) of each model that
    could serve; ``previous`` is the deployed model, numbered ``deployed_id`` (which
    may be set without ``previous`` when the deployed model could not be scored).
    """
    if not scores:
        raise ValueError("the gate needs at least one scored model")
    ordered = [n for n in MODEL_NAMES if n in scores]
    ranked = sorted(ordered, key=lambda n: _rank_key(n, scores[n], min_delta), reverse=True)
    floor = round(majority.accuracy, 9)
    eligible = [n for n in ranked if round(scores[n].accuracy, 9) >= floor]
    deployed = f"model {deployed_id}" if deployed_id is not None else "the deployed model"
    listing = ", ".join(f"{_LABEL[n]} {_pct(scores[n].accuracy)}" for n in ordered)
    baseline = f"always answering '{majority.class_name}'"
    if in_sample:
        where = f"{majority.n} training images, in-sample: the validation split is empty"
    else:
        where = f"{majority.n} validation images"

    if not eligible:
        best = ranked[0]
        head = f"kept {deployed}" if deployed_id is not None else "nothing deployed"
        reason = (
            f"{head}: no model did as well as {baseline} ({_pct(majority.accuracy)} of "
            f"{where}); best was {deployed if best == 'previous' else _THE[best]} at "
            f"{_pct(scores[best].accuracy)} ({listing})"
        )
        chosen: ModelName | None = "previous" if "previous" in scores else None
        return GateChoice(chosen, False, reason)

    best = eligible[0]
    accuracy = "in-sample accuracy" if in_sample else "validation accuracy"
    images = "training images (the validation split is empty)" if in_sample else "images"
    head = f"kept {deployed}" if best == "previous" else f"deployed {_THE[best]}"
    reason = (
        f"{head}: {accuracy} {_pct(scores[best].accuracy)} on {majority.n} {images}, "
        f"best of {listing}; {baseline} scores {_pct(majority.accuracy)}"
    )
    previous = scores.get("previous")
    if best != "previous" and previous is not None and scores[best].accuracy < previous.accuracy:
        reason += f" (deploy_min_delta {min_delta:g} lets it replace {deployed})"
    return GateChoice(best, best != "previous", reason)


__all__ = [
    "MODEL_NAMES",
    "GateChoice",
    "MajorityBaseline",
    "ModelName",
    "choose_model",
    "majority_baseline",
]
