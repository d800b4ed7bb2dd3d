"""``fedinspect demo``: one server and N edges as local processes, one whole cycle.

The demo does what an operator does with curl: it starts the processes on free
loopback ports with fresh data folders and random tokens, registers the edges with
the server's API, starts each edge's cycle job over HTTP and follows the jobs until
they end. Then it computes, with the same code and hyper-parameters, the two
references the federated models are judged against: each edge trained on its own data
alone (local-only), and one model trained on the union of all edges' data
(centralized upper bound). Every process it started is stopped on exit, Ctrl-C or
failure.

The processes start through :mod:`fedinspect.launcher`, from settings objects built
here: the demo's own values, then the ``--set`` overrides (``server.privacy.noise_sigma=0``,
``edge.extract_backend=torch``), checked against the settings classes. Nothing of the
caller's ``FEDINSPECT_*`` variables reaches them, and the JSON lists the settings the
processes got (``settings``), so a result says how it was made. The table and plots
are :mod:`fedinspect.report`'s.

An edge's federated figure is the test accuracy of the model that serves after its
deploy gate (the fine-tuned candidate, the server's model as received, or the model
kept), as ``federated_model`` says; where nothing serves, the candidate's, marked.
"""

from __future__ import annotations

import json
import re
import secrets
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import httpx
import torch
from pydantic import BaseModel, ValidationError
from pydantic_settings import BaseSettings
from tqdm import tqdm

from edge_service.config import Settings as EdgeSettings
from edge_service.services.cycle import finetune_config
from fedinspect.launcher import HOST, SERVICES, Processes, free_port, running, settings_from_env
from fedinspect.report import NOT_DEPLOYED, format_table
from fl_core.data import ImageSet, Splits, load_dataset_spec, split
from fl_core.features import extract_images, usable_cores
from fl_core.model import HeadConfig, SplitModel, build_split_model
from fl_core.onnx_runtime import lower_runner
from fl_core.schemas import CycleJobResult, EvalMetrics
from fl_core.training import (
    FinetuneConfig,
    Progress,
    UpperTrainConfig,
    evaluate,
    evaluate_features,
    finetune,
    frozen_runner,
    train_upper,
)
from server_service.config import Settings as ServerSettings


@dataclass
class DemoOptions:
    edges: int = 3
    quick: bool = False
    dataset: str = "elpv"
    json_path: Path | None = None
    report_dir: Path | None = None
    seed: int = 0
    input_size: int | None = None
    #: how the local-only and centralized references are trained: "full" as the
    #: federated models (stage 2 on pooled features, then stage 3 fine-tuning), "pooled"
    #: stage 2 only (minutes instead of an hour on all of elpv on two cores)
    references: str = "full"
    #: ``--set`` overrides per service, as :func:`parse_settings` returns them
    settings: dict[str, dict[str, str]] = field(default_factory=dict)


REFERENCES = ("full", "pooled")

# --------------------------------------------------------------------------- --set

SETTINGS_CLASSES: dict[str, type[BaseSettings]] = {
    "server": ServerSettings,
    "edge": EdgeSettings,
}

#: settings the demo sets itself for every run (ports, folders, tokens, which server,
#: which images, and the splits its references are scored on): an override would break
#: the run or its comparison, not vary it. Other overrides change the started processes
#: only; the local-only and centralized references keep the plan's hyper-parameters.
DEMO_OWNED = {
    "server": {"admin_token", "data_dir", "host", "port"},
    "edge": {
        "server_url",
        "token",
        "edge_id",
        "admin_token",
        "name",
        "data_dir",
        "dataset",
        "split_seed",
        "val_fraction",
        "test_fraction",
        "host",
        "port",
    },
}

#: a token that passes the settings' checks, for checking overrides before a run
_PLACEHOLDER_TOKEN = "demo-settings-check-0123456789"


class SettingError(ValueError):
    """A ``--set`` that names no setting, or gives it a value its class refuses."""


def _setting_var(key: str) -> tuple[str, str]:
    """``server.privacy.noise_sigma`` -> ("server", "PRIVACY__NOISE_SIGMA"); SettingError
    naming ``key`` where the service, a field or a nested field does not exist."""
    service, _, path = key.partition(".")
    if service not in SETTINGS_CLASSES or not path:
        raise SettingError(
            f"unknown setting {key!r}: say server.<setting> or edge.<setting> "
            "(fedinspect settings lists them)"
        )
    model: type[BaseModel] = SETTINGS_CLASSES[service]
    parts = path.split(".")
    for depth, part in enumerate(parts):
        info = model.model_fields.get(part)
        if info is None:
            where = ".".join([service, *parts[:depth]])
            raise SettingError(
                f"unknown setting {key!r}: {where} has no setting {part!r} "
                f"(fedinspect settings {service} lists them)"
            )
        if depth < len(parts) - 1:
            nested = info.annotation
            if not (isinstance(nested, type) and issubclass(nested, BaseModel)):
                raise SettingError(f"unknown setting {key!r}: {part!r} has no settings inside")
            model = nested
    if parts[0] in DEMO_OWNED[service]:
        raise SettingError(f"{key} is set by the demo itself for each process; it cannot be set")
    return service, "__".join(parts).upper()


def _problems(exc: ValidationError, service: str, given: Mapping[str, str]) -> str:
    """The errors of ``exc`` with the ``--set`` key each is about (``given``: env-style
    names to the keys they came from)."""
    lines = []
    for err in exc.errors():
        loc = "__".join(str(p) for p in err["loc"]).upper()
        keys = [k for var, k in given.items() if loc and (var == loc or loc.startswith(var))]
        keys = (
            keys or [k for var, k in given.items() if var.startswith(loc)] or list(given.values())
        )
        lines.append(f"{', '.join(keys) or service}: {err['msg']}")
    return "; ".join(lines)


def parse_settings(items: Sequence[str]) -> dict[str, dict[str, str]]:
    """``--set KEY=VALUE`` items (``server.privacy.noise_sigma=0``) as the variables each
    service's settings read (``{"server": {"PRIVACY__NOISE_SIGMA": "0"}}``), each checked
    against the settings classes: :class:`SettingError` naming the key when it is
    unknown, one the demo sets itself, or its value is refused. Lists and nested
    settings take JSON, as in the environment."""
    out: dict[str, dict[str, str]] = {}
    origin: dict[str, dict[str, str]] = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise SettingError(f"{item!r} is not KEY=VALUE (e.g. server.privacy.noise_sigma=0)")
        service, var = _setting_var(key)
        out.setdefault(service, {})[var] = value
        origin.setdefault(service, {})[var] = key
    for service, values in out.items():
        cls = SETTINGS_CLASSES[service]
        prefix = SERVICES[service][1]
        env = {f"{prefix}{k}": v for k, v in values.items()}
        env.setdefault(f"{prefix}ADMIN_TOKEN", _PLACEHOLDER_TOKEN)
        try:
            settings_from_env(cls, env)
        except ValidationError as exc:
            raise SettingError(_problems(exc, service, origin[service])) from None
    return out


def settings_record(settings: BaseSettings) -> dict[str, Any]:
    """The settings a process was given, as JSON (secrets masked)."""
    return settings.model_dump(mode="json", include=settings.model_fields_set)


@dataclass
class DemoPlan:
    """What the demo runs: partitions and the hyper-parameters both sides share."""

    edge_specs: list[str]
    class_names: list[str]
    input_size: int | None
    backbone: str = "efficientnet_lite0"
    cut: str = "pooled"
    head_hidden: int = 256
    val_fraction: float = 0.1
    test_fraction: float = 0.25
    seed: int = 0
    upper: UpperTrainConfig = field(default_factory=UpperTrainConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    batch_size: int = 32
    #: ``--set`` overrides per service (:func:`parse_settings`), applied over the plan's
    overrides: dict[str, dict[str, str]] = field(default_factory=dict)

    def _settings(self, service: str, values: Mapping[str, Any]) -> Any:
        prefix = SERVICES[service][1]
        env = _env(prefix, {**values, **self.overrides.get(service, {})})
        try:
            return settings_from_env(SETTINGS_CLASSES[service], env)
        except ValidationError as exc:
            given = {var: f"{service}.{var.lower().replace('__', '.')}" for var in values}
            given |= {
                var: f"{service}.{var.lower().replace('__', '.')}"
                for var in self.overrides.get(service, {})
            }
            problems = _problems(exc, service, given)
            raise SettingError(f"the demo's {service} settings: {problems}") from None

    def server_settings(self, admin_token: str, data_dir: Path, port: int) -> ServerSettings:
        """The server's settings: the plan's, then the ``--set`` overrides."""
        values: dict[str, Any] = {
            "ADMIN_TOKEN": admin_token,
            "DATA_DIR": data_dir,
            "HOST": HOST,
            "PORT": port,
            "BACKBONE": self.backbone,
            "CUT": self.cut,
            "CLASS_NAMES": json.dumps(self.class_names),
            "HEAD_HIDDEN": self.head_hidden,
            "MIN_EDGES": len(self.edge_specs),
            "CYCLE_DEADLINE_S": 3600,
            "ROUND_DEADLINE_S": 3600,
            "TRAIN_EPOCHS": self.upper.epochs,
            "TRAIN_LR": self.upper.lr,
            "TRAIN_BATCH_SIZE": self.upper.batch_size,
            "TRAIN_VAL_FRACTION": self.upper.val_fraction,
            "TRAIN_SEED": self.upper.seed,
        }
        if self.input_size:
            values["INPUT_SIZE"] = self.input_size
        settings: ServerSettings = self._settings("server", values)
        return settings

    def edge_settings(
        self,
        index: int,
        name: str,
        edge_id: str,
        tokens: tuple[str, str],
        server_url: str,
        port: int,
        data_dir: Path,
    ) -> EdgeSettings:
        """Settings of edge ``index``, the plan's then the ``--set`` overrides; ``tokens``
        is (its server token, its admin token)."""
        ft = self.finetune
        values: dict[str, Any] = {
            "SERVER_URL": server_url,
            "TOKEN": tokens[0],
            "EDGE_ID": edge_id,
            "ADMIN_TOKEN": tokens[1],
            "NAME": name,
            "DATA_DIR": data_dir,
            "DATASET": self.edge_specs[index],
            "SPLIT_SEED": self.seed,
            "VAL_FRACTION": self.val_fraction,
            "TEST_FRACTION": self.test_fraction,
            "HOST": HOST,
            "PORT": port,
            "BATCH_SIZE": self.batch_size,
            "FINETUNE_EPOCHS": ft.epochs,
            "FINETUNE_LR": ft.lr,
            "FINETUNE_BACKBONE_LR_SCALE": ft.backbone_lr_scale,
            "FINETUNE_VIEWS": ft.views,
            "FINETUNE_AUGMENT": ft.augment,
            "FINETUNE_SELECT": ft.select,
            "POLL_INTERVAL_S": 0.5,
            # the edges share this machine's cores: a thread per core each would
            # oversubscribe them (a quick cycle took 109 s that way, 37 s with these)
            "THREADS": edge_threads(len(self.edge_specs)),
        }
        if ft.train_from:
            values["FINETUNE_TRAIN_FROM"] = ft.train_from
        settings: EdgeSettings = self._settings("edge", values)
        return settings

    def check_settings(self) -> None:
        """Build every process's settings with placeholders: a :class:`SettingError`
        before anything starts, not after the server has."""
        self.server_settings(_PLACEHOLDER_TOKEN, Path("server"), 8000)
        for i in range(len(self.edge_specs)):
            self.placeholder_edge_settings(i)

    def placeholder_edge_settings(self, index: int) -> EdgeSettings:
        """Edge ``index``'s settings with placeholder tokens, address and folder."""
        tokens = (_PLACEHOLDER_TOKEN, _PLACEHOLDER_TOKEN[::-1])
        return self.edge_settings(
            index, f"edge-{index + 1}", "e", tokens, f"http://{HOST}:1", 8100, Path()
        )

    def split(self, spec: str) -> Splits:
        return split(load_dataset_spec(spec), self.val_fraction, self.test_fraction, self.seed)


def edge_threads(edges: int) -> int:
    """Threads per edge process when ``edges`` of them share this machine's cores."""
    return max(1, usable_cores() // max(1, edges))


def _env(prefix: str, values: Mapping[str, Any]) -> dict[str, str]:
    return {
        prefix + k: str(v).lower() if isinstance(v, bool) else str(v) for k, v in values.items()
    }


def plan_demo(options: DemoOptions) -> DemoPlan:
    """Partitions and hyper-parameters for a dataset, an edge count and a mode."""
    if options.references not in REFERENCES:
        raise ValueError(f"references must be one of {REFERENCES}, not {options.references!r}")
    n = options.edges
    if options.dataset == "elpv":
        class_names = ["functional", "defective"]
        if n == 3:
            # non-iid: one edge with mono cells only, one with poly only, one mixed
            specs = [
                "elpv:type=mono:part=1,2,3/4",
                "elpv:type=poly:part=1,2,3/4",
                "elpv:part=4/4:within=type",
            ]
        else:
            specs = [f"elpv:dirichlet={k}/{n}:alpha=1.0" for k in range(1, n + 1)]
        if options.quick:
            limits = [120, 120, 60] if n == 3 else [100] * n
            specs = [f"{s}:limit={m}" for s, m in zip(specs, limits, strict=True)]
    else:
        root = Path(options.dataset)
        class_names = load_dataset_spec(str(root)).class_names
        specs = [f"{root}:dirichlet={k}/{n}:alpha=1.0" for k in range(1, n + 1)]
        if options.quick:
            specs = [f"{s}:limit=100" for s in specs]
    specs = [f"{s}:seed={options.seed}" for s in specs]
    overrides = {k: dict(v) for k, v in options.settings.items()}
    if options.quick:
        plan = DemoPlan(
            specs,
            class_names,
            input_size=options.input_size or 96,
            seed=options.seed,
            upper=UpperTrainConfig(epochs=40, seed=options.seed),
            finetune=FinetuneConfig(epochs=5, views=2, seed=options.seed),
            overrides=overrides,
        )
    else:
        plan = DemoPlan(
            specs,
            class_names,
            # elpv's cells are 300 px and its cracks a few pixels wide: at their own size the
            # pooled features separate them 1.7 points better than at 224 (stage 2, seed 0)
            input_size=options.input_size or (300 if options.dataset == "elpv" else None),
            seed=options.seed,
            upper=UpperTrainConfig(seed=options.seed),
            finetune=FinetuneConfig(seed=options.seed),  # the recipe the edges ship with
            overrides=overrides,
        )
    if any(var.startswith("FINETUNE_") for var in overrides.get("edge", {})):
        # the references train with the recipe the edges get, ``--set`` included
        plan = replace(plan, finetune=finetune_config(plan.placeholder_edge_settings(0)))
    return plan


# --------------------------------------------------------------------------- progress


class JobProgress:
    """One progress bar per edge on a terminal; one line per stage change elsewhere."""

    def __init__(self, names: list[str]) -> None:
        self.tty = sys.stderr.isatty()
        self.stages: dict[str, str] = {}
        self.bars = (
            {n: tqdm(total=100, desc=n, position=i, leave=True) for i, n in enumerate(names)}
            if self.tty
            else {}
        )

    def update(self, name: str, job: Mapping[str, Any]) -> None:
        if self.tty:
            bar = self.bars[name]
            bar.n = round(100 * job["progress"])
            bar.set_postfix_str(f"{job['stage']}: {job['message']}"[:60], refresh=True)
        elif self.stages.get(name) != job["stage"]:
            self.stages[name] = job["stage"]
            print(
                f"{name}: {100 * job['progress']:3.0f}% {job['stage']}: {job['message']}",
                file=sys.stderr,
            )

    def close(self) -> None:
        for bar in self.bars.values():
            bar.close()


def _raise_for(resp: httpx.Response) -> httpx.Response:
    if resp.is_error:
        raise RuntimeError(
            f"{resp.request.method} {resp.request.url} -> {resp.status_code}: {resp.text}"
        )
    return resp


# --------------------------------------------------------------------------- references


def _union(sets: list[ImageSet], class_names: list[str]) -> ImageSet:
    return ImageSet([r for s in sets for r in s.records], class_names, "union")


def served_metrics(result: CycleJobResult) -> tuple[EvalMetrics, str]:
    """The test metrics of the model that serves on an edge after its cycle job (``result``)
    and which one it is (the gate's ``chosen``: candidate, server_model or previous); the
    fine-tuned candidate's, marked :data:`NOT_DEPLOYED`, when none serves."""
    metrics = result.metrics
    if metrics.deployed is not None:
        return metrics.deployed, result.chosen or "deployed"
    if metrics.candidate is None:
        raise ValueError(f"cycle {result.cycle_id}: the edge's job scored no model")
    return metrics.candidate, NOT_DEPLOYED


def _scores(m: EvalMetrics | None) -> dict[str, float] | None:
    if m is None:
        return None
    return {
        "accuracy": round(m.accuracy, 4),
        "balanced_accuracy": round(m.balanced_accuracy, 4),
        "macro_f1": round(m.macro_f1, 4),
    }


def _base_model(plan: DemoPlan) -> SplitModel:
    # the same arguments (and seed) as the server's version 1
    return build_split_model(
        plan.class_names, plan.backbone, plan.cut, plan.input_size, HeadConfig(plan.head_hidden)
    )


def train_reference(
    plan: DemoPlan, train: ImageSet, val: ImageSet, progress: Progress | None = None
) -> SplitModel:
    """Stages 2 and 3 on one dataset, without federation, as an edge trains them."""

    def report(fraction: float, message: str) -> None:
        if progress is not None:
            progress(fraction, message)

    model = _base_model(plan)
    report(0.0, "stage 2: extracting features")
    # the frozen layers run on the edges' engine (ONNX Runtime, else torch), as they do
    # in the federated cycle
    feats, labels = _cut_features(plan, model, train)
    report(0.1, "stage 2: training the upper part")
    train_upper(model, feats, labels, plan.upper)
    finetune(
        model,
        train,
        val,
        plan.finetune,
        lambda f, m: report(0.2 + 0.8 * f, f"stage 3: {m}"),
        frozen=frozen_runner(model, plan.finetune.train_from),
    )
    report(1.0, "done")
    return model


def _evaluate(plan: DemoPlan, model: SplitModel, test: ImageSet) -> EvalMetrics:
    """``evaluate`` with the frozen stages on the edges' engine, as the edges evaluate."""
    frozen = frozen_runner(model, plan.finetune.train_from)
    return evaluate(model, test, plan.batch_size, frozen=frozen)


def _cut_features(
    plan: DemoPlan, base: SplitModel, images: ImageSet
) -> tuple[torch.Tensor, torch.Tensor]:
    """``images`` through the base model's part below the cut, on the edges' engine."""
    return extract_images(base, images, plan.batch_size, lower=lower_runner(base))


def _pooled_references(
    plan: DemoPlan,
    base: SplitModel,
    splits: list[Splits],
    test_features: list[tuple[torch.Tensor, torch.Tensor]],
    rows: list[dict[str, Any]],
    results: dict[str, Any],
    progress: Callable[[str], Progress],
) -> None:
    """Stage 2 only: the local-only and centralized heads on features of the base model,
    which is every reference's network below the cut (so each training image is run
    through it once, for its edge's reference and for the centralized one)."""
    pooled_train = []
    for row, sp, test in zip(rows, splits, test_features, strict=True):
        report = progress(f"local-only {row['name']}")
        report(0.0, "stage 2: extracting features")
        train = _cut_features(plan, base, sp.train)
        pooled_train.append(train)
        report(0.5, "stage 2: training the upper part")
        local = _base_model(plan)
        train_upper(local, *train, plan.upper)
        row["local_only"] = _scores(evaluate_features(local, *test))
        report(1.0, "done")
    report = progress("centralized")
    report(0.5, "stage 2: training the upper part")
    central = _base_model(plan)
    train_upper(
        central,
        torch.cat([x for x, _ in pooled_train]),
        torch.cat([y for _, y in pooled_train]),
        plan.upper,
    )
    results["centralized"] = _scores(
        evaluate_features(
            central,
            torch.cat([x for x, _ in test_features]),
            torch.cat([y for _, y in test_features]),
        )
    )
    report(1.0, "done")


def _job_view(fraction: float, message: str) -> dict[str, Any]:
    """A reference's progress in the shape of an edge job (for ``JobProgress``, which
    prints a line per stage where there is no terminal: one per epoch, not per batch)."""
    stage = re.sub(r" \d+/\d+$| loss .*$", "", message)
    return {"progress": fraction, "stage": stage, "message": message}


# --------------------------------------------------------------------------- the run


def run_cycle(plan: DemoPlan, work: Path, procs: Processes) -> dict[str, Any]:
    """Start the processes, run one cycle over HTTP, return what the edges reported."""
    admin = secrets.token_urlsafe(24)
    server_port = free_port()
    server_url = f"http://{HOST}:{server_port}"
    server_settings = plan.server_settings(admin, work / "server", server_port)
    procs.start("server", "server", server_settings).wait_healthy()
    settings: dict[str, Any] = {"server": settings_record(server_settings), "edges": {}}
    server = httpx.Client(
        base_url=server_url, headers={"Authorization": f"Bearer {admin}"}, timeout=60
    )
    edges: list[dict[str, Any]] = []
    for i in range(len(plan.edge_specs)):
        name = f"edge-{i + 1}"
        reg = _raise_for(server.post("/v1/edges", json={"name": name})).json()
        port = free_port()
        edge_admin = secrets.token_urlsafe(24)
        edge_settings = plan.edge_settings(
            i, name, reg["edge_id"], (reg["token"], edge_admin), server_url, port, work / name
        )
        procs.start(name, "edge", edge_settings)
        settings["edges"][name] = settings_record(edge_settings)
        edges.append({"name": name, "url": f"http://{HOST}:{port}", "token": edge_admin})
    for e in edges:
        procs.procs[e["name"]].wait_healthy()
    started = time.monotonic()
    jobs = {}
    for e in edges:
        resp = httpx.post(
            f"{e['url']}/v1/jobs/cycle", headers={"Authorization": f"Bearer {e['token']}"}
        )
        jobs[e["name"]] = _raise_for(resp).json()["id"]
    shown = JobProgress([e["name"] for e in edges])
    final: dict[str, dict[str, Any]] = {}
    try:
        while len(final) < len(edges):
            procs.check_alive()
            for e in edges:
                if e["name"] in final:
                    continue
                job = _raise_for(
                    httpx.get(
                        f"{e['url']}/v1/jobs/{jobs[e['name']]}",
                        headers={"Authorization": f"Bearer {e['token']}"},
                    )
                ).json()
                shown.update(e["name"], job)
                if job["state"] in ("done", "failed"):
                    final[e["name"]] = job
            time.sleep(1.0)
    finally:
        shown.close()
    seconds = time.monotonic() - started
    failed = {n: j.get("error") for n, j in final.items() if j["state"] != "done"}
    if failed:
        raise RuntimeError(f"cycle jobs failed: {failed}")
    results = {n: CycleJobResult.model_validate(final[n]["result"]) for n in final}
    cycle_id = next(iter(results.values())).cycle_id
    cycle = _raise_for(server.get(f"/v1/cycles/{cycle_id}")).json()
    return {
        "edges": edges,
        "results": results,
        "cycle": cycle,
        "seconds": seconds,
        "settings": settings,
    }


def _save_json(results: Mapping[str, Any], path: Path | None) -> None:
    if path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(results, indent=2) + "\n")


def run_demo(options: DemoOptions) -> dict[str, Any]:
    """Run the whole demo; print the table and write JSON / report when asked."""
    plan = plan_demo(options)
    plan.check_settings()
    torch.manual_seed(plan.seed)
    work = Path(tempfile.mkdtemp(prefix="fedinspect-demo-"))
    (work / "logs").mkdir()
    print(
        f"FedInspect demo: {len(plan.edge_specs)} edges, dataset {options.dataset}"
        f"{' (quick)' if options.quick else ''}; logs in {work / 'logs'}",
        file=sys.stderr,
    )
    t0 = time.monotonic()
    try:
        with running(work / "logs") as procs:
            cycle = run_cycle(plan, work, procs)
    except BaseException:
        print(f"demo failed; process logs kept in {work / 'logs'}", file=sys.stderr)
        raise
    splits = [plan.split(s) for s in plan.edge_specs]
    base = _base_model(plan)
    # stage-2-only references share the base model's lower part: each test image goes
    # through it once, for the base column and for every reference
    pooled = (
        [_cut_features(plan, base, sp.test) for sp in splits]
        if options.references == "pooled"
        else None
    )
    rows = []
    for i, e in enumerate(cycle["edges"]):
        r: CycleJobResult = cycle["results"][e["name"]]
        federated, federated_model = served_metrics(r)
        rows.append(
            {
                "name": e["name"],
                "dataset": plan.edge_specs[i],
                "n_train": r.n_train,
                "n_test": r.n_test,
                "local_only": None,
                "base": _scores(
                    evaluate_features(base, *pooled[i])
                    if pooled is not None
                    else _evaluate(plan, base, splits[i].test)
                ),
                "server_model": _scores(r.metrics.server_model),
                "federated": _scores(federated),
                "federated_model": federated_model,
                # the fine-tuned model on the test split, deployed or not (reporting only),
                # and what the gate chose on: each weighed model's validation scores
                "candidate": _scores(r.metrics.candidate),
                "gate_validation": {
                    name: _scores(m) for name, m in (r.metrics.validation or {}).items()
                },
                # always answering the edge's most frequent training class, on its test
                "majority": r.majority.test_accuracy if r.majority else None,
                "deployed": r.deployed,
                "decision": r.decision,
                "federated_confusion": federated.confusion_matrix,
                "bytes": {
                    "uploaded": r.bytes_uploaded,
                    "downloaded": r.bytes_downloaded,
                    "raw_images": r.raw_train_bytes,
                },
                "stage_seconds": r.stage_seconds,
                # the edge's fine-tuning: epochs run, and the one whose weights were kept
                "finetune": r.finetune.model_dump() if r.finetune else None,
                # each federated round's model as this edge received it, on its test split;
                # the last round's aggregate is the stage 2 column
                "rounds": [
                    {
                        "round": rr.round,
                        "model_version": rr.model_version,
                        "test": _scores(rr.test),
                        "norm": round(rr.norm, 4),
                        "clipped": rr.clipped,
                        "bytes_uploaded": rr.bytes_uploaded,
                        "bytes_downloaded": rr.bytes_downloaded,
                        "seconds": round(rr.seconds, 1),
                    }
                    for rr in r.rounds
                ],
            }
        )
    results: dict[str, Any] = {
        "dataset": options.dataset,
        "quick": options.quick,
        "seed": options.seed,
        "input_size": base.arch.input_size,
        "backbone": plan.backbone,
        "class_names": plan.class_names,
        "edges": rows,
        "centralized": None,
        "references": "pending",
        "mean_federated_accuracy": round(
            sum(r["federated"]["accuracy"] for r in rows) / len(rows), 4
        ),
        "cycle": {
            "id": cycle["cycle"]["id"],
            "model_version": cycle["cycle"]["result_model_version"],
            "rounds": cycle["cycle"]["round"],
            "round_versions": cycle["cycle"]["round_versions"],
            "reason": cycle["cycle"]["reason"],
            "seconds": round(cycle["seconds"], 1),
            "server_metrics": _scores(
                EvalMetrics(**cycle["cycle"]["metrics"]) if cycle["cycle"]["metrics"] else None
            ),
        },
        "bytes": {
            k: sum(r["bytes"][k] for r in rows) for k in ("uploaded", "downloaded", "raw_images")
        },
        "references_seconds": None,
        "total_seconds": round(time.monotonic() - t0, 1),
        # how the run was made: the --set overrides, and every setting each process got
        "settings": {
            "set": {
                f"{service}.{var.lower().replace('__', '.')}": value
                for service, values in plan.overrides.items()
                for var, value in values.items()
            },
            **cycle.get("settings", {}),
        },
    }
    # the cycle's results are kept even if the references are interrupted
    print(format_table(results), file=sys.stderr)
    _save_json(results, options.json_path)
    print(
        "cycle done; training the local-only and centralized references"
        f" ({'stage 2 only' if pooled is not None else 'stages 2 and 3'})...",
        file=sys.stderr,
    )
    t_ref = time.monotonic()
    local_names = [f"local-only {r['name']}" for r in rows]
    shown = JobProgress([*local_names, "centralized"])

    def progress(name: str) -> Progress:
        return lambda f, m: shown.update(name, _job_view(f, m))

    try:
        if pooled is not None:
            _pooled_references(plan, base, splits, pooled, rows, results, progress)
        else:
            for name, row, sp in zip(local_names, rows, splits, strict=True):
                local = train_reference(plan, sp.train, sp.val, progress(name))
                row["local_only"] = _scores(_evaluate(plan, local, sp.test))
            central = train_reference(
                plan,
                _union([s.train for s in splits], plan.class_names),
                _union([s.val for s in splits], plan.class_names),
                progress("centralized"),
            )
            results["centralized"] = _scores(
                _evaluate(plan, central, _union([s.test for s in splits], plan.class_names))
            )
    finally:
        shown.close()
    results["references"] = options.references
    results["references_seconds"] = round(time.monotonic() - t_ref, 1)
    results["total_seconds"] = round(time.monotonic() - t0, 1)
    print(format_table(results))
    _save_json(results, options.json_path)
    if options.report_dir:
        from fedinspect.report import write_report

        write_report(results, options.report_dir)
    # the data folders (models, features) go; the logs the first line pointed to stay
    for child in work.iterdir():
        if child.is_dir() and child.name != "logs":
            shutil.rmtree(child, ignore_errors=True)
        elif child.is_file():
            child.unlink()
    print(f"process logs kept in {work / 'logs'}", file=sys.stderr)
    return results
