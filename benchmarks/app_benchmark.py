"""Benchmark the serving path: one image at a time, the app's start-up, and `mlflow models serve`.

    python benchmarks/app_benchmark.py [--model-uri URI] [--keras-model models/model.keras] [--output results.json]

Measures, in one run, on the same images (the example PNGs):
- predict (decode + checks + the ONNX artefact) and predict + heatmap (the CAM the artefact returns,
  upsampled and blended: what the app computes per upload, before PNG encoding);
- the naive path as the ratio's reference: decode + `keras_model.predict(x)` per upload;
- `python app.py` time to ready (start to the first HTTP 200), its resident memory and whether TensorFlow
  is mapped in it, and one `/predict` request;
- `mlflow models serve` on the registered model: images/s with 32-image base64 requests (skipped for an
  exported folder, which is not an MLflow model).

Run it on an otherwise idle machine: numbers taken beside a training run mean little.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from scoring.imaging import decode_greyscale, resize_grey
from scoring.locations import production_uri
from scoring.runtime import Predictor
from scoring.store import load_artefact, model_uri_help
from serving.overlay import heatmap, overlay

ROOT = Path(__file__).resolve().parent.parent
APP = ROOT / "app.py"
EXAMPLES = sorted((ROOT / "examples").glob("*.png"))

# Issue targets: predict + heatmap <= 10 ms (model quality III); ready <= 3.0 s and <= 350 MB after a first
# predict, serving the registry's production alias (scoring core).
TARGETS = {"predict_and_heatmap_p50_ms": 10.0, "ready_s": 3.0, "rss_after_request_mb": 350.0,
           "serve_images_per_s": 200.0}
READY_TIMEOUT_S = 180.0
SERVE_BATCH = 32


def percentiles(samples_s: list[float]) -> dict[str, float]:
    ms = np.asarray(samples_s) * 1000.0
    return {"p50_ms": float(np.percentile(ms, 50)), "p95_ms": float(np.percentile(ms, 95)),
            "mean_ms": float(ms.mean()), "n": len(samples_s)}


def time_calls(call: Callable[[Any], Any], inputs: list[Any], repeats: int, warmup: int) -> list[float]:
    for index in range(warmup):
        call(inputs[index % len(inputs)])
    samples = []
    for index in range(repeats):
        item = inputs[index % len(inputs)]
        started = time.perf_counter()
        call(item)
        samples.append(time.perf_counter() - started)
    return samples


def latency(model_uri: str, keras_path: Path | None, repeats: int, naive_repeats: int) -> dict[str, Any]:
    predictor = Predictor(load_artefact(model_uri))
    decision = predictor.decision
    uploads = [(path.name, path.read_bytes()) for path in EXAMPLES]

    def predict(item: tuple[str, bytes]) -> float | None:
        return predictor.predict([item])[0].probability

    def predict_and_heatmap(item: tuple[str, bytes]) -> np.ndarray:
        result = predictor.predict([item], with_cam=True)[0]
        towards = result.label == decision.class_names[1]
        return overlay(result.grey, heatmap(result.cam, result.grey.shape, towards, decision.crop))

    result = {"input_size": decision.input_size, "model": f"{decision.model_name} v{decision.model_version}",
              "predict": percentiles(time_calls(predict, uploads, repeats, warmup=10)),
              "predict_and_heatmap": percentiles(time_calls(predict_and_heatmap, uploads, repeats, warmup=10))}
    if keras_path is not None and keras_path.is_file():
        result.update(naive(keras_path, predictor, uploads, naive_repeats))
    return result


def naive(keras_path: Path, predictor: Predictor, uploads: list[tuple[str, bytes]], repeats: int) -> dict[str, Any]:
    """What typical pneumonia web apps do: `model.predict` on every upload (raw, uncalibrated sigmoid)."""
    import keras

    model = keras.models.load_model(keras_path, compile=False, safe_mode=True)
    size = int(model.input_shape[1])

    def call(item: tuple[str, bytes]) -> float:
        x = resize_grey(decode_greyscale(item[1]), size).astype(np.float32)[np.newaxis, ..., np.newaxis]
        return float(model.predict(x, verbose=0)["pneumonia"][0, 0])

    samples = time_calls(call, uploads, repeats, warmup=2)
    # Same network: the calibrated artefact's ranking must match the raw Keras one.
    ours = [predictor.predict([item])[0].probability for item in uploads]
    theirs = [call(item) for item in uploads]
    return {"naive_model_predict": percentiles(samples), "same_ranking": bool(np.argsort(ours).tolist() ==
                                                                             np.argsort(theirs).tolist())}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def resident_mb(pid: int) -> float | None:
    status = Path(f"/proc/{pid}/status")
    for line in status.read_text().splitlines() if status.exists() else []:
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024.0
    return None


def maps_tensorflow(pid: int) -> bool | None:
    maps = Path(f"/proc/{pid}/maps")
    return "tensorflow" in maps.read_text().lower() if maps.exists() else None


def app_start(model_uri: str) -> dict[str, Any]:
    """Start `python app.py` cold, wait for HTTP 200, measure memory and one /predict call, stop it."""
    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "MLFLOW_DISABLE_TELEMETRY": "true"}
    command = [sys.executable, str(APP), "--model-uri", model_uri, "--host", "127.0.0.1", "--port", str(port)]
    with tempfile.TemporaryFile() as log:  # a file, not a pipe: a full pipe would stall the app
        started = time.perf_counter()
        process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True)
        try:
            ready_s = wait_until_ready(url, process, started)
            if ready_s is None:
                log.seek(0)
                raise RuntimeError(f"app did not answer on {url}:\n{log.read().decode(errors='replace')[-2000:]}")
            rss_ready = resident_mb(process.pid)
            first_request_s = first_prediction(url)
            return {"ready_s": ready_s, "rss_ready_mb": rss_ready, "first_predict_request_s": first_request_s,
                    "rss_after_request_mb": resident_mb(process.pid), "tensorflow_mapped": maps_tensorflow(process.pid)}
        finally:
            stop(process)


def wait_until_ready(url: str, process: subprocess.Popen, started: float) -> float | None:
    """Seconds from `started` to the first HTTP 200 (one client for all polls: building one per poll takes
    CPU from the starting app), or None if the app died or never answered."""
    import httpx

    with httpx.Client(timeout=1.0) as client:
        while time.perf_counter() - started < READY_TIMEOUT_S and process.poll() is None:
            try:
                if client.get(url).status_code == 200:
                    return time.perf_counter() - started
            except httpx.HTTPError:
                pass
            time.sleep(0.02)
    return None


def first_prediction(url: str) -> float:
    from gradio_client import Client, handle_file

    client = Client(url, verbose=False, analytics_enabled=False)
    started = time.perf_counter()
    client.predict(handle_file(str(EXAMPLES[0])), api_name="/predict")
    return time.perf_counter() - started


def stop(process: subprocess.Popen) -> None:
    if process.poll() is not None:
        return
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def serve_throughput(model_uri: str, requests: int) -> dict[str, Any]:
    """`mlflow models serve` (one worker, local environment): images/s with 32-image requests."""
    import httpx

    port = free_port()
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    command = [str(Path(sys.executable).parent / "mlflow"), "models", "serve", "-m", model_uri,
               "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port), "--workers", "1"]
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        if wait_until_ready(f"{url}/ping", process, time.perf_counter()) is None:
            raise RuntimeError("mlflow models serve did not start")
        files = [base64.b64encode(path.read_bytes()).decode() for path in EXAMPLES]
        body = {"dataframe_records": [{"image": files[i % len(files)]} for i in range(SERVE_BATCH)]}
        with httpx.Client(timeout=60) as client:
            for _ in range(3):
                client.post(f"{url}/invocations", json=body).raise_for_status()
            started = time.perf_counter()
            for _ in range(requests):
                answer = client.post(f"{url}/invocations", json=body)
                answer.raise_for_status()
            wall = time.perf_counter() - started
        assert len(answer.json()["predictions"]) == SERVE_BATCH
    finally:
        stop(process)
    return {"requests": requests, "images_per_request": SERVE_BATCH, "seconds": wall,
            "images_per_s": requests * SERVE_BATCH / wall}


def verdict(ok: bool) -> str:
    return "yes" if ok else "**no**"


def row(*cells: str) -> str:
    return "| " + " | ".join(cells) + " |"


def markdown(result: dict[str, Any]) -> str:
    lat, starts = result["latency"], result["app_start"]
    both = lat["predict_and_heatmap"]
    ready = statistics.median(run["ready_s"] for run in starts)
    rss = statistics.median(run["rss_ready_mb"] for run in starts)
    rss_after = statistics.median(run["rss_after_request_mb"] for run in starts)
    rows = [row("measurement", "p50", "p95", "target", "met"), row("---", "---", "---", "---", "---"),
            row("predict (decode, checks, ONNX artefact)", f"{lat['predict']['p50_ms']:.2f} ms",
                f"{lat['predict']['p95_ms']:.2f} ms", "", ""),
            row("predict + heatmap", f"{both['p50_ms']:.2f} ms", f"{both['p95_ms']:.2f} ms",
                f"<= {TARGETS['predict_and_heatmap_p50_ms']} ms",
                verdict(both["p50_ms"] <= TARGETS["predict_and_heatmap_p50_ms"]))]
    if "naive_model_predict" in lat:
        naive_p50 = lat["naive_model_predict"]["p50_ms"]
        rows += [row("naive `model.predict(x)` per upload (reference)", f"{naive_p50:.2f} ms",
                     f"{lat['naive_model_predict']['p95_ms']:.2f} ms", "", ""),
                 row("speed-up, naive / predict + heatmap", f"{naive_p50 / both['p50_ms']:.1f}x", "", "", "")]
    rows += [row(f"`python app.py` ready (median of {len(starts)}; max in p95 column)", f"{ready:.2f} s",
                 f"{max(run['ready_s'] for run in starts):.2f} s", f"<= {TARGETS['ready_s']} s",
                 verdict(ready <= TARGETS["ready_s"])),
             row("app resident memory when ready", f"{rss:.0f} MB", "", "", ""),
             row("app resident memory after a first predict", f"{rss_after:.0f} MB", "",
                 f"<= {TARGETS['rss_after_request_mb']:.0f} MB", verdict(rss_after <= TARGETS["rss_after_request_mb"])),
             row("TensorFlow mapped in the app process", str(any(run["tensorflow_mapped"] for run in starts)),
                 "", "False", verdict(not any(run["tensorflow_mapped"] for run in starts))),
             row("first `/predict` over HTTP (upload, score, heatmap)",
                 f"{statistics.median(run['first_predict_request_s'] for run in starts) * 1000:.0f} ms", "", "", "")]
    if result.get("serve"):
        serve = result["serve"]
        rows.append(row(f"`mlflow models serve`, {SERVE_BATCH}-image requests", f"{serve['images_per_s']:.0f} images/s",
                        "", f">= {TARGETS['serve_images_per_s']:.0f} images/s",
                        verdict(serve["images_per_s"] >= TARGETS["serve_images_per_s"])))
    notes = (f"\nModel `{result['model_uri']}` ({lat['model']}, input {lat['input_size']} px); "
             f"{lat['predict']['n']} timed calls per path; {result['machine']['cpus']} CPUs.")
    return "\n".join(rows) + notes


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-uri", default=None, help=model_uri_help())
    parser.add_argument("--keras-model", type=Path, default=ROOT / "models" / "model.keras",
                        help="the Keras model for the naive reference (skipped if absent)")
    parser.add_argument("--output", type=Path, default=None, help="JSON file to write")
    parser.add_argument("--repeats", type=int, default=500, help="timed calls per fast path")
    parser.add_argument("--naive-repeats", type=int, default=40, help="timed calls of model.predict")
    parser.add_argument("--startup-runs", type=int, default=5, help="cold starts of app.py to time")
    parser.add_argument("--serve-requests", type=int, default=30, help="32-image requests to mlflow models serve")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    uri = args.model_uri or production_uri()
    # Cold starts first, while this process competes for nothing.
    starts = [app_start(uri) for _ in range(args.startup_runs)]
    serve = serve_throughput(uri, args.serve_requests) if uri.startswith("models:/") else None
    result = {"model_uri": uri, "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                                            "python": platform.python_version()},
              "latency": latency(uri, args.keras_model, args.repeats, args.naive_repeats),
              "app_start": starts, "serve": serve, "targets": TARGETS}
    print(markdown(result))
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
