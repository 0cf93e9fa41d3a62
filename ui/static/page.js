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
    if (!["export", "embed", "select", "zip"].includes(item.op)) clearDownloads();
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
        } else if (item.op === "zip") {
          await exportZip(item.which);
        } else if (item.op === "picture") {
          // every picture is added to the session's strip; the first of a batch is shown, the others wait
          const query = (item.example !== undefined ? "?example=" + item.example + "&" : "?") + "add=1&show=" + (item.show === false ? 0 : 1);
          const headers = item.file ? { "X-Filename": encodeURIComponent(item.file.name || "picture") } : {};
          if (item.show !== false) setStatus("Reading the picture…");  // the others arrive in the strip quietly
          const view = await call("/ui/session/" + S.session + "/picture" + query,
            { method: "POST", body: item.file || null, headers });
          if (item.show === false) {
            S.album = view.album;
          } else {
            await showPicture(view);
            apply(view);
            S.queue.splice(1, 0, { op: "embed" });  // next, before any click made meanwhile
          }
          refreshStrip();
        } else if (item.op === "switch" || item.op === "remove") {
          if (item.op === "switch") setStatus("Opening picture " + (item.index + 1) + "…");
          const view = await call("/ui/session/" + S.session + "/pictures/" + item.index, { method: item.op === "switch" ? "POST" : "DELETE" });
          if (item.op === "remove") root.querySelectorAll("#strip .strip-item").forEach((node) => node.remove());
          await showPicture(view);
          apply(view);
          if (!view.picture.embedded) S.queue.splice(1, 0, { op: "embed" });
          refreshStrip();
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
        // past the pictures' limit, the rest of the batch is refused alike: the message stays on screen
        if (error.status === 409 && item.op === "picture") S.queue = S.queue.filter((q, i) => i === 0 || q.op !== "picture");
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
    if (view.album) S.album = view.album;
    if (view.rev !== previousRev) clearDownloads();
    if (view.status) setStatus(view.status, false);
    if (item && (item.op === "click" || item.op === "box")) S.clicks += 1;
    renderTools();
    renderLegend();
    renderCandidates();
    markStrip();
    renderCategory();
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
        "", obj.value ? obj.number : "–", obj.score == null ? "–" : obj.score.toFixed(3),
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
  function upload(files) {
    const pictures = [...(files || [])].filter(isPicture);
    if (!pictures.length) { if (files && files.length) setStatus("No picture among the files dropped.", true); return; }
    S.queue = S.queue.filter((q) => q.op !== "click");
    if (!S.session) setStatus("The picture opens as soon as the page is ready…");
    pictures.sort((a, b) => (a.webkitRelativePath || a.name).localeCompare(b.webkitRelativePath || b.name, undefined, { numeric: true }));
    pictures.forEach((file, i) => enqueue({ op: "picture", file, show: i === 0 }));
  }

  const PICTURE_NAME = /\.(jpe?g|png|webp|bmp|gif|tiff?|avif)$/i;
  const isPicture = (file) => (file.type ? file.type.startsWith("image/") : PICTURE_NAME.test(file.name));

  // A dropped folder: its pictures (and those of its sub-folders), read through the entries API.
  async function droppedFiles(transfer) {
    const entries = [...(transfer.items || [])].map((item) => item.webkitGetAsEntry && item.webkitGetAsEntry()).filter(Boolean);
    if (!entries.some((entry) => entry.isDirectory)) return [...transfer.files];
    const files = [];
    async function walk(entry) {
      if (entry.isFile) {
        files.push(await new Promise((resolve, reject) => entry.file(resolve, reject)));
      } else if (entry.isDirectory) {
        const reader = entry.createReader();
        for (;;) {
          const batch = await new Promise((resolve, reject) => reader.readEntries(resolve, reject));
          if (!batch.length) break;
          for (const child of batch) await walk(child);
        }
      }
    }
    for (const entry of entries) await walk(entry);
    return files;
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
      button.addEventListener("click", () => { S.queue = S.queue.filter((q) => q.op !== "click"); enqueue({ op: "picture", example: example.index, show: true }); });
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
  $("file").addEventListener("change", (e) => { upload(e.target.files); e.target.value = ""; });
  $("folder").addEventListener("change", (e) => { upload(e.target.files); e.target.value = ""; });
  const stage = $("stage");
  stage.addEventListener("dragover", (e) => { e.preventDefault(); stage.classList.add("dragging"); });
  stage.addEventListener("dragleave", () => stage.classList.remove("dragging"));
  stage.addEventListener("drop", async (e) => {
    e.preventDefault();
    stage.classList.remove("dragging");
    try { upload(await droppedFiles(e.dataTransfer)); } catch (error) { setStatus("The folder could not be read: " + error.message, true); }
  });
  document.addEventListener("paste", (e) => {
    const file = [...(e.clipboardData ? e.clipboardData.files : [])].find((f) => f.type.startsWith("image/"));
    if (file) upload([file]);
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
    if (running && !status.total) bar.removeAttribute("value"); // one request to a remote server: no batches to count
    bar.dataset.done = String(status.done || 0);
    bar.dataset.total = String(status.total || 0);
    $("everything-tools").dataset.state = status.state;
    const text = $("everything-text");
    if (running && !status.total) text.textContent = "on the segmentation server…";
    else if (running) text.textContent = "batch " + status.done + " of " + status.total + " · " + status.kept + " mask(s) so far";
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

  // ---- several pictures: the strip, moving between them -------------------------------------------
  S.album = { count: 0, current: -1 };
  let stripFetch = null;
  async function refreshStrip() {
    if (!S.session) return;
    const mine = stripFetch = call("/ui/session/" + S.session + "/pictures");
    let listing;
    try { listing = await mine; } catch (error) { return; }
    if (mine !== stripFetch) return;  // a newer listing is on its way
    const strip = $("strip");
    strip.hidden = listing.count < 2;
    const items = strip.querySelectorAll(".strip-item");
    listing.pictures.forEach((picture, index) => {
      let item = items[index];
      if (!item) {
        item = document.createElement("button");
        item.className = "strip-item";
        item.dataset.index = String(index);
        const image = document.createElement("img");
        image.loading = "lazy";
        image.src = "/ui/session/" + S.session + "/pictures/" + index + "/thumb.jpg";
        const badge = document.createElement("span");
        badge.className = "strip-badge";
        item.append(image, badge);
        item.addEventListener("click", () => goTo(index));
        strip.append(item);
      }
      item.title = picture.name + " — " + (picture.objects ? picture.objects + " object(s)" : "no objects yet");
      item.querySelector("img").alt = picture.name;
      setItemObjects(item, picture.objects);
      item.classList.toggle("current", picture.current);
      item.setAttribute("aria-current", picture.current ? "true" : "false");
    });
    S.album = { count: listing.count, current: listing.current };
    renderAlbum();
  }

  function setItemObjects(item, count) {
    item.dataset.objects = String(count);
    item.classList.toggle("has-objects", count > 0);
    item.querySelector(".strip-badge").textContent = count ? String(count) : "";
  }

  // The picture on screen's item follows its objects at each answer (no listing needed).
  function markStrip() {
    if (!S.view || !S.album) return;
    const current = S.album.current;
    root.querySelectorAll("#strip .strip-item").forEach((item) => {
      const mine = Number(item.dataset.index) === current;
      item.classList.toggle("current", mine);
      item.setAttribute("aria-current", mine ? "true" : "false");
      if (mine) setItemObjects(item, S.view.objects.filter((o) => o.points.length || o.box).length);
    });
    renderAlbum();
  }

  function renderAlbum() {
    const { count, current } = S.album;
    $("picture-count").textContent = count > 1 ? "Picture " + (current + 1) + " of " + count : "";
    $("prev-picture").disabled = !(count > 1 && current > 0);
    $("next-picture").disabled = !(count > 1 && current < count - 1);
    $("album-tools").hidden = count < 2;
    const active = root.querySelector("#strip .strip-item.current");
    if (active && active.scrollIntoView) active.scrollIntoView({ block: "nearest", inline: "nearest" });
  }

  // The picture `index` after every edit queued before (the edits belong to the picture they were made on).
  function goTo(index) {
    const target = S.queue.filter((q) => q.op === "switch").map((q) => q.index).pop() ?? S.album.current;
    if (index < 0 || index >= S.album.count || index === target) return;
    S.corner = null;
    enqueue({ op: "switch", index });
  }
  const step = (delta) => {
    const from = S.queue.filter((q) => q.op === "switch").map((q) => q.index).pop() ?? S.album.current;
    goTo(from + delta);
  };
  $("prev-picture").addEventListener("click", () => step(-1));
  $("next-picture").addEventListener("click", () => step(1));
  $("remove-picture").addEventListener("click", () => {
    if (S.album.count < 2 || S.queue.some((q) => q.op === "switch" || q.op === "remove")) return;
    if (window.confirm("Remove this picture and its objects from the page? This cannot be undone.")) enqueue({ op: "remove", index: S.album.current });
  });

  // ---- the object's category (its class in the COCO and YOLO exports) -----------------------------
  function renderCategory() {
    if (!S.view) return;
    const field = $("object-category");
    const active = S.view.objects.find((o) => o.number === S.view.active);
    if (document.activeElement !== field) field.value = active ? active.category : "object";
    const list = $("categories");
    list.innerHTML = "";
    for (const name of S.view.categories || []) {
      const option = document.createElement("option");
      option.value = name;
      list.append(option);
    }
  }
  const sendCategory = () => {
    const active = S.view && S.view.objects.find((o) => o.number === S.view.active);
    const name = $("object-category").value.trim() || "object";
    if (active && active.category !== name) enqueue({ op: "category", name });
  };
  $("object-category").addEventListener("change", sendCategory);
  $("object-category").addEventListener("keydown", (e) => { if (e.key === "Enter") { e.preventDefault(); $("object-category").blur(); } });

  // ---- data-set exports: this picture, or the whole session as one zip ----------------------------
  async function exportZip(which) {
    if (!S.view || !S.view.picture) { setStatus("Upload a picture first, or pick one of the examples.", true); return; }
    const path = which === "session" ? "export/session.zip" : "export/picture/" + S.album.current + ".zip";
    setStatus(which === "session" ? "Preparing the data set of every picture…" : "Preparing this picture's files…");
    const response = await fetch("/ui/session/" + S.session + "/" + path);
    if (!response.ok) {
      let message = "The server answered " + response.status + ".";
      try { message = (await response.json()).error.message; } catch (e) { /* not JSON */ }
      throw Object.assign(new Error(message), { status: response.status });
    }
    const disposition = response.headers.get("Content-Disposition") || "";
    const utf8 = /filename\*=UTF-8''([^;]+)/.exec(disposition);  // a name in other letters (写真.zip)
    const name = utf8 ? decodeURIComponent(utf8[1]) : (/filename="([^"]+)"/.exec(disposition) || [])[1] || "dataset.zip";
    const url = URL.createObjectURL(await response.blob());
    const link = document.createElement("a");
    link.href = url;
    link.download = name;
    document.body.append(link);
    link.click();
    link.remove();
    setTimeout(() => URL.revokeObjectURL(url), 60_000);
    setStatus("Exported " + name + ".");
  }
  $("export-picture").addEventListener("click", () => enqueue({ op: "zip", which: "picture" }));
  $("export-session").addEventListener("click", () => enqueue({ op: "zip", which: "session" }));

  // ---- keyboard shortcuts (never while typing in a field) and the `?` overlay -------------------------
  function setMode(mode) {
    S.mode = mode; S.corner = null;
    $("stage").classList.toggle("box-mode", mode === "box");
    root.querySelector("input[name=samhq-mode][value=" + mode + "]").checked = true;
    drawPoints();
  }
  function toggleShortcuts(show) {
    const box = $("shortcuts");
    box.hidden = show === undefined ? !box.hidden : !show;
  }
  const typing = (target) => target && (target.isContentEditable || /^(INPUT|TEXTAREA|SELECT)$/.test(target.tagName))
    && !(target.tagName === "INPUT" && /^(radio|checkbox|range|button|file)$/.test(target.type));
  document.addEventListener("keydown", (event) => {
    if (!root.isConnected || event.defaultPrevented || event.altKey) return;
    if (event.key === "Escape") { if (!$("shortcuts").hidden) { toggleShortcuts(false); event.preventDefault(); } return; }
    if (typing(event.target)) return;
    const key = event.key;
    const command = event.ctrlKey || event.metaKey;
    let handled = true;
    if (command) {
      if (key === "z" || key === "Z") enqueue({ op: event.shiftKey ? "redo" : "undo" });
      else if (key === "y") enqueue({ op: "redo" });
      else handled = false;
    } else if (key === "?") toggleShortcuts();
    else if (key === "i") setMode("include");
    else if (key === "e") setMode("exclude");
    else if (key === "b") setMode("box");
    else if (key === "n") $("new-object").click();
    else if (key === "z") enqueue({ op: "undo" });
    else if (key === "y" || key === "Z") enqueue({ op: "redo" });
    else if (key === "Delete" || key === "Backspace") enqueue({ op: "delete" });
    else if (key === "ArrowRight" || key === "PageDown" || key === "d") step(1);
    else if (key === "ArrowLeft" || key === "PageUp" || key === "a") step(-1);
    else if (key === "x") enqueue({ op: "zip", which: "picture" });
    else if (key === "s") enqueue({ op: "zip", which: "session" });
    else if (key === "c") { $("object-category").focus(); $("object-category").select(); }
    else if (["1", "2", "3"].includes(key) && S.view && (S.view.thumbnails || []).length >= Number(key)) enqueue({ op: "choose", candidate: Number(key) - 1 });
    else handled = false;
    if (handled) event.preventDefault();
  });
  $("shortcuts-button").addEventListener("click", () => toggleShortcuts());
  $("shortcuts-close").addEventListener("click", () => toggleShortcuts(false));

  start();
})
