// One task: GET /v1/tasks/{id} for its state, images and timings, /ui/api/tasks/{id} for its
// parameters and .out JSON, its event stream for live progress, POST .../cancel to stop it,
// DELETE /v1/tasks/{id} to delete it once it has ended.
"use strict";

(() => {
  const root = document.getElementById("task");
  const id = root.dataset.taskId;
  const el = (name) => document.getElementById(name);
  let stream = null;

  function rows(table, entries) {
    table.replaceChildren();
    for (const [k, v] of entries) {
      const tr = table.insertRow();
      tr.insertCell().textContent = k;
      // null: not set, the runtime's or the queue's default (as "–" elsewhere on the page)
      tr.insertCell().textContent = v === null ? "–" : typeof v === "object" ? JSON.stringify(v) : String(v);
    }
  }

  function showState(state, progress, error) {
    el("state").textContent = state;
    el("state").className = `state ${state}`;
    el("progress").value = state === "succeeded" ? 1 : progress || 0;
    el("percent").textContent = `${Math.round((state === "succeeded" ? 1 : progress || 0) * 100)}%`;
    el("cancel").disabled = sdfleet.TERMINAL.has(state);
    el("delete").disabled = !sdfleet.TERMINAL.has(state);
    // A queued or running task's error is its last failed try's: it is tried again.
    const retrying = Boolean(error) && sdfleet.RETRYING.has(state);
    el("error").hidden = !error;
    el("error").className = retrying ? "error retrying" : "error";
    el("error").textContent = !error ? ""
      : retrying ? `last try failed: ${error.code}: ${error.message} (it is tried again)`
      : `${error.code}: ${error.message}`;
  }

  function showImages(view) {
    const box = el("images");
    box.replaceChildren();
    for (const image of view.images) {
      const link = document.createElement("a");
      link.href = image.url;
      const img = document.createElement("img");
      img.src = image.url;
      img.alt = image.key;
      img.className = "full";
      link.append(img);
      const caption = document.createElement("p");
      caption.className = "caption";
      caption.textContent = image.key;
      box.append(link, caption);
    }
    if (!view.images.length) box.textContent = sdfleet.TERMINAL.has(view.state) ? "none" : "not yet";
  }

  async function refresh() {
    try {
      const [view, detail] = await Promise.all([
        sdfleet.api(`/v1/tasks/${encodeURIComponent(id)}`),
        sdfleet.api(`/ui/api/tasks/${encodeURIComponent(id)}`),
      ]);
      showState(view.state, view.progress, view.error);
      rows(el("params"), [["model", view.model || "fleet default"], ["queue", view.queue || "–"],
        ["type", view.type], ["priority", view.priority],
        ...(view.ttl_s ? [["start within", `${view.ttl_s} s of its submit (ttl_s)`]] : []),
        ...Object.entries(detail.params),
        ["runtime", detail.runtime || "–"],
        ["run", view.run], ["attempts", view.attempts],
        ["created", new Date(view.created_at * 1000).toLocaleString()],
        ...(view.expires_at ? [["kept until", new Date(view.expires_at * 1000).toLocaleString()]] : [])]);
      rows(el("timings"), Object.entries(view.timings).map(([k, v]) => [k, v.toFixed(3)]));
      showImages(view);
      el("output").textContent = detail.output ? JSON.stringify(detail.output, null, 2) : "none yet";
      if (!sdfleet.TERMINAL.has(view.state)) live();
    } catch (e) {
      if (e.status === 404) {
        showState("not found", 0, { code: "not_found", message: e.message });
        el("cancel").disabled = true;
        el("delete").disabled = true;
        root.classList.add("missing");
      }
      else if (e.status !== 401) sdfleet.say(`Could not load the task: ${e.message}`, "error");
    }
  }

  function live() {
    if (stream) return;
    stream = new AbortController();
    sdfleet.follow(id, (type, event) => {
      showState(event.state, event.progress, event.error);
      if (sdfleet.TERMINAL.has(event.state)) {
        stream = null;
        refresh();
      }
    }, stream.signal).catch(() => {}).finally(() => { stream = null; });
  }

  el("cancel").addEventListener("click", async () => {
    el("cancel").disabled = true;
    try {
      const view = await sdfleet.api(`/v1/tasks/${encodeURIComponent(id)}/cancel`, { method: "POST" });
      showState(view.state, view.progress, view.error);
      sdfleet.say("Cancelled.", "info");
    } catch (e) {
      sdfleet.say(`Not cancelled: ${e.message}`, "error");
      el("cancel").disabled = false;
    }
  });

  el("delete").addEventListener("click", async () => {
    if (!window.confirm("Delete this task, its images and its record? This cannot be undone.")) return;
    el("delete").disabled = true;
    try {
      await sdfleet.api(`/v1/tasks/${encodeURIComponent(id)}`, { method: "DELETE" });
      if (stream) stream.abort();
      showState("deleted", 0, null);
      el("delete").disabled = true;
      el("cancel").disabled = true;
      el("images").textContent = "deleted";
      el("output").textContent = "deleted";
      root.classList.add("missing");
      sdfleet.say("Deleted: its images and record are gone.", "info");
    } catch (e) {
      sdfleet.say(`Not deleted: ${e.message}`, "error");
      el("delete").disabled = false;
    }
  });

  sdfleet.onKeyChange(refresh);
  refresh();
})();
