// The "On this device" page: the production model runs in this browser (ONNX Runtime Web, WebAssembly,
// one thread) and the image never leaves it. The page fetches three things from its own server, once:
// the decision metadata (config.json), the ONNX serving artefact (model.onnx) and the runtime (ONNX
// Runtime's module and .wasm, dicom-parser). Files are read with the File API and scored in memory: no
// request carries an image, its name or anything derived from it.

import { ImageDecodeError, heatmap, implausibility, overlay, resizeUint8, roundHalfEven } from "./imaging.js";
import { decodeGreyscale, decodeWithBrowser } from "./decode.js";
import * as rules from "./decision.js";

// The smallest valid WebAssembly module: the header alone.
const WASM_HEADER = new Uint8Array([0x00, 0x61, 0x73, 0x6d, 0x01, 0x00, 0x00, 0x00]);

/** What tests and benchmarks read: the page's state, timings and last results (no image data). */
const state = { status: "loading", message: "", timings: {}, results: [], modelBytes: null, runs: 0, batches: 0 };

export function wasmAvailable() {
  try {
    return typeof WebAssembly === "object" && typeof WebAssembly.instantiate === "function" &&
      WebAssembly.validate(WASM_HEADER);
  } catch {
    return false;
  }
}

function loadClassicScript(url) {
  // dicom-parser ships as a UMD bundle: as a classic script it defines window.dicomParser.
  return new Promise((resolve, reject) => {
    if (window.dicomParser) return resolve(window.dicomParser);
    const script = document.createElement("script");
    script.src = url;
    script.async = true;
    script.onload = () => (window.dicomParser ? resolve(window.dicomParser) : reject(new Error("dicom-parser did not load")));
    script.onerror = () => reject(new Error(`could not fetch ${url.split("/").pop()}`));
    document.head.appendChild(script);
  });
}

async function fetchBytes(url) {
  const response = await fetch(url, { credentials: "same-origin" });
  if (!response.ok) throw new Error(`the server answered ${response.status} for ${url.split("/").pop().split("?")[0]}`);
  return new Uint8Array(await response.arrayBuffer());
}

async function fetchConfig(base) {
  const response = await fetch(`${base}config.json`, { credentials: "same-origin", cache: "no-store" });
  let body = null;
  try {
    body = await response.json();
  } catch {
    body = null;
  }
  if (!response.ok || !body || !body.decision) {
    throw new Error((body && body.error) || `the server answered ${response.status}`);
  }
  return body;
}

class Scorer {
  constructor(ort, session, config, dicomParser) {
    this.ort = ort;
    this.session = session;
    this.config = config;
    this.decision = config.decision;
    this.dicomParser = dicomParser;
    this.words = config.words;
    const wanted = [config.tensors.probability, config.tensors.cam, config.tensors.viral, config.tensors.orientation];
    if (this.decision.ood && Object.keys(this.decision.ood).length) wanted.push(config.tensors.ood);
    const missing = wanted.filter((name) => !session.outputNames.includes(name));
    if (missing.length) throw new Error(`the model lacks the outputs ${missing.join(", ")}`);
    this.outputs = wanted;
  }

  /** uint8 S x S pixels -> {probability, viral, orientation (8 probabilities), cam: {data, height, width}, ood}. */
  async run(pixels) {
    const size = this.decision.input_size;
    const tensors = this.config.tensors;
    const input = new this.ort.Tensor("float32", Float32Array.from(pixels), [1, size, size, 1]);
    const results = await this.session.run({ [tensors.input]: input }, this.outputs);
    const cam = results[tensors.cam];
    const ood = results[tensors.ood];
    const scored = {
      probability: results[tensors.probability].data[0],
      viral: results[tensors.viral].data[0],
      orientation: Array.from(results[tensors.orientation].data),
      cam: { data: Float32Array.from(cam.data), height: cam.dims[1], width: cam.dims[2] },
      ood: ood ? ood.data[0] : null,
    };
    for (const tensor of Object.values(results)) if (tensor.dispose) tensor.dispose();
    state.runs += 1;
    return scored;
  }

  /** The decoded greyscale image, resized to the model's input and scored (scoring.runtime Predictor._score). */
  async scoreGrey(grey, width, height) {
    const size = this.decision.input_size;
    return this.run(resizeUint8(grey, width, height, size, size));
  }

  /** One file's bytes -> a result like the server's Prediction (scoring.runtime Predictor._predict_chunk):
   * decode, checks, score; an orientation the model is not sure of is refused (the gate's refusal first);
   * a turned or mirrored X-ray is put back upright (the full decoded image, then resized) and scored again;
   * the gate on the upright scores; label, triage and subtype at the artefact's thresholds. */
  async score(name, bytes) {
    const started = performance.now();
    const threshold = this.decision.threshold;
    const env = { limits: this.config.limits, checks: this.config.checks, dicomParser: this.dicomParser,
      browserDecode: decodeWithBrowser };
    let decoded;
    try {
      decoded = await decodeGreyscale(bytes, env);
      const problem = implausibility(decoded.grey, decoded.width, decoded.height, decoded.spread, this.config.checks);
      if (problem) return refused(name, threshold, problem);
    } catch (error) {
      if (error instanceof ImageDecodeError) return refused(name, threshold, error.message);
      throw error;
    }
    const decodedAt = performance.now();
    const words = this.words;
    let image = decoded;
    let scored = await this.scoreGrey(image.grey, image.width, image.height);
    let note = null;
    const found = rules.orientation(this.decision, scored.orientation);
    if (found === null) {
      const error = rules.refusal(this.decision, scored.ood, words.gate_refusal) || words.orientation_unclear;
      return refused(name, threshold, error, { ood_score: scored.ood });
    }
    if (found !== words.upright) {
      image = rules.upright(decoded.grey, decoded.width, decoded.height, found, words.orientations.length / 2);
      scored = await this.scoreGrey(image.grey, image.width, image.height);
      note = fill(words.upright_note, { orientation: words.orientations[found] });
    }
    const finished = performance.now();
    const gate = rules.refusal(this.decision, scored.ood, words.gate_refusal);
    if (gate) return refused(name, threshold, gate, { note, ood_score: scored.ood });
    const probability = scored.probability;
    return { name, probability_pneumonia: probability, label: rules.label(this.decision, probability), threshold,
      error: null, triage: rules.triaged(this.decision, probability, words.review),
      subtype: rules.subtype(this.decision, probability, scored.viral, words.subtypes),
      probability_viral: scored.viral, note, ood_score: scored.ood, grey: image.grey, width: image.width,
      height: image.height, cam: scored.cam,
      timings: { decode_ms: decodedAt - started, model_ms: finished - decodedAt, total_ms: finished - started } };
  }

  /** The overlay image for a scored result, drawn as the server draws it (at most max_side a side). */
  render(result) {
    const { grey, width, height } = result;
    const maxSide = this.config.overlay.max_side;
    const scale = maxSide / Math.max(width, height);
    let shown = grey, w = width, h = height;
    if (scale < 1) {
      w = roundHalfEven(width * scale);
      h = roundHalfEven(height * scale);
      shown = resizeUint8(grey, width, height, w, h);
    }
    const towards = result.label === this.decision.class_names[1];
    const heat = heatmap(result.cam.data, result.cam.height, result.cam.width, h, w, towards, this.decision.crop);
    return new ImageData(overlay(shown, heat, this.config.overlay.palette, this.config.overlay.alpha), w, h);
  }
}

/** A file the page does not score: the record's fields, with its error (and a note or gate score). */
function refused(name, threshold, error, extra = {}) {
  return { name, probability_pneumonia: null, label: null, threshold, error, ...extra };
}

function publicResult(result, fields) {
  // What the page keeps and exposes: never the pixels. The prediction record under the server's field names
  // (config.record_fields: scoring.runtime.RECORD_FIELDS, raw 0..1 probabilities), with the file's name, the
  // threshold and the timings; `probability` repeats probability_pneumonia for programs that read it.
  const record = Object.fromEntries(fields.map((field) => [field, result[field] ?? null]));
  return { name: result.name, ...record, probability: record.probability_pneumonia, threshold: result.threshold,
    timings: result.timings || null };
}

/** Python's str.format for the named fields of the server's sentences (scoring.wording). */
function fill(template, values) {
  return template.replace(/\{(\w+)\}/g, (whole, key) => (key in values ? String(values[key]) : whole));
}

/** scoring.wording.with_next_step: a refusal, then what to do next when it does not already say it. */
export function refusalText(error, words) {
  if (!error) return "";
  if (new RegExp(`\\b(${words.action_words.join("|")})\\b`, "i").test(error)) return error;
  const lowered = error.toLowerCase();
  const found = words.next_steps.find(([fragment]) => lowered.includes(fragment));
  return `${error}. ${found ? found[1] : words.default_next_step}, or ${words.alternative}`;
}

/** scoring.wording.scored_line and the refused files, one line each. */
export function statusText(results, shown, words) {
  const scored = results.filter((r) => r.probability_pneumonia !== null).length;
  const lines = [fill(words.scored, { scored, total: results.length, files: results.length === 1 ? "file" : "files",
    where: words.where })];
  if (shown !== null && results.length > 1) lines.push(`The result and map above are for ${shown}; the table lists every file.`);
  for (const r of results) {
    if (r.probability_pneumonia === null) lines.push(fill(words.refused, { name: r.name, reason: refusalText(r.error, words) }));
  }
  return lines;
}

/** scoring.wording.decision_sentence: the decision as the server page words it. */
export function decisionText(r, words) {
  const shown = (value) => rules.percent(value, words.percent_floor, words.percent_ceiling);
  let text = fill(words.decision, { label: r.label, probability: shown(r.probability_pneumonia), threshold: shown(r.threshold) });
  if (r.triage && r.triage !== r.label) text += fill(words.triage_part, { triage: r.triage });
  if (r.subtype) text += fill(words.subtype_part, { subtype: r.subtype, probability_viral: shown(r.probability_viral) });
  return text;
}

/** Gradio's footer link "Use via API" on this page would list this page's API, which is none: point it, and
 * the page's own link, at the server page's API documentation instead. */
function pointApiLinks(root, base, docs) {
  const appRoot = base.replace(/ondevice\/$/, "");
  const target = appRoot + (docs || "?view=api");
  const own = root.querySelector("#ondevice-api-link");
  if (own) own.href = target;
  const redirect = (event) => {
    const control = event.target && event.target.closest && event.target.closest("footer button, footer a");
    if (!control || !/api/i.test(control.textContent || "")) return;
    event.preventDefault();
    event.stopImmediatePropagation();
    window.location.assign(target);
  };
  document.addEventListener("click", redirect, true);
  document.addEventListener("keydown", (event) => {
    if (event.key === "Enter" || event.key === " ") redirect(event);
  }, true);
}

/** Start the page in `root`, its files under `base`. */
export async function mount(root, base) {
  if (root.dataset.mounted) return state;
  root.dataset.mounted = "1";
  window.pneumoniaOnDevice = state;
  const $ = (id) => root.querySelector(`#${id}`);
  // The sentence that sends a visitor to the server page, in the page's markup (serving.ondevice): the
  // failures before the config is in need it too.
  const instead = $("ondevice").dataset.instead;
  const statusLine = $("ondevice-status");
  const input = $("ondevice-files");
  const drop = $("ondevice-drop");
  const say = (text, status) => {
    statusLine.textContent = text;
    state.message = text;
    if (status) state.status = status;
  };
  const fail = (text) => {
    say(text, "failed");
    input.disabled = true;
    root.classList.add("ondevice-failed");
  };

  if (!wasmAvailable()) {
    fail(`This browser cannot run WebAssembly, which on-device screening needs: ${instead}.`);
    return state;
  }
  const started = performance.now();
  state.timings.mount_at_ms = started;  // since navigation start
  let scorer;
  try {
    say("Loading the model into this browser...");
    // All at once: the decision metadata, the model, the runtime's module and dicom-parser. The
    // metadata's answer comes first: it says why when the server has no model or no runtime to give.
    const pending = [fetchConfig(base), fetchBytes(`${base}model.onnx`), import(`${base}ort.wasm.min.mjs`),
      loadClassicScript(`${base}dicomParser.min.js`)];
    for (const promise of pending) promise.catch(() => {});  // reported below, once
    const config = await pending[0];
    const [modelBytes, ort, dicomParser] = await Promise.all(pending.slice(1));
    if (modelBytes.length !== config.model.bytes) {
      throw new Error("the model changed on the server while this page loaded it: reload the page");
    }
    state.modelBytes = config.model.bytes;
    state.timings.download_ms = performance.now() - started;
    ort.env.wasm.wasmPaths = base;
    ort.env.wasm.numThreads = 1;  // single-threaded: no SharedArrayBuffer or cross-origin isolation needed
    ort.env.wasm.proxy = false;
    ort.env.logLevel = "error";
    const sessionStarted = performance.now();
    const session = await ort.InferenceSession.create(modelBytes,
      { executionProviders: ["wasm"], graphOptimizationLevel: "all" });
    scorer = new Scorer(ort, session, config, dicomParser);
    await scorer.run(new Uint8Array(config.decision.input_size ** 2));  // warm-up: the first run allocates
    state.timings.session_ms = performance.now() - sessionStarted;
  } catch (error) {
    const reason = (error && error.message) || String(error);
    fail(`The model could not be loaded on this device (${reason}): ${instead}.`);
    return state;
  }
  state.timings.ready_ms = performance.now() - started;
  state.scorer = scorer;
  const fields = scorer.config.record_fields;
  state.score = (bytes, name = "image") => scorer.score(name, bytes).then((result) => publicResult(result, fields));
  // The model's input as this page prepares it (for the tests that compare it with the server's): the decoded
  // image, and the input made from it, put back upright first from `orientation` (default: upright).
  state.preprocess = async (bytes, orientation = 0) => {
    const env = { limits: scorer.config.limits, checks: scorer.config.checks, dicomParser: scorer.dicomParser,
      browserDecode: decodeWithBrowser };
    const decoded = await decodeGreyscale(bytes, env);
    const size = scorer.decision.input_size;
    const image = orientation ? rules.upright(decoded.grey, decoded.width, decoded.height, orientation,
      scorer.words.orientations.length / 2) : decoded;
    return { width: decoded.width, height: decoded.height, spread: decoded.spread, grey: Array.from(decoded.grey),
      input: Array.from(resizeUint8(image.grey, image.width, image.height, size, size)) };
  };
  input.disabled = false;
  say(`Ready: ${scorer.decision.model_name} version ${scorer.decision.model_version ?? "(unregistered)"} runs in ` +
    `this browser (${(state.modelBytes / 1e6).toFixed(1)} MB). Images stay on this device.`, "ready");

  const labelBox = $("ondevice-label");
  const canvas = $("ondevice-heatmap");
  const summary = $("ondevice-summary");
  const table = $("ondevice-results");
  const timing = $("ondevice-timing");
  const resultBox = $("ondevice-result");
  const words = scorer.config.words;
  pointApiLinks(root, base, scorer.config.api_docs);

  async function handle(files) {
    files = Array.from(files || []);
    if (!files.length) return;
    const limit = scorer.config.limits.max_files;
    state.status = "scoring";
    say(`Scoring ${files.length} file${files.length !== 1 ? "s" : ""} on this device...`);
    const began = performance.now();
    const results = [];
    try {
      for (const file of files.slice(0, limit)) {
        let result;
        try {
          result = await scorer.score(file.name, new Uint8Array(await file.arrayBuffer()));
        } catch (error) {
          result = refused(file.name, scorer.decision.threshold,
            `could not be scored on this device (${(error && error.message) || error}): ${instead}`);
        }
        results.push(result);
      }
      for (const file of files.slice(limit)) {
        results.push(refused(file.name, scorer.decision.threshold, words.too_many_files));
      }
      const first = results.find((r) => r.probability_pneumonia !== null) || null;
      labelBox.textContent = first ? decisionText(first, words) +
        (first.note ? ` (${first.note})` : "") : "";
      if (first) {
        const image = scorer.render(first);
        canvas.width = image.width;
        canvas.height = image.height;
        canvas.getContext("2d").putImageData(image, 0, 0);
        canvas.hidden = false;
      } else {
        canvas.hidden = true;
      }
      summary.replaceChildren(...statusText(results, first ? first.name : null, words).map((line) => {
        const p = document.createElement("p");
        p.textContent = line;
        return p;
      }));
      const body = table.querySelector("tbody");
      const headers = Array.from(table.querySelectorAll("thead th"), (th) => th.textContent.trim());
      const shown = [words.percent_floor, words.percent_ceiling];
      body.replaceChildren(...results.map((r) => {
        const row = document.createElement("tr");
        const scoredRow = r.probability_pneumonia !== null;
        // The note column: how the X-ray was put upright, or why it was refused and what to do next.
        const note = [r.note, refusalText(r.error, words)].filter(Boolean).join("; ");
        const cells = [r.name, scoredRow ? rules.percent(r.probability_pneumonia, ...shown) : "", r.label || words.not_scored,
          r.triage || "", r.subtype || "", scoredRow ? rules.percent(r.probability_viral, ...shown) : "", note];
        cells.forEach((cell, index) => {
          const td = document.createElement("td");
          td.textContent = cell;
          td.dataset.label = headers[index];
          row.appendChild(td);
        });
        return row;
      }));
      table.hidden = false;
      const elapsed = performance.now() - began;
      const model = results.filter((r) => r.timings).map((r) => r.timings.model_ms);
      timing.textContent = `Scored in ${elapsed.toFixed(0)} ms on this device` +
        (model.length ? ` (model ${model.map((t) => t.toFixed(0)).join(", ")} ms).` : ".");
      state.results = results.map((result) => publicResult(result, fields));
      state.timings.last_ms = elapsed;
      state.timings.result_at_ms = performance.now();  // since navigation start
      state.status = "done";
      say("Done: the images were read and scored in this browser; nothing was uploaded.");
      // The result, not the file picker, is what the visitor wants to see now (on a phone it is below the fold).
      resultBox.scrollIntoView({ block: "start" });
      resultBox.focus({ preventScroll: true });
    } catch (error) {
      state.status = "failed";
      say(`Scoring failed on this device (${(error && error.message) || error}): ${instead}.`);
    }
    state.batches += 1;
  }

  input.addEventListener("change", () => {
    const files = Array.from(input.files || []);
    input.value = "";  // choosing the same file again scores it again
    handle(files);
  });
  if (drop) {
    drop.addEventListener("dragover", (event) => event.preventDefault());
    drop.addEventListener("drop", (event) => {
      event.preventDefault();
      handle(event.dataTransfer && event.dataTransfer.files);
    });
  }
  return state;
}
