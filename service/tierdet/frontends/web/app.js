// tierdet web page: pick or drop an image, send it to POST /v1/detect, draw the
// boxes over it on a canvas. Plain JS, no build step: the gateway serves it as is.
"use strict";

// Same palette as tierdet/render.py, so a class has one colour everywhere.
const PALETTE = [
  [31, 119, 180], [255, 127, 14], [44, 160, 44], [214, 39, 40], [148, 103, 189],
  [140, 86, 75], [227, 119, 194], [188, 189, 34], [23, 190, 207], [255, 187, 120],
  [152, 223, 138], [255, 152, 150], [197, 176, 213], [196, 156, 148], [247, 182, 210],
  [219, 219, 141], [158, 218, 229], [57, 59, 121], [99, 121, 57], [140, 109, 49],
];
const MAX_CANVAS_WIDTH = 1000;
const $ = (id) => document.getElementById(id);

const state = { file: null, image: null, imageUrl: null, seq: 0 };

function colorFor(classId) {
  const [r, g, b] = PALETTE[((classId % PALETTE.length) + PALETTE.length) % PALETTE.length];
  return { css: `rgb(${r}, ${g}, ${b})`, dark: 0.2126 * r + 0.7152 * g + 0.0722 * b <= 140 };
}

function setState(name, message) {
  document.body.dataset.state = name;
  if (message !== undefined) $("status").textContent = message;
}

// The key stays in this tab only (sessionStorage) and travels as X-API-Key.
function authHeaders() {
  const key = $("api-key").value.trim();
  return key ? { "X-API-Key": key } : {};
}

async function loadModels() {
  let body;
  try {
    const reply = await fetch("/v1/models", { headers: authHeaders() });
    if (!reply.ok) return;
    body = await reply.json();
  } catch {
    return; // the page still works with the server's defaults
  }
  // Lists of choices (x-choices in the options' schema) are filled from here.
  const fill = {
    tiers: (select) => {
      select.options[0].textContent = `server default (${body.default_tier})`;
      for (const t of body.tiers) {
        select.add(new Option(`${t.name} (${Math.round(t.budget_ms)} ms)`, t.name));
      }
    },
    models: (select) => {
      for (const m of body.models) {
        const option = new Option(`${m.name} (AP ${m.routing_ap})`, m.name);
        option.disabled = !m.ready;
        select.add(option);
      }
    },
  };
  for (const select of $("options").querySelectorAll("select[data-choices]")) {
    select.length = 1; // reloaded when the API key changes
    fill[select.dataset.choices]?.(select);
  }
  const untrained = body.models.filter((m) => m.ready && m.weights.startsWith("random"));
  if (untrained.length) {
    const warning = $("weights-warning");
    warning.textContent = `${untrained.map((m) => m.name).join(", ")}: untrained random ` +
      "weights (a test deployment); the boxes are meaningless.";
    warning.hidden = false;
  }
}

function pickFile(file) {
  if (!file) return;
  if (file.type && !file.type.startsWith("image/")) {
    setState("error", `${file.name} is not an image (${file.type}).`);
    return;
  }
  state.file = file;
  $("detect").disabled = false;
  if (state.imageUrl) URL.revokeObjectURL(state.imageUrl);
  state.imageUrl = URL.createObjectURL(file);
  const image = new Image();
  image.onload = () => {
    state.image = image;
    drawImage();
    detect();
  };
  image.onerror = () => setState("error", `${file.name}: the browser cannot show this image.`);
  image.src = state.imageUrl;
}

// The request options as the API documents them: the query parameters of
// POST /v1/detect in /openapi.json (one per option, derived on the server
// from tierdet.contract.options). A new option appears here by itself.
async function buildOptionFields() {
  let spec;
  try {
    spec = await (await fetch("/openapi.json")).json();
  } catch {
    return;
  }
  const params = spec.paths["/v1/detect"].post.parameters
    .filter((p) => p.in === "query" && p.name !== "render");
  const box = $("options");
  for (const p of params) {
    const s = p.schema;
    const label = document.createElement("label");
    label.textContent = s.title || p.name;
    let control;
    if (s["x-choices"]) {
      control = document.createElement("select");
      control.dataset.choices = s["x-choices"];
      control.add(new Option(s["x-placeholder"] || "", ""));
    } else {
      control = document.createElement("input");
      const numeric = s.type === "number" || s.type === "integer";
      control.type = numeric ? "number" : "text";
      if (numeric) {
        if (s.minimum !== undefined) control.min = s.minimum;
        if (s.exclusiveMinimum !== undefined) control.min = s.exclusiveMinimum + 1;
        if (s.maximum !== undefined) control.max = s.maximum;
        control.step = s.type === "integer" || (s.maximum || 2) > 1 ? "1" : "0.05";
      }
      control.placeholder = s["x-placeholder"] || "";
    }
    control.id = p.name.replaceAll("_", "-");
    control.name = p.name;
    control.title = p.description || s.description || "";
    // A changed option re-runs the current image, so budgets can be compared quickly.
    control.addEventListener("change", detect);
    label.append(control);
    box.append(label);
  }
}

function options() {
  const form = new FormData();
  form.append("image", state.file, state.file.name || "image");
  for (const control of $("options").querySelectorAll("input, select")) {
    const value = control.value.trim();
    if (value !== "") form.append(control.name, value);
  }
  return form;
}

async function detect() {
  if (!state.file) return;
  const seq = ++state.seq; // a newer request makes older answers stale
  setState("busy", `Detecting in ${state.file.name || "the image"}…`);
  const started = performance.now();
  let reply, body;
  try {
    reply = await fetch("/v1/detect", { method: "POST", body: options(), headers: authHeaders() });
    body = await reply.json();
  } catch (err) {
    if (seq === state.seq) setState("error", `The gateway did not answer: ${err}`);
    return;
  }
  if (seq !== state.seq) return;
  const roundTripMs = performance.now() - started;
  if (!reply.ok) {
    const e = body.error || { code: reply.status, message: reply.statusText };
    drawImage();
    showTable([]);
    $("summary").hidden = true;
    setState("error", `${e.code}: ${e.message}`);
    return;
  }
  drawImage();
  drawBoxes(body);
  showSummary(body, roundTripMs);
  showTable(body.detections);
  setState("done", `${body.detections.length} detection(s).`);
}

function drawImage() {
  const canvas = $("canvas");
  const image = state.image;
  if (!image) return;
  const scale = Math.min(1, MAX_CANVAS_WIDTH / image.naturalWidth);
  canvas.width = Math.round(image.naturalWidth * scale);
  canvas.height = Math.round(image.naturalHeight * scale);
  canvas.getContext("2d").drawImage(image, 0, 0, canvas.width, canvas.height);
}

function drawBoxes(body) {
  const canvas = $("canvas");
  const ctx = canvas.getContext("2d");
  // Boxes are in the pixels of the image the server decoded; scale to the canvas.
  const sx = canvas.width / body.width;
  const sy = canvas.height / body.height;
  const line = Math.max(2, Math.round(Math.min(canvas.width, canvas.height) / 250));
  const fontPx = Math.max(11, Math.round(Math.min(canvas.width, canvas.height) / 40));
  ctx.font = `${fontPx}px system-ui, "DejaVu Sans", sans-serif`;
  ctx.textBaseline = "top";
  // Lowest score first: the most confident boxes end up on top.
  const ordered = [...body.detections].sort((a, b) => a.score - b.score);
  for (const d of ordered) {
    const { css, dark } = colorFor(d.class_id);
    const x = d.x1 * sx, y = d.y1 * sy, w = (d.x2 - d.x1) * sx, h = (d.y2 - d.y1) * sy;
    ctx.lineWidth = line;
    ctx.strokeStyle = css;
    ctx.strokeRect(x, y, w, h);
    const text = `${d.class_name} ${d.score.toFixed(2)}`;
    const tw = ctx.measureText(text).width + 6;
    const th = fontPx + 4;
    const ty = y - th >= 0 ? y - th : y; // above the box, or inside when no room
    const tx = Math.min(Math.max(0, x), Math.max(0, canvas.width - tw));
    ctx.fillStyle = css;
    ctx.fillRect(tx, ty, tw, th);
    ctx.fillStyle = dark ? "#fff" : "#000";
    ctx.fillText(text, tx + 3, ty + 2);
  }
}

function showSummary(body, roundTripMs) {
  const t = body.timing, r = body.routing;
  $("summary-model").textContent = body.model;
  $("summary-latency").textContent =
    `${t.total_ms.toFixed(1)} ms at the gateway (inference ${t.infer_ms.toFixed(1)} ms), ` +
    `${roundTripMs.toFixed(0)} ms round trip`;
  const within = r.actual_ms <= r.budget_ms ? "within" : "over";
  $("summary-routing").textContent =
    `${r.tier ? `tier ${r.tier}, ` : ""}budget ${Math.round(r.budget_ms)} ms (${within}), ` +
    `predicted ${r.predicted_ms.toFixed(0)} ms${r.degraded ? ", degraded" : ""}`;
  $("summary-image").textContent = `${body.width} x ${body.height} px`;
  $("summary").hidden = false;
}

function showTable(detections) {
  const tbody = $("detections").querySelector("tbody");
  tbody.replaceChildren();
  detections.forEach((d, i) => {
    const row = tbody.insertRow();
    row.insertCell().textContent = String(i + 1);
    const name = row.insertCell();
    const swatch = document.createElement("span");
    swatch.className = "swatch";
    swatch.style.backgroundColor = colorFor(d.class_id).css;
    name.append(swatch, d.class_name);
    row.insertCell().textContent = d.score.toFixed(3);
    row.insertCell().textContent =
      [d.x1, d.y1, d.x2, d.y2].map((v) => v.toFixed(0)).join(", ");
  });
  $("detections").hidden = detections.length === 0;
}

function wire() {
  const zone = $("dropzone");
  $("file").addEventListener("change", (e) => pickFile(e.target.files[0]));
  for (const name of ["dragenter", "dragover"]) {
    zone.addEventListener(name, (e) => { e.preventDefault(); zone.classList.add("over"); });
  }
  for (const name of ["dragleave", "drop"]) {
    zone.addEventListener(name, () => zone.classList.remove("over"));
  }
  zone.addEventListener("drop", (e) => {
    e.preventDefault();
    pickFile(e.dataTransfer.files[0]);
  });
  $("controls").addEventListener("submit", (e) => { e.preventDefault(); detect(); });
  const key = $("api-key");
  key.value = sessionStorage.getItem("tierdet-api-key") || "";
  key.addEventListener("change", () => {
    sessionStorage.setItem("tierdet-api-key", key.value.trim());
    loadModels();
  });
}

wire();
buildOptionFields().then(loadModels);
