// The server's dashboard: one GET /v1/overview every few seconds (edges, cycles,
// models, edges' evaluation reports, training progress), and the operator's actions.
"use strict";

(() => {
  const { api, showError, el, fill, pct, progress, stamp, when, duration } = FI;
  const POLL_MS = 2000;
  let overview = null;
  let skewMs = 0; // server clock minus this browser's, for countdowns
  let timer = null;

  const $ = (id) => document.getElementById(id);

  const act = (what, fn) => FI.act(what, fn, refresh);

  // ------------------------------------------------------------------ cycles

  function countdown(cycle) {
    if (cycle.state !== "collecting") return stamp(cycle.deadline);
    const left = (Date.parse(cycle.deadline) - (Date.now() + skewMs)) / 1000;
    return left > 0 ? `in ${duration(left)}` : `passed ${duration(-left)} ago`;
  }

  function metricsText(m) {
    if (!m) return "–";
    return `accuracy ${pct(m.accuracy)} · balanced ${pct(m.balanced_accuracy)} · macro F1 ${pct(m.macro_f1)} (n=${m.n})`;
  }

  function cycleRow(cycle) {
    const training = (overview.training || []).find((p) => p.cycle_id === cycle.id);
    const uploaded = cycle.uploads.map((u) => u.edge_id);
    const waiting = cycle.joined_edges.filter((e) => !uploaded.includes(e));
    let trainingCell = "–";
    if (cycle.state === "training") {
      trainingCell = training ? progress(training.fraction, training.message) : "training…";
    } else if (cycle.state === "done") {
      trainingCell = progress(1, `done: model v${cycle.result_model_version}`);
    } else if (cycle.reason) {
      trainingCell = el("span", { class: "muted" }, cycle.reason);
    }
    const buttons = [];
    if (cycle.state === "collecting") {
      buttons.push(
        el("button", { type: "button", class: "train", onclick: () => act("Train now", () => api("POST", `/v1/cycles/${cycle.id}/train`)) }, "Train now")
      );
    }
    if (cycle.state === "collecting" || cycle.state === "training") {
      buttons.push(
        el("button", {
          type: "button",
          class: "cancel danger",
          onclick: () => {
            if (confirm(`Cancel cycle ${cycle.id}?`)) act("Cancel", () => api("POST", `/v1/cycles/${cycle.id}/cancel`));
          },
        }, "Cancel")
      );
    }
    return el(
      "tr",
      { dataset: { cycleId: cycle.id, state: cycle.state } },
      el("td", {}, `#${cycle.id}`),
      el("td", {}, el("span", { class: `state ${cycle.state}` }, cycle.state)),
      el("td", {}, `v${cycle.base_model_version} → ${cycle.result_model_version ? "v" + cycle.result_model_version : "…"}`),
      el(
        "td",
        { class: "uploads" },
        `${cycle.uploads.length} / ${cycle.min_edges}`,
        waiting.length ? el("div", { class: "muted" }, `joined, not uploaded: ${waiting.join(", ")}`) : null
      ),
      el("td", { class: "deadline", dataset: { deadline: cycle.deadline }, title: stamp(cycle.deadline) }, countdown(cycle)),
      el("td", { class: "training" }, trainingCell),
      el("td", { class: "metrics" }, metricsText(cycle.metrics)),
      el("td", { class: "buttons" }, buttons)
    );
  }

  // ------------------------------------------------------------------ edges

  function edgeRow(edge) {
    const name = edge.revoked ? [edge.name, " ", el("span", { class: "state cancelled" }, "revoked")] : edge.name;
    return el(
      "tr",
      { dataset: { edgeId: edge.edge_id } },
      el("td", { class: "name" }, name),
      el("td", {}, el("code", {}, edge.edge_id)),
      el("td", { title: stamp(edge.created_at) }, when(edge.created_at, overview.now)),
      el("td", { title: stamp(edge.last_seen) }, when(edge.last_seen, overview.now)),
      el("td", { title: stamp(edge.last_upload) }, when(edge.last_upload, overview.now)),
      el("td", {}, edge.last_cycle_id ? `#${edge.last_cycle_id}` : "–"),
      el("td", {}, edge.deployed_model_version ? `v${edge.deployed_model_version}` : "–"),
      el("td", { class: "accuracy" }, pct(edge.test_accuracy))
    );
  }

  // ------------------------------------------------------------------ models

  function privacyText(p) {
    if (!p) return "–";
    const parts = [p.mode, p.dtype];
    if (p.clip_norm) parts.push(`clip ${p.clip_norm}`);
    if (p.noise_sigma) parts.push(`noise σ ${p.noise_sigma}`);
    return parts.join(", ");
  }

  function modelRow(model) {
    const from = model.trained_from;
    const trained = from && from.cycle_id
      ? `cycle #${from.cycle_id}: ${from.edges.length} edge(s), ${from.rows_train} rows`
      : "initial base model";
    return el(
      "tr",
      { dataset: { version: model.version } },
      el("td", {}, `v${model.version}`),
      el("td", {}, model.parent ? `v${model.parent}` : "–"),
      el("td", {}, stamp(model.created_at)),
      el("td", { title: model.sha256 }, el("code", {}, model.sha256.slice(0, 12))),
      el("td", {}, `${model.backbone} / ${model.cut} @ ${model.input_size}px`),
      el("td", {}, privacyText(model.privacy)),
      el("td", {}, trained),
      el("td", {}, metricsText(model.metrics))
    );
  }

  // ------------------------------------------------------------------ chart

  const SVG = "http://www.w3.org/2000/svg";
  const COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf", "#8c564b", "#e377c2"];

  function svg(tag, attrs, ...children) {
    const node = document.createElementNS(SVG, tag);
    for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, String(v));
    for (const c of children) node.append(c instanceof Node ? c : document.createTextNode(String(c)));
    return node;
  }

  function chart(evaluations, edges) {
    const names = Object.fromEntries(edges.map((e) => [e.edge_id, e.name]));
    const points = evaluations
      .filter((e) => e.report.metrics && e.report.metrics.deployed)
      .map((e) => ({ edge: e.edge_id, x: e.model_version, y: e.report.metrics.deployed.accuracy, e: e.report }));
    if (!points.length) {
      return el("p", { class: "muted" }, "No edge has reported an evaluation yet: edges report after stage 3 of a cycle.");
    }
    const W = 640, H = 240, L = 48, R = 150, T = 12, B = 36;
    const xs = [...new Set(points.map((p) => p.x))].sort((a, b) => a - b);
    const xAt = (x) => (xs.length === 1 ? L + (W - L - R) / 2 : L + ((W - L - R) * xs.indexOf(x)) / (xs.length - 1));
    const yAt = (y) => T + (H - T - B) * (1 - y);
    const root = svg("svg", { viewBox: `0 0 ${W} ${H}`, class: "chart", role: "img", "aria-label": "test accuracy per edge and model version" });
    for (const y of [0, 0.25, 0.5, 0.75, 1]) {
      root.append(svg("line", { x1: L, x2: W - R, y1: yAt(y), y2: yAt(y), class: "grid" }));
      root.append(svg("text", { x: L - 6, y: yAt(y) + 4, "text-anchor": "end", class: "axis" }, `${y * 100}%`));
    }
    for (const x of xs) {
      root.append(svg("text", { x: xAt(x), y: H - B + 16, "text-anchor": "middle", class: "axis" }, `v${x}`));
    }
    root.append(svg("text", { x: (W - R + L) / 2, y: H - 4, "text-anchor": "middle", class: "axis" }, "server model version (one per cycle)"));
    const byEdge = {};
    for (const p of points) (byEdge[p.edge] = byEdge[p.edge] || []).push(p);
    Object.keys(byEdge).sort().forEach((edge, i) => {
      const color = COLORS[i % COLORS.length];
      const pts = byEdge[edge].sort((a, b) => a.x - b.x);
      if (pts.length > 1) {
        root.append(svg("polyline", { points: pts.map((p) => `${xAt(p.x)},${yAt(p.y)}`).join(" "), fill: "none", stroke: color, "stroke-width": 2 }));
      }
      for (const p of pts) {
        root.append(
          svg("circle", { cx: xAt(p.x), cy: yAt(p.y), r: 4, fill: color, class: "point", "data-edge": edge },
            svg("title", {}, `${names[edge] || edge}, model v${p.x}: ${pct(p.y)} on ${p.e.n_test} test images (${p.e.chosen || "nothing"} serves)`))
        );
      }
      root.append(svg("rect", { x: W - R + 12, y: T + i * 18, width: 10, height: 10, fill: color }));
      root.append(svg("text", { x: W - R + 28, y: T + i * 18 + 9, class: "legend" }, names[edge] || edge));
    });
    return root;
  }

  // ------------------------------------------------------------------ refresh

  function render() {
    fill($("cycles").tBodies[0], overview.cycles.map(cycleRow));
    $("no-cycles").hidden = overview.cycles.length > 0;
    fill($("edges").tBodies[0], overview.edges.map(edgeRow));
    $("no-edges").hidden = overview.edges.length > 0;
    fill($("models").tBodies[0], [...overview.models].reverse().map(modelRow));
    $("chart").replaceChildren(chart(overview.evaluations, overview.edges));
  }

  function tick() {
    if (!overview) return;
    for (const cell of document.querySelectorAll("#cycles td.deadline")) {
      const row = cell.closest("tr");
      const cycle = overview.cycles.find((c) => String(c.id) === row.dataset.cycleId);
      if (cycle) cell.textContent = countdown(cycle);
    }
  }

  async function refresh() {
    overview = await api("GET", "/v1/overview");
    skewMs = Date.parse(overview.now) - Date.now();
    render();
    $("live").textContent = `live · updated ${new Date().toLocaleTimeString()}`;
  }

  async function poll() {
    clearTimeout(timer);
    if (!FI.token()) return;
    try {
      if (!document.hidden) await refresh();
    } catch (err) {
      if (err.status !== 401) showError(`Cannot refresh: ${err.message}`);
    }
    timer = setTimeout(poll, POLL_MS);
  }

  // ------------------------------------------------------------------ actions

  $("register-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const input = $("edge-name");
    act("Register edge", async () => {
      const created = await api("POST", "/v1/edges", { name: input.value.trim() });
      input.value = "";
      $("new-token-name").textContent = created.name;
      $("new-token-id").textContent = created.edge_id;
      $("new-token-value").textContent = created.token;
      $("new-token").hidden = false;
    });
  });
  $("hide-token").addEventListener("click", () => {
    $("new-token-value").textContent = "";
    $("new-token").hidden = true;
  });
  $("open-cycle").addEventListener("click", () => act("Open a cycle", () => api("POST", "/v1/cycles")));

  setInterval(tick, 1000);
  FI.setup("fedinspect.server.token", () => api("GET", "/v1/overview"), poll);
})();
