// An edge's page: its status (server link, dataset, deployed model), the gate's last
// decision, the running job, "start a cycle", rollback, and "try an image".
"use strict";

(() => {
  const { api, showError, el, fill, pct, progress, stamp, when } = FI;
  const $ = (id) => document.getElementById(id);
  let timer = null;
  let imageUrl = null;

  const act = (what, fn) => FI.act(what, fn, refresh);

  function kv(pairs) {
    return pairs.flatMap(([k, v]) => [el("dt", {}, k), el("dd", {}, v)]);
  }

  // ------------------------------------------------------------------ status

  function renderStatus(status) {
    $("edge-name").textContent = status.edge_name;
    const problems = status.problems || [];
    $("problems").hidden = problems.length === 0;
    fill($("problem-list"), problems.map((p) => el("li", {}, p)));
    const link = status.server;
    $("server").replaceChildren(
      ...kv([
        ["URL", el("code", {}, status.server_url)],
        ["connection", link ? (link.authorized ? el("span", { class: "state done" }, "connected") : el("span", { class: "state failed" }, link.reachable ? "token refused" : "unreachable")) : "–"],
        ["detail", link ? link.detail : "–"],
        ["last cycle", status.last_cycle_id ? `#${status.last_cycle_id}` : "none"],
      ])
    );
    const data = status.dataset;
    if (!data) {
      $("dataset").replaceChildren(el("p", { class: "error" }, "The dataset cannot be loaded (see the problems above)."));
    } else {
      const head = el("tr", {}, el("th", {}, "class"), el("th", {}, "train"), el("th", {}, "val"), el("th", {}, "test"));
      const rows = data.class_names.map((c) =>
        el("tr", {}, el("td", {}, c), el("td", {}, data.counts.train[c] || 0), el("td", {}, data.counts.val[c] || 0), el("td", {}, data.counts.test[c] || 0))
      );
      $("dataset").replaceChildren(
        el("p", {}, el("code", {}, data.spec), ` · ${data.n_images} images, ${data.class_names.length} classes`),
        el("table", { id: "dataset-counts" }, el("thead", {}, head), el("tbody", {}, rows))
      );
    }
    renderJob(status.last_job);
  }

  function renderJob(job) {
    const busy = job && (job.state === "queued" || job.state === "running");
    $("start-cycle").disabled = Boolean(busy);
    if (!job) return;
    const parts = [
      el("p", {}, `Job ${job.kind} `, el("span", { class: `state ${job.state}`, id: "job-state" }, job.state),
        job.stage && job.stage !== "done" ? ` · stage ${job.stage}` : "", ` · started ${when(job.created_at)}`),
      progress(job.progress, pct(job.progress)),
      el("p", { id: "job-message" }, job.error || job.message),
    ];
    if (job.state === "done" && job.result) {
      const r = job.result;
      parts.push(el("p", { class: "muted" }, `cycle #${r.cycle_id ?? "–"} · model v${r.model_version ?? "–"} · ${r.rows_uploaded} rows uploaded (${r.bytes_uploaded} bytes; the images are ${r.raw_train_bytes} bytes and stay here)${r.finetune ? ` · fine-tuned ${r.finetune.epochs_run} epochs, kept epoch ${r.finetune.best_epoch}` : ""}`));
    }
    $("job").replaceChildren(...parts);
  }

  // ------------------------------------------------------------------ evaluation

  function modelText(m) {
    if (!m) return "none";
    return `model ${m.id} (${m.source === "base" ? "server's" : "fine-tuned"}, from server v${m.base_version ?? "–"}) · test accuracy ${pct(m.metrics && m.metrics.accuracy)}${m.metrics ? ` on ${m.metrics.n} images` : ""}`;
  }

  function renderEvaluation(ev) {
    const chosen = { candidate: "the fine-tuned candidate", server_model: "the server's model as received", previous: "the previously deployed model (kept)" };
    const pairs = [
      ["serving now", modelText(ev.deployed)],
      ["before it", modelText(ev.previous)],
      ["decision", ev.decision || "none yet"],
    ];
    if (ev.chosen !== undefined && ev.chosen !== null) pairs.push(["gate chose", chosen[ev.chosen] || ev.chosen]);
    const parts = [el("dl", { class: "kv" }, kv(pairs))];
    if (ev.validation_accuracy) {
      const rows = Object.entries(ev.validation_accuracy).map(([name, acc]) =>
        el("tr", { class: name === ev.chosen ? "chosen" : "" }, el("td", {}, chosen[name] || name), el("td", {}, pct(acc)), el("td", {}, name === ev.chosen ? "✓ serves" : ""))
      );
      rows.push(el("tr", {}, el("td", { class: "muted" }, `always answering '${ev.majority_class}' (the floor)`), el("td", { class: "muted" }, pct(ev.majority_accuracy)), el("td", {})));
      parts.push(
        el("p", { class: "muted" }, `Scored on the ${ev.scored_on} split (${ev.n_scored} images); the test split is for reporting only.`),
        el("table", { id: "gate" }, el("thead", {}, el("tr", {}, el("th", {}, "model"), el("th", {}, `${ev.scored_on} accuracy`), el("th", {}))), el("tbody", {}, rows))
      );
    }
    $("evaluation").replaceChildren(...parts);
  }

  function renderModels(models) {
    fill(
      $("models").tBodies[0],
      [...models].reverse().map((m) =>
        el(
          "tr",
          { dataset: { modelId: m.id } },
          el("td", {}, m.id, m.active ? el("span", { class: "state done" }, " serving") : ""),
          el("td", {}, `${m.source === "base" ? "server" : "fine-tuned"} v${m.base_version ?? "–"}`),
          el("td", { title: stamp(m.created_at) }, when(m.created_at)),
          el("td", { title: m.note }, pct(m.metrics && m.metrics.accuracy)),
          el("td", {}, m.active ? "" : el("button", {
            type: "button",
            class: "secondary",
            onclick: () => {
              if (confirm(`Deploy model ${m.id} instead of the one serving now?`)) act("Activate", () => api("POST", `/v1/models/${m.id}/activate`));
            },
          }, "Deploy"))
        )
      )
    );
  }

  // ------------------------------------------------------------------ try an image

  async function tryImage(file) {
    showError("");
    if (imageUrl) URL.revokeObjectURL(imageUrl);
    imageUrl = URL.createObjectURL(file);
    const form = new FormData();
    form.append("files", file, file.name);
    $("prediction").replaceChildren(el("p", { class: "muted" }, "classifying…"));
    try {
      const answer = await api("POST", "/v1/predict?heatmap=true", form);
      const p = answer.predictions[0];
      const scores = Object.entries(p.scores).sort((a, b) => b[1] - a[1]).map(([name, s]) =>
        el("tr", {}, el("td", {}, name), el("td", {}, pct(s)), el("td", {}, progress(s, "")))
      );
      $("prediction").replaceChildren(
        el("p", { id: "predicted" }, "Prediction: ", el("b", {}, p.label), el("span", { class: "muted" }, ` · model ${answer.model_id} (server v${answer.model_version ?? "–"}) · ${answer.latency_ms.toFixed(0)} ms`)),
        el("table", { class: "scores" }, el("tbody", {}, scores)),
        el("div", { class: "images" },
          el("figure", {}, el("img", { src: imageUrl, alt: "the image" }), el("figcaption", { class: "muted" }, p.filename)),
          el("figure", {}, el("img", { id: "heatmap", src: `data:image/png;base64,${p.heatmap_png_base64}`, alt: `heat map of ${p.heatmap_class}` }),
            el("figcaption", { class: "muted" }, `where the model saw '${p.heatmap_class}' (Grad-CAM)`)))
      );
    } catch (err) {
      $("prediction").replaceChildren(el("p", { class: "error" }, `Prediction failed: ${err.message}`));
    }
  }

  $("image").addEventListener("change", (event) => {
    const file = event.target.files[0];
    if (file) tryImage(file);
  });
  const drop = $("drop");
  drop.addEventListener("dragover", (event) => {
    event.preventDefault();
    drop.classList.add("over");
  });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (event) => {
    event.preventDefault();
    drop.classList.remove("over");
    const file = event.dataTransfer.files[0];
    if (file) tryImage(file);
  });

  // ------------------------------------------------------------------ refresh

  async function refresh() {
    const [status, evaluation, models] = await Promise.all([
      api("GET", "/v1/status"),
      api("GET", "/v1/evaluation"),
      api("GET", "/v1/models"),
    ]);
    renderStatus(status);
    renderEvaluation(evaluation);
    renderModels(models);
    $("live").textContent = `live · updated ${new Date().toLocaleTimeString()}`;
    return status;
  }

  async function poll() {
    clearTimeout(timer);
    if (!FI.token()) return;
    let delay = 5000;
    try {
      if (!document.hidden) {
        const status = await refresh();
        const job = status.last_job;
        if (job && (job.state === "queued" || job.state === "running")) delay = 1500;
      }
    } catch (err) {
      if (err.status !== 401) showError(`Cannot refresh: ${err.message}`);
    }
    timer = setTimeout(poll, delay);
  }

  $("start-cycle").addEventListener("click", () =>
    act("Start a cycle", async () => {
      await api("POST", "/v1/jobs/cycle");
      poll();
    })
  );

  FI.setup("fedinspect.edge.token", () => api("GET", "/v1/status"), poll);
})();
