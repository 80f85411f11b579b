// What every sdfleet page shares: the API key (this tab's session storage, sent as X-API-Key),
// calls to the API, and a task's Server-Sent Events read through fetch (EventSource cannot send
// a key header). Page data is always written with textContent, never as HTML.
"use strict";

const sdfleet = (() => {
  const KEY = "sdfleet.apiKey";
  const base = document.body.dataset.base || "";
  const notice = document.getElementById("notice");

  class ApiError extends Error {
    constructor(status, code, message) {
      super(message);
      this.status = status;
      this.code = code;
    }
  }

  function key() {
    return sessionStorage.getItem(KEY) || "";
  }

  function headers(extra) {
    const h = new Headers(extra || {});
    if (key()) h.set("X-API-Key", key());
    return h;
  }

  function say(text, kind) {
    notice.textContent = text;
    notice.className = "notice " + (kind || "info");
    notice.hidden = !text;
  }

  async function api(path, options) {
    const opts = Object.assign({}, options || {});
    opts.headers = headers(opts.headers);
    if (opts.json !== undefined) {
      opts.body = JSON.stringify(opts.json);
      opts.headers.set("Content-Type", "application/json");
      delete opts.json;
    }
    const r = await fetch(base + path, opts);
    const body = (r.headers.get("content-type") || "").includes("json") ? await r.json() : null;
    if (r.status === 401) {
      showKeyState();
      say((body && body.error && body.error.message) || "This fleet needs an API key.", "warn");
      document.getElementById("api-key").focus();
    }
    if (!r.ok) {
      const err = (body && body.error) || { code: String(r.status), message: r.statusText };
      throw new ApiError(r.status, err.code, err.message);
    }
    return body;
  }

  // Calls onEvent(type, data) for each event of the task until the stream ends (a terminal event).
  async function follow(taskId, onEvent, signal) {
    const h = headers({ Accept: "text/event-stream" });
    const r = await fetch(`${base}/v1/tasks/${encodeURIComponent(taskId)}/events`, { headers: h, signal });
    if (!r.ok || !r.body) throw new ApiError(r.status, "events", "the event stream is unavailable");
    const reader = r.body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      buffer += value;
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const frame = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        let type = "message";
        let data = "";
        for (const line of frame.split("\n")) {
          if (line.startsWith("event:")) type = line.slice(6).trim();
          else if (line.startsWith("data:")) data += line.slice(5).trim();
        }
        if (data) onEvent(type, JSON.parse(data));
      }
    }
  }

  function showKeyState() {
    document.getElementById("key-state").textContent = key() ? "key set" : "no key";
  }

  function fmtSeconds(timings) {
    const total = Object.values(timings || {}).reduce((a, b) => a + b, 0);
    return total ? `${total.toFixed(1)} s in all` : "–";
  }

  function age(createdAt) {
    const s = Math.max(0, Date.now() / 1000 - createdAt);
    if (s < 60) return `${Math.round(s)} s ago`;
    if (s < 3600) return `${Math.round(s / 60)} min ago`;
    if (s < 86400) return `${Math.round(s / 3600)} h ago`;
    return new Date(createdAt * 1000).toLocaleString();
  }

  const TERMINAL = new Set(["succeeded", "failed", "cancelled"]);
  // States whose error, if any, is a failed try's: the task is tried again.
  const RETRYING = new Set(["queued", "running"]);
  const listeners = [];

  document.getElementById("key-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    const input = document.getElementById("api-key");
    if (input.value.trim()) sessionStorage.setItem(KEY, input.value.trim());
    input.value = "";
    showKeyState();
    say("", "info");
    listeners.forEach((fn) => fn());
  });
  document.getElementById("forget-key").addEventListener("click", () => {
    sessionStorage.removeItem(KEY);
    showKeyState();
    listeners.forEach((fn) => fn());
  });
  showKeyState();

  return {
    api, follow, say, fmtSeconds, age, ApiError, TERMINAL, RETRYING, base,
    onKeyChange: (fn) => listeners.push(fn),
  };
})();
