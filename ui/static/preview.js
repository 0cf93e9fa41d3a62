// The hover preview: while the pointer rests on the picture, the mask a click there would add to the active
// object, drawn faintly on #preview. The decoder runs in this browser (onnxruntime-web in a worker, the
// graph and the picture's features fetched once from /ui/preview…, ui/preview_routes.py); at most one
// inference is in flight and a request the pointer has left behind is dropped, never queued. A click is
// untouched: it goes to the server as always, and the server's answer is what the page keeps.
(function (root) {
  const $ = (id) => root.querySelector("#" + id);
  const S = window.samhq;
  const REST_MS = 30; // the pointer "rests" once it has not moved for this long
  const ALPHA = 110; // of 255: faint beside the objects' overlay
  const P = {
    on: false, touched: false, info: null, worker: null, decoder: null, key: null, loading: null,
    busy: false, pointer: null, timer: null, seq: 0, last: null, timings: [], bytes: {}, state: "off",
  };
  S.previewState = P; // for tests and benchmarks

  function show(state, text) {
    P.state = state;
    $("preview-state").textContent = text;
    $("preview-toggle").dataset.state = state;
  }

  function clear() {
    const canvas = $("preview");
    canvas.getContext("2d").clearRect(0, 0, canvas.width, canvas.height);
    canvas.dataset.drawn = "0";  // P.last stays: what was last drawn (tests compare it with the click's answer)
  }

  let messageId = 0;
  const waiting = new Map();
  function ask(message, transfer) {
    const id = ++messageId;
    return new Promise((resolve, reject) => {
      waiting.set(id, { resolve, reject });
      P.worker.postMessage({ ...message, id }, transfer || []);
    });
  }

  function worker(url) {
    if (P.worker) return;
    P.worker = new Worker(url, { type: "module" });
    P.worker.onmessage = (event) => {
      const reply = event.data;
      const pending = waiting.get(reply.id);
      if (!pending) return;
      waiting.delete(reply.id);
      if (reply.type === "error") pending.reject(new Error(reply.message));
      else pending.resolve(reply);
    };
    P.worker.onerror = (event) => show("failed", "unavailable: the preview's worker failed (" + (event.message || "error") + ")");
  }

  async function information(prepare) {
    const response = await fetch("/ui/session/" + S.session + "/preview" + (prepare ? "?prepare=1" : ""));
    const body = await response.json();
    if (!response.ok) throw new Error((body.error && body.error.message) || "The preview is not available.");
    return body;
  }

  // Get the graph and the current picture's features into the worker (each once), polling while the server
  // prepares the graph. Only one such load runs at a time; a newer picture makes an older load stop.
  async function prepare() {
    if (!P.on || !S.session || !S.view || !S.view.picture || !S.view.picture.embedded) return;
    if (P.loading) return;
    P.loading = (async () => {
      try {
        for (let tries = 0; P.on; tries++) {
          const info = await information(true);
          P.info = info;
          if (info.state === "building" || info.state === "waiting") {
            show("loading", info.reason);
            await new Promise((resolve) => setTimeout(resolve, Math.min(2000, 250 * (tries + 1))));
            continue;
          }
          if (!info.available) { show("unavailable", "unavailable: " + info.reason); return; }
          worker(info.worker);
          if (P.decoder !== info.decoder) {
            show("loading", "loading the decoder…");
            P.key = null; // a new decoder's worker has no picture yet
            const loaded = await ask({
              type: "init", runtime: info.runtime, decoder: info.decoder, picture: info.picture_graph, threads: info.threads,
            });
            P.decoder = info.decoder;
            P.bytes.decoder = loaded.bytes; P.bytes.decoderMs = loaded.ms; P.threads = loaded.threads;
            P.bytes.pictureGraph = loaded.pictureGraphBytes;
          }
          if (P.key !== info.key) {
            show("loading", "loading the picture's features…");
            P.key = null;
            const loaded = await ask({ type: "features", key: info.key, url: info.features });
            P.key = info.key;
            P.resized = loaded.resized; // the picture inside the model's 1024 frame, as the server made it
            P.bytes.features = loaded.bytes; P.bytes.featuresMs = loaded.ms; P.bytes.pictureMs = loaded.pictureMs;
          }
          if (!S.view.picture || !S.view.picture.embedded) continue;
          // the SAM-tokens graph (SAMHQ_UI_PREVIEW_GRAPH=sam) previews a different mask from the click's: say so
          show("ready", info.graph === "sam" ? "on (SAM's mask; a click gives SAM-HQ's)" : "on");
          if (P.pointer && P.pointer.rested) setTimeout(kick, 0); // the pointer waited on the picture meanwhile
          return;
        }
      } catch (error) {
        show("failed", "unavailable: " + error.message);
      } finally {
        P.loading = null;
      }
    })();
    return P.loading;
  }

  // The prompt a click at (x, y) would make for the active object, in the model's 1024 frame, Meta's labels.
  function prompt(x, y) {
    const view = S.view;
    const active = view.objects.find((o) => o.number === view.active);
    const points = (active ? active.points : []).concat([[x, y]]);
    const labels = (active ? active.labels : []).concat([S.mode === "include" ? 1 : 0]);
    const coords = [], kinds = [];
    const [oh, ow] = [view.picture.height, view.picture.width];
    const [rh, rw] = P.resized || [oh, ow];
    points.forEach(([px, py], i) => { coords.push(px * rw / ow, py * rh / oh); kinds.push(labels[i] ? 1 : 0); });
    if (active && active.box) {
      const [x0, y0, x1, y1] = active.box;
      coords.push(x0 * rw / ow, y0 * rh / oh, x1 * rw / ow, y1 * rh / oh);
      kinds.push(2, 3);
    } else {
      coords.push(0, 0);
      kinds.push(-1);
    }
    return { coords, labels: kinds, number: active ? active.number : view.active };
  }

  function usable() {
    return P.on && P.state === "ready" && S.view && S.view.picture && S.view.picture.embedded &&
      S.mode !== "box" && !S.view.hq_only && !S.queue.length && !S.busy;
  }

  // One inference at a time, for the pointer's latest resting place; the one it left behind is dropped.
  async function kick() {
    if (P.busy || !P.pointer || !usable()) return;
    const pointer = P.pointer;
    const view = S.view;
    const { coords, labels, number } = prompt(pointer.x, pointer.y);
    const [w, h] = view.picture.preview;
    const hex = S.palette[(number - 1) % S.palette.length] || "#ff0000";
    const color = [1, 3, 5].map((i) => parseInt(hex.slice(i, i + 2), 16));
    P.busy = true;
    const seq = ++P.seq;
    try {
      const sent = performance.now();
      const result = await ask({ type: "run", key: P.key, coords, labels, size: [h, w], color, alpha: ALPHA });
      if (P.pointer !== pointer || S.view !== view || !usable()) return; // stale: the pointer or the prompt moved on
      const canvas = $("preview");
      if (canvas.width !== w || canvas.height !== h) { canvas.width = w; canvas.height = h; }
      canvas.getContext("2d").putImageData(new ImageData(result.rgba, w, h), 0, 0);
      P.last = { x: pointer.x, y: pointer.y, coords, labels, rev: view.rev, mask: result.mask, width: w, height: h, area: result.area, score: result.score, seq };
      requestAnimationFrame((now) => {
        canvas.dataset.drawn = String(seq);
        P.timings.push({ ms: now - pointer.restAt, run: result.ms.run, upscale: result.ms.upscale, roundtrip: performance.now() - sent });
      });
    } catch (error) {
      if (error.message !== "not ready") show("failed", "unavailable: " + error.message);
    } finally {
      P.busy = false;
      if (P.pointer && P.pointer !== pointer && P.pointer.rested) kick();
    }
  }

  function onMove(event) {
    if (!P.on || !S.view || !S.view.picture) return;
    const rect = $("points").getBoundingClientRect();
    const { width, height } = S.view.picture;
    // the same coordinates a click at this place sends (page.js onCanvasClick)
    const x = Math.min(Math.max(((event.clientX - rect.left) / rect.width) * width - 0.5, 0), width - 1);
    const y = Math.min(Math.max(((event.clientY - rect.top) / rect.height) * height - 0.5, 0), height - 1);
    // restAt: when the pointer stopped here (this move's time); the preview's latency counts from it
    const pointer = { x: Math.round(x * 100) / 100, y: Math.round(y * 100) / 100, rested: false, restAt: event.timeStamp };
    if (P.pointer && P.pointer.x === pointer.x && P.pointer.y === pointer.y) return;
    if (P.clicked && P.clicked.x === pointer.x && P.clicked.y === pointer.y) return; // the point is there now
    P.pointer = pointer;
    clearTimeout(P.timer);
    P.timer = setTimeout(() => {
      pointer.rested = true;
      kick();
    }, REST_MS);
  }

  function setOn(on) {
    P.on = on;
    $("preview-toggle").checked = on;
    if (!on) {
      clearTimeout(P.timer);
      P.pointer = null;
      clear();
      show("off", "off");
    } else {
      show("loading", "starting…");
      if (S.view && S.view.picture && S.view.picture.embedded) prepare();
      else show("waiting", "on (starts when the picture is ready)");
    }
  }

  $("preview-toggle").addEventListener("change", (event) => { P.touched = true; setOn(event.target.checked); });
  $("points").addEventListener("pointermove", onMove);
  $("points").addEventListener("pointerleave", () => { clearTimeout(P.timer); P.pointer = null; clear(); });
  $("points").addEventListener("pointerdown", () => {
    clearTimeout(P.timer);
    P.clicked = P.pointer; // a click's own place: the next preview waits for the pointer to move on
    P.pointer = null;
    clear();
  });

  root.addEventListener("samhq:session", async () => {
    try {
      const info = await information();
      P.info = info;
      if (info.state === "unavailable") { if (!P.touched) { P.on = false; } show("unavailable", "unavailable: " + info.reason); return; }
      if (!P.touched) setOn(!!info.default_on);
    } catch (error) {
      show("failed", "unavailable: " + error.message);
    }
  });
  root.addEventListener("samhq:view", (event) => {
    const view = event.detail;
    clear(); // the prompt changed (or may have): the old preview is no longer what a click would give
    if (!view.picture) return;
    if (P.on && view.picture.embedded) prepare().then(() => { if (P.pointer && P.pointer.rested) kick(); });
  });
})
