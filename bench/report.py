"""results.json -> results.md: the same numbers as Markdown tables."""

from __future__ import annotations

from typing import Any

from bench import limit
from bench.stats import fmt


def pct(s: dict[str, Any] | None) -> str:
    if not s or s.get("median") is None:
        return "-"
    return f"{100 * s['median']:.1f} ({100 * s['min']:.1f}-{100 * s['max']:.1f})"


def _mb(s: dict[str, Any] | None) -> str:
    if not s or s.get("median") is None:
        return "-"
    return f"{s['median'] / 1e6:.1f} MB ({s['min'] / 1e6:.1f}-{s['max'] / 1e6:.1f})"


def _extraction(e: dict[str, Any]) -> list[str]:
    lines = ["## 1. Extraction against the CPU's limit", ""]
    for size in e["sizes"]:
        lines += [
            f"{size['input_size']} px, batch {size['batch_size']}, {size['threads']} threads, "
            f"{size['images']} elpv images; img/s, median (min-max):",
            "",
            "| what | img/s |",
            "|---|---:|",
            f"| reference: torch eager NCHW on decoded tensors | {fmt(size['torch_nchw_img_s'])} |",
            f"| reference: torch eager channels-last on decoded tensors | {fmt(size['torch_img_s'])} |",
            f"| reference: ONNX Runtime on decoded tensors | {fmt(size['onnxruntime_img_s'])} |",
        ]
        for name, value in size["breakdown"].items():
            lines.append(f"| edge path: {name} | {fmt(value)} |")
        lines += [
            "",
            f"ratio (edge path / fastest reference, medians of the same run): **{size['ratio']}**; "
            f"ONNX export + check once per base model: {size['onnx_setup_s']} s "
            f"(max abs diff {size['onnx_max_abs_diff']:.1e}).",
            "",
        ]
    return lines


def _first_base(d: dict[str, Any]) -> str:
    if "base_from_local_weights" not in d:  # results from before the local-weights delta
        return f"base in full {d['full_model']}"
    return (
        f"base {d['base_from_local_weights']} as a delta from the local ImageNet weights, "
        f"{d['base_changed_tensors']} tensors; {d['without_local_weights_first_cycle']} "
        f"without them"
    )


def _wire(w: dict[str, Any]) -> list[str]:
    d = w["download_bytes_per_cycle"]
    lines = [
        "## 2. Bytes on the wire",
        "",
        f"raw image bytes on disk: {w['raw_bytes_per_image']:.0f} per image (elpv PNG).",
        "",
        "| privacy dtype | upload bytes / image | / raw |",
        "|---|---:|---:|",
    ]
    for dtype, value in w["upload_bytes_per_image"].items():
        lines.append(f"| {dtype} | {value:.0f} | {w['ratio'][dtype]:.4f} |")
    lines += [
        "",
        f"download per cycle: first cycle {d['first_cycle']} bytes ({_first_base(d)} + "
        f"retrained delta {d['delta']}: {d['changed_tensors']} of "
        f"{d['total_tensors']} tensors), later cycles {d['later_cycles']} bytes; "
        f"without the delta a first cycle cost {d['without_delta_first_cycle']} bytes.",
        "",
    ]
    if w.get("per_round_per_edge"):
        r = w["per_round_per_edge"]
        lines += [
            f"a federated round, per edge ({r['train_from']} up and the head, "
            f"{r['trained_parameters']:,} parameters in {r['trained_tensors']} tensors, "
            f"{r['dtype']}): upload {r['upload']} bytes; download of the round's model "
            f"{r['download_update']} bytes as the averaged update, against "
            f"{r['download_changed_tensors']} as the changed tensors.",
            "",
        ]
    if w.get("measured_in_demo"):
        lines += [
            "measured in the demo (elpv, seed 0):",
            "",
            "| edge | train images | up | down | raw |",
            "|---|---:|---:|---:|---:|",
        ]
        for e in w["measured_in_demo"]:
            lines.append(
                f"| {e['name']} | {e['n_train']} | {e['uploaded']} | {e['downloaded']} | {e['raw_images']} |"
            )
        lines.append("")
    return lines


def _ingest(rows: list[dict[str, Any]]) -> list[str]:
    lines = [
        "## 3. Server ingest under load",
        "",
        "| edges | uploads | bytes/upload | uploads/s | MB/s | p50 ms | p99 ms | errors | 429/503 retried | peak RSS MB |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['edges']} | {r['uploads']} | {r['upload_bytes']} | {r['uploads_per_s']} | "
            f"{r['mb_per_s']} | {r['p50_ms']} | {r['p99_ms']} | {r['errors']} | "
            f"{r['retries_429_503']} | {r['peak_rss_mb']} |"
        )
    return [*lines, ""]


def _cycle(c: dict[str, Any]) -> list[str]:
    lines = [
        "## 4. Cycle time",
        "",
        f"quick demo cycle: {fmt(c.get('quick_s'), ' s')}; full demo cycle: {fmt(c.get('full_s'), ' s')}",
        "",
        "| stage (per edge) | seconds |",
        "|---|---:|",
    ]
    for k, v in c.get("stages", {}).items():
        lines.append(f"| {k} | {fmt(v)} |")
    return [*lines, ""]


def _accuracy(acc: dict[str, Any]) -> list[str]:
    lines = ["## 5. Accuracy (test accuracy %, median (min-max) over seeds)", ""]
    for name, t in acc.items():
        lines += [
            f"### {name} ({'quick' if t['quick'] else 'full'}, {t['input_size']} px, seeds {t['seeds']})",
            "",
            "| edge | local-only | base | stage 2 (server) | federated |",
            "|---|---:|---:|---:|---:|",
        ]
        for e in t["edges"]:
            lines.append(
                f"| {e['name']} | {pct(e['local_only'])} | {pct(e['base'])} | "
                f"{pct(e['server_model'])} | {pct(e['federated'])} |"
            )
        m = t["mean"]
        lines += [
            f"| **mean** | {pct(m['local_only'])} | {pct(m['base'])} | "
            f"{pct(m['server_model'])} | {pct(m['federated'])} |",
            "",
            f"centralized upper bound: {pct(t['centralized'])}; references trained "
            f"{', '.join(t.get('references') or ['full'])}"
            + (f"; runs at commits {', '.join(t['commits'])}" if t.get("commits") else ""),
            "",
        ]
        if m.get("majority"):
            lines += [
                f"always answering each edge's most frequent class (mean): {pct(m['majority'])}",
                "",
            ]
        if m.get("candidate"):
            lines += [
                "each edge's fine-tuned model, whether its gate deployed it or not (mean): "
                f"{pct(m['candidate'])}",
                "",
            ]
        lines += _scores(t.get("scores") or {})
    return lines


def _scores(scores: dict[str, Any]) -> list[str]:
    """Balanced accuracy and macro F1 of the edges' mean and of the centralized reference."""
    if not scores:  # runs from before the demo kept them
        return []
    names = {"balanced_accuracy": "balanced accuracy", "macro_f1": "macro F1"}
    lines = [
        "| mean over edges, % | local-only | stage 2 (server) | federated | centralized |",
        "|---|---:|---:|---:|---:|",
    ]
    for metric, row in scores.items():
        lines.append(
            f"| {names.get(metric, metric)} | {pct(row.get('local_only'))} | "
            f"{pct(row.get('server_model'))} | {pct(row.get('federated'))} | "
            f"{pct(row.get('centralized'))} |"
        )
    return [*lines, ""]


def our_rounds(ours: dict[str, Any] | None) -> dict[str, Any] | None:
    """The summary of our cycles' federated rounds; None where the results predate it
    (they kept a constant 1 for one cycle, and those cycles had no rounds)."""
    rounds = (ours or {}).get("rounds")
    return rounds if isinstance(rounds, dict) else None


def _flower(block: dict[str, Any], title: str) -> list[str]:
    lines = [
        f"## 6. Against Flower ({title})",
        "",
        "| | mean acc % | per edge acc % | rounds | bytes moved | edge compute s | wall s |",
        "|---|---:|---|---:|---:|---:|---:|",
    ]
    o = block["ours"]
    rounds = our_rounds(o)
    lines.append(
        f"| ours (1 cycle) | {pct(o['accuracy']['mean'])} | "
        + ", ".join(pct(a) for a in o["accuracy"]["per_edge"])
        + f" | {fmt(rounds) if rounds else '0'} | {_mb(o['bytes'])} | {fmt(o['seconds']['edge_compute'])} | {fmt(o['seconds']['wall'])} |"
    )
    for key, label in (
        ("flower", "Flower FedAvg, {}+ and head"),
        ("flower_head", "Flower FedAvg, head on pooled"),
    ):
        f = block.get(key)
        if not f:
            continue
        label = label.format(f.get("trained_from") or "b11")  # b11: before it was kept
        lines.append(
            f"| {label} | {pct(f['accuracy']['mean'])} | "
            + ", ".join(pct(a) for a in f["accuracy"]["per_edge"])
            + f" | {fmt(f['rounds'])} | {_mb(f['bytes'])} | {fmt(f['seconds']['edge_compute'])} | "
            f"{fmt(f['seconds']['wall'])} |"
        )
    for key in ("flower", "flower_head"):
        f = block.get(key)
        if f:
            lines.append(
                f"\n{key}: rounds to reach the median of our means (all seeds), per seed: "
                f"{f['rounds_to_reach_ours']}; "
                f"chosen (local epochs, lr): {f['choice']}"
            )
            lines += _flower_scores(key, f)
    lines += _flower_same_seed(block)
    lines += _flower_grids(block)
    if block.get("engine"):
        lines.append(f"\nengine: {block['engine']}")
    # results stored before the choice moved to validation carry no "selection"; with
    # no Flower result yet, the text describes what the bench runs today
    by_validation = all(
        (block.get(k) or {"selection": "validation"}).get("selection") == "validation"
        for k in ("flower", "flower_head")
    )
    protocol = (
        "Flower's clients run our fine-tuning recipe (fl_core's finetune_activations) on "
        "their train split, for the local epochs, no early stopping; its (local epochs, lr, "
        "round) is the best mean accuracy on the clients' validation splits, and the "
        "accuracy shown is the test split's at that round (the test-selected best is shown "
        "apart, for reference only)"
        if by_validation
        else "Flower's clients train on train+val (no early stopping) and its "
        "(local epochs, lr, round) is the best on the test split, which favours Flower"
    )
    lines += [
        "",
        f"How to read this: {protocol}; ours "
        "is one cycle at the shipped defaults (the server's default privacy mode and "
        "rounds, the edges' fine-tuning recipe, the deploy gate on each edge's validation "
        "split). "
        "Bytes: ours = upload + download of every edge (first cycle: the base model as a delta "
        "from the ImageNet weights installed on the edge, then the retrained part as a "
        "delta); Flower = its serialised parameters down and up, "
        "per client, per round, up to the reported round. Seconds: ours = the cycle's wall "
        "time and the edges' summed stage seconds (wait excluded); Flower = client training "
        "plus the frozen part run once, up to the reported round (in-process, sequential).",
        "",
    ]
    return lines


def _flower_scores(key: str, f: dict[str, Any]) -> list[str]:
    """Balanced accuracy and macro F1 beside the accuracy, and the test-selected
    accuracy, where the results carry them (the earlier protocol's do not)."""
    lines = []
    if f.get("balanced_accuracy"):
        lines.append(
            f"{key}: chosen on {f['selection']}; at that round, test balanced accuracy "
            f"{pct(f['balanced_accuracy']['mean'])}, macro F1 "
            f"{pct(f['macro_f1']['mean'])}, validation accuracy "
            f"{pct(f['val_accuracy']['mean'])}"
        )
    if f.get("test_selected"):
        t = f["test_selected"]
        lines.append(
            f"{key}, test-selected for reference only (favours Flower): mean acc "
            f"{pct(t['accuracy']['mean'])} at rounds {t['rounds']}, (local epochs, lr) "
            f"{t['choice']}"
        )
    return lines


def _flower_same_seed(block: dict[str, Any]) -> list[str]:
    """Each seed's Flower result beside our cycle on that seed's own splits."""
    rows = []
    for row in block.get("same_seed") or []:
        cells = [f"{row['seed']}", f"{100 * row['ours']['mean']:.1f}"]
        for key in ("flower", "flower_head"):
            f = row[key]
            reach = f["to_reach_ours"]
            cells += [
                f"{100 * f['mean']:.1f} ({f['points_above_ours']:+.1f})",
                f"{f['bytes_x_ours']:g}x, {f['wall_x_ours']:g}x",
                "never"
                if reach is None
                else f"{f['reaches_ours_at_round']} ({reach['bytes'] / 1e6:.1f} MB, "
                f"{reach['wall_s']:.0f} s)",
            ]
        rows.append("| " + " | ".join(cells) + " |")
    if not rows:
        return []
    return [
        "",
        "Same seed, same splits (points: Flower's mean test accuracy at its chosen round "
        "minus ours; bytes and wall time to that round as multiples of ours; the round "
        "where Flower's mean test accuracy first reached ours, with bytes and wall time "
        "to it):",
        "",
        "| seed | ours mean % | Flower (a) chosen % | (a) bytes, wall x ours | (a) reaches ours "
        "at | Flower (b) chosen % | (b) bytes, wall x ours | (b) reaches ours at |",
        "|---:|---:|---:|---|---|---:|---|---|",
        *rows,
    ]


def _flower_grids(block: dict[str, Any]) -> list[str]:
    """Each searched grid point of each configuration: its best round and its cost."""
    rows = []
    for key in ("flower", "flower_head"):
        for run in (block.get(key) or {}).get("per_seed", []):
            for p in run.get("grid", []):
                if "accuracy" not in p:  # stored before the grid kept its points' results
                    continue
                reach = p["rounds_to_reach_ours"]
                rows.append(
                    f"| {key}, seed {run['seed']} | {p['local_epochs']}, {p['lr']:g} | "
                    f"{100 * p['accuracy']['mean']:.1f} | {p['best_round']} ({p['rounds_run']}) | "
                    f"{p['bytes'] / 1e6:.1f} MB | {p['seconds']['wall_to_best']:.0f} | "
                    f"{'never' if reach is None else reach} |"
                )
    if not rows:
        return []
    return [
        "",
        "Grid points (mean test accuracy at each point's chosen round, chosen on the split "
        "its configuration's results name, above; bytes and wall time up to that round):",
        "",
        "| configuration, seed | local epochs, lr | mean test acc % | round (of run) | "
        "bytes to best | wall to best s | reaches ours at round |",
        "|---|---|---:|---:|---:|---:|---:|",
        *rows,
    ]


def _flower_partial(partial: dict[str, Any]) -> list[str]:
    """Flower seeds begun but not finished: the grid points they have so far."""
    lines = ["## Flower, seeds still running (resume with --only flower --resume)", ""]
    for label, seeds in partial.items():
        for seed, configs in seeds.items():
            for key, points in configs.items():
                for point, p in points.items():
                    lines.append(
                        f"- {label} seed {seed}, {key}, (local epochs, lr) {point}: mean test "
                        f"accuracy {100 * p['accuracy']['mean']:.1f}% at round "
                        f"{p['best_round']} of {p['rounds_run']}, chosen on "
                        f"{p.get('selection', 'test')}"
                    )
    return [*lines, ""]


def to_markdown(r: dict[str, Any]) -> str:
    m = r["machine"]
    lines = [
        f"# FedInspect benchmarks ({r['mode']})",
        "",
        f"Command: `{r['command']}`  ",
        f"Machine: {m['cpu']}, {m['cores']} cores, Python {m['python']}, torch {m['torch']}, "
        f"onnxruntime {m['onnxruntime']}; load average at start {m['load_average_at_start']} "
        "(shared machine: compare only numbers from the same run).  ",
        f"Started {r['started_at']}; total {r.get('total_seconds', '-')} s.",
        "",
        "Every figure is the median of repeated runs with (min-max); ratios compare numbers "
        "measured in the same run.",
        "",
    ]
    for note in r.get("notes", []):
        lines.append(f"- {note}")
    for rerun in r.get("reruns", []):
        lines.append(
            f"- sections {rerun['sections']} rerun at {rerun['at']} "
            f"(load average then {rerun['machine']['load_average_at_start']})"
        )
    if r.get("extraction"):
        lines += _extraction(r["extraction"])
    if r.get("wire"):
        lines += _wire(r["wire"])
    if r.get("ingest"):
        lines += _ingest(r["ingest"])
    if r.get("limit"):  # its own page's title, one level down
        lines += ["", "#" + limit.markdown(r["limit"]).strip()]
    if r.get("cycle"):
        lines += _cycle(r["cycle"])
    if r.get("accuracy"):
        lines += _accuracy(r["accuracy"])
    if r.get("ours"):
        lines += _flower(r, "elpv")
    if r.get("neu_det_flower"):
        lines += _flower(r["neu_det_flower"], "NEU-DET")
    if r.get("flower_partial"):
        lines += _flower_partial(r["flower_partial"])
    if r.get("errors"):
        lines += ["## Sections that failed", ""]
        lines += [f"- {k}: {v}" for k, v in r["errors"].items()]
    return "\n".join(lines) + "\n"


__all__ = ["to_markdown"]
