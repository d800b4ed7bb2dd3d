// Shared by the FedInspect pages: sign-in with a token kept in sessionStorage (never in
// a URL, never logged), API calls with the token in the Authorization header, and small
// DOM helpers that build nodes with textContent (no HTML from data).
"use strict";

const FI = (() => {
  let storageKey = "fedinspect.token";
  let onSignedIn = () => {};

  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(attrs || {})) {
      if (value === undefined || value === null || value === false) continue;
      if (key === "class") node.className = value;
      else if (key === "dataset") Object.assign(node.dataset, value);
      else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
      else node.setAttribute(key, value === true ? "" : String(value));
    }
    for (const child of children.flat()) {
      if (child === undefined || child === null || child === false) continue;
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return node;
  }

  function token() {
    return sessionStorage.getItem(storageKey);
  }

  class ApiError extends Error {
    constructor(status, detail) {
      super(detail);
      this.status = status;
    }
  }

  async function api(method, path, body) {
    const headers = { Authorization: `Bearer ${token() || ""}` };
    const init = { method, headers, cache: "no-store", credentials: "omit" };
    if (body instanceof FormData) init.body = body;
    else if (body !== undefined) {
      headers["Content-Type"] = "application/json";
      init.body = JSON.stringify(body);
    }
    const response = await fetch(path, init);
    const type = response.headers.get("content-type") || "";
    const data = type.includes("json") ? await response.json() : await response.text();
    if (!response.ok) {
      const detail = data && data.detail ? data.detail : `HTTP ${response.status}`;
      if (response.status === 401) signOut(`Signed out: ${detail}`);
      throw new ApiError(response.status, detail);
    }
    return data;
  }

  function show(id, visible) {
    document.getElementById(id).hidden = !visible;
  }

  function signOut(message) {
    sessionStorage.removeItem(storageKey);
    show("app", false);
    show("sign-out", false);
    show("sign-in", true);
    document.getElementById("sign-in-error").textContent = message || "";
  }

  async function signIn(value, check) {
    sessionStorage.setItem(storageKey, value);
    try {
      await check();
    } catch (err) {
      sessionStorage.removeItem(storageKey);
      throw err;
    }
    show("sign-in", false);
    show("app", true);
    show("sign-out", true);
    onSignedIn();
  }

  function setup(key, check, signedIn) {
    storageKey = key;
    onSignedIn = signedIn;
    document.getElementById("sign-in-form").addEventListener("submit", async (event) => {
      event.preventDefault();
      const input = document.getElementById("token");
      const error = document.getElementById("sign-in-error");
      error.textContent = "";
      try {
        await signIn(input.value.trim(), check);
        input.value = "";
      } catch (err) {
        error.textContent =
          err.status === 403
            ? "That token is not the admin token."
            : `Sign-in failed: ${err.message}`;
      }
    });
    document.getElementById("sign-out").addEventListener("click", () => signOut(""));
    if (token()) {
      signIn(token(), check).catch(() => signOut(""));
    } else {
      signOut("");
    }
  }

  function when(iso, now) {
    if (!iso) return "never";
    const seconds = Math.round((Date.parse(now || new Date().toISOString()) - Date.parse(iso)) / 1000);
    if (seconds < 5) return "just now";
    return `${duration(seconds)} ago`;
  }

  function duration(seconds) {
    seconds = Math.max(0, Math.round(seconds));
    if (seconds < 60) return `${seconds}s`;
    const m = Math.floor(seconds / 60);
    if (m < 60) return `${m}m ${String(seconds % 60).padStart(2, "0")}s`;
    const h = Math.floor(m / 60);
    if (h < 48) return `${h}h ${String(m % 60).padStart(2, "0")}m`;
    return `${Math.floor(h / 24)}d`;
  }

  function stamp(iso) {
    if (!iso) return "";
    return new Date(iso).toISOString().replace("T", " ").slice(0, 19) + " UTC";
  }

  function pct(x) {
    return x === null || x === undefined ? "–" : `${(100 * x).toFixed(1)}%`;
  }

  function progress(fraction, label) {
    const bar = el("div", { class: "bar", role: "progressbar", "aria-valuenow": Math.round(100 * fraction) });
    const fillNode = el("div", { class: "fill" });
    // through the CSSOM: the Content-Security-Policy forbids style attributes
    fillNode.style.width = `${(100 * fraction).toFixed(1)}%`;
    bar.append(fillNode);
    return el("div", { class: "progress" }, bar, el("span", { class: "muted" }, label === undefined ? pct(fraction) : label));
  }

  function fill(tbody, rows) {
    tbody.replaceChildren(...rows);
  }

  // the page's error line (an element with id "error")
  function showError(message) {
    document.getElementById("error").textContent = message || "";
  }

  // an operator action, then the page's refresh; a failure shows in the error line
  async function act(what, fn, refresh) {
    showError("");
    try {
      await fn();
      await refresh();
    } catch (err) {
      showError(`${what}: ${err.message}`);
    }
  }

  return { ApiError, act, api, duration, el, fill, pct, progress, setup, showError, stamp, token, when };
})();
