"""Benchmark the app's serving path and start-up; prints a Markdown table and writes JSON.

    python benchmarks/app_benchmark.py [--model-uri URI] [--output results.json]

Measures, for one image at a time (the example PNGs):
- predict latency through `Predictor.probability_of` (decode + preprocess + the model in ONNX Runtime), the path the
  app uses, against the naive path (decode + preprocess + `model.predict(x)` on every upload);
- Grad-CAM latency (heatmap + overlay, image already decoded);
- `python app.py` time to ready (start to the first HTTP 200), its resident memory, and one request
  through the `/predict` endpoint.

Default model: the production alias in the project's MLflow store; an exported folder works too. Nothing
is trained. Run it on an otherwise idle machine: numbers taken beside a training run mean little.
"""

from __future__ import annotations

import argparse
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

from pipeline.imaging import decode_greyscale, to_model_input
from pipeline.registry import load_serving_model, production_uri
from pipeline.serving import Predictor

ROOT = Path(__file__).resolve().parent.parent
APP = ROOT / "app.py"
EXAMPLES = sorted((ROOT / "examples").glob("*.png"))

TARGET_PREDICT_P50_MS = 5.0
TARGET_SPEEDUP = 10.0
TARGET_READY_S = 8.0
READY_TIMEOUT_S = 180.0


def percentiles(samples_s: list[float]) -> dict[str, float]:
    ms = np.asarray(samples_s) * 1000.0
    return {"p50_ms": float(np.percentile(ms, 50)), "p95_ms": float(np.percentile(ms, 95)),
            "mean_ms": float(ms.mean()), "n": len(samples_s)}


def time_calls(call: Callable[[bytes], Any], inputs: list[Any], repeats: int, warmup: int) -> list[float]:
    for index in range(warmup):
        call(inputs[index % len(inputs)])
    samples = []
    for index in range(repeats):
        item = inputs[index % len(inputs)]
        started = time.perf_counter()
        call(item)
        samples.append(time.perf_counter() - started)
    return samples


def latency(model_uri: str, repeats: int, naive_repeats: int) -> dict[str, Any]:
    from pipeline.gradcam import GradCam, overlay

    started = time.perf_counter()
    serving = load_serving_model(model_uri)
    load_s = time.perf_counter() - started
    predictor = Predictor(serving)
    model, size = serving.keras_model, serving.input_size
    uploads = [path.read_bytes() for path in EXAMPLES]

    def naive(data: bytes) -> float:
        x = to_model_input(decode_greyscale(data), size)[np.newaxis]
        return float(model.predict(x, verbose=0)[0, 0])

    ours = time_calls(predictor.probability_of, uploads, repeats, warmup=5)
    slow = time_calls(naive, uploads, naive_repeats, warmup=2)
    explainer = GradCam(model)
    greys = [decode_greyscale(data) for data in uploads]
    cams = time_calls(lambda grey: overlay(grey, explainer.heatmap(grey)), greys, repeats, warmup=3)
    # Both paths must agree, or the comparison is meaningless.
    agree = max(abs(predictor.probability_of(data) - naive(data)) for data in uploads)
    return {
        "model_load_s": load_s,
        "input_size": size,
        "predictor": percentiles(ours),
        "naive_model_predict": percentiles(slow),
        "gradcam": percentiles(cams),
        "max_abs_difference_between_paths": agree,
    }


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def resident_mb(pid: int) -> float | None:
    try:
        import psutil
    except ImportError:
        status = Path(f"/proc/{pid}/status")
        for line in status.read_text().splitlines() if status.exists() else []:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
        return None
    process = psutil.Process(pid)
    return sum(p.memory_info().rss for p in [process, *process.children(recursive=True)]) / 2**20


def app_start(model_uri: str) -> dict[str, Any]:
    """Start `python app.py` cold, wait for HTTP 200, measure memory and one /predict call, stop it."""
    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "TF_CPP_MIN_LOG_LEVEL": "2",
           "MLFLOW_DISABLE_TELEMETRY": "true"}
    command = [sys.executable, str(APP), "--model-uri", model_uri, "--host", "127.0.0.1", "--port", str(port)]
    with tempfile.TemporaryFile() as log:  # a file, not a pipe: a full pipe would stall the app
        started = time.perf_counter()
        process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True)  # its own process group, stopped as one below
        try:
            ready_s = wait_until_ready(url, process, started)
            if ready_s is None:
                log.seek(0)
                output = log.read().decode(errors="replace")[-2000:]
                raise RuntimeError(f"app did not answer on {url} within {READY_TIMEOUT_S:.0f} s:\n{output}")
            rss_ready = resident_mb(process.pid)
            first_request_s = first_prediction(url)
            return {"ready_s": ready_s, "rss_ready_mb": rss_ready, "first_predict_request_s": first_request_s,
                    "rss_after_request_mb": resident_mb(process.pid)}
        finally:
            stop(process)


def wait_until_ready(url: str, process: subprocess.Popen, started: float) -> float | None:
    """Seconds from `started` to the first HTTP 200, or None if the app died or never answered.

    One client for all polls: `httpx.get` builds a new client (and SSL context) per call, which on two
    cores takes enough CPU from the starting app to add about a second to what is measured.
    """
    import httpx

    with httpx.Client(timeout=1.0) as client:
        while time.perf_counter() - started < READY_TIMEOUT_S and process.poll() is None:
            try:
                if client.get(url).status_code == 200:
                    return time.perf_counter() - started
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
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


def verdict(ok: bool) -> str:
    return "yes" if ok else "**no**"


def row(*cells: str) -> str:
    return "| " + " | ".join(cells) + " |"


def markdown(result: dict[str, Any]) -> str:
    lat, starts = result["latency"], result["app_start"]
    ours, naive, cam = lat["predictor"], lat["naive_model_predict"], lat["gradcam"]
    speedup = result["speedup_p50"]
    ready = statistics.median(run["ready_s"] for run in starts)
    slowest = max(run["ready_s"] for run in starts)
    rss = [run["rss_ready_mb"] for run in starts if run["rss_ready_mb"] is not None]
    first = statistics.median(run["first_predict_request_s"] for run in starts)
    rows = [
        row("measurement", "p50", "p95", "target", "met"),
        row("---", "---", "---", "---", "---"),
        row("predict, `Predictor` path (decode + preprocess + ONNX Runtime)", f"{ours['p50_ms']:.2f} ms",
            f"{ours['p95_ms']:.2f} ms", f"p50 < {TARGET_PREDICT_P50_MS:.0f} ms",
            verdict(ours["p50_ms"] < TARGET_PREDICT_P50_MS)),
        row("predict, naive `model.predict(x)` per upload", f"{naive['p50_ms']:.2f} ms",
            f"{naive['p95_ms']:.2f} ms", "", ""),
        row("speed-up (naive p50 / `Predictor` p50)", f"{speedup:.1f}x", "", f">= {TARGET_SPEEDUP:.0f}x",
            verdict(speedup >= TARGET_SPEEDUP)),
        row("Grad-CAM (heatmap + overlay)", f"{cam['p50_ms']:.2f} ms", f"{cam['p95_ms']:.2f} ms", "", ""),
        row(f"`python app.py` time to ready (median of {len(starts)}; max in p95 column)", f"{ready:.2f} s",
            f"{slowest:.2f} s", f"< {TARGET_READY_S:.0f} s", verdict(ready < TARGET_READY_S)),
        row("app resident memory when ready", f"{statistics.median(rss):.0f} MB" if rss else "n/a", "", "", ""),
        row("first `/predict` request over HTTP (upload, score, Grad-CAM)", f"{first * 1000:.0f} ms", "", "", ""),
    ]
    notes = (f"\nModel `{result['model_uri']}` (input {lat['input_size']} px); {ours['n']} timed calls per "
             f"path ({naive['n']} naive); paths agree to {lat['max_abs_difference_between_paths']:.1e}; "
             f"{result['machine']['cpus']} CPUs, TensorFlow {result['machine']['tensorflow']}.")
    return "\n".join(rows) + notes


def machine() -> dict[str, Any]:
    import tensorflow as tf

    return {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
            "tensorflow": tf.__version__}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-uri", default=None,
                        help="models:/NAME@ALIAS, models:/NAME/VERSION or an exported folder "
                             "(default: the production alias)")
    parser.add_argument("--output", type=Path, default=None, help="JSON file to write")
    parser.add_argument("--repeats", type=int, default=300, help="timed calls per fast path")
    parser.add_argument("--naive-repeats", type=int, default=40, help="timed calls of model.predict")
    parser.add_argument("--startup-runs", type=int, default=3, help="cold starts of app.py to time")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    uri = args.model_uri or production_uri()
    if not EXAMPLES:
        raise SystemExit("no example images in examples/")
    # Cold starts first, while this process has not loaded TensorFlow and competes for nothing.
    starts = [app_start(uri) for _ in range(args.startup_runs)]
    lat = latency(uri, args.repeats, args.naive_repeats)
    result = {
        "model_uri": uri,
        "machine": machine(),
        "latency": lat,
        "speedup_p50": lat["naive_model_predict"]["p50_ms"] / lat["predictor"]["p50_ms"],
        "app_start": starts,
        "targets": {"predict_p50_ms": TARGET_PREDICT_P50_MS, "speedup": TARGET_SPEEDUP,
                    "ready_s": TARGET_READY_S},
    }
    print(markdown(result))
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
