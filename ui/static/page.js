// The page in the browser: the picture on a <canvas>, every click drawn at once and queued in order,
// one small label map per answer painted over the picture in the object colours.
(function (root) {
  const $ = (id) => root.querySelector("#" + id);
  const S = {
    session: null, palette: [], view: null, queue: [], busy: false, picture: null, pixels: null,
    opacity: 0.5, mode: "include", viewMode: "overlay", labels: null, clicks: 0, localActive: 1,
    drag: null, corner: null,  // Box mode: the box being dragged, or the first corner of a two-click box
  };
  window.samhq = S;
  S.timings = [];

  const color = (number) => S.palette[(number - 1) % S.palette.length] || "#ff0000";
  const rgb = (hex) => [1, 3, 5].map((i) => parseInt(hex.slice(i, i + 2), 16));

  function setStatus(text, isError) {
    const status = $("status");
    status.textContent = text;
    status.classList.toggle("error", !!isError);
  }

  function showBanner(banner) {
    const box = $("banner");
    if (!banner) { box.hidden = true; box.textContent = ""; return; }
    box.hidden = false;
    box.innerHTML = "";
    const title = document.createElement("strong");
    title.textContent = "The model " + banner.model + " is not available.";
    const reason = document.createElement("div");
    reason.textContent = banner.reason;
    const fix = document.createElement("div");
    fix.textContent = banner.fix;
    box.append(title, reason, fix);
  }

  async function call(path, options) {
    const response = await fetch(path, options);
    let body = null;
    try { body = await response.json(); } catch (e) { body = null; }
    if (!response.ok) {
      const message = (body && body.error && body.error.message) || ("The server answered " + response.status + ".");
      if (body && body.banner) {
        showBanner(body.banner);
        throw Object.assign(new Error("The model is not available: see the banner at the top."), { status: response.status });
      }
      throw Object.assign(new Error(message), { status: response.status });
    }
    return body;
  }

  // ---- the queue: every edit in order, one request at a time -----------------------------------
  function enqueue(item) {
    // an edit makes the offered downloads stale at once, before its answer comes back
    if (!["export", "embed", "select"].includes(item.op)) clearDownloads();
    S.queue.push(item);
    drawPoints();
    pump();
  }

  async function pump() {
    if (S.busy || !S.session) return;  // before the session is open, edits wait in the queue (start pumps it)
    S.busy = true;
    while (S.queue.length) {
      const item = S.queue[0];
      try {
        if (item.op === "export") {
          await prepareDownloads();
        } else if (item.op === "picture") {
          const query = item.example !== undefined ? "?example=" + item.example : "";
          const headers = item.file ? { "X-Filename": encodeURIComponent(item.file.name || "picture") } : {};
          setStatus("Reading the picture…");
          const view = await call("/ui/session/" + S.session + "/picture" + query,
            { method: "POST", body: item.file || null, headers });
          await showPicture(view);
          apply(view);
          S.queue.splice(1, 0, { op: "embed" });  // next, before any click made meanwhile
        } else {
          if (item.op === "embed") setStatus("Computing the embedding (the slow part; clicks are kept and applied when it is ready)…");
          const { local, sentAt, ...body } = item;
          item.sentAt = performance.now();
          const view = await call("/ui/session/" + S.session + "/op", {
            method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body),
          });
          S.queue.shift();
          apply(view, item);
          continue;
        }
      } catch (error) {
        setStatus(error.message, true);
        if (error.status === 404 && /expired/.test(error.message)) { S.queue = []; break; }
        if (item.op === "picture") S.queue = S.queue.filter((q) => q.op !== "click");
      }
      S.queue.shift();
      drawPoints();
    }
    S.busy = false;
  }

  // ---- views from the server ----------------------------------------------------------------------
  function apply(view, item) {
    const previousRev = S.view ? S.view.rev : null;
    S.view = view;
    if (view.rev !== previousRev) clearDownloads();
    if (view.status) setStatus(view.status, false);
    if (item && (item.op === "click" || item.op === "box")) S.clicks += 1;
    renderTools();
    renderLegend();
    renderCandidates();
    drawPoints();
    root.dispatchEvent(new CustomEvent("samhq:view", { detail: view }));  // hook: ui/static/preview.js
    if (view.map) {
      paintMap(view.map, view.rev, item);
    } else if (view.picture) {
      S.labels = null;
      paintOverlay();
      markPainted(view.rev, item);
    }
  }

  function markPainted(rev, item) {
    requestAnimationFrame((now) => {
      const overlay = $("overlay");
      overlay.dataset.rev = String(rev);
      overlay.dataset.clicks = String(S.clicks);
      if (item && item.clickAt !== undefined) {
        S.timings.push({ kind: "overlay", rev, ms: now - item.clickAt, server: item.sentAt - item.clickAt });
      }
    });
  }

  async function showPicture(view) {
    const image = new Image();
    image.src = "/ui/session/" + S.session + "/preview.jpg?t=" + Date.now();
    await image.decode();
    const [w, h] = view.picture.preview;
    for (const id of ["canvas", "overlay", "points"]) { $(id).width = w; $(id).height = h; }
    $("stage-box").style.width = "min(100%, " + (72 * w / h).toFixed(2) + "vh)";  // fits the screen
    const context = $("canvas").getContext("2d");
    context.drawImage(image, 0, 0, w, h);
    S.picture = image;
    S.corner = null;  // a box's first corner belonged to the previous picture
    S.pixels = context.getImageData(0, 0, w, h).data;
    S.labels = null;
    $("stage").classList.add("has-picture");
    paintOverlay();
  }

  async function paintMap(b64, rev, item) {
    const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
    const bitmap = await createImageBitmap(new Blob([bytes], { type: "image/png" }));
    if (!S.view || S.view.rev !== rev) return;  // a newer answer came meanwhile
    const scratch = document.createElement("canvas");
    scratch.width = bitmap.width; scratch.height = bitmap.height;
    const context = scratch.getContext("2d", { willReadFrequently: true });
    context.drawImage(bitmap, 0, 0);
    const data = context.getImageData(0, 0, bitmap.width, bitmap.height).data;
    const labels = new Uint8Array(bitmap.width * bitmap.height);
    for (let i = 0; i < labels.length; i++) labels[i] = data[i * 4];
    S.labels = { data: labels, width: bitmap.width, height: bitmap.height };
    paintOverlay();
    markPainted(rev, item);
  }

  // Object colours by label value (the value is the object's rank among objects with points).
  function valueColors() {
    const table = [[0, 0, 0]];
    if (!S.view) return table;
    for (const obj of S.view.objects) if (obj.value) table[obj.value] = rgb(color(obj.number));
    return table;
  }

  function paintOverlay() {
    const canvas = $("overlay");
    const context = canvas.getContext("2d");
    const { width, height } = canvas;
    const picture = $("canvas");
    picture.style.visibility = S.viewMode === "overlay" ? "visible" : "hidden";
    context.clearRect(0, 0, width, height);
    if (!S.labels || S.labels.width !== width || S.labels.height !== height) {
      if (S.viewMode === "mask" && S.picture) { context.fillStyle = "#18181b"; context.fillRect(0, 0, width, height); }
      return;
    }
    const labels = S.labels.data;
    const table = valueColors();
    const out = context.createImageData(width, height);
    const o = out.data;
    const alpha = Math.round(S.opacity * 255);
    for (let y = 0, i = 0; y < height; y++) {
      for (let x = 0; x < width; x++, i++) {
        const v = labels[i];
        const p = i * 4;
        if (S.viewMode === "cutout") {
          if (v) { o[p] = S.pixels[p]; o[p + 1] = S.pixels[p + 1]; o[p + 2] = S.pixels[p + 2]; o[p + 3] = 255; }
          continue;
        }
        if (!v) { if (S.viewMode === "mask") { o[p] = 24; o[p + 1] = 24; o[p + 2] = 27; o[p + 3] = 255; } continue; }
        const c = table[v] || [255, 0, 0];
        const edge = (x > 0 && labels[i - 1] !== v) || (x < width - 1 && labels[i + 1] !== v) ||
          (y > 0 && labels[i - width] !== v) || (y < height - 1 && labels[i + width] !== v);
        o[p] = c[0]; o[p + 1] = c[1]; o[p + 2] = c[2];
        o[p + 3] = S.viewMode === "mask" || edge ? 255 : alpha;
      }
    }
    context.putImageData(out, 0, 0);
  }

  // ---- points: the server's prompt plus the clicks still on their way ----------------------------
  function drawPoints() {
    const canvas = $("points");
    const context = canvas.getContext("2d");
    context.clearRect(0, 0, canvas.width, canvas.height);
    if (!S.view || !S.view.picture) return;
    const scale = canvas.width / S.view.picture.width;
    const radius = Math.max(4, Math.round(Math.max(canvas.width, canvas.height) / 110));
    const dot = (x, y, include, number, active) => {
      const r = radius + (active ? 2 : 0);
      const cx = (x + 0.5) * scale, cy = (y + 0.5) * scale;
      context.beginPath();
      context.arc(cx, cy, r, 0, 2 * Math.PI);
      context.lineWidth = Math.max(2, Math.floor(r / 3));
      context.fillStyle = include ? color(number) : "#141414";
      context.strokeStyle = include ? "#ffffff" : color(number);
      context.fill(); context.stroke();
      if (!include) {
        const arm = r * 0.55;
        context.strokeStyle = "#ffffff";
        context.beginPath();
        context.moveTo(cx - arm, cy - arm); context.lineTo(cx + arm, cy + arm);
        context.moveTo(cx - arm, cy + arm); context.lineTo(cx + arm, cy - arm);
        context.stroke();
      }
    };
    const rectangle = (box, number, active, dashed) => {
      const [x0, y0, x1, y1] = box.map((v) => v * scale);
      context.save();
      context.lineWidth = active ? 3 : 2;
      context.setLineDash(dashed ? [6, 4] : []);
      context.strokeStyle = "#ffffff";
      context.strokeRect(x0, y0, x1 - x0, y1 - y0);
      context.lineWidth = active ? 2 : 1;
      context.strokeStyle = color(number);
      context.strokeRect(x0, y0, x1 - x0, y1 - y0);
      context.restore();
    };
    // an object's box as drawn, the newest queued one replacing what the server knows
    const boxes = new Map(S.view.objects.filter((o) => o.box).map((o) => [o.number, o.box]));
    for (const item of S.queue) if (item.op === "box") boxes.set(item.local, [item.x0, item.y0, item.x1, item.y1]);
    for (const [number, box] of boxes) rectangle(box, number, number === S.view.active, false);
    for (const obj of S.view.objects) {
      obj.points.forEach(([x, y], i) => dot(x, y, obj.labels[i] === 1, obj.number, obj.number === S.view.active));
    }
    for (const item of S.queue) {
      if (item.op === "click") dot(item.x, item.y, item.include, item.local, true);
    }
    if (S.drag && S.drag.moved) rectangle([S.drag.x0, S.drag.y0, S.drag.x1, S.drag.y1].map(Number), predictedActive(), true, true);
    if (S.corner) dot(S.corner.x, S.corner.y, true, predictedActive(), true);
  }

  // ---- Box mode: a drag, or two clicks at opposite corners ---------------------------------------
  function picturePoint(event) {
    const rect = $("points").getBoundingClientRect();
    const { width, height } = S.view.picture;
    return {
      x: Math.round(Math.min(Math.max(((event.clientX - rect.left) / rect.width) * width, 0), width) * 100) / 100,
      y: Math.round(Math.min(Math.max(((event.clientY - rect.top) / rect.height) * height, 0), height) * 100) / 100,
    };
  }

  function sendBox(a, b, at) {
    const box = { x0: Math.min(a.x, b.x), y0: Math.min(a.y, b.y), x1: Math.max(a.x, b.x), y1: Math.max(a.y, b.y) };
    if (box.x1 - box.x0 < 1 || box.y1 - box.y0 < 1) return false;
    enqueue({ op: "box", ...box, local: predictedActive(), clickAt: at });
    return true;
  }

  function onPointerDown(event) {
    if (S.mode !== "box" || !S.view || !S.view.picture || event.button !== 0) return;
    event.preventDefault();
    $("points").setPointerCapture(event.pointerId);
    const p = picturePoint(event);
    S.drag = { x0: p.x, y0: p.y, x1: p.x, y1: p.y, sx: event.clientX, sy: event.clientY, moved: false };
  }

  function onPointerMove(event) {
    if (!S.drag) return;
    const p = picturePoint(event);
    S.drag.x1 = p.x; S.drag.y1 = p.y;
    if (Math.abs(event.clientX - S.drag.sx) + Math.abs(event.clientY - S.drag.sy) > 4) S.drag.moved = true;
    drawPoints();
  }

  function onPointerUp(event) {
    if (!S.drag) return;
    const drag = S.drag;
    S.drag = null;
    const end = picturePoint(event);
    if (drag.moved) {
      S.corner = null;
      if (!sendBox({ x: drag.x0, y: drag.y0 }, end, event.timeStamp)) setStatus("A box needs an area: drag across the object.", true);
    } else if (!S.corner) {
      S.corner = end;  // a tap: the first corner; the next tap closes the box
      setStatus("Box: now click the opposite corner.");
    } else {
      const first = S.corner;
      S.corner = null;
      if (!sendBox(first, end, event.timeStamp)) setStatus("A box needs an area: click two opposite corners.", true);
    }
    drawPoints();
  }

  function onCanvasClick(event) {
    if (!S.view || !S.view.picture || S.mode === "box") return;
    const clickAt = event.timeStamp;
    const rect = $("points").getBoundingClientRect();
    const { width, height } = S.view.picture;
    const x = Math.min(Math.max(((event.clientX - rect.left) / rect.width) * width - 0.5, 0), width - 1);
    const y = Math.min(Math.max(((event.clientY - rect.top) / rect.height) * height - 0.5, 0), height - 1);
    enqueue({ op: "click", x: Math.round(x * 100) / 100, y: Math.round(y * 100) / 100,
      include: S.mode === "include", local: predictedActive(), clickAt });
    requestAnimationFrame((now) => S.timings.push({ kind: "point", ms: now - clickAt }));
  }

  // The object a click goes to once the edits before it are applied (for its colour while it travels).
  function predictedActive() {
    if (!S.view) return 1;
    let active = S.view.active;
    let next = S.view.next_number || Math.max(...S.view.objects.map((o) => o.number)) + 1;
    let hasPoints = S.view.objects.some((o) => o.number === active && o.points.length);
    for (const item of S.queue) {
      if (item.op === "click" || item.op === "box") hasPoints = true;
      if (item.op === "new" && hasPoints) { active = next; next += 1; hasPoints = false; }
      if (item.op === "select") active = item.number;
    }
    return active;
  }

  // ---- tools, legend, candidates ---------------------------------------------------------------
  function renderTools() {
    const view = S.view;
    const select = $("active-object");
    select.innerHTML = "";
    for (const obj of view.objects) {
      const option = document.createElement("option");
      option.value = String(obj.number);
      option.textContent = "Object " + obj.number;
      option.selected = obj.number === view.active;
      select.append(option);
    }
    const active = view.objects.find((o) => o.number === view.active);
    $("undo").disabled = !active || (!active.points.length && !active.box);
    $("redo").disabled = !active || !active.can_redo;
    $("hq-only").checked = view.hq_only;
    if (view.model && $("model").value !== view.model) $("model").value = view.model;
  }

  function renderLegend() {
    const view = S.view;
    const legend = $("legend");
    if (!view.objects.some((o) => o.points.length || o.box)) {
      legend.innerHTML = "<p class='legend-empty'>No objects yet: click on the picture to add a point.</p>";
      return;
    }
    const table = document.createElement("table");
    table.className = "legend";
    table.innerHTML = "<thead><tr><th>object</th><th title='its value in mask.png'>value</th><th title='the model’s predicted IoU (0–1): how sure it is of this outline'>score</th><th>area</th><th title='points, and ▭ when the object has a box (hover for its corners)'>prompt</th><th>candidate</th></tr></thead>";
    const body = document.createElement("tbody");
    for (const obj of view.objects) {
      const row = document.createElement("tr");
      if (obj.number === view.active) row.className = "active";
      const cells = [
        "", obj.value ?? "–", obj.score == null ? "–" : obj.score.toFixed(3),
        obj.percent == null ? "–" : obj.percent.toFixed(1) + "%",
        obj.box ? (obj.points.length ? obj.points.length + " + ▭" : "▭") : String(obj.points.length),
        obj.candidates > 1 ? (obj.candidate + 1) + " of " + obj.candidates : "–",
      ];
      cells.forEach((text, i) => {
        const cell = document.createElement("td");
        if (i === 0) {
          const swatch = document.createElement("span");
          swatch.className = "swatch";
          swatch.style.background = color(obj.number);
          cell.append(swatch, " Object " + obj.number + (obj.number === view.active ? " (active)" : ""));
        } else cell.textContent = text;
        if (i === 4 && obj.box) cell.title = "box [" + obj.box.map((v) => Math.round(v)).join(", ") + "]";
        row.append(cell);
      });
      row.addEventListener("click", () => selectObject(obj.number));
      body.append(row);
    }
    table.append(body);
    legend.innerHTML = "";
    legend.append(table);
  }

  function renderCandidates() {
    const box = $("candidates");
    box.innerHTML = "";
    const thumbs = S.view.thumbnails || [];
    $("candidates-box").hidden = !thumbs.length;
    const active = S.view.objects.find((o) => o.number === S.view.active);
    thumbs.forEach((thumb, index) => {
      const button = document.createElement("button");
      button.className = "candidate" + (active && active.choice === index ? " chosen" : "");
      const canvas = document.createElement("canvas");
      const label = document.createElement("span");
      label.textContent = "Candidate " + (index + 1) + " · score " + thumb.score.toFixed(3);
      button.append(canvas, label);
      button.addEventListener("click", () => enqueue({ op: "choose", candidate: index }));
      box.append(button);
      const bytes = Uint8Array.from(atob(thumb.png), (c) => c.charCodeAt(0));
      createImageBitmap(new Blob([bytes], { type: "image/png" })).then((bitmap) => {
        canvas.width = bitmap.width; canvas.height = bitmap.height;
        const context = canvas.getContext("2d");
        context.drawImage(bitmap, 0, 0);
        const mask = context.getImageData(0, 0, bitmap.width, bitmap.height);
        if (S.picture) context.drawImage(S.picture, 0, 0, bitmap.width, bitmap.height);
        const picture = context.getImageData(0, 0, bitmap.width, bitmap.height);
        const c = rgb(color(S.view.active));
        for (let p = 0; p < mask.data.length; p += 4) {
          if (mask.data[p]) for (let k = 0; k < 3; k++) picture.data[p + k] = picture.data[p + k] * 0.4 + c[k] * 0.6;
        }
        context.putImageData(picture, 0, 0);
      });
    });
  }

  function selectObject(number) {
    S.corner = null;
    S.mode = "include";  // a new or other object starts with include points
    $("stage").classList.remove("box-mode");
    root.querySelector("input[name=samhq-mode][value=include]").checked = true;
    enqueue({ op: "select", number });
  }

  // ---- downloads: always for the prompt on screen -----------------------------------------------
  function clearDownloads() {
    $("files").hidden = true;
    for (const id of ["mask-file", "objects-file", "response-file", "cutout-file"]) {
      root.querySelector("#" + id + " a").removeAttribute("href");
    }
    $("snippet").textContent = "";
  }

  async function prepareDownloads() {
    if (!S.view || !S.view.objects.some((o) => o.points.length || o.box)) {
      setStatus("Nothing to export yet: add at least one point or a box.", true);
      return;
    }
    const base = "/ui/session/" + S.session + "/download/" + S.view.rev + "/";
    const response = await fetch(base + "snippet.py");
    if (!response.ok) throw new Error((await response.json()).error.message);
    const snippet = await response.text();
    $("snippet").textContent = snippet;
    const names = { "mask-file": "mask.png", "objects-file": "objects.json", "response-file": "response.json", "cutout-file": "cutout.png" };
    for (const [id, name] of Object.entries(names)) root.querySelector("#" + id + " a").href = base + name;
    $("files").hidden = false;
  }

  // ---- wiring ---------------------------------------------------------------------------------------
  function upload(file) {
    if (!file) return;
    S.queue = S.queue.filter((q) => q.op !== "click");
    if (!S.session) setStatus("The picture opens as soon as the page is ready…");
    enqueue({ op: "picture", file });
  }

  async function start() {
    let config;
    try {
      config = await call("/ui/session", { method: "POST" });
    } catch (error) {
      // a refusal (too many pages from this address, server full, login needed) says why in its message
      setStatus(error.status ? error.message : "The server is not reachable: " + error.message, true);
      return;
    }
    S.session = config.session;
    S.palette = config.palette;
    showBanner(config.banner);
    const models = $("model");
    for (const id of config.models) {
      const option = document.createElement("option");
      option.value = option.textContent = id;
      models.append(option);
    }
    models.value = config.model;
    const examples = $("examples");
    for (const example of config.examples) {
      const button = document.createElement("button");
      button.className = "example";
      button.title = example.name;
      const image = document.createElement("img");
      image.src = "/ui/examples/" + example.index + ".jpg";
      image.alt = example.name;
      button.append(image);
      button.addEventListener("click", () => { S.queue = S.queue.filter((q) => q.op !== "click"); enqueue({ op: "picture", example: example.index }); });
      examples.append(button);
    }
    setStatus(config.banner ? "The model is not available: see the banner above." : "Upload a picture or pick an example to start.", !!config.banner);
    $("samhq").dataset.ready = "1";
    root.dispatchEvent(new CustomEvent("samhq:session", { detail: config }));  // hook: ui/static/preview.js
    pump();  // a picture dropped or chosen while the page was still loading
  }

  $("points").addEventListener("click", onCanvasClick);
  $("points").addEventListener("pointerdown", onPointerDown);
  $("points").addEventListener("pointermove", onPointerMove);
  $("points").addEventListener("pointerup", onPointerUp);
  $("points").addEventListener("pointercancel", () => { S.drag = null; drawPoints(); });
  $("file").addEventListener("change", (e) => { upload(e.target.files[0]); e.target.value = ""; });
  const stage = $("stage");
  stage.addEventListener("dragover", (e) => { e.preventDefault(); stage.classList.add("dragging"); });
  stage.addEventListener("dragleave", () => stage.classList.remove("dragging"));
  stage.addEventListener("drop", (e) => { e.preventDefault(); stage.classList.remove("dragging"); upload(e.dataTransfer.files[0]); });
  document.addEventListener("paste", (e) => {
    const file = [...(e.clipboardData ? e.clipboardData.files : [])].find((f) => f.type.startsWith("image/"));
    if (file) upload(file);
  });
  root.querySelectorAll("input[name=samhq-mode]").forEach((input) => input.addEventListener("change", () => {
    S.mode = input.value; S.corner = null; $("stage").classList.toggle("box-mode", S.mode === "box"); drawPoints();
  }));
  root.querySelectorAll("input[name=samhq-view]").forEach((input) => input.addEventListener("change", () => { S.viewMode = input.value; paintOverlay(); }));
  $("new-object").addEventListener("click", () => {
    S.corner = null;
    S.mode = "include";
    $("stage").classList.remove("box-mode");
    root.querySelector("input[name=samhq-mode][value=include]").checked = true;
    enqueue({ op: "new" });
  });
  $("undo").addEventListener("click", () => enqueue({ op: "undo" }));
  $("redo").addEventListener("click", () => enqueue({ op: "redo" }));
  $("delete-object").addEventListener("click", () => enqueue({ op: "delete" }));
  $("clear-all").addEventListener("click", () => {
    if (window.confirm("Remove every object and point? This cannot be undone.")) enqueue({ op: "clear" });
  });
  $("active-object").addEventListener("change", (e) => selectObject(Number(e.target.value)));
  $("hq-only").addEventListener("change", (e) => enqueue({ op: "settings", hq_only: e.target.checked }));
  $("model").addEventListener("change", (e) => enqueue({ op: "settings", model: e.target.value }));
  const setOpacity = (value) => {
    const number = Math.min(0.9, Math.max(0.1, Number(value)));
    if (!Number.isFinite(number)) return;
    S.opacity = number;
    $("opacity").value = String(number);
    paintOverlay();
  };
  $("opacity").addEventListener("input", (e) => { $("opacity-value").value = e.target.value; setOpacity(e.target.value); });
  $("opacity-value").addEventListener("input", (e) => setOpacity(e.target.value));
  $("export").addEventListener("click", () => enqueue({ op: "export" }));
  window.addEventListener("pagehide", () => { if (S.session) fetch("/ui/session/" + S.session, { method: "DELETE", keepalive: true }); });
  // ---- Everything: find every object (a job on the server, polled for its progress) ---------------
  const everything = { polling: false };
  function showEverything(status) {
    const running = status.state === "running";
    $("everything").disabled = running;
    $("everything-cancel").hidden = !running;
    const bar = $("everything-progress");
    bar.hidden = !running && status.state !== "finished";
    bar.max = Math.max(1, status.total || 1);
    bar.value = status.done || 0;
    bar.dataset.done = String(status.done || 0);
    bar.dataset.total = String(status.total || 0);
    $("everything-tools").dataset.state = status.state;
    const text = $("everything-text");
    if (running) text.textContent = "batch " + status.done + " of " + status.total + " · " + status.kept + " mask(s) so far";
    else if (status.state === "cancelled") text.textContent = "Cancelled.";
    else if (status.state === "failed") text.textContent = status.message;
    else if (status.state === "finished") text.textContent = "Adding the objects…";
    else text.textContent = "";
  }
  async function pollEverything() {
    if (everything.polling) return;
    everything.polling = true;
    try {
      for (;;) {
        const status = await call("/ui/session/" + S.session + "/everything");
        showEverything(status);
        if (status.state === "finished") {
          while (S.busy || S.queue.length) await new Promise((resolve) => setTimeout(resolve, 50));
          const view = await call("/ui/session/" + S.session + "/everything/apply", { method: "POST" });
          apply(view);
          showEverything({ state: "applied" });
          $("everything-tools").dataset.found = String(view.objects.filter((o) => o.value).length);
          break;
        }
        if (status.state !== "running") { if (status.state === "failed") setStatus(status.message, true); break; }
        await new Promise((resolve) => setTimeout(resolve, 250));
      }
    } catch (error) {
      setStatus(error.message, true);
      showEverything({ state: "failed", message: error.message });
    } finally {
      everything.polling = false;
    }
  }
  $("everything").addEventListener("click", async () => {
    if (!S.view || !S.view.picture) { setStatus("Upload a picture first, or pick one of the examples.", true); return; }
    try {
      const status = await call("/ui/session/" + S.session + "/everything", {
        method: "POST", headers: { "Content-Type": "application/json" },
        // data-options on the button may carry further official knobs (JSON), e.g. lower thresholds
        body: JSON.stringify({ ...JSON.parse($("everything").dataset.options || "{}"), points_per_side: Number($("everything-grid").value) }),
      });
      showEverything(status);
      setStatus("Finding every object… clicks still work meanwhile.", false);
      pollEverything();
    } catch (error) {
      setStatus(error.message, true);
    }
  });
  $("everything-cancel").addEventListener("click", async () => {
    try { showEverything(await call("/ui/session/" + S.session + "/everything", { method: "DELETE" })); }
    catch (error) { setStatus(error.message, true); }
  });

  start();
})
