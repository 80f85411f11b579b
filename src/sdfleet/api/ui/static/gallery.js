// The gallery: the caller's tasks newest first (GET /v1/tasks), filtered by state on the server
// and by model, queue and age here; thumbnails and prompts from /ui/api/cards; running tasks
// followed over their event streams; a form that submits a task: text-to-image, or image-to-image
// and inpainting from files the person picks.
"use strict";

(() => {
  const PAGE = 24;
  const grid = document.getElementById("grid");
  const more = document.getElementById("more");
  const empty = document.getElementById("empty");
  const count = document.getElementById("count");
  const filters = document.getElementById("filters");
  const template = document.getElementById("card-template");
  let cursor = null;
  let generation = 0; // a reload makes older loads and streams stale
  const streams = new Map();

  function wanted(view) {
    const f = new FormData(filters);
    if (f.get("model") && view.model !== f.get("model")) return false;
    if (f.get("queue") && view.queue !== f.get("queue")) return false;
    const since = Number(f.get("since") || 0);
    return !since || view.created_at >= Date.now() / 1000 - since;
  }

  function card(view) {
    const node = template.content.firstElementChild.cloneNode(true);
    node.dataset.taskId = view.id;
    node.href = `${sdfleet.base}/ui/tasks/${encodeURIComponent(view.id)}`;
    update(node, view);
    return node;
  }

  function update(node, view) {
    const state = node.querySelector(".state");
    state.textContent = view.state;
    state.className = `state ${view.state}`;
    const bar = node.querySelector("progress");
    bar.value = view.progress || 0;
    bar.hidden = sdfleet.TERMINAL.has(view.state);
    node.querySelector(".model").textContent = view.model || "default model";
    node.querySelector(".timing").textContent = sdfleet.fmtSeconds(view.timings);
    const retrying = Boolean(view.error) && sdfleet.RETRYING.has(view.state);
    node.querySelector(".placeholder").textContent = view.error && !retrying ? view.error.code : view.state;
    node.title = `${view.id} · ${sdfleet.age(view.created_at)} · queue ${view.queue || "–"}`
      + (retrying ? ` · last try failed: ${view.error.code}` : "");
  }

  function fill(node, extra) {
    node.querySelector(".prompt").textContent = extra.prompt || "(no prompt)";
    const steps = `${extra.steps} step${extra.steps === 1 ? "" : "s"}`;
    node.querySelector(".size").textContent = `${extra.width}×${extra.height}, ${steps}`;
    const img = node.querySelector("img");
    if (extra.thumbs.length) {
      img.src = extra.thumbs[0];
      img.alt = extra.prompt;
      img.hidden = false;
      node.querySelector(".placeholder").hidden = true;
    }
  }

  async function extras(nodes) {
    if (!nodes.length) return;
    const ids = nodes.map((n) => n.dataset.taskId).join(",");
    const got = await sdfleet.api(`/ui/api/cards?ids=${encodeURIComponent(ids)}`);
    for (const node of nodes) {
      if (got.cards[node.dataset.taskId]) fill(node, got.cards[node.dataset.taskId]);
    }
  }

  function watch(node, view, gen) {
    if (sdfleet.TERMINAL.has(view.state) || streams.has(view.id)) return;
    const stop = new AbortController();
    streams.set(view.id, stop);
    sdfleet.follow(view.id, (type, event) => {
      if (gen !== generation) return stop.abort();
      update(node, Object.assign(view, { state: event.state, progress: event.progress,
        error: event.error, timings: (event.result && event.result.timings) || view.timings }));
      if (sdfleet.TERMINAL.has(event.state)) extras([node]).catch(() => {});
    }, stop.signal).catch(() => {}).finally(() => streams.delete(view.id));
  }

  async function load(reset) {
    if (reset) {
      generation += 1;
      streams.forEach((s) => s.abort());
      streams.clear();
      grid.replaceChildren();
      cursor = null;
    }
    const gen = generation;
    const state = new FormData(filters).get("state");
    const added = [];
    try {
      // Filters other than state are applied here: read pages until one is full or none are left.
      for (let pages = 0; pages < 10 && added.length < PAGE; pages += 1) {
        const q = new URLSearchParams({ limit: String(PAGE) });
        if (state) q.set("state", state);
        if (cursor) q.set("cursor", cursor);
        const page = await sdfleet.api(`/v1/tasks?${q}`);
        if (gen !== generation) return;
        for (const view of page.tasks.filter(wanted)) {
          const node = card(view);
          grid.append(node);
          added.push(node);
          watch(node, view, gen);
        }
        cursor = page.cursor;
        if (!cursor) break;
      }
      more.hidden = !cursor;
      empty.hidden = grid.children.length > 0;
      count.textContent = `${grid.children.length} shown`;
      await extras(added);
    } catch (e) {
      if (e.status !== 401) sdfleet.say(`Could not load tasks: ${e.message}`, "error");
      empty.hidden = grid.children.length > 0;
    }
  }

  async function options() {
    try {
      const [models, queues] = await Promise.all([sdfleet.api("/v1/models"), sdfleet.api("/v1/queues")]);
      for (const select of [document.getElementById("model-choice"), document.getElementById("model-filter")]) {
        select.length = 1;
        models.forEach((m) => select.add(new Option(m.tiny ? `${m.name} (tiny test model)` : m.name, m.name)));
      }
      const qf = document.getElementById("queue-filter");
      qf.length = 1;
      queues.forEach((q) => qf.add(new Option(q.name, q.name)));
    } catch (e) {
      /* the grid reports what went wrong */
    }
  }

  // A chosen file as a PNG data URL of the task's size (a photo of any size stays under the
  // API's body limit; the runtime would bring it to that size anyway).
  async function drawn(file, width, height) {
    const bitmap = await createImageBitmap(file);
    const canvas = document.createElement("canvas");
    canvas.width = width;
    canvas.height = height;
    canvas.getContext("2d").drawImage(bitmap, 0, 0, width, height);
    bitmap.close();
    return canvas.toDataURL("image/png");
  }

  async function inputs(f, params, body) {
    const image = f.get("init_image"), mask = f.get("mask");
    const chosen = (file) => file instanceof File && file.size > 0;
    if (chosen(mask) && !chosen(image)) throw new Error("a mask needs an input image");
    if (!chosen(image)) return;
    body.type = "image-to-image";
    params.denoising_strength = parseFloat(f.get("denoising_strength"));
    try {
      params.init_images = [await drawn(image, params.width, params.height)];
      if (chosen(mask)) params.extra = { mask: await drawn(mask, params.width, params.height) };
    } catch (e) {
      throw new Error(`${e.name === "InvalidStateError" ? "not a readable image" : e.message}`);
    }
  }

  document.getElementById("submit-form").addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const f = new FormData(ev.target);
    const params = { prompt: f.get("prompt"), negative_prompt: f.get("negative_prompt") };
    for (const k of ["width", "height", "steps", "seed"]) params[k] = parseInt(f.get(k), 10);
    params.cfg_scale = parseFloat(f.get("cfg_scale"));
    const body = { params };
    if (f.get("model")) body.model = f.get("model");
    const button = document.getElementById("submit-button");
    button.disabled = true;
    try {
      await inputs(f, params, body);
      const view = await sdfleet.api("/v1/tasks", { method: "POST", json: body });
      sdfleet.say(`Submitted ${view.id}.`, "info");
      const node = card(view);
      fill(node, { prompt: params.prompt, width: params.width, height: params.height, steps: params.steps, thumbs: [] });
      grid.prepend(node);
      empty.hidden = true;
      count.textContent = `${grid.children.length} shown`;
      watch(node, view, generation);
    } catch (e) {
      if (e.status !== 401) sdfleet.say(`Not submitted: ${e.message}`, "error");
    } finally {
      button.disabled = false;
    }
  });

  filters.addEventListener("change", () => load(true));
  more.addEventListener("click", () => load(false));
  sdfleet.onKeyChange(() => { options(); load(true); });
  options();
  load(true);
})();
