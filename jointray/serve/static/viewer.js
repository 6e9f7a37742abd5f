// jointray viewer: upload a case to v1/predict, show the numbers and three orthogonal slices.
// Plain ES2020, no dependencies; every URL is relative so the page also works under a route prefix.
"use strict";

const MODEL_URL = "v1/model";
const PREDICT_URL = "v1/predict?viewer=true";
// CSS pixels on the longest physical side of the views: as large as fits the panel, within these bounds.
const VIEW_LONG_SIDE_MIN = 256;
const VIEW_LONG_SIDE_MAX = 384;
const VIEW_GAP = 16; // matches .views { gap: 1rem }
const MASK_ALPHA = 0.45;
const HEAT_MAX_ALPHA = 0.9;
const LABEL_COLOURS = [
  [220, 50, 47], // 1: red
  [38, 110, 220], // 2: blue
  [40, 160, 70], // 3: green
  [235, 140, 20], // 4: orange
  [150, 70, 200], // 5: purple
  [20, 170, 180], // 6: teal
];
const OUTCOME_HEADS = ["mmse", "cdr", "risk"];

// Each view fixes one axis (0 = x, 1 = y, 2 = z) and shows `across` horizontally and `up` vertically.
const VIEWS = {
  axial: { fixed: 2, across: 0, up: 1 },
  coronal: { fixed: 1, across: 0, up: 2 },
  sagittal: { fixed: 0, across: 1, up: 2 },
};
const AXIS_NAMES = ["x", "y", "z"];

const state = { model: null, volume: null, slices: [0, 0, 0] };

const byId = (id) => document.getElementById(id);

function setPageState(value) {
  document.body.dataset.state = value;
}

// ---------------------------------------------------------------------------------------------------------
// Small DOM and formatting helpers

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (value === undefined || value === null || value === false) continue;
    if (key === "class") node.className = value;
    else if (key === "text") node.textContent = value;
    else if (key === "style") Object.assign(node.style, value); // CSSOM, so a strict CSP allows it
    else node.setAttribute(key, value === true ? "" : value);
  }
  for (const child of children.flat(Infinity)) {
    if (child === undefined || child === null || child === false) continue;
    node.append(child instanceof Node ? child : String(child));
  }
  return node;
}

function isNumber(value) {
  return typeof value === "number" && Number.isFinite(value);
}

function fmt(value, digits) {
  return isNumber(value) ? value.toFixed(digits) : "—";
}

const INTERVAL_METHODS = {
  conformal_normalised: "conformal",
  conformal: "conformal, one width",
  monte_carlo: "Monte Carlo, no guarantee",
};

function fmtInterval(interval, digits, method) {
  if (!Array.isArray(interval) || interval.length !== 2) return "—";
  const low = interval[0] === null ? "−∞" : fmt(interval[0], digits);
  const high = interval[1] === null ? "∞" : fmt(interval[1], digits);
  return method ? `${low} – ${high} (${INTERVAL_METHODS[method] || method})` : `${low} – ${high}`;
}

function fmtMeanStd(estimate, digits) {
  if (!estimate || !isNumber(estimate.mean)) return "—";
  return `${fmt(estimate.mean, digits)} ± ${fmt(estimate.std, digits)}`;
}

function humanize(name) {
  const words = String(name).replace(/_/g, " ");
  return words.charAt(0).toUpperCase() + words.slice(1);
}

function intervalLabel(mc) {
  const level = mc && isNumber(mc.interval) ? mc.interval : null;
  return level === null ? "Interval" : `${Math.round(level * 100)} % interval`;
}

function pathLabel(path) {
  if (path === "window") return "single window";
  if (path === "sliding_window") return "sliding window";
  return path ? String(path) : "—";
}

// ---------------------------------------------------------------------------------------------------------
// HTTP

async function requestJson(url, options = {}) {
  let response;
  try {
    response = await fetch(url, options);
  } catch (err) {
    throw new Error(`Could not reach the server (${err.message}).`);
  }
  const text = await response.text();
  let body = null;
  try {
    body = text ? JSON.parse(text) : null;
  } catch {
    body = null;
  }
  if (!response.ok) {
    const error = new Error(errorMessage(response, body, text));
    error.status = response.status;
    throw error;
  }
  if (body === null) throw new Error(`The server's answer was not JSON (HTTP ${response.status}).`);
  return body;
}

function errorMessage(response, body, text) {
  const error = body && body.error;
  if (error && error.message) return String(error.message);
  // FastAPI's own errors (e.g. a route that is missing) use {"detail": ...}.
  if (body && body.detail) return typeof body.detail === "string" ? body.detail : JSON.stringify(body.detail);
  const snippet = text ? `: ${text.slice(0, 300)}` : "";
  return `HTTP ${response.status} ${response.statusText}${snippet}`;
}

function showError(message) {
  const box = byId("error");
  box.textContent = message;
  box.hidden = false;
}

function clearError() {
  const box = byId("error");
  box.textContent = "";
  box.hidden = true;
}

function setStatus(text) {
  byId("status").textContent = text;
}

// ---------------------------------------------------------------------------------------------------------
// Model description → form

function keyHeaders() {
  const key = byId("api-key").value;
  return key ? { "X-API-Key": key } : {};
}

async function loadModel() {
  try {
    const model = await requestJson(MODEL_URL, { headers: keyHeaders() });
    clearError();
    state.model = model;
    renderModelInfo(model);
    buildClinicalFields(model.clinical || {});
    buildMcControls(model.mc || {});
    byId("api-key-fieldset").hidden = !model.api_key_required;
    byId("submit").disabled = false;
    setPageState("ready");
  } catch (err) {
    if (err.status === 401) {
      // The server asks for a key before it describes its model: ask for it, then load again.
      byId("api-key-fieldset").hidden = false;
      byId("model-info").textContent = "API key needed";
      showError(`${err.message}. Enter the API key to continue.`);
      setPageState("locked");
      return;
    }
    byId("model-info").textContent = "Model unavailable";
    showError(`Could not load the model description: ${err.message}`);
    setPageState("error");
  }
}

function renderModelInfo(model) {
  const parts = [el("code", { text: model.name || "unnamed model" })];
  if (model.variant) parts.push(" · variant ", el("code", { text: model.variant }));
  if (model.version) parts.push(" · version ", el("code", { text: model.version }));
  if (Array.isArray(model.trained_heads) && model.trained_heads.length) {
    parts.push(` · heads: ${model.trained_heads.join(", ")}`);
  }
  byId("model-info").replaceChildren(...parts);
}

function fieldNames(group) {
  // Accept both a list of names and an object keyed by name.
  if (Array.isArray(group)) return group;
  return group && typeof group === "object" ? Object.keys(group) : [];
}

function buildClinicalFields(clinical) {
  const container = byId("clinical-fields");
  const fields = [];
  for (const name of fieldNames(clinical.numeric)) {
    const id = `clin-${name}`;
    fields.push(el("div", { class: "field" },
      el("label", { for: id, text: humanize(name) }),
      el("input", { type: "number", id, step: "any", inputmode: "decimal", "data-clinical": name, "data-kind": "numeric" })));
  }
  const categorical = clinical.categorical && typeof clinical.categorical === "object" ? clinical.categorical : {};
  for (const [name, options] of Object.entries(categorical)) {
    const id = `clin-${name}`;
    const select = el("select", { id, "data-clinical": name, "data-kind": "categorical" },
      el("option", { value: "", text: "unknown" }),
      (Array.isArray(options) ? options : []).map((option) => el("option", { value: String(option), text: String(option) })));
    fields.push(el("div", { class: "field" }, el("label", { for: id, text: humanize(name) }), select));
  }
  if (fields.length) container.replaceChildren(...fields);
  byId("clinical-fieldset").hidden = fields.length === 0;
}

function buildMcControls(mc) {
  const samples = byId("mc-samples");
  if (isNumber(mc.max_samples)) samples.max = String(mc.max_samples);
  samples.value = String(isNumber(mc.samples) ? mc.samples : 1);
  const modes = Array.isArray(mc.modes) && mc.modes.length ? mc.modes : [mc.mode || "heads"];
  const select = byId("mc-mode");
  select.replaceChildren(...modes.map((mode) => el("option", { value: mode, text: mode })));
  if (mc.mode && modes.includes(mc.mode)) select.value = mc.mode;
}

// ---------------------------------------------------------------------------------------------------------
// Form → request

function collectClinical() {
  const values = {};
  for (const input of document.querySelectorAll("[data-clinical]")) {
    const name = input.dataset.clinical;
    if (input.dataset.kind === "numeric") {
      if (input.value.trim() === "" && !input.validity.badInput) continue;
      const number = input.valueAsNumber;
      if (!Number.isFinite(number)) throw new Error(`${humanize(name)} must be a number.`);
      values[name] = number;
    } else if (input.value !== "") {
      values[name] = input.value;
    }
  }
  return values;
}

function collectSamples() {
  const input = byId("mc-samples");
  const samples = Number(input.value);
  const max = input.max ? Number(input.max) : Infinity;
  if (!Number.isInteger(samples) || samples < 1 || samples > max) {
    const range = Number.isFinite(max) ? `1 to ${max}` : "1 or more";
    throw new Error(`MC samples must be a whole number from ${range}.`);
  }
  return samples;
}

function buildRequest() {
  const file = byId("file").files[0];
  if (!file) throw new Error("Choose an image file (.nii, .nii.gz or .zip) first.");
  const body = new FormData();
  body.append("file", file, file.name);
  body.append("clinical", JSON.stringify(collectClinical()));
  body.append("mc_samples", String(collectSamples()));
  body.append("mc_mode", byId("mc-mode").value);
  return { method: "POST", body, headers: keyHeaders() };
}

async function onSubmit(event) {
  event.preventDefault();
  let request;
  try {
    request = buildRequest();
  } catch (err) {
    showError(err.message);
    setPageState("error");
    return;
  }
  clearError();
  resetResults();
  byId("submit").disabled = true;
  setStatus("Running prediction…");
  setPageState("busy");
  try {
    const result = await requestJson(PREDICT_URL, request);
    renderResult(result);
    const total = result.timings_s && result.timings_s.total;
    setStatus(isNumber(total) ? `Done in ${total.toFixed(2)} s` : "Done");
    setPageState("done");
  } catch (err) {
    resetResults();
    showError(err.message);
    setStatus("");
    setPageState("error");
  } finally {
    byId("submit").disabled = false;
  }
}

// ---------------------------------------------------------------------------------------------------------
// Results: numbers

function resetResults() {
  state.volume = null;
  byId("views").hidden = true;
  const empty = byId("viewer-empty");
  empty.hidden = false;
  empty.textContent = "Choose an image and run a prediction to see the segmentation.";
  byId("legend").replaceChildren();
  byId("results").replaceChildren(el("p", { class: "placeholder", text: "Volumes, uncertainty and outcome predictions appear here." }));
  const review = byId("review");
  review.className = "badge badge-idle";
  review.textContent = "no result yet";
}

function renderResult(result) {
  renderReview(result);
  renderNumbers(result);
  renderViewer(result.viewer, result.input);
}

function renderReview(result) {
  const review = byId("review");
  const info = result.review || {};
  const reasons = Array.isArray(info.reasons) ? info.reasons : [];
  const limits = [];
  if (isNumber(info.predicted_dice_threshold)) limits.push(`flagged below a predicted Dice of ${info.predicted_dice_threshold.toFixed(3)}`);
  if (isNumber(info.volume_cv_threshold)) limits.push(`volume SD threshold ${Math.round(info.volume_cv_threshold * 100)} % of the mean`);
  if (isNumber(info.entropy_threshold)) limits.push(`entropy threshold ${info.entropy_threshold} nats`);
  const threshold = limits.length ? ` (${limits.join(", ")})` : "";
  if (result.needs_review) {
    review.className = "badge badge-review";
    const detail = reasons.length ? `: ${reasons.map(reasonText).join("; ")}` : "";
    review.replaceChildren("⚠ ", el("strong", { text: "needs review" }), el("span", { class: "badge-detail", text: detail + threshold }));
  } else {
    review.className = "badge badge-ok";
    review.replaceChildren("✓ ", el("strong", { text: "no review flag" }), el("span", { class: "badge-detail", text: threshold }));
  }
}

function reasonText(reason) {
  return typeof reason === "string" ? reason : JSON.stringify(reason);
}

function renderNumbers(result) {
  const sections = [];
  if (result.structures && Object.keys(result.structures).length) {
    sections.push(structuresSection(result.structures, result.mc));
  }
  const outcomes = result.outcomes || {};
  if (outcomes.mmse) sections.push(estimateSection("MMSE", outcomes.mmse, result.mc, 1));
  if (outcomes.cdr) sections.push(cdrSection(outcomes.cdr));
  if (outcomes.risk) sections.push(estimateSection("Risk", outcomes.risk, result.mc, 3));
  const horizon = outcomes.risk_by_horizon;
  if (horizon && isNumber(horizon.probability)) {
    sections.push(el("section", { id: "outcome-risk-horizon" }, el("h3", { text: "Event probability" }),
      el("p", { text: `${(horizon.probability * 100).toFixed(0)} % by time ${fmt(horizon.horizon, 2)} (Breslow baseline fitted on the calibration cases)` })));
  }
  const missing = OUTCOME_HEADS.filter((head) => !outcomes[head]);
  if (missing.length) {
    sections.push(el("section", {}, el("h3", { text: "Outcomes" }),
      el("p", { class: "na", text: `Not available (head not trained): ${missing.map((h) => h.toUpperCase()).join(", ")}` })));
  }
  if (result.trust) sections.push(trustSection(result.trust));
  sections.push(inferenceSection(result));
  if (result.timings_s) sections.push(timingsSection(result.timings_s));
  byId("results").replaceChildren(...sections);
}

function structuresSection(structures, mc) {
  const rows = Object.entries(structures).map(([name, info]) => {
    const volume = info.volume_mm3 || {};
    const uncertainty = info.uncertainty || {};
    return el("tr", {},
      el("th", { scope: "row", text: humanize(name) }),
      el("td", { text: fmt(volume.mask, 1) }),
      el("td", { text: fmtMeanStd(volume, 1) }),
      el("td", { text: fmtInterval(volume.interval, 1, volume.interval_method) }),
      el("td", { text: fmt(info.predicted_dice, 3) }),
      el("td", { text: fmt(uncertainty.entropy, 3) }),
      el("td", { text: fmt(uncertainty.mutual_information, 4) }));
  });
  const head = el("tr", {}, ["Structure", "Volume (mm³)", "MC mean ± SD (mm³)", `${intervalLabel(mc)} (mm³)`,
    "Predicted Dice", "Mean entropy (nats)", "Mean MI (nats)"].map((text) => el("th", { scope: "col", text })));
  return el("section", { class: "wide" }, el("h3", { text: "Structures" }),
    el("div", { class: "table-scroll" }, el("table", { id: "structures-table" }, el("thead", {}, head), el("tbody", {}, rows))));
}

function estimateSection(title, estimate, mc, digits) {
  const id = `outcome-${title.toLowerCase()}`;
  return el("section", { id }, el("h3", { text: title }),
    el("dl", { class: "kv" },
      el("dt", { text: "Mean ± SD" }), el("dd", {}, el("span", { class: "big", text: fmtMeanStd(estimate, digits) })),
      el("dt", { text: intervalLabel(mc) }), el("dd", { text: fmtInterval(estimate.interval, digits, estimate.interval_method) }),
      el("dt", { text: "Deterministic" }), el("dd", { text: fmt(estimate.point, digits) })));
}

function cdrSection(cdr) {
  const entries = Object.entries(cdr.probabilities || {}).sort((a, b) => Number(a[0]) - Number(b[0]));
  const best = Math.max(...entries.map(([, p]) => (isNumber(p) ? p : 0)));
  const bars = entries.map(([stage, p]) => {
    const width = isNumber(p) ? Math.max(0, Math.min(1, p)) * 100 : 0;
    return el("li", { class: isNumber(p) && p === best ? "top" : null },
      el("span", { text: `CDR ${stage}` }),
      el("span", { class: "bar-track", role: "presentation" }, el("span", { class: "bar-fill", style: { width: `${width.toFixed(1)}%` } })),
      el("span", { class: "bar-value", text: isNumber(p) ? `${(p * 100).toFixed(1)} %` : "—" }));
  });
  const set = Array.isArray(cdr.set) ? [el("dt", { text: "Conformal set" }), el("dd", { text: `{${cdr.set.join(", ")}}` })] : [];
  return el("section", { id: "outcome-cdr" }, el("h3", { text: "CDR" }),
    el("dl", { class: "kv" }, el("dt", { text: "Stage" }), el("dd", {}, el("span", { class: "big", text: isNumber(cdr.stage) ? String(cdr.stage) : "—" })), ...set),
    el("ul", { class: "bars", "aria-label": "CDR class probabilities (MC mean)" }, bars));
}

function trustSection(trust) {
  const lines = ["statement", "review_statement", "ood_statement", "note"].filter((k) => trust[k]).map((k) => el("p", { text: trust[k] }));
  if (isNumber(trust.ood_p_value)) lines.push(el("p", { text: `Out-of-distribution p-value of this input: ${trust.ood_p_value.toFixed(3)}.` }));
  return el("section", { id: "trust", class: "wide" }, el("h3", { text: trust.calibrated ? "What these figures promise" : "Not calibrated" }), ...lines);
}

function inferenceSection(result) {
  const input = result.input || {};
  const mc = result.mc || {};
  const model = result.model || {};
  const pairs = [
    ["Input", input.name || "—"],
    ["Shape", Array.isArray(input.shape) ? input.shape.join(" × ") : "—"],
    ["Spacing (mm)", Array.isArray(input.spacing_mm) ? input.spacing_mm.map((s) => (isNumber(s) ? +s.toFixed(3) : "?")).join(" × ") : "—"],
    ["Path", pathLabel(result.path)],
    ["MC samples", isNumber(mc.samples) ? String(mc.samples) : "—"],
    ["MC mode", mc.mode || "—"],
    ["Model", [model.name, model.version].filter(Boolean).join(" @ ") || "—"],
  ];
  return el("section", { id: "inference" }, el("h3", { text: "Inference" }),
    el("dl", { class: "kv" }, pairs.map(([k, v]) => [el("dt", { text: k }), el("dd", { text: v })])));
}

function timingsSection(timings) {
  const pairs = Object.entries(timings).map(([k, v]) => [
    el("dt", { text: humanize(k) }),
    el("dd", {}, k === "total" ? el("strong", { text: `${fmt(v, 3)} s` }) : `${fmt(v, 3)} s`),
  ]);
  return el("section", { id: "timings" }, el("h3", { text: "Timings" }), el("dl", { class: "kv" }, pairs));
}

// ---------------------------------------------------------------------------------------------------------
// Results: slices

function decodeBase64(text) {
  const binary = atob(text);
  const bytes = new Uint8Array(binary.length);
  for (let i = 0; i < binary.length; i++) bytes[i] = binary.charCodeAt(i);
  return bytes;
}

function decodeVolume(viewer, input) {
  const shape = viewer.shape.map(Number);
  const count = shape[0] * shape[1] * shape[2];
  const array = (name, required) => {
    if (!viewer[name]) {
      if (required) throw new Error(`viewer.${name} is missing`);
      return null;
    }
    const bytes = decodeBase64(viewer[name]);
    if (bytes.length !== count) throw new Error(`viewer.${name} has ${bytes.length} values, expected ${count}`);
    return bytes;
  };
  return {
    shape,
    strides: [shape[1] * shape[2], shape[2], 1], // C order: index = (x * ny + y) * nz + z
    voxelMm: viewerVoxelMm(shape, input, viewer.step),
    image: array("image", true),
    mask: array("mask", false),
    uncertainty: array("uncertainty", false),
    labels: viewer.labels || {},
  };
}

// The viewer grid may be subsampled: its voxel is the input spacing times the step when the server names the
// step, else the input's extent over the viewer's voxel count (isotropic 1 mm when the input is not described).
function viewerVoxelMm(shape, input, step) {
  const spacing = input && Array.isArray(input.spacing_mm) && input.spacing_mm.length >= 3 ? input.spacing_mm : null;
  const inputShape = input && Array.isArray(input.shape) && input.shape.length >= 3 ? input.shape : null;
  return shape.map((n, axis) => {
    if (!spacing) return 1;
    let size = Math.abs(Number(spacing[axis]));
    if (Array.isArray(step) && step.length === 3) size *= Number(step[axis]);
    else if (inputShape) size *= Number(inputShape[axis]) / n;
    return Number.isFinite(size) && size > 0 ? size : 1;
  });
}

function foregroundCentre(volume) {
  const [nx, ny, nz] = volume.shape;
  const middle = [nx >> 1, ny >> 1, nz >> 1];
  if (!volume.mask) return middle;
  let count = 0, sx = 0, sy = 0, sz = 0;
  let i = 0;
  for (let x = 0; x < nx; x++) {
    for (let y = 0; y < ny; y++) {
      for (let z = 0; z < nz; z++, i++) {
        if (volume.mask[i] > 0) {
          count++; sx += x; sy += y; sz += z;
        }
      }
    }
  }
  return count ? [Math.round(sx / count), Math.round(sy / count), Math.round(sz / count)] : middle;
}

function renderViewer(viewer, input) {
  if (!viewer || !Array.isArray(viewer.shape) || viewer.shape.length !== 3) {
    byId("viewer-empty").textContent = "The server returned no slices for this case.";
    return;
  }
  let volume;
  try {
    volume = decodeVolume(viewer, input);
  } catch (err) {
    byId("viewer-empty").textContent = `The slices could not be shown: ${err.message}.`;
    return;
  }
  state.volume = volume;
  state.slices = foregroundCentre(volume);
  const uncertaintyBox = byId("show-uncertainty");
  uncertaintyBox.disabled = !volume.uncertainty;
  uncertaintyBox.parentElement.title = volume.uncertainty ? "" : "No uncertainty map in this result";
  if (!volume.uncertainty) uncertaintyBox.checked = false;
  byId("show-mask").disabled = !volume.mask;
  byId("viewer-empty").hidden = true;
  byId("views").hidden = false;
  sizeCanvases(volume);
  for (const [name, view] of Object.entries(VIEWS)) {
    const slider = byId(`slider-${name}`);
    slider.max = String(volume.shape[view.fixed] - 1);
    slider.value = String(state.slices[view.fixed]);
  }
  drawAll();
}

function sizeCanvases(volume) {
  const extent = volume.shape.map((n, axis) => n * volume.voxelMm[axis]);
  const longest = Math.max(...extent);
  // One common mm → pixel scale keeps the three views consistent; fit them side by side when the panel allows.
  const rowWidth = Object.values(VIEWS).reduce((sum, view) => sum + extent[view.across], 0);
  const available = byId("views").clientWidth - 2 * VIEW_GAP - 2;
  const fit = available > 0 ? (available / rowWidth) * longest : VIEW_LONG_SIDE_MIN;
  const scale = Math.min(VIEW_LONG_SIDE_MAX, Math.max(VIEW_LONG_SIDE_MIN, fit)) / longest;
  const dpr = window.devicePixelRatio || 1;
  for (const [name, view] of Object.entries(VIEWS)) {
    const canvas = byId(name);
    const width = Math.max(1, Math.round(extent[view.across] * scale));
    const height = Math.max(1, Math.round(extent[view.up] * scale));
    canvas.style.width = `${width}px`;
    canvas.style.height = `${height}px`;
    canvas.width = Math.round(width * dpr);
    canvas.height = Math.round(height * dpr);
  }
}

function overlayMode() {
  if (byId("show-uncertainty").checked && state.volume.uncertainty) return "uncertainty";
  if (byId("show-mask").checked && state.volume.mask) return "mask";
  return "none";
}

// Overlay colour per possible uint8 value: RGB 0..255 and alpha 0..1 (0 = leave the grey pixel as it is).
function labelTable() {
  const table = new Float32Array(256 * 4);
  for (let k = 1; k < 256; k++) {
    const [r, g, b] = LABEL_COLOURS[(k - 1) % LABEL_COLOURS.length];
    table.set([r, g, b, MASK_ALPHA], k * 4);
  }
  return table;
}

function heatTable() {
  const table = new Float32Array(256 * 4);
  const low = [255, 230, 0]; // yellow
  const high = [215, 25, 28]; // red
  for (let v = 0; v < 256; v++) {
    const t = v / 255;
    table.set([0, 1, 2].map((c) => low[c] + (high[c] - low[c]) * t), v * 4);
    table[v * 4 + 3] = HEAT_MAX_ALPHA * t;
  }
  return table;
}

const TABLES = { mask: labelTable(), uncertainty: heatTable() };

function drawAll() {
  for (const name of Object.keys(VIEWS)) drawView(name);
  renderLegend();
}

function drawView(name) {
  const volume = state.volume;
  if (!volume) return;
  const view = VIEWS[name];
  const width = volume.shape[view.across];
  const height = volume.shape[view.up];
  const mode = overlayMode();
  const overlay = mode === "none" ? null : volume[mode];
  const table = mode === "none" ? null : TABLES[mode];
  const stride = volume.strides;
  const base = state.slices[view.fixed] * stride[view.fixed];
  const pixels = new ImageData(width, height);
  const out = pixels.data;
  for (let row = 0; row < height; row++) {
    const up = height - 1 - row; // flip so that y/z increase upwards
    for (let col = 0; col < width; col++) {
      const i = base + col * stride[view.across] + up * stride[view.up];
      const grey = volume.image[i];
      let r = grey, g = grey, b = grey;
      if (overlay) {
        const t = overlay[i] * 4;
        const a = table[t + 3];
        if (a > 0) {
          r += (table[t] - grey) * a;
          g += (table[t + 1] - grey) * a;
          b += (table[t + 2] - grey) * a;
        }
      }
      const o = (row * width + col) * 4;
      out[o] = r;
      out[o + 1] = g;
      out[o + 2] = b;
      out[o + 3] = 255;
    }
  }
  blit(byId(name), pixels);
  const slider = byId(`slider-${name}`);
  byId(`pos-${name}`).textContent = `${AXIS_NAMES[view.fixed]} ${slider.value} / ${slider.max}`;
}

function blit(canvas, pixels) {
  const scratch = blit.scratch || (blit.scratch = document.createElement("canvas"));
  scratch.width = pixels.width;
  scratch.height = pixels.height;
  scratch.getContext("2d").putImageData(pixels, 0, 0);
  const ctx = canvas.getContext("2d");
  ctx.imageSmoothingEnabled = false;
  ctx.clearRect(0, 0, canvas.width, canvas.height);
  ctx.drawImage(scratch, 0, 0, canvas.width, canvas.height);
}

function renderLegend() {
  const legend = byId("legend");
  const mode = overlayMode();
  if (mode === "uncertainty") {
    legend.replaceChildren(el("span", { class: "legend-item" }, "Entropy: low", el("span", { class: "heat-ramp" }), "high"));
  } else if (mode === "mask") {
    const labels = Object.entries(state.volume.labels).sort((a, b) => Number(a[0]) - Number(b[0]));
    legend.replaceChildren(...labels.map(([value, name]) => {
      const [r, g, b] = LABEL_COLOURS[(Number(value) - 1) % LABEL_COLOURS.length] || [128, 128, 128];
      return el("span", { class: "legend-item" }, el("span", { class: "swatch", style: { background: `rgb(${r}, ${g}, ${b})` } }), humanize(name));
    }));
  } else {
    legend.replaceChildren(el("span", { text: "Overlay off" }));
  }
}

function onSliderInput(name) {
  const view = VIEWS[name];
  state.slices[view.fixed] = Number(byId(`slider-${name}`).value);
  drawView(name);
}

// Clicking a view moves the other two views to the clicked point.
function onCanvasClick(name, event) {
  const volume = state.volume;
  if (!volume) return;
  const view = VIEWS[name];
  const rect = event.currentTarget.getBoundingClientRect();
  const across = Math.floor(((event.clientX - rect.left) / rect.width) * volume.shape[view.across]);
  const up = volume.shape[view.up] - 1 - Math.floor(((event.clientY - rect.top) / rect.height) * volume.shape[view.up]);
  const clamp = (v, axis) => Math.max(0, Math.min(volume.shape[axis] - 1, v));
  state.slices[view.across] = clamp(across, view.across);
  state.slices[view.up] = clamp(up, view.up);
  for (const [other, otherView] of Object.entries(VIEWS)) {
    if (other === name) continue;
    byId(`slider-${other}`).value = String(state.slices[otherView.fixed]);
    drawView(other);
  }
}

// ---------------------------------------------------------------------------------------------------------

function init() {
  byId("predict-form").addEventListener("submit", onSubmit);
  byId("api-key").addEventListener("change", () => { if (!state.model) loadModel(); });
  for (const name of Object.keys(VIEWS)) {
    byId(`slider-${name}`).addEventListener("input", () => onSliderInput(name));
    byId(name).addEventListener("click", (event) => onCanvasClick(name, event));
  }
  for (const id of ["show-mask", "show-uncertainty"]) {
    byId(id).addEventListener("change", () => state.volume && drawAll());
  }
  let resizeTimer = 0;
  window.addEventListener("resize", () => {
    clearTimeout(resizeTimer);
    resizeTimer = setTimeout(() => {
      if (!state.volume) return;
      sizeCanvases(state.volume);
      drawAll();
    }, 150);
  });
  loadModel();
}

init();
