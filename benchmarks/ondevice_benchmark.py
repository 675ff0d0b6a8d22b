"""Benchmark on-device screening: the production model in headless Chromium (ONNX Runtime Web, WebAssembly,
one thread), driven by Playwright against the app's "On this device" page.

    python benchmarks/ondevice_benchmark.py [--model-uri URI] [--repeats 60] [--cold-loads 3]
                                            [--output benchmarks/ondevice-results.json]

Measures, on the model the app would serve (default: a `model/` export beside app.py, else
models/serving.onnx, else the registry's production alias):
- in-page scoring of a 224 x 224 PNG: file bytes -> decode, checks, resize, ONNX Runtime Web -> probability
  (p50, p90; and the model run alone), after one warm-up;
- the first result after the page has loaded: a fresh browser context (empty cache), the `load` event,
  then a file chosen as soon as the page accepts one; the time from `load` to the result on screen;
- what the page downloads: the model's bytes, the runtime's, and what went over the wire;
- parity with the server on the fixture X-rays (tests/fixtures/chest_xray/**/*.jpeg): the labels, and the
  largest difference in probability.

Needs `make web` (the runtime in serving/web/vendor/) and Debian's Chromium at /usr/bin/chromium. Numbers
taken beside a training run are slower than on an idle machine: the load average is recorded with them.
"""

from __future__ import annotations

import argparse
import base64
import gzip
import io
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from serving import ondevice
from serving.settings import MAX_FILES

ROOT = Path(__file__).resolve().parent.parent

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run", "--disable-sync"]
FIXTURES = sorted((ROOT / "tests" / "fixtures" / "chest_xray").rglob("*.jpeg"))
TARGETS = {"scoring_p50_ms": 30.0, "first_result_s": 2.0, "max_probability_difference": 0.01}
TIMEOUT_MS = 120_000

SCORE_LOOP_JS = """
async ([data, repeats]) => {
  const bytes = Uint8Array.from(atob(data), (c) => c.charCodeAt(0));
  const state = window.pneumoniaOnDevice;
  const first = await state.score(bytes, "bench.png");  // warm-up, and the result to report
  const total = [], model = [];
  for (let i = 0; i < repeats; i++) {
    const started = performance.now();
    await state.score(bytes, "bench.png");
    total.push(performance.now() - started);
  }
  const size = state.scorer.decision.input_size;
  const pixels = new Uint8Array(size * size).fill(128);
  for (let i = 0; i < repeats; i++) {
    const started = performance.now();
    await state.scorer.run(pixels);
    model.push(performance.now() - started);
  }
  return {first, total, model};
}
"""


def default_model_uri() -> str | None:
    exported = ROOT / "model" / "model.onnx"
    if exported.is_file():
        return str(exported.parent)
    evaluated = ROOT / "models" / "serving.onnx"
    return str(evaluated) if evaluated.is_file() else None  # None: the registry's production alias


def shown_uri(uri: str | None) -> str:
    """The model's URI as the results record it: relative to the project where it lies inside it."""
    if not uri:
        return "production alias"
    path = Path(uri).resolve()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else uri


def summary(samples_ms: list[float]) -> dict[str, float]:
    values = np.asarray(samples_ms)
    return {"p50_ms": round(float(np.percentile(values, 50)), 2), "p90_ms": round(float(np.percentile(values, 90)), 2),
            "min_ms": round(float(values.min()), 2), "mean_ms": round(float(values.mean()), 2), "n": len(samples_ms)}


def compressed_sizes(path: Path) -> dict[str, int]:
    """What a file would cost over the wire if a proxy compressed it (the app sends these three as they are)."""
    data = path.read_bytes()
    sizes = {"raw": len(data), "gzip_9": len(gzip.compress(data, 9))}
    try:
        import brotli

        sizes["brotli_11"] = len(brotli.compress(data, quality=11))
    except ImportError:
        pass
    return sizes


def image_224() -> bytes:
    with Image.open(FIXTURES[0]) as image:
        small = image.convert("L").resize((224, 224), Image.Resampling.BILINEAR)
    buffer = io.BytesIO()
    small.save(buffer, format="PNG")
    return buffer.getvalue()


def open_page(browser, url: str, responses: list | None = None):
    context = browser.new_context(viewport={"width": 1280, "height": 1400})  # a fresh context: an empty cache
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    if responses is not None:
        page.on("response", lambda response: responses.append(response))
    page.goto(f"{url}{ondevice.PAGE_PATH}", wait_until="load")
    return context, page


def wait_ready(page) -> dict[str, Any]:
    page.wait_for_function("window.pneumoniaOnDevice && ['ready', 'failed'].includes(window.pneumoniaOnDevice.status)")
    state = page.evaluate("({status: window.pneumoniaOnDevice.status, message: window.pneumoniaOnDevice.message,"
                          " timings: window.pneumoniaOnDevice.timings})")
    if state["status"] != "ready":
        raise SystemExit(f"the page did not get ready: {state['message']}")
    return state


def first_result(browser, url: str, image: Path) -> dict[str, Any]:
    """From the `load` event of a fresh page (empty cache) to the first result on screen."""
    responses: list = []
    context, page = open_page(browser, url, responses)
    try:
        page.locator("#ondevice-files:enabled").wait_for()  # as soon as the page accepts a file
        page.locator("#ondevice-files").set_input_files(str(image))
        page.wait_for_function("window.pneumoniaOnDevice.batches > 0")
        measured = page.evaluate("""() => {
          const navigation = performance.getEntriesByType("navigation")[0];
          const state = window.pneumoniaOnDevice;
          return {load_event_ms: navigation.loadEventEnd, result_at_ms: state.timings.result_at_ms,
                  timings: state.timings, result: state.results[0]};
        }""")
        downloads = {}
        for response in responses:
            if "/ondevice/" not in response.url:
                continue
            name = response.url.split("/ondevice/", 1)[1].split("?")[0]
            sizes = response.request.sizes()
            downloads[name] = {"status": response.status, "transferred_bytes": sizes["responseBodySize"],
                               "encoding": response.headers.get("content-encoding", "identity")}
    finally:
        context.close()
    timings = measured["timings"]
    return {"first_result_s": round((measured["result_at_ms"] - measured["load_event_ms"]) / 1000.0, 3),
            "load_to_page_script_s": round((timings["mount_at_ms"] - measured["load_event_ms"]) / 1000.0, 3),
            "page_script_to_ready_s": round(timings["ready_ms"] / 1000.0, 3),
            "ready_to_result_s": round((measured["result_at_ms"] - timings["mount_at_ms"] - timings["ready_ms"])
                                       / 1000.0, 3),
            "download_ms": round(timings["download_ms"], 1),
            "session_and_warm_up_ms": round(timings["session_ms"], 1),
            "probability": measured["result"]["probability"], "downloads": downloads}


def parity(page, predictor, max_files: int) -> dict[str, Any]:
    differences, disagreements, refused = [], [], 0
    for start in range(0, len(FIXTURES), max_files):
        batch = FIXTURES[start:start + max_files]
        done = page.evaluate("window.pneumoniaOnDevice.batches")
        page.locator("#ondevice-files").set_input_files([str(p) for p in batch])
        page.wait_for_function(f"window.pneumoniaOnDevice.batches > {done}")
        device = page.evaluate("window.pneumoniaOnDevice.results")
        server = predictor.predict([(p.name, p.read_bytes()) for p in batch])
        for path, mine, theirs in zip(batch, device, server):
            if theirs.scored != (mine["probability"] is not None) or mine["label"] != theirs.label:
                disagreements.append({"file": path.name, "server": [theirs.probability, theirs.label, theirs.error],
                                      "device": [mine["probability"], mine["label"], mine["error"]]})
            elif theirs.scored:
                differences.append(abs(mine["probability"] - theirs.probability))
            else:
                refused += 1
    return {"images": len(FIXTURES), "compared": len(differences), "refused_by_both": refused,
            "label_disagreements": disagreements,
            "max_abs_probability_difference": float(max(differences)) if differences else None,
            "mean_abs_probability_difference": float(np.mean(differences)) if differences else None}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-uri", default=os.environ.get("PNEUMONIA_MODEL_URI") or default_model_uri())
    parser.add_argument("--repeats", type=int, default=60)
    parser.add_argument("--cold-loads", type=int, default=3)
    parser.add_argument("--output", type=Path, default=ROOT / "benchmarks" / "ondevice-results.json")
    args = parser.parse_args(argv)
    if not ondevice.assets_built():
        raise SystemExit("the on-device runtime is not built: run `make web` first")

    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    sys.path.insert(0, str(ROOT))  # app.py is a script beside the packages, not one of them
    from playwright.sync_api import sync_playwright

    import app

    service = app.ModelService(args.model_uri)
    if not service.ready:
        raise SystemExit(f"no model: {service.problem}")
    decision = service.predictor.decision
    demo = app.create_demo(service)
    demo.launch(prevent_thread_lock=True, server_name="127.0.0.1", server_port=None, quiet=True,
                **ondevice.launch_options(demo))
    url = demo.local_url
    load_before = os.getloadavg()
    started = time.time()
    try:
        with tempfile.TemporaryDirectory() as folder, sync_playwright() as playwright:
            image = Path(folder) / "xray-224.png"
            image.write_bytes(image_224())
            browser = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
            try:
                loads = [first_result(browser, url, image) for _ in range(args.cold_loads)]
                context, page = open_page(browser, url)
                try:
                    ready = wait_ready(page)
                    scored = page.evaluate(SCORE_LOOP_JS, [base64.b64encode(image.read_bytes()).decode(), args.repeats])
                    agreement = parity(page, service.predictor, MAX_FILES)
                finally:
                    context.close()
                chromium_version = browser.version
            finally:
                browser.close()
    finally:
        demo.close()
    load_after = os.getloadavg()

    artefact = Path(service.predictor.artefact.source)
    runtime = {name: (ondevice.VENDOR_DIR / name).stat().st_size for name in ondevice.VENDOR_FILES}
    modules = {name: (ondevice.WEB_DIR / name).stat().st_size for name in ondevice.MODULES}
    scoring, model_only = summary(scored["total"]), summary(scored["model"])
    first_s = [load["first_result_s"] for load in loads]
    results = {
        "what": "on-device screening in headless Chromium (ONNX Runtime Web, WebAssembly, 1 thread)",
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "chromium": chromium_version,
                    "load_average_before": [round(v, 2) for v in load_before],
                    "load_average_after": [round(v, 2) for v in load_after],
                    "note": "load averages above the CPU count mean other work (e.g. a training run) shared the "
                            "cores: the timings are then upper bounds"},
        "runtime_versions": ondevice.runtime_versions(),
        "model": {"uri": shown_uri(args.model_uri), "name": decision.model_name,
                  "version": decision.model_version, "input_size": decision.input_size,
                  "ood_gate": bool(decision.ood), "bytes": artefact.stat().st_size},
        "download": {"model_bytes": artefact.stat().st_size, "runtime_bytes": runtime, "page_module_bytes": modules,
                     "compressed": {"model.onnx": compressed_sizes(artefact),
                                    ondevice.ORT_WASM[1]: compressed_sizes(ondevice.VENDOR_DIR / ondevice.ORT_WASM[1])},
                     "total_bytes": artefact.stat().st_size + sum(runtime.values()) + sum(modules.values()),
                     "first_cold_load": loads[0]["downloads"]},
        "scoring_224px": {"what": "file bytes (224 x 224 PNG) -> decode, checks, resize, model -> probability",
                          **scoring, "model_run_only": model_only, "probability": scored["first"]["probability"]},
        "first_result": {"what": "fresh context (empty cache): page `load` event -> first result on screen",
                         "runs_s": first_s, "median_s": round(statistics.median(first_s), 3),
                         "runs": [{k: v for k, v in load.items() if k != "downloads"} for load in loads]},
        "warm_page_ready_ms": round(ready["timings"]["ready_ms"], 1),
        "parity_with_server": agreement,
        "targets": TARGETS,
        "met": {"scoring_p50_ms": scoring["p50_ms"] <= TARGETS["scoring_p50_ms"],
                "first_result_s": statistics.median(first_s) <= TARGETS["first_result_s"],
                "max_probability_difference": agreement["max_abs_probability_difference"] is not None and
                agreement["max_abs_probability_difference"] <= TARGETS["max_probability_difference"]
                and not agreement["label_disagreements"]},
        "duration_s": round(time.time() - started, 1),
    }
    args.output.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps({key: results[key] for key in ("scoring_224px", "first_result", "met")}, indent=2))
    print(f"model {results['download']['model_bytes']:,} bytes; largest browser-server difference "
          f"{agreement['max_abs_probability_difference']:.2e}; written to {args.output}")
    return results


if __name__ == "__main__":
    main()
