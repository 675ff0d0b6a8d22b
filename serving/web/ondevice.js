// The "On this device" page: the production model runs in this browser (ONNX Runtime Web, WebAssembly,
// one thread) and the image never leaves it. The page fetches three things from its own server, once:
// the decision metadata (config.json), the ONNX serving artefact (model.onnx) and the runtime (ONNX
// Runtime's module and .wasm, dicom-parser). Files are read with the File API and scored in memory: no
// request carries an image, its name or anything derived from it.

import { ImageDecodeError, formatG, heatmap, implausibility, overlay, resizeUint8, roundHalfEven } from "./imaging.js";
import { decodeGreyscale, decodeWithBrowser } from "./decode.js";

const SERVER_PAGE = "use the “On the server” page instead";
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

const percent = (value) => `${(100 * value).toFixed(1)}%`;

class Scorer {
  constructor(ort, session, config, dicomParser) {
    this.ort = ort;
    this.session = session;
    this.config = config;
    this.decision = config.decision;
    this.dicomParser = dicomParser;
    const wanted = [config.tensors.probability, config.tensors.cam];
    if (this.decision.ood && Object.keys(this.decision.ood).length) wanted.push(config.tensors.ood);
    const missing = wanted.filter((name) => !session.outputNames.includes(name));
    if (missing.length) throw new Error(`the model lacks the outputs ${missing.join(", ")}`);
    this.outputs = wanted;
  }

  /** uint8 S x S pixels -> {probability, cam: {data, height, width}, ood}. */
  async run(pixels) {
    const size = this.decision.input_size;
    const input = new this.ort.Tensor("float32", Float32Array.from(pixels), [1, size, size, 1]);
    const results = await this.session.run({ [this.config.tensors.input]: input }, this.outputs);
    const cam = results[this.config.tensors.cam];
    const ood = results[this.config.tensors.ood];
    const scored = {
      probability: results[this.config.tensors.probability].data[0],
      cam: { data: Float32Array.from(cam.data), height: cam.dims[1], width: cam.dims[2] },
      ood: ood ? ood.data[0] : null,
    };
    for (const tensor of Object.values(results)) if (tensor.dispose) tensor.dispose();
    state.runs += 1;
    return scored;
  }

  /** One file's bytes -> a result like the server's Prediction (probability and label, or an error). */
  async score(name, bytes) {
    const started = performance.now();
    const threshold = this.decision.threshold;
    const env = { limits: this.config.limits, checks: this.config.checks, dicomParser: this.dicomParser,
      browserDecode: decodeWithBrowser };
    let decoded;
    try {
      decoded = await decodeGreyscale(bytes, env);
      const problem = implausibility(decoded.grey, decoded.width, decoded.height, decoded.spread, this.config.checks);
      if (problem) return { name, probability: null, label: null, threshold, error: problem };
    } catch (error) {
      if (error instanceof ImageDecodeError) return { name, probability: null, label: null, threshold, error: error.message };
      throw error;
    }
    const size = this.decision.input_size;
    const decodedAt = performance.now();
    const pixels = resizeUint8(decoded.grey, decoded.width, decoded.height, size, size);
    const scored = await this.run(pixels);
    const finished = performance.now();
    const limit = this.decision.ood && this.decision.ood.limit !== undefined ? Number(this.decision.ood.limit) : null;
    if (limit !== null && scored.ood !== null && scored.ood > limit) {
      return { name, probability: null, label: null, threshold, ood: scored.ood,
        error: `not recognised as a frontal paediatric chest X-ray (score ${formatG(scored.ood, 3)}, ` +
          `limit ${formatG(limit, 3)}): not scored` };
    }
    const probability = scored.probability;
    const label = this.decision.class_names[probability >= threshold ? 1 : 0];
    return { name, probability, label, threshold, error: null, ood: scored.ood, grey: decoded.grey,
      width: decoded.width, height: decoded.height, cam: scored.cam,
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

function publicResult(result) {
  // What the page keeps and exposes: never the pixels.
  const { name, probability, label, threshold, error, ood, timings } = result;
  return { name, probability, label, threshold, error, ood: ood ?? null, timings: timings || null };
}

function statusText(results, shown) {
  const scored = results.filter((r) => r.probability !== null).length;
  const lines = [`Scored ${scored} of ${results.length} file${results.length !== 1 ? "s" : ""} on this device.`];
  if (shown !== null && results.length > 1) lines.push(`The result and map above are for ${shown}; the table lists every file.`);
  for (const r of results) if (r.probability === null) lines.push(`${r.name}: ${r.error}`);
  return lines;
}

export async function mount(root, base) {
  if (root.dataset.mounted) return state;
  root.dataset.mounted = "1";
  window.pneumoniaOnDevice = state;
  const $ = (id) => root.querySelector(`#${id}`);
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
    fail(`This browser cannot run WebAssembly, which on-device screening needs: ${SERVER_PAGE}.`);
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
    fail(`The model could not be loaded on this device (${reason}): ${SERVER_PAGE}.`);
    return state;
  }
  state.timings.ready_ms = performance.now() - started;
  state.scorer = scorer;
  state.score = (bytes, name = "image") => scorer.score(name, bytes).then(publicResult);
  // The model's input as this page prepares it (for the tests that compare it with the server's).
  state.preprocess = async (bytes) => {
    const env = { limits: scorer.config.limits, checks: scorer.config.checks, dicomParser: scorer.dicomParser,
      browserDecode: decodeWithBrowser };
    const decoded = await decodeGreyscale(bytes, env);
    const size = scorer.decision.input_size;
    return { width: decoded.width, height: decoded.height, spread: decoded.spread, grey: Array.from(decoded.grey),
      input: Array.from(resizeUint8(decoded.grey, decoded.width, decoded.height, size, size)) };
  };
  input.disabled = false;
  say(`Ready: ${scorer.decision.model_name} version ${scorer.decision.model_version ?? "(unregistered)"} runs in ` +
    `this browser (${(state.modelBytes / 1e6).toFixed(1)} MB). Images stay on this device.`, "ready");

  const labelBox = $("ondevice-label");
  const canvas = $("ondevice-heatmap");
  const summary = $("ondevice-summary");
  const table = $("ondevice-results");
  const timing = $("ondevice-timing");

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
          result = { name: file.name, probability: null, label: null, threshold: scorer.decision.threshold,
            error: `could not be scored on this device (${(error && error.message) || error}): ${SERVER_PAGE}` };
        }
        results.push(result);
      }
      for (const file of files.slice(limit)) {
        results.push({ name: file.name, probability: null, label: null, threshold: scorer.decision.threshold,
          error: `not scored: at most ${limit} files per request` });
      }
      const first = results.find((r) => r.probability !== null) || null;
      labelBox.textContent = first ? `${first.label}: probability of pneumonia ${percent(first.probability)}, ` +
        `threshold ${percent(first.threshold)}` : "";
      if (first) {
        const image = scorer.render(first);
        canvas.width = image.width;
        canvas.height = image.height;
        canvas.getContext("2d").putImageData(image, 0, 0);
        canvas.hidden = false;
      } else {
        canvas.hidden = true;
      }
      summary.replaceChildren(...statusText(results, first ? first.name : null).map((line) => {
        const p = document.createElement("p");
        p.textContent = line;
        return p;
      }));
      const body = table.querySelector("tbody");
      body.replaceChildren(...results.map((r) => {
        const row = document.createElement("tr");
        for (const cell of [r.name, r.probability === null ? "" : r.probability.toFixed(4), r.label || "", r.error || ""]) {
          const td = document.createElement("td");
          td.textContent = cell;
          row.appendChild(td);
        }
        return row;
      }));
      table.hidden = false;
      const elapsed = performance.now() - began;
      const model = results.filter((r) => r.timings).map((r) => r.timings.model_ms);
      timing.textContent = `Scored in ${elapsed.toFixed(0)} ms on this device` +
        (model.length ? ` (model ${model.map((t) => t.toFixed(0)).join(", ")} ms).` : ".");
      state.results = results.map(publicResult);
      state.timings.last_ms = elapsed;
      state.timings.result_at_ms = performance.now();  // since navigation start
      state.status = "done";
      say("Done: the images were read and scored in this browser; nothing was uploaded.");
    } catch (error) {
      state.status = "failed";
      say(`Scoring failed on this device (${(error && error.message) || error}): ${SERVER_PAGE}.`);
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
